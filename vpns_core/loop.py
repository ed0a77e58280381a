"""The training loop of a trial (:class:`Loop`): stages, epochs, steps and optimisers, and the
trial's counters.

Cost accounting (cumulative in every row): ``wall_time_s`` (training epochs plus untrained steps
such as SNIP/GraSP/SynFlow scoring or LTH pruning; evaluation excluded), ``epoch``,
``grad_steps`` (parameter updates), ``forward_passes`` / ``backward_passes`` (mini-batch passes
of training and of scoring, SynFlow's batch-1 passes included; evaluation, label mapping and
BatchNorm recalibration excluded, being the same for every method).
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .assembly import Assembly
from .checkpoint import load_scaler_state, set_rng_state
from .data import random_crop_flip
from .evaluation import Evaluation
from .feed import Feed

#: called after every training batch with ``stage``, ``epoch`` (1-based), ``step``, ``steps``,
#: ``images`` (this epoch so far) and ``elapsed`` (seconds this epoch): a progress bar's feed
Progress = Callable[[dict[str, Any]], None]
#: a custom training step ``step(x, y, prompted, optimizer) -> (loss, logits)`` that sets the
#: ``.grad`` of the stage optimiser's parameters (and may update others, e.g. BiP's lower level)
StepFn = Callable[[Tensor, Tensor, bool, torch.optim.Optimizer], tuple[Tensor, Tensor]]
STAGES = ("mask", "tune")


def stage_index(stage: str) -> int:
    """Stable integer id of a stage name (seeds its epochs' shuffling, reported as
    ``stage_index``): ``warmup`` −1 (channel methods), ``mask`` 0, ``tune`` 1, LTH's ``round{k}``
    2 + k."""
    if stage == "warmup":
        return -1
    if stage in STAGES:
        return STAGES.index(stage)
    match = re.fullmatch(r"round(\d+)", stage)
    if match is None:
        raise ValueError(f"stage: unknown stage name {stage!r}; use {', '.join(STAGES)} or round<k>")
    return len(STAGES) + int(match.group(1))


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the trial stops at once."""


