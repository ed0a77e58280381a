"""The CUDA path, checked in one short run (``scripts/gpu_check.sh`` calls it; see its header).

Steps (each prints one block and adds an entry to ``gpu_check.json`` under ``--out``):

1. ``env``: GPU, driver, torch, CUDA, bf16 support;
2. ``threshold``: the k-th smallest of ~11 M scores (ResNet-18's) by ``kthvalue``, by ``sort`` and
   by the trial's own ``kth_smallest_abs``: times, and the three values must be equal;
3. ``no_sync``: 5 stage-1 and 5 stage-2 VPNs steps under ``torch.cuda.set_sync_debug_mode("error")``
   (a host synchronisation inside a step raises);
4. ``trial``: one 1 + 1-epoch VPNs trial (ResNet-18 without pretrained weights, Fashion-MNIST at
   ``--size`` px): images/s per epoch, peak GPU memory, the exact sparsity of the masks;
5. ``resume``: a checkpoint written on the CPU (tiny trial, one epoch) resumed on the device;
6. ``default``: the embedded default (EfficientNet-Lite0 -> Fashion-MNIST, the authors' loop at
   64 px, pad 8, 90% ERK) for 1 + 1 epochs: images/s, peak memory, accuracy without the prompt;
7. ``jpeg_folder``: images/s of an epoch over a folder of real JPEGs, decoded per item against
   the decode-once cache (``benchmarks/image_folder.py``);
8. ``semi_structured``: torchvision's ``vit_b_16`` at 224 px in fp16 with 2:4 masks on its linear
   layers, converted to torch's semi-structured format: the largest difference to the
   dense-with-zeros model, and the speed-up of one MLP linear layer and of the whole model at
   batch 1, 64 and 256 (skipped, with the reason, where the device has no 2:4 kernels).

Every step reads its data through one data root (``--data-root``, exported by gpu_check.sh as
``$VPNS_DATA_ROOT``): the GPU machine has no Debian Fashion-MNIST.

``--device cpu --quick`` runs every step on the CPU with small sizes (the dry run).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.masked_step import make_trial, prepare  # noqa: E402
from vpns_core.config import Config  # noqa: E402
from vpns_core.masking import kth_smallest, kth_smallest_abs  # noqa: E402
from vpns_core.train import Trial, run_trial  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 5) -> tuple[Any, float]:
    out = fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return out, sorted(times)[len(times) // 2]


def step_env(device: torch.device) -> dict[str, Any]:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count,
                    bf16=torch.cuda.is_bf16_supported(), driver=_driver())
    return info


def _driver() -> str | None:
    import subprocess
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def step_threshold(device: torch.device, n: int) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(0)
    scores = torch.randn(n, generator=gen, device=device)
    k = int(0.9 * n)
    a, t_kth = timed(lambda: kth_smallest(scores.abs(), k, "kthvalue"), device)
    b, t_sort = timed(lambda: kth_smallest(scores.abs(), k, "sort"), device)
    c, t_trial = timed(lambda: kth_smallest_abs([scores], k), device)
    assert torch.equal(a, b) and torch.equal(a, c), (a, b, c)
    return {"values": n, "kthvalue_ms": 1e3 * t_kth, "sort_ms": 1e3 * t_sort, "trial_ms": 1e3 * t_trial,
            "kthvalue_over_sort": t_kth / t_sort, "equal": True}


def step_no_sync(device: torch.device, size: int, batch: int) -> dict[str, Any]:
    args = argparse.Namespace(model="resnet18", sparsity=0.9, allocation="global", threads=1,
                              device=str(device), amp=True, pattern="2:4")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("stage1", "stage2"):
            step = prepare(make_trial(size, 16 * size // 224 or 1, batch, args, f"{tmp}/{variant}"), variant)
            step()  # first step: allocations, cuDNN autotuning, lazy initialisation
            sync(device)
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("error")
            try:
                t0 = time.perf_counter()
                for _ in range(5):
                    step()
                sync(device)
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
            out[variant] = {"steps": 5, "ms_per_step": 1e3 * (time.perf_counter() - t0) / 5}
    return out


def step_trial(device: torch.device, size: int, train: int, batch: int, workdir: Path,
               data_root: str | None) -> dict[str, Any]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cfg = Config(model="resnet18", pretrained=False, dataset="fashion_mnist", method="vpns",
                 train_subset=train, test_subset=min(2000, train), input_size=size, output_size=size,
                 pad_size=max(1, 16 * size // 224), sparsity=0.9, allocation="global",
                 mask_epochs=1, tune_epochs=1, batch_size=batch, eval_batch_size=2 * batch,
                 device=str(device), label_mapping_samples=1000, measure_repeats=0, data_root=data_root)
    t0 = time.perf_counter()
    result = run_trial(cfg, workdir / "trial", resume=False)
    wall = time.perf_counter() - t0
    trial = Trial(cfg, workdir / "trial")  # reload the finished checkpoint: the exact masks
    masks = trial.net.current_masks() if trial.net.mode != "dense" else {}
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    out = {"wall_s": wall, "images_per_s": [h["images_per_s"] for h in result.history],
           "epoch_time_s": [h["epoch_time_s"] for h in result.history],
           "eval_time_s": [h["eval_time_s"] for h in result.history],
           "sparsity_reported": result.history[-1]["sparsity"],
           "sparsity_exact": 1.0 - kept / total if total else None,
           "selected_test_acc": result.final.get("selected_test_acc"),
           "data_on_device": trial.feed.on_device(trial.data.train)}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def step_resume(device: torch.device, workdir: Path, data_root: str | None) -> dict[str, Any]:
    cfg = Config(model="tiny_resnet", pretrained=False, dataset="fashion_mnist", train_subset=128,
                 test_subset=64, val_fraction=0.25, input_size=24, output_size=32, pad_size=4,
                 batch_size=32, mask_epochs=1, tune_epochs=1, sparsity=0.8, label_mapping_samples=64,
                 device="cpu", data_root=data_root)

    class Stop(Exception):
        pass

    def stop_after_mask(metrics):
        if metrics["stage"] == "mask":
            raise Stop
    try:
        run_trial(cfg, workdir / "resume", reporter=stop_after_mask)
    except Stop:
        pass
    resumed = run_trial(cfg.replace(device=str(device)), workdir / "resume")
    return {"written_on": "cpu", "resumed_on": str(device), "epochs": len(resumed.history),
            "selected_test_acc": resumed.final["selected_test_acc"]}


def step_default(device: torch.device, quick: bool, workdir: Path, data_root: str | None) -> dict[str, Any]:
    from search_spaces.base import base
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    values = {**base("default"), "mask_epochs": 1, "tune_epochs": 1, "device": str(device),
              "data_root": data_root, "measure_repeats": 0}
    if quick:
        values.update(train_subset=128, test_subset=64, label_mapping_samples=64, output_size=32,
                      input_size=32, pad_size=4)
    t0 = time.perf_counter()
    result = run_trial(Config(**values), workdir / "default", resume=False)
    out = {"wall_s": time.perf_counter() - t0, "images_per_s": [h["images_per_s"] for h in result.history],
           "grad_steps": result.history[-1]["grad_steps"],
           "selected_test_acc_noprompt": result.final.get("selected_test_acc_noprompt")}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def step_jpeg_folder(quick: bool) -> dict[str, Any]:
    from benchmarks import image_folder
    result = image_folder.main(["--quick"] if quick else [])
    return {k: result[k] for k in ("images", "same_pixels", "before_images_per_s",
                                   "first_epoch_images_per_s", "cached_epoch_images_per_s")}


def step_semi_structured(device: torch.device, quick: bool) -> dict[str, Any]:
    import copy

    import torchvision

    from vpns_core import semi_structured
    reason = semi_structured.unavailable(device)
    if reason is not None:
        return {"skipped": reason}
    dense = torchvision.models.vit_b_16(weights=None).to(device).half().eval()
    pruned = semi_structured.prune_2_4(dense, skip=("heads.head",))
    sparse = copy.deepcopy(dense)
    layers = semi_structured.convert(sparse)
    out: dict[str, Any] = {"linear_layers_2_4": pruned, "converted": len(layers)}
    for batch in ((1, 8) if quick else (1, 64, 256)):
        x = torch.randn(batch, 3, 224, 224, device=device, dtype=torch.half)
        whole = semi_structured.compare(dense, sparse, x, repeats=10)
        name = "encoder.layers.encoder_layer_0.mlp.0"
        tokens = torch.randn(batch * 197, 768, device=device, dtype=torch.half)
        one = semi_structured.compare(dense.get_submodule(name), sparse.get_submodule(name), tokens, repeats=20)
        out[f"batch_{batch}"] = {"model_max_abs_diff": whole["max_abs_diff"],
                                 "model_speedup": whole["dense_ms"] / whole["sparse_ms"],
                                 "model_dense_ms": whole["dense_ms"], "model_sparse_ms": whole["sparse_ms"],
                                 "mlp_linear_speedup": one["dense_ms"] / one["sparse_ms"]}
    return out


def step_shared_gpu_sweep(device: torch.device, workdir: Path, data_root: str | None) -> dict[str, Any]:
    """A Ray Tune sweep of two tiny trials sharing one GPU (``--gpus-per-trial 0.5``, two at
    once): both finish on CUDA, and they overlapped in time. On a CPU (the dry run) the same two
    trials share the CPU. Needs Ray: the lent device image has only torch, so there it reports
    why it was skipped (on a machine set up with ``scripts/setup.sh`` it runs)."""
    import importlib.util
    import subprocess
    import sys
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("mlflow") is None:
        return {"skipped": "Ray Tune and MLflow are not installed here (the lent device image has "
                           "only torch); run this check on a machine set up with scripts/setup.sh"}
    store = workdir / "sweep"
    command = [sys.executable, str(ROOT / "sweeps" / "ablation_pad.py"), "--preset", "tiny", "--seeds", "7",
               "--search", "grid", "--scheduler", "fifo", "--max-concurrent", "2", "--cpus-per-trial", "1",
               "--gpus-per-trial", "0.5" if device.type == "cuda" else "0", "--name", "shared",
               "--storage-path", str(store), "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}",
               "--set", f"device={device.type}"]
    if data_root:
        command += ["--data-root", data_root]
    t0 = time.perf_counter()
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        raise RuntimeError(f"the sweep exited {run.returncode}: {run.stderr.strip().splitlines()[-1:]}")
    first = next((line for line in run.stdout.splitlines() if "trials on" in line), "")
    results = [json.loads(line) for f in sorted(store.glob("shared/trials/*/result.json"))
               for line in f.read_text().splitlines()[-1:] if line.strip()]
    finals = [r for r in results if r.get("final")]
    spans = sorted((r["started_at"], r["ended_at"]) for r in finals)  # ISO times, one clock
    overlapped = len(spans) >= 2 and spans[1][0] < spans[0][1]
    devices = sorted({str(r.get("device")) for r in finals})
    if len(finals) < 2 or not overlapped or devices != [device.type]:
        raise RuntimeError(f"expected 2 trials at once on {device.type}: {len(finals)} finished, "
                           f"overlapped={overlapped}, devices {devices}")
    return {"wall_s": round(wall, 1), "first_line": first.strip()[:160], "trials": len(finals),
            "overlapped": overlapped, "devices": devices,
            "gpu_ids": sorted({str(r.get("gpu_ids")) for r in finals})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small sizes (the CPU dry run)")
    p.add_argument("--out", default=str(ROOT / "results" / "gpu_check"))
    p.add_argument("--data-root", default=None, help="a folder holding fashion-mnist/ (default: the "
                   "system's dataset-fashion-mnist)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        n, size, batch, train, trial_size, trial_batch = 1 << 20, 32, 8, 256, 32, 32
    else:
        n, size, batch, train, trial_size, trial_batch = 11_200_000, 224, 256, 20_000, 224, 256
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    steps = [("env", lambda: step_env(device)),
             ("threshold", lambda: step_threshold(device, n)),
             ("no_sync", lambda: step_no_sync(device, size, batch)),
             ("trial", lambda: step_trial(device, trial_size, train, trial_batch, work, args.data_root)),
             ("resume", lambda: step_resume(device, work, args.data_root)),
             ("default", lambda: step_default(device, args.quick, work, args.data_root)),
             ("jpeg_folder", lambda: step_jpeg_folder(args.quick)),
             ("semi_structured", lambda: step_semi_structured(device, args.quick)),
             ("shared_gpu_sweep", lambda: step_shared_gpu_sweep(device, work, args.data_root))]
    failed = 0
    try:
        for name, fn in steps:
            t0 = time.perf_counter()
            try:
                results[name] = {**fn(), "step_s": round(time.perf_counter() - t0, 1)}
                print(f"[{name}] ok {json.dumps(results[name], default=str)}", flush=True)
            except Exception as err:  # every step reports; the exit status says whether all passed
                failed += 1
                results[name] = {"error": f"{type(err).__name__}: {err}"}
                print(f"[{name}] FAILED {results[name]['error']}", flush=True)
            (out_dir / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
