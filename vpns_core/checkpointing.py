"""A trial's checkpoint: written atomically after every epoch, restored exactly (model, masks,
prompt, label map, optimiser, scheduler, loss scaler, RNG, counters, history, the selected epoch
and the method's own state). Rank 0 of a data-parallel trial writes; every rank reads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .assembly import Assembly
from .checkpoint import CheckpointError, atomic_save, rng_state, safe_load, set_rng_state
from .evaluation import Evaluation
from .loop import Loop

CHECKPOINT = "checkpoint.pt"
FORMAT = "vpns-trial-1"
#: config fields with no effect on training: a checkpoint resumes under other values of them
RUNTIME_FIELDS = ("device", "amp", "num_workers", "num_threads", "eval_batch_size", "tags", "data_root",
                  "download", "channels_last", "cost_record", "count_flops", "measure_repeats",
                  "latency_batch")


def load(workdir: Path, resume: bool) -> dict[str, Any] | None:
    """The checkpoint in ``workdir`` to resume from, if any (a corrupt one is refused here,
    before any compute)."""
    path = Path(workdir) / CHECKPOINT
    return safe_load(path, map_location="cpu") if resume and path.exists() else None


class Checkpoints:
    """Saves and restores the parts of one trial in ``workdir``; ``method`` adds its own entries
    (``checkpoint_state`` / ``restore``, given the trial's ``context``)."""

    def __init__(self, workdir: Path, assembly: Assembly, loop: Loop, evaluation: Evaluation,
                 method: Any, context: Any, collective: Any) -> None:
        self.path = Path(workdir) / CHECKPOINT
        self.assembly, self.loop, self.evaluation = assembly, loop, evaluation
        self.method, self.context, self.collective = method, context, collective

    def save(self, stage: str, stage_epoch: int, opt, sched) -> None:
        if not self.collective.is_main:
            return  # rank 0 writes; every rank holds the same state
        a, loop, ev = self.assembly, self.loop, self.evaluation
        atomic_save({
            "format": FORMAT,
            "config": a.cfg.to_dict(),
            "stage": stage,
            "stage_epoch": stage_epoch,
            "completed": list(loop.completed),
            "net_mode": a.net.mode,
            "model": a.model.state_dict(),
            "prompt": a.prompt.state_dict(),
            "label_map": a.label_map.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": loop.scaler.state_dict(),
            "rng": rng_state(a.device),
            "history": loop.history,
            **loop.counters(),
            "eval_time": ev.eval_time,
            "best": ev.best,
            "best_state": ev.best_state,
            **self.method.checkpoint_state(self.context),
        }, self.path)

    def restore(self, state: dict[str, Any]) -> None:
        a, loop, ev = self.assembly, self.loop, self.evaluation
        if state.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint: {self.path} is not a vpns trial checkpoint")
        saved = {k: v for k, v in state["config"].items() if k not in RUNTIME_FIELDS}
        current = {k: v for k, v in a.cfg.to_dict().items() if k not in RUNTIME_FIELDS}
        if saved != current:
            diff = sorted(k for k in current if saved.get(k) != current[k])
            raise CheckpointError(f"checkpoint: {self.path} was written with a different config "
                                  f"(fields {diff}); use another workdir")
        if state["net_mode"] == "score":
            a.net.attach_scores()
        elif state["net_mode"] == "fixed":
            prefix_masks = {n: state["model"][f"{n}.weight_mask"] for n, _ in a.net.layers}
            a.net.fix(prefix_masks)
        self.method.restore(self.context, state)
        a.model.load_state_dict(state["model"])
        a.prompt.load_state_dict(state["prompt"])
        a.label_map.load_state_dict(state["label_map"])
        loop.completed = list(state["completed"])
        loop.history = list(state["history"])
        loop.load_counters(state)
        ev.eval_time = state.get("eval_time", 0.0)
        ev.best = state["best"]
        if state["best_state"] is not None:
            ev.best_state = state["best_state"]
        ev.mapping_done = True
        if state["stage"] in loop.completed:
            set_rng_state(state["rng"], a.device)
        else:
            loop.resume_state = state