class Loop:
    """Runs stages on ``assembly`` with ``feed``'s batches; evaluates each epoch with
    ``evaluation``; after each epoch calls ``checkpoint(stage, stage_epoch, opt, sched)`` and
    ``report(row)``. ``sparsity`` gives an epoch row's sparsity columns (the method's)."""

    def __init__(self, assembly: Assembly, feed: Feed, evaluation: Evaluation, collective: Any, *,
                 sparsity: Callable[[], dict[str, float]],
                 checkpoint: Callable[[str, int, Any, Any], None],
                 report: Callable[[dict[str, Any]], None], progress: Progress | None = None) -> None:
        self.assembly, self.feed, self.evaluation, self.collective = assembly, feed, evaluation, collective
        self.cfg, self.device = assembly.cfg, assembly.device
        self.sparsity, self.checkpoint, self.report, self.progress = sparsity, checkpoint, report, progress
        self.scaler = torch.amp.GradScaler("cuda", enabled=assembly.amp_dtype == torch.float16)
        self.history: list[dict[str, Any]] = []
        self.completed: list[str] = []
        self.grad_steps = 0
        self.prompted_steps = 0
        self.forward_passes = 0
        self.backward_passes = 0
        self.wall_time = 0.0
        #: the checkpoint a resumed trial continues from, until its stage picks it up
        self.resume_state: dict[str, Any] | None = None
        self._stage_step: StepFn | None = None
        self._after_backward: Callable[[], None] | None = None
        self._checked_loss: Tensor | None = None  # the loss every rank decides on (non-finite check)

    # --- counters -------------------------------------------------------------------------------

    def counters(self) -> dict[str, Any]:
        return {"grad_steps": self.grad_steps, "prompted_steps": self.prompted_steps,
                "forward_passes": self.forward_passes, "backward_passes": self.backward_passes,
                "wall_time": self.wall_time}

    def load_counters(self, state: dict[str, Any]) -> None:
        self.grad_steps = state["grad_steps"]
        self.prompted_steps = state.get("prompted_steps", 0)
        self.forward_passes = state.get("forward_passes", 0)
        self.backward_passes = state.get("backward_passes", 0)
        self.wall_time = state["wall_time"]

    def count_passes(self, forward: int = 0, backward: int = 0) -> None:
        """Add mini-batch forward/backward passes done outside the standard step (scoring, BiP)."""
        self.forward_passes += forward
        self.backward_passes += backward

    def count_steps(self, steps: int) -> None:
        """Add parameter updates taken inside a custom step beside the stage's own (BiP's
        lower-level step)."""
        self.grad_steps += steps

    # --- stages -----------------------------------------------------------------------------

    def stage_pending(self, stage: str) -> bool:
        return stage not in self.completed

    def run_once(self, name: str, fn: Callable[[], None]) -> None:
        """Run an untrained step (e.g. scoring and fixing a mask) unless already done; its time
        counts into ``wall_time_s`` and it is recorded as completed, so a trial resumed from a
        later checkpoint skips it (one interrupted before that checkpoint redoes it)."""
        if not self.stage_pending(name):
            return
        t0 = time.perf_counter()
        fn()
        self.wall_time += time.perf_counter() - t0
        self.completed.append(name)

    def run_tune_stage(self, stage: str = "tune", *, epochs: int | None = None,
                       prompted: bool | None = None, train_weights: bool | None = None,
                       extra_metrics: dict[str, Any] | None = None,
                       after_backward: Callable[[], None] | None = None) -> None:
        """Weights (all model parameters) and, if prompted, the prompt with SGD + cosine.

        Defaults are those of stage 2: ``cfg.tune_epochs``, ``cfg.prompt_in_tune_stage``, and the
        weights frozen when ``cfg.post_prompt == "zero_shot"`` (then only the prompt, and a new
        linear head, learn). LTH's rounds call it with their own stage name and settings;
        channel methods' warm-up adds a sparse-training penalty with ``after_backward``.
        """
        cfg, a = self.cfg, self.assembly
        if not self.stage_pending(stage):
            return
        epochs = cfg.stage_epochs("tune") if epochs is None else epochs
        prompted = cfg.prompt_in_tune_stage if prompted is None else prompted
        if train_weights is None:
            train_weights = not (stage == "tune" and cfg.post_prompt == "zero_shot")
        groups = ([{"params": list(a.model.parameters()), "lr": cfg.tune_lr}] if train_weights
                  else a.head_groups(cfg.tune_lr))
        if prompted:
            groups += a.prompt_groups(cfg.tune_prompt_lr or cfg.tune_lr)
        if cfg.prompt_in_mask_stage and not prompted:
            with torch.no_grad():  # "VP only in mask finding": the prompt is dropped here
                for p in a.prompt_params():
                    p.zero_()
        self.run_stage(stage, groups, optimizer="sgd", epochs=epochs, prompted=prompted,
                       recalibrate=stage != "warmup", extra_metrics=extra_metrics,
                       after_backward=after_backward)

    def optimizer(self, kind: str, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """The stage optimizer (``adam`` or ``sgd``) over ``groups``; only their parameters train:
        every other model and prompt parameter is frozen."""
        cfg, a = self.cfg, self.assembly
        trainable = {id(p) for g in groups for p in g["params"]}
        for p in list(a.model.parameters()) + a.prompt_params():
            p.requires_grad_(id(p) in trainable)
        for g in groups:  # e.g. scores, which are not model parameters
            for p in g["params"]:
                p.requires_grad_(True)
        # Fused kernels (same update rule): one pass per parameter instead of several, which is
        # most of an optimizer step over millions of scores (benchmarks/masked_step.py).
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                    for g in groups for p in g["params"]) or None
        if kind == "adam":
            return torch.optim.Adam(groups, weight_decay=cfg.weight_decay, fused=fused)
        return torch.optim.SGD(groups, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused)

    def run_stage(self, stage: str, groups: list[dict[str, Any]], *, optimizer: str, epochs: int,
                  prompted: bool, recalibrate: bool = False, step: StepFn | None = None,
                  extra_metrics: dict[str, Any] | None = None,
                  after_backward: Callable[[], None] | None = None) -> None:
        """Train ``groups`` for ``epochs`` with cosine decay; checkpoint and report every epoch.

        ``stage`` names a stage (see :func:`stage_index`); ``recalibrate`` re-estimates BatchNorm
        statistics before its first epoch (``cfg.bn_recalibrate_batches``); ``step`` replaces the
        plain loss-backward step (BiP's bi-level iteration); ``extra_metrics`` are added to each
        of its epoch rows (LTH's ``round``); ``after_backward`` runs after each backward pass on
        unscaled gradients, before the optimizer step (a regulariser's gradient).
        """
        cfg, a, ev = self.cfg, self.assembly, self.evaluation
        opt = self.optimizer(optimizer, groups)
        steps_per_epoch = self.feed.steps_per_epoch()
        # Cosine decay per step (paper schedule) or per epoch (the authors' code steps it once
        # an epoch, so epoch e trains at lr * (1 + cos(pi e / E)) / 2).
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=max(1, epochs if cfg.lr_per_epoch else epochs * steps_per_epoch))
        start = 0
        state = self.resume_state
        if state is not None and state["stage"] == stage:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            load_scaler_state(self.scaler, state["scaler"])
            start = state["stage_epoch"]
            set_rng_state(state["rng"], self.device)
            self.resume_state = None
        else:
            ev.map_labels_once()
        if recalibrate and start == 0:
            ev.recalibrate_bn(prompted)
        self.collective.start_stage((a.model, a.prompt, a.label_map), lambda: a.net.refresh(force=True),
                                    a.replica_digests, f"at the start of {stage}")
        self._stage_step = step
        self._after_backward = after_backward
        for epoch in range(start, epochs):
            if cfg.head == "ilm":
                ev.compute_label_mapping(prompted=prompted)
            lrs = [g["lr"] for g in opt.param_groups]  # at the start of the epoch
            t0 = time.perf_counter()
            train_metrics = self.train_epoch(stage, epoch, opt, sched, prompted, steps_per_epoch)
            if cfg.lr_per_epoch:
                sched.step()
            self.collective.check_replicas_of(a.replica_digests, f"after {stage} epoch {epoch + 1}")
            elapsed = time.perf_counter() - t0
            self.wall_time += elapsed
            last = epoch == epochs - 1
            metrics = self.epoch_row(stage, epoch, prompted, train_metrics, elapsed, lrs, last_of_stage=last)
            metrics.update(extra_metrics or {})
            self.history.append(metrics)
            if last:
                self.completed.append(stage)
            self.checkpoint(stage, epoch + 1, opt, sched)
            self.report(metrics)
        self._stage_step = None
        self._after_backward = None
        if epochs == 0:
            self.completed.append(stage)

    def epoch_seed(self, stage: str, epoch: int) -> int:
        return (self.cfg.seed * 1_000_003 + stage_index(stage) * 10_007 + epoch) % 2**62

    def train_epoch(self, stage: str, epoch: int, opt, sched, prompted: bool, steps: int) -> dict[str, float]:
        """One epoch of ``steps`` iterations.

        ``paper`` schedule: one step per iteration on an augmented batch, prompted if the stage
        uses the prompt. ``reference`` schedule (the authors' code) with the prompt: two steps
        per iteration, first on a prompted batch with the test-time transform, drawn from its
        own shuffle of the training split, then on an unprompted augmented batch from an
        independent shuffle; every optimised group (scores or weights) takes both steps, the
        prompt only gets a gradient from the first. Without the prompt: one unprompted step.
        """
        cfg, feed = self.cfg, self.feed
        self.assembly.model.train()
        seed = self.epoch_seed(stage, epoch)
        augment = torch.Generator(device=self.device).manual_seed(seed)
        loader = feed.loader(feed.data.train, train=True, generator=torch.Generator().manual_seed(seed))
        two_step = cfg.schedule == "reference" and prompted
        if two_step:  # a second, independent stream (an LCG step away from every epoch's seed)
            prompted_seed = (seed * 6364136223846793005 + 1442695040888963407) % 2**62
            prompted_loader = feed.loader(feed.data.train_eval, train=True,
                                          generator=torch.Generator().manual_seed(prompted_seed))
            batches = zip(loader, prompted_loader)
        else:
            batches = ((b, None) for b in loader)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        seen = 0
        check_every = 1 if self.device.type == "cpu" else 25
        per_step = not cfg.lr_per_epoch
        started = time.perf_counter()
        for step, (batch, prompted_batch) in enumerate(batches):
            if step >= steps:
                break
            if two_step:
                xp, yp = feed.to_device(*prompted_batch)
                self.train_step(opt, sched, xp, yp, prompted=True, scheduler_step=False)
            x, y = feed.to_device(*batch)
            # on N ranks the crops are drawn for the whole global batch: this rank crops its rows
            x = random_crop_flip(x, cfg.input_size, augment, **self.collective.crop_draws(cfg.batch_size, len(y)))
            loss, logits = self.train_step(opt, sched, x, y, prompted=prompted and not two_step,
                                           scheduler_step=per_step)
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            checked = self._checked_loss  # the same decision on every rank
            if step % check_every == 0 and not torch.isfinite(checked):
                raise NonFiniteLossError(f"loss became {checked.item()} at {stage} epoch {epoch} step {step}")
            if self.progress is not None:
                self.progress({"stage": stage, "epoch": epoch + 1, "step": step + 1, "steps": steps,
                               "images": seen, "elapsed": time.perf_counter() - started})
        loss_sum, correct, seen = self.collective.totals(loss_sum, correct, seen, device=self.device)
        seen = int(seen)
        if not torch.isfinite(loss_sum):
            raise NonFiniteLossError(f"loss became non-finite in {stage} epoch {epoch}")
        return {"train_loss": loss_sum.item() / max(1, seen), "train_acc": correct.item() / max(1, seen),
                "images": seen}

    def train_step(self, opt, sched, x: Tensor, y: Tensor, prompted: bool,
                   scheduler_step: bool = True) -> tuple[Tensor, Tensor]:
        """One optimizer step on the device batch ``x, y`` (with the prompt if ``prompted``),
        under the current stage's step function and AMP scaling; returns the loss and logits."""
        a = self.assembly
        if self._stage_step is not None:  # e.g. BiP: sets the grads, we apply the update
            opt.zero_grad(set_to_none=True)
            loss, logits = self._stage_step(x, y, prompted, opt)
            opt.step()
            self._checked_loss = loss
        else:
            with a.autocast():
                logits = a.forward(x, prompted).float()
                loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            # weights, scores, head and prompt: the ranks' mean gradient (one process: as is)
            self._checked_loss = self.collective.average_gradients(opt, loss)
            if self._after_backward is not None:
                self.scaler.unscale_(opt)  # a no-op without fp16 loss scaling
                self._after_backward()
            self.scaler.step(opt)
            self.scaler.update()
            self.count_passes(forward=1, backward=1)
        if scheduler_step:
            sched.step()
        self.grad_steps += 1
        self.prompted_steps += int(prompted)
        return loss, logits

    def epoch_row(self, stage: str, epoch: int, prompted: bool, train: dict[str, float],
                  elapsed: float, lrs: list[float], last_of_stage: bool = False) -> dict[str, Any]:
        """The epoch's row: training numbers, the evaluation's columns (:meth:`Evaluation.epoch`),
        the method's sparsity, learning rates, times and the counters."""
        cfg = self.cfg
        ev = self.evaluation.epoch(stage, len(self.history) + 1, prompted, last_of_stage)
        report = self.sparsity()
        return {
            "stage": stage,
            "stage_index": stage_index(stage),
            "stage_epoch": epoch + 1,
            "epoch": len(self.history) + 1,
            "train_loss": train["train_loss"],
            "train_acc": train["train_acc"],
            **ev["test"],
            "val_acc_prompt": ev["val_acc_prompt"],
            "val_acc_noprompt": ev["val_acc_noprompt"],
            "val_acc": ev["val_acc"],
            "sparsity": report["sparsity"],
            "sparsity_all_layers": report["sparsity_all_layers"],
            "min_layer_density": report["min_layer_density"],
            "lr": lrs[0],
            "prompt_lr": lrs[-1] if prompted and cfg.learn_prompt else 0.0,
            "epoch_time_s": elapsed,
            "eval_time_s": ev["eval_time_s"],
            "images_per_s": train["images"] / elapsed if elapsed > 0 else 0.0,
            "grad_steps": self.grad_steps,
            "prompted_steps": self.prompted_steps,
            "forward_passes": self.forward_passes,
            "backward_passes": self.backward_passes,
            "wall_time_s": self.wall_time,
        }
