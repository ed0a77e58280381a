"""Fingerprint of the tiny trial of every method (and of the main variants): every epoch row's
and the final row's values, less what depends on the clock, and a digest of the exported
weights. Run before and after a change of the core: on one machine the two JSON files must be
equal, bit for bit (``python scripts/fingerprint.py out.json``; compare with ``cmp``)."""
from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import tiny  # noqa: E402  (the suite's tiny task; CPU only)

CLOCK = ("time", "_s", "_ms", "per_s", "latency", "throughput", "memory", "peak", "timing")


def variants():
    from vpns_core.methods import METHODS
    for name in METHODS.names():
        yield name, tiny(method=name, **({"model": "resnet18", "sparsity": 0.5, "max_steps_per_epoch": 1}
                                        if METHODS.get(name).structured else {}))
    yield "vpns 2:4", tiny(pattern="2:4", sparsity=0.5)
    yield "vpns reference", tiny(schedule="reference")
    yield "vpns frozen", tiny(learn_prompt=False, schedule="reference")
    yield "hydra matched", tiny(method="hydra", matched_updates=True, schedule="reference")
    yield "vpns linear head", tiny(head="linear", allocation="layerwise", prune_first=False)


def plain(row: dict) -> dict:
    return {k: v for k, v in sorted(row.items()) if not any(c in k for c in CLOCK)}


def main(out: str) -> None:
    import torch

    from vpns_core import run_trial
    prints = {}
    for label, cfg in variants():
        with tempfile.TemporaryDirectory() as tmp:
            result = run_trial(cfg.replace(measure_repeats=0), tmp)
            export = torch.load(Path(tmp) / "model_export.pt", weights_only=True)
            weights = hashlib.sha256(b"".join(v.numpy().tobytes() for _, v in sorted(export["state_dict"].items())
                                              if isinstance(v, torch.Tensor))).hexdigest()
        prints[label] = {"final": plain(result.final), "history": [plain(h) for h in result.history],
                         "weights": weights}
        print(label, result.final.get("test_acc"), flush=True)
    Path(out).write_text(json.dumps(prints, indent=1, sort_keys=True, default=str))


if __name__ == "__main__":
    main(sys.argv[1])
