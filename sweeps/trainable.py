"""The Tune trainable: one vpns trial in a Ray worker, its per-epoch reports and checkpoints, and
the artifacts of its final report (masks, layer stats, the prompt as a PNG, the exported model).

Tune pickles :func:`trainable` by reference: this module must import in a Ray worker as
``sweeps.trainable``.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from search_spaces.points import resolve
from sweeps.flags import METRIC
from vpns_core.config import Config

CHECKPOINT = "checkpoint.pt"
FINAL = "final.json"


def trainable(config: dict[str, Any], points: dict[str, dict] | None = None) -> None:
    """One vpns trial under Tune: report every epoch with the trial's checkpoint, resume from
    ``tune.get_checkpoint()``, and end with one ``final`` report carrying the selected
    accuracies and the artifacts (masks, layer stats, prompt PNG, exported model)."""
    cfg = Config.from_dict(resolve(config, points))
    cap_gpu_memory(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0), cfg.device)
    # Scratch space outside Tune's trial folder, which Tune copies to storage wholesale; what
    # must survive goes into the reported checkpoints. A leftover of a dead attempt is stale:
    # Tune's latest checkpoint is the truth.
    scratch = Path(os.environ.get("VPNS_SCRATCH", tempfile.gettempdir())) / "vpns-trials" / \
        tune.get_context().get_trial_id()
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        _train(cfg, scratch)
    finally:  # also when ASHA stops the trial (SystemExit inside tune.report)
        shutil.rmtree(scratch, ignore_errors=True)
        if cfg.device != "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()  # a reused actor's next trial starts with the GPU's memory free


def cap_gpu_memory(share: float, device: str) -> float | None:
    """Trials that share a GPU (``--gpus-per-trial 0.5``) each get at most their share of its
    memory, so one trial cannot starve the other into out-of-memory errors. Returns the cap."""
    if not 0 < share < 1 or device == "cpu" or not torch.cuda.is_available():
        return None
    torch.cuda.set_per_process_memory_fraction(share)
    return share


def _train(cfg: Config, scratch: Path) -> None:
    from vpns_core.train import run_trial

    workdir = scratch / "work"
    workdir.mkdir(parents=True)
    planned = cfg.total_epochs  # ASHA never stops a trial at its last epoch
    resume = False
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            folder = Path(folder)
            if (folder / FINAL).is_file():  # finished before the driver died: report it again
                _report_final(json.loads((folder / FINAL).read_text()), folder, scratch)
                return
            shutil.copyfile(folder / CHECKPOINT, workdir / CHECKPOINT)
            resume = True

    def report(metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory(dir=scratch, prefix="report-") as tmp:
            _link(workdir / CHECKPOINT, Path(tmp) / CHECKPOINT)
            tune.report({**metrics, "planned_epochs": planned},
                        checkpoint=tune.Checkpoint.from_directory(tmp))

    # resume=False without a Tune checkpoint: an epoch Tune never saw must run (and report) again
    result = run_trial(cfg, workdir, reporter=report, resume=resume)
    final = {**result.final, "final": 1, "planned_epochs": planned}
    final[METRIC] = final.get("selected_val_acc", final.get(METRIC))  # the selected model's
    write_artifacts(cfg, workdir, scratch / "final", final)
    shutil.rmtree(workdir)
    _report_final(final, scratch / "final", scratch)


def _report_final(metrics: dict[str, Any], folder: Path, scratch: Path) -> None:
    with tempfile.TemporaryDirectory(dir=scratch, prefix="final-") as tmp:
        for item in folder.iterdir():
            _link(item, Path(tmp) / item.name)
        shutil.rmtree(scratch / "final", ignore_errors=True)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # checkpoint.pt is replaced atomically, so a hard link is a snapshot
    except OSError:
        shutil.copyfile(src, dst)


def write_artifacts(cfg: Config, workdir: Path, out: Path, final: dict[str, Any]) -> None:
    """Copy masks, layer stats (JSON and CSV) and the export; draw the prompt; write final.json."""
    from torchvision.utils import save_image

    from vpns_core.prompts import build_prompt

    out.mkdir(parents=True, exist_ok=True)
    for name in ("masks.pt", "layer_stats.json", "model_export.pt"):
        _link(workdir / name, out / name)
    stats = json.loads((workdir / "layer_stats.json").read_text())
    with open(out / "layer_stats.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["name", "numel", "kept", "density", "pruned"])
        writer.writeheader()
        writer.writerows(stats)
    if final.get("prompt_tunable", 0) > 0:
        export = torch.load(workdir / "model_export.pt", map_location="cpu", weights_only=True)
        prompt = build_prompt(cfg.prompt, input_size=cfg.input_size, output_size=cfg.output_size,
                              mean=export["mean"], std=export["std"], pad_size=cfg.pad_size,
                              prompt_size=cfg.resolved_prompt_size)
        prompt.load_state_dict(export["prompt"])
        image = prompt.image()
        scale = max(1, 256 // image.shape[-1])  # nearest-neighbour upscaling so pixels stay visible
        save_image(image.repeat_interleave(scale, 1).repeat_interleave(scale, 2), out / "prompt.png")
    (out / FINAL).write_text(json.dumps(final, indent=1, default=str))
