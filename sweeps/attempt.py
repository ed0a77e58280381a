"""One attempt of a trial in one process: the loop a one-process trial runs in its Tune trainable
and every rank of a data-parallel trial runs in its Ray Train worker.

An attempt resumes from the trial's last checkpoint (if any), runs
:func:`vpns_core.train.run_trial`, reports after every epoch with the trial's checkpoint, and ends
with one ``final`` report that carries the selected accuracies and the artifacts (masks, layer
stats, the prompt as a PNG, the exported model). Where a report goes is the
:class:`Channel`'s business: straight to Tune for one process (:class:`TuneChannel`), through Ray
Train to the trial's driver for a rank (``sweeps/data_parallel.py``). Only the channel's main
process (the one process, or rank 0) reports the trial; the other ranks only keep step with it.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch
from ray import tune

from sweeps.flags import METRIC
from sweeps.placement import now
from sweeps.usage import Usage
from vpns_core.config import Config

CHECKPOINT = "checkpoint.pt"
FINAL = "final.json"
NODES = "nodes.txt"  # in every reported checkpoint: the nodes the trial's attempts ran on
#: in every reported checkpoint: every epoch row the trial reported so far, one JSON line each,
#: carried from checkpoint to checkpoint. Tune's own result.json can lose the rows written
#: before its driver was killed (a resumed trial's file restarts from storage's copy); the
#: Parquet export reads the rows it lacks from here (sweeps.results.collect)
EPOCHS = "epochs.jsonl"


class Stopped(Exception):
    """Tune stopped the trial (ASHA) and the channel says so: the attempt ends without its final
    report. (A one-process trial is stopped by ``tune.report`` itself, with ``SystemExit``.)"""


class Channel(Protocol):
    """Where an attempt's reports go. ``main``: this process reports the trial (its metrics,
    checkpoints and artifacts); the others send only ``{"epoch": N}`` and ``{"final": 1}`` to
    keep step with it."""

    main: bool

    def send(self, metrics: dict[str, Any], folder: Path | None) -> None:
        """Report ``metrics``, with ``folder`` as the trial's checkpoint (None: without one);
        ``folder`` may be deleted once this returns. Raises :class:`Stopped` if the trial must
        stop."""


class TuneChannel:
    """The channel of a one-process trial: ``tune.report`` in the trial's own Tune trainable."""

    main = True

    def send(self, metrics: dict[str, Any], folder: Path | None) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder) if folder is not None else None)


def scratch_root() -> Path:
    """Where trials keep their working files: outside Tune's trial folder, which Tune copies to
    storage wholesale (``$VPNS_SCRATCH``, else the system's temporary folder). What must survive
    goes into the reported checkpoints."""
    return Path(os.environ.get("VPNS_SCRATCH", tempfile.gettempdir())) / "vpns-trials"


