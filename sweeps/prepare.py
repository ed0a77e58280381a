"""Prepare datasets and pretrained weights for every search space of a preset, once per node.

``python -m sweeps.prepare --preset paper --data-root /shared/data`` downloads what the sweeps of
that preset need (torchvision datasets into ``--data-root``, ImageNet weights into
``TORCH_HOME``), so trials only read them. The sweep scripts do the same for their own space
before starting trials; a ``ray up`` cluster runs this in its setup commands on every node.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

import search_spaces
from search_spaces.points import named_points, point_configs
from sweeps.resources import prepare_resources


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweeps.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=search_spaces.PRESETS, default="default")
    parser.add_argument("--data-root", default=None, help="override the preset's data root")
    args = parser.parse_args(argv)
    configs = []
    for info in pkgutil.iter_modules(search_spaces.__path__):
        module = importlib.import_module(f"search_spaces.{info.name}")
        if not hasattr(module, "space"):
            continue
        base = module.base(args.preset)
        if args.data_root:
            base["data_root"] = str(Path(args.data_root).resolve())
        axes = module.space(args.preset)
        if hasattr(module, "target_datasets"):
            axes = {**axes, "dataset": axes.get("dataset", []) + module.target_datasets(args.preset)}
        configs += point_configs(base, axes, named_points(axes))
    ready, missing = prepare_resources(configs, keep_going=True)
    print(f"ready: {', '.join(ready)}")
    for line in missing:  # e.g. Stanford Cars: torchvision cannot download it
        print(f"missing: {line}", file=sys.stderr)
    return 0  # a cluster node must still come up; a sweep that needs a missing item says so


if __name__ == "__main__":
    sys.exit(main())
