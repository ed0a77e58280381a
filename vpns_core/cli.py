"""``python -m vpns_core``: run one trial from the command line and print a summary.

Every :class:`~vpns_core.config.Config` field is a flag (``--pad-size 8``, ``--no-pretrained``,
``--train-subset none``); the config is validated before anything is loaded.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import types
import typing
from pathlib import Path

from .config import Config, ConfigError, check_label_mapping_samples
from .files import CheckpointError, check_file_path, torch_file_problem
from .resources import check_resources


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_optional(kind):
    def parse(text: str):
        if text.lower() in ("none", "null", ""):
            return None
        return _parse_bool(text) if kind is bool else kind(text)
    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vpns_core", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="results/trials/cli", help="trial folder (checkpoint, masks, export)")
    parser.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        if f.name == "tags":
            parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
            continue
        kind = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
            continue
        args = typing.get_args(kind)
        optional = isinstance(kind, types.UnionType) and type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else kind
        parser.add_argument(flag, type=_parse_optional(base) if optional else base, default=default)
    return parser


def config_from_args(ns: argparse.Namespace) -> Config:
    values = {k: v for k, v in vars(ns).items() if k not in ("out", "no_resume", "tag")}
    values["tags"] = dict(t.split("=", 1) for t in ns.tag)
    return Config(**values)


def given_flags(argv: list[str] | None) -> set[str]:
    """The destinations of the flags ``argv`` names (not those left at their defaults)."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def check_paths(ns: argparse.Namespace) -> None:
    """The paths on the command line, before torch is imported: ``--out`` a folder (or one that
    can be made), ``--mask-file`` and ``--source-checkpoint`` files that may be torch files.
    Raises ValueError (``--out``), ConfigError or CheckpointError naming the flag or field."""
    out = Path(ns.out)
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                where = "" if folder == out else f" ({folder} is a file)"
                raise ValueError(f"--out {ns.out}: is a file, not a folder{where}; the trial writes "
                                 f"its folder there (checkpoint.pt, masks.pt, model_export.pt): "
                                 f"give a folder")
            break
    for field in ("mask_file", "source_checkpoint"):
        path = getattr(ns, field)
        if path is None:
            continue
        check_file_path(field, path)
        problem = torch_file_problem(path)
        if problem:
            raise CheckpointError(f"{field}: cannot read {path}: {problem}")


class progress_bar:
    """A progress bar per training epoch (batches, images/s, time left) on ``stream``; None when
    ``stream`` is not a terminal (a log file, a pipe, a Tune trial), so nothing is printed there."""

    def __new__(cls, stream, force: bool = False):
        if not force and not (hasattr(stream, "isatty") and stream.isatty()):
            return None
        return super().__new__(cls)

    def __init__(self, stream, force: bool = False) -> None:
        self.stream = stream
        self.bar = None

    def __call__(self, event: dict) -> None:
        from tqdm import tqdm
        if self.bar is None or event["step"] == 1:
            self.close()
            self.bar = tqdm(total=event["steps"], desc=f"{event['stage']} epoch {event['epoch']}",
                            unit="batch", file=self.stream, leave=False, dynamic_ncols=True)
        self.bar.update(event["step"] - self.bar.n)
        if event["elapsed"] > 0:
            self.bar.set_postfix_str(f"{event['images'] / event['elapsed']:.0f} images/s", refresh=False)
        if event["step"] >= event["steps"]:
            self.bar.refresh()  # the finished count, also when it came within tqdm's mininterval
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        check_paths(ns)
        if "label_mapping_samples" in given_flags(argv):  # asked for: no more than the split has
            check_label_mapping_samples(ns.label_mapping_samples, ns.train_subset)
        cfg = config_from_args(ns)  # plain values first; the registries' checks import torch
        check_resources(cfg)
    except (ConfigError, FileNotFoundError, ValueError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from .train import Trial

    def report(m):
        test = (f"test {m['test_acc_prompt']:.3f} (prompt) / {m['test_acc_noprompt']:.3f} (no prompt) "
                if "test_acc" in m else "")  # the test set is evaluated where a result reads it
        print(f"[{m['stage']} {m['stage_epoch']}] loss {m['train_loss']:.3f} train {m['train_acc']:.3f} "
              f"val {m['val_acc_prompt']:.3f} (prompt) / {m['val_acc_noprompt']:.3f} (no prompt) "
              f"{test}sparsity {m['sparsity']:.3f} {m['epoch_time_s']:.1f}s", flush=True)

    t0 = time.time()
    bar = progress_bar(sys.stderr)
    try:  # the trial's own checks (checkpoint in --out, mask file) come before any compute
        trial = Trial(cfg, Path(ns.out), reporter=report, resume=not ns.no_resume, progress=bar)
    except (ConfigError, FileNotFoundError, ValueError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        result = trial.run()
    finally:
        if bar is not None:
            bar.close()
    summary = {k: v for k, v in result.final.items() if isinstance(v, (int, float, str))}
    summary["total_time_s"] = round(time.time() - t0, 1)
    print(json.dumps(summary, indent=1))
    print(f"artifacts in {result.workdir}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
