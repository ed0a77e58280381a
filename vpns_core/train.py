"""One trial, as the sequence of its parts: ``run_trial(cfg, workdir, reporter)``.

1. :func:`~vpns_core.resources.check_resources`: device, files, data and weights, before any compute;
2. the data (:func:`~vpns_core.data.build_data`) and how it is read (:class:`~vpns_core.feed.Feed`);
3. the assembled model: network, masks, head, prompt, label map (:class:`~vpns_core.assembly.Assembly`);
4. the method, created for this trial, set up on it (``cfg.method``, :mod:`vpns_core.methods`);
5. the loop (:class:`~vpns_core.loop.Loop`), evaluation and the test-set policy
   (:class:`~vpns_core.evaluation.Evaluation`), checkpoints
   (:class:`~vpns_core.checkpointing.Checkpoints`; a trial resumes exactly where it stopped);
6. the method runs its stages through a narrow :class:`Context`;
7. the outputs: masks, export, final row (:func:`~vpns_core.outputs.finish`).

Data parallelism enters as one collective object (:func:`vpns_core.distributed.current_collective`):
on one process every collective operation is the identity. Metrics go to ``reporter(metrics)``
once per epoch, with the data it trains on under ``"dataset"`` (:func:`vpns_core.data.split_record`);
nothing is printed.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .assembly import Assembly, amp_dtype
from .checkpoint import CheckpointError, safe_load, seed_everything
from .checkpointing import CHECKPOINT, RUNTIME_FIELDS, Checkpoints, load
from .config import Config
from .data import build_data, split_record
from .distributed import current_collective
from .evaluation import Evaluation
from .feed import Feed
from .loop import Loop, NonFiniteLossError, Progress, StepFn, stage_index
from .methods import METHODS
from .outputs import TrialResult, finish
from .resources import check_resources

Reporter = Callable[[dict[str, Any]], None]
__all__ = ["CHECKPOINT", "Context", "NonFiniteLossError", "Progress", "Reporter", "StepFn", "Trial",
           "TrialResult", "amp_dtype", "resolve_device", "run_trial", "stage_index", "RUNTIME_FIELDS"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Context:
    """What a method sees of its trial (the :class:`vpns_core.methods.base.TrialContext`
    protocol): the config, the assembled model, the stages it may run, its scoring data and
    counters. Nothing else of the trial."""

    def __init__(self, cfg: Config, assembly: Assembly, feed: Feed, loop: Loop, evaluation: Evaluation,
                 mask_file_masks: Callable[[], dict[str, Tensor] | None]) -> None:
        self.cfg, self.device = cfg, assembly.device
        self._a, self._feed, self._loop, self._ev = assembly, feed, loop, evaluation
        self._mask_file_masks = mask_file_masks

    # the stages and steps a method runs
    def run_stage(self, *args, **kwargs): return self._loop.run_stage(*args, **kwargs)
    def run_tune_stage(self, *args, **kwargs): return self._loop.run_tune_stage(*args, **kwargs)
    def run_once(self, name, fn): return self._loop.run_once(name, fn)
    def stage_pending(self, stage): return self._loop.stage_pending(stage)
    def count_passes(self, forward=0, backward=0): return self._loop.count_passes(forward, backward)
    def count_steps(self, steps): return self._loop.count_steps(steps)
    # the model's passes and parts
    def forward(self, x, prompted): return self._a.forward(x, prompted)
    def autocast(self): return self._a.autocast()
    def rewind(self): return self._a.rewind()
    def head_groups(self, lr): return self._a.head_groups(lr)
    def prompt_groups(self, lr): return self._a.prompt_groups(lr)
    # data for scoring and checks
    def scoring_batches(self, n): return self._feed.scoring_batches(n)
    def first_images(self, n): return self._feed.first_images(n)
    def compute_label_mapping(self, prompted): return self._ev.compute_label_mapping(prompted)

    net = property(lambda self: self._a.net)
    model = property(lambda self: self._a.model)
    prompt = property(lambda self: self._a.prompt)
    head_name = property(lambda self: self._a.head_name)
    num_classes = property(lambda self: self._a.num_classes)
    num_source_classes = property(lambda self: self._a.source.num_source_classes)
    amp_dtype = property(lambda self: self._a.amp_dtype)
    scaler = property(lambda self: self._loop.scaler)
    mask_file_masks = property(lambda self: self._mask_file_masks())


class Trial:
    """One run, built from its parts (see the module's docstring); ``run()`` runs it."""

    def __init__(self, cfg: Config, workdir: str | Path, reporter: Reporter | None = None,
                 resume: bool = True, progress: Progress | None = None) -> None:
        check_resources(cfg)  # clear errors about device, files, data, weights before any compute
        saved = load(Path(workdir), resume)  # a corrupt checkpoint is refused before any compute too
        self.cfg = cfg
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.reporter = reporter or (lambda metrics: None)
        self.collective = collective = current_collective()
        self.device = collective.device(resolve_device(cfg.device))
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.method = METHODS.get(cfg.method)()  # created for this trial: its state is its own
        seed_everything(cfg.seed)

        self.data = build_data(cfg.dataset, cfg.data_root, cfg.input_size, train_subset=cfg.train_subset,
                               test_subset=cfg.test_subset, val_fraction=cfg.val_fraction,
                               data_seed=cfg.data_seed, download=cfg.download)
        #: the dataset, its split sizes and a digest of its images (in every report and the final one)
        self.dataset = split_record(cfg.dataset, self.data)
        collective.check(cfg, len(self.data.train))
        self.feed = Feed(cfg, self.data, self.device, collective)
        self.assembly = Assembly(cfg, self.data, self.method, self.device, prepare=collective.prepare)
        self.evaluation = Evaluation(self.assembly, self.feed, collective)
        self.loop = Loop(self.assembly, self.feed, self.evaluation, collective,
                         sparsity=lambda: self.method.sparsity_report(self.context),
                         checkpoint=lambda *a: self.checkpoints.save(*a),
                         report=lambda row: self.reporter({**row, "dataset": dict(self.dataset)}),
                         progress=progress)
        self._mask_file_masks: dict[str, Tensor] | None = None
        self.context = Context(cfg, self.assembly, self.feed, self.loop, self.evaluation,
                               lambda: self._mask_file_masks)
        self.checkpoints = Checkpoints(self.workdir, self.assembly, self.loop, self.evaluation,
                                       self.method, self.context, collective)
        self.method.setup(self.context)
        self._mask_file_masks = self._load_mask_file() if cfg.mask_file else None
        if self.device.type == "cuda":  # fixed input shapes: let cuDNN pick the fastest kernels once
            torch.backends.cudnn.benchmark = True
        if saved is not None:
            self.checkpoints.restore(saved)

    def run(self) -> TrialResult:
        """The method's stages, or for ``cfg.mask_file`` (transfer) its fine-tuning of that mask;
        then the trial's outputs."""
        if self._mask_file_masks is not None:
            self.method.transfer(self.context)
        else:
            self.method.run(self.context)
        return self.finish()

    def finish(self) -> TrialResult:
        return finish(self.workdir, self.assembly, self.loop, self.evaluation, self.method, self.context,
                      self.dataset, self.data.test, writes=self.collective.is_main)

    def _load_mask_file(self) -> dict[str, Tensor]:
        cfg, net = self.cfg, self.assembly.net
        payload = safe_load(cfg.mask_file)
        masks = payload.get("masks", payload) if isinstance(payload, dict) else None
        names = {n for n, _ in net.layers}
        if not isinstance(masks, dict) or not names <= set(masks):
            raise CheckpointError(f"mask_file: {cfg.mask_file} has no masks for layers "
                                  f"{sorted(names - set(masks or {}))[:5]} of {cfg.model}")
        shapes = {n: tuple(m.weight.shape) for n, m in net.layers}  # dense mode here
        wrong = [n for n in sorted(names) if tuple(masks[n].shape) != shapes[n]]
        if wrong:
            raise CheckpointError(f"mask_file: {cfg.mask_file} does not fit {cfg.model}: "
                                  f"layer {wrong[0]} has a mask of shape {tuple(masks[wrong[0]].shape)}, "
                                  f"its weight {shapes[wrong[0]]} ({len(wrong)} layers differ)")
        return {n: masks[n].bool() for n in names}

    # --- the parts, by the names tests, benchmarks and scripts use ----------------------------

    net = property(lambda self: self.assembly.net)
    model = property(lambda self: self.assembly.model)
    prompt = property(lambda self: self.assembly.prompt)
    label_map = property(lambda self: self.assembly.label_map)
    head_name = property(lambda self: self.assembly.head_name)
    new_head = property(lambda self: self.assembly.new_head)
    source = property(lambda self: self.assembly.source)
    uses_prompt = property(lambda self: self.assembly.uses_prompt)
    history = property(lambda self: self.loop.history)
    forward_passes = property(lambda self: self.loop.forward_passes)
    grad_steps = property(lambda self: self.loop.grad_steps)
    scaler = property(lambda self: self.loop.scaler)
    best = property(lambda self: self.evaluation.best)


def run_trial(cfg: Config, workdir: str | Path, reporter: Reporter | None = None,
              resume: bool = True, progress: Progress | None = None) -> TrialResult:
    """Run (or resume) one trial in ``workdir``; see :class:`Trial`."""
    return Trial(cfg, workdir, reporter, resume, progress).run()
