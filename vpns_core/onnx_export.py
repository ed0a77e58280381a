"""A trial's model for serving stacks: ONNX, checked in onnxruntime (optional extra:
``pip install onnx onnxruntime``).

    python -m vpns_core.onnx_export results/trials/demo            # -> model.onnx + onnx_check.json

The exported graph is what the trial deploys: uint8-free float pixels in [0, 1] at the export's
``input_size`` (the bare image; under the reference schedule accuracy is measured without the
prompt), the model's normalisation, the network (:func:`vpns_core.models.plain_model`: a
channel-pruned model as the smaller network it is, a weight-sparse one with its zeros), and the
label mapping onto the target classes. ``--with-prompt`` exports the prompted input instead
(the image resized into the ``output_size`` frame plus the learned prompt). The check runs the
ONNX file in onnxruntime and the same module in torch on real test images of the trial's dataset
and records the largest absolute difference of the logits, the top-1 agreement and both
latencies (median of timed passes at a batch size).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import plain_model

EXPORT = "model_export.pt"


class Deployed(nn.Module):
    """Pixels in [0, 1] -> target-class logits: (prompt,) normalisation, network, label map."""

    def __init__(self, export: dict[str, Any], with_prompt: bool = False) -> None:
        super().__init__()
        self.net = plain_model(export)
        self.register_buffer("mean", torch.tensor(export["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(export["std"]).view(1, 3, 1, 1))
        self.register_buffer("mapping", export["label_mapping"].long())
        self.identity = export["head"] == "linear"
        self.with_prompt = with_prompt
        self.size = export["output_size"] if with_prompt else export["input_size"]
        if with_prompt:
            state = export["prompt"]
            if export["prompt_type"] != "pad" or "delta" not in state:
                raise ValueError("--with-prompt: only the pad prompt is exported (fix and random "
                                 "prompts are drawn per pass); export without the prompt instead")
            self.register_buffer("delta", (state["delta"] * state["mask"]).float())
            self.pad = (export["output_size"] - export["input_size"]) // 2

    def forward(self, x: Tensor) -> Tensor:
        if self.with_prompt:
            x = F.pad(x, (self.pad,) * 4) + self.delta
            x = x.clamp(0.0, 1.0)
        logits = self.net((x - self.mean) / self.std)
        return logits if self.identity else logits.index_select(1, self.mapping)


def test_images(export: dict[str, Any], n: int, data_root: str | None = None) -> Tensor:
    """``n`` real test images of the trial's dataset at the deployed size, in [0, 1]."""
    from .data import build_data
    splits = build_data(export.get("dataset", "fashion_mnist"), data_root, export["input_size"],
                        train_subset=None, test_subset=n, val_fraction=0.0)
    return torch.stack([splits.test[i][0] for i in range(len(splits.test))]).float().div(255)


def _median_ms(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def export_onnx(export_path: str | Path, out: str | Path, *, images: Tensor | None = None,
                n_images: int = 256, batch: int = 64, repeats: int = 10, with_prompt: bool = False,
                data_root: str | None = None, opset: int = 17) -> dict[str, Any]:
    """Write ``out`` (ONNX) from ``export_path`` (a model_export.pt) and check it in onnxruntime
    against torch on ``images`` (default: ``n_images`` test images of the trial's dataset).
    Returns the check: ``max_abs_diff``, ``top1_agreement``, ``torch_latency_ms`` and
    ``onnxruntime_latency_ms`` at ``batch``, the parameter counts and the file's size."""
    import onnx
    import onnxruntime as ort

    export = torch.load(export_path, map_location="cpu", weights_only=True)
    module = Deployed(export, with_prompt).eval()
    if images is None:
        images = test_images(export, n_images, data_root)
    sample = images[:2]
    out = Path(out)
    with warnings.catch_warnings():  # the TorchScript-based exporter: no onnxscript needed
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, (sample,), str(out), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    onnx.checker.check_model(onnx.load(str(out)))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = module(images)
    got = torch.from_numpy(session.run(None, {"image": images.numpy()})[0])
    timed = images[:batch].contiguous()
    if len(timed) < batch:
        timed = timed.repeat((batch + len(timed) - 1) // len(timed), 1, 1, 1)[:batch]
    with torch.no_grad():
        torch_ms = _median_ms(lambda: module(timed), repeats)
    ort_ms = _median_ms(lambda: session.run(None, {"image": timed.numpy()}), repeats)
    params = [p for p in module.net.parameters()]
    return {
        "onnx": str(out), "bytes": out.stat().st_size, "images": len(images),
        "input": f"float [B, 3, {module.size}, {module.size}] in [0, 1]"
                 + (" (prompted frame)" if with_prompt else " (the bare image)"),
        "max_abs_diff": float((got - expected).abs().max()),
        "top1_agreement": float((got.argmax(1) == expected.argmax(1)).float().mean()),
        "params": sum(p.numel() for p in params),
        "nonzero_params": sum(int(torch.count_nonzero(p)) for p in params),
        "latency_batch": batch, "latency_threads": torch.get_num_threads(),
        "torch_latency_ms": torch_ms, "onnxruntime_latency_ms": ort_ms,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vpns_core.onnx_export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trial", help="a trial folder (holding model_export.pt) or the export file")
    parser.add_argument("--out", default=None, help="ONNX file (default: model.onnx beside the export)")
    parser.add_argument("--images", type=int, default=256, help="test images checked (default 256)")
    parser.add_argument("--batch", type=int, default=64, help="latency batch size (default 64)")
    parser.add_argument("--repeats", type=int, default=10, help="timed passes (default 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--with-prompt", action="store_true", help="export the prompted input")
    parser.add_argument("--data-root", default=None, help="where the trial's dataset lives")
    args = parser.parse_args(argv)
    path = Path(args.trial)
    path = path / EXPORT if path.is_dir() else path
    if not path.is_file():
        print(f"error: {path}: no {EXPORT} (give a trial folder or its export file)", file=sys.stderr)
        return 2
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        print("error: ONNX export needs the optional extra: pip install onnx onnxruntime", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else path.with_name("model.onnx")
    try:
        check = export_onnx(path, out, n_images=args.images, batch=args.batch, repeats=args.repeats,
                            with_prompt=args.with_prompt, data_root=args.data_root)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = out.with_name(out.stem + "_check.json")
    report.write_text(json.dumps(check, indent=1))
    print(f"{out}: {check['bytes'] / 1e6:.1f} MB, {check['nonzero_params']:,} of {check['params']:,} "
          f"parameters nonzero; onnxruntime vs torch on {check['images']} test images: max |diff| "
          f"{check['max_abs_diff']:.2e}, top-1 agreement {100 * check['top1_agreement']:.1f}%; latency at "
          f"batch {check['latency_batch']} ({check['latency_threads']} threads): torch "
          f"{check['torch_latency_ms']:.1f} ms, onnxruntime {check['onnxruntime_latency_ms']:.1f} ms "
          f"(check: {report})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