def run_attempt(cfg: Config, scratch: Path, placement: dict[str, str], restored: tune.Checkpoint | None,
                channel: Channel) -> None:
    """One attempt of the trial ``cfg`` in this process, its files under ``scratch`` (a folder of
    this attempt's own; created here).

    ``placement``: this process's :data:`sweeps.placement.PLACEMENT` values so far (``nodes`` is
    added here); ``restored``: the trial's last Tune checkpoint, or None for a first attempt (a
    checkpoint holding a final report is :func:`report_again`'s, not this function's).
    Every epoch is reported through ``channel`` with the checkpoint; the end with the final
    report. Returns early when the channel raises :class:`Stopped`.
    """
    from vpns_core.train import run_trial

    workdir = scratch / "work"
    workdir.mkdir(parents=True)
    planned = cfg.total_epochs  # ASHA never stops a trial at its last epoch
    nodes = [placement["node_id"]]
    resume = False
    if restored is not None:
        with restored.as_directory() as folder:
            folder = Path(folder)
            shutil.copyfile(folder / CHECKPOINT, workdir / CHECKPOINT)
            if (folder / NODES).is_file():  # one entry per attempt that reported
                nodes = (folder / NODES).read_text().split(",") + nodes
            if (folder / EPOCHS).is_file():
                shutil.copyfile(folder / EPOCHS, scratch / EPOCHS)
        resume = True
    placement = {**placement, "nodes": ",".join(nodes)}
    (scratch / NODES).write_text(placement["nodes"])
    usage = Usage(placement["device"])  # the main process's use is the trial's

    def report(metrics: dict[str, Any]) -> None:
        if not channel.main:  # the main process's report is the trial's
            channel.send({"epoch": metrics["epoch"]}, None)
            return
        row = {**metrics, **placement, "planned_epochs": planned, "system": usage.sample()}
        with (scratch / EPOCHS).open("a") as log:
            log.write(json.dumps(row, default=str) + "\n")
        with tempfile.TemporaryDirectory(dir=scratch, prefix="report-") as tmp:
            link(workdir / CHECKPOINT, Path(tmp) / CHECKPOINT)
            link(scratch / NODES, Path(tmp) / NODES)
            shutil.copyfile(scratch / EPOCHS, Path(tmp) / EPOCHS)  # a copy: the log grows on
            channel.send(row, Path(tmp))

    try:
        # resume=False without a Tune checkpoint: an epoch Tune never saw must run (and report) again
        result = run_trial(cfg, workdir, reporter=report, resume=resume)
        if not channel.main:
            channel.send({"final": 1}, None)
            return
        final = {**result.final, **placement, "ended_at": now(), "final": 1, "planned_epochs": planned}
        final[METRIC] = final.get("selected_val_acc", final.get(METRIC))  # the selected model's
        write_artifacts(cfg, workdir, scratch / "final", final)
        link(scratch / NODES, scratch / "final" / NODES)
        if (scratch / EPOCHS).is_file():
            shutil.copyfile(scratch / EPOCHS, scratch / "final" / EPOCHS)
        shutil.rmtree(workdir)
        report_final(final, scratch / "final", scratch, channel)
    except Stopped:
        return


def report_again(restored: tune.Checkpoint | None, scratch: Path, channel: Channel) -> bool:
    """If the trial's last checkpoint holds its final report (it finished before the sweep's
    driver died), report it again through ``channel`` and return True; else False."""
    if restored is None:
        return False
    with restored.as_directory() as folder:
        folder = Path(folder)
        if not (folder / FINAL).is_file():
            return False
        report_final(json.loads((folder / FINAL).read_text()), folder, scratch, channel)
    return True


def report_final(metrics: dict[str, Any], folder: Path, scratch: Path, channel: Channel) -> None:
    """Send the final report with ``folder``'s files as its checkpoint, from a snapshot of
    links under ``scratch`` (``folder`` may be the stored checkpoint itself); ``scratch/final``
    is removed first."""
    with tempfile.TemporaryDirectory(dir=scratch, prefix="final-") as tmp:
        for item in folder.iterdir():
            link(item, Path(tmp) / item.name)
        shutil.rmtree(scratch / "final", ignore_errors=True)
        channel.send(metrics, Path(tmp))


def link(src: Path, dst: Path) -> None:
    """``dst`` becomes ``src``'s content: a hard link where it can, else a copy."""
    try:
        os.link(src, dst)  # checkpoint.pt is replaced atomically, so a hard link is a snapshot
    except OSError:
        shutil.copyfile(src, dst)


def write_artifacts(cfg: Config, workdir: Path, out: Path, final: dict[str, Any]) -> None:
    """Copy masks, layer stats (JSON and CSV), the export and its programs; draw the prompt;
    write final.json."""
    from PIL import Image

    from vpns_core.export import PROGRAM, UNPROMPTED_PROGRAM
    from vpns_core.prompts import build_prompt

    out.mkdir(parents=True, exist_ok=True)
    for name in ("masks.pt", "layer_stats.json", "model_export.pt", PROGRAM, UNPROMPTED_PROGRAM):
        if name == UNPROMPTED_PROGRAM and not (workdir / name).is_file():
            continue  # a trial without a prompt has one program
        link(workdir / name, out / name)
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
        image = image.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        pixels = image.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8)
        Image.fromarray(pixels.numpy()).save(out / "prompt.png")  # 8-bit RGB, rounded
    (out / FINAL).write_text(json.dumps(final, indent=1, default=str))
