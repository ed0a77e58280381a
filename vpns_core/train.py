"""The one training loop of vpns: a :class:`Trial` runs a method's stages and reports metrics.

``run_trial(cfg, workdir, reporter)`` builds data, model, prompt and label mapping, lets the
method (``cfg.method``) call ``run_stage`` for each stage (and ``run_once`` for untrained steps
such as scoring a mask), checkpoints atomically after every epoch and resumes from that
checkpoint exactly (model, masks, prompt, optimizer, scheduler, RNG). Metrics go to
``reporter(metrics)`` once per epoch, with the data it trains on under ``"dataset"``
(:func:`vpns_core.data.split_record`); nothing is printed.

Cost accounting (cumulative in every row): ``wall_time_s`` (training epochs plus untrained steps
such as SNIP/GraSP/SynFlow scoring or LTH pruning; evaluation excluded), ``epoch``,
``grad_steps`` (parameter updates), ``forward_passes`` / ``backward_passes`` (mini-batch passes
of training and of scoring, SynFlow's batch-1 passes included; evaluation, label mapping and
BatchNorm recalibration excluded, being the same for every method).
"""
from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from .checkpoint import (CheckpointError, atomic_save, load_scaler_state, rng_state, safe_load, seed_everything,
                         set_rng_state)
from .config import Config
from .costs import trial_costs
from .data import (DataSplits, DeviceBatches, build_data, device_copy_bytes, hold_on_device, random_crop_flip,
                   split_record, stratified_sample)
from .distributed import DataParallel, ShardedBatches, check_data_parallel, digest, sync_batchnorm
from .errors import ConfigError
from .export import Predictor, save_programs
from .label_mapping import LabelMap, frequency_label_mapping, greedy_mapping, label_counts
from .masking import MaskedNetwork, plain_state_dict
from .methods import METHODS
from .models import (SourceModel, build_model, first_layer, head_layer, plain_model, prefers_channels_last,
                     replace_head, set_bn_momentum)
from .prompts import Prompt, build_prompt
from .resources import check_resources

if TYPE_CHECKING:  # pragma: no cover
    from .channel_pruning import ChannelPruner

Reporter = Callable[[dict[str, Any]], None]
#: called after every training batch with ``stage``, ``epoch`` (1-based), ``step``, ``steps``,
#: ``images`` (this epoch so far) and ``elapsed`` (seconds this epoch): a progress bar's feed
Progress = Callable[[dict[str, Any]], None]
#: a custom training step ``step(x, y, prompted, optimizer) -> (loss, logits)`` that sets the
#: ``.grad`` of the stage optimiser's parameters (and may update others, e.g. BiP's lower level)
StepFn = Callable[[Tensor, Tensor, bool, torch.optim.Optimizer], tuple[Tensor, Tensor]]
STAGES = ("mask", "tune")
CHECKPOINT = "checkpoint.pt"


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


_DEVICE_COPY_BYTES = 2 * 2**30  # data_on_device=None: splits up to this size (stored) go to the GPU


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype of a trial with ``amp=True``: bf16 where the GPU supports it,
    else fp16 (with loss scaling); None on a CPU (full precision)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class TrialResult:
    config: Config
    final: dict[str, Any]
    history: list[dict[str, Any]]
    layer_stats: list[dict[str, Any]] = field(default_factory=list)
    workdir: Path | None = None


class Trial:
    """State of one run: the model with its masks, the prompt, the label map, data and optimiser."""

    def __init__(self, cfg: Config, workdir: str | Path, reporter: Reporter | None = None,
                 resume: bool = True, progress: Progress | None = None) -> None:
        check_resources(cfg)  # clear errors about device, files, data, weights before any compute
        ckpt = Path(workdir) / CHECKPOINT  # a corrupt checkpoint is refused before any compute too
        saved = safe_load(ckpt, map_location="cpu") if resume and ckpt.exists() else None
        self.cfg = cfg
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._eval_loaders: dict[tuple[int, bool], DataLoader] = {}  # persistent evaluation loaders (loader)
        self._device_splits: dict[int, tuple[Tensor, Tensor]] = {}  # splits held on the device (loader)
        self.reporter = reporter or (lambda metrics: None)
        self.progress = progress
        #: this process's rank in a data-parallel trial (None: a single process, the plain path)
        self.dp = DataParallel.current()
        if self.dp is not None:
            check_data_parallel(cfg, self.dp.world)
        self.device = resolve_device(cfg.device)
        if self.dp is not None and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # the rank's own GPU
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.method = METHODS.get(cfg.method)
        seed_everything(cfg.seed)

        self.data: DataSplits = build_data(
            cfg.dataset, cfg.data_root, cfg.input_size, train_subset=cfg.train_subset,
            test_subset=cfg.test_subset, val_fraction=cfg.val_fraction, data_seed=cfg.data_seed,
            download=cfg.download)
        #: the dataset, its split sizes and a digest of its images (in every report and the final one)
        self.dataset = split_record(cfg.dataset, self.data)
        if self.dp is not None and len(self.data.train) < cfg.batch_size:
            raise ConfigError(f"batch_size: {cfg.batch_size} is more than the {len(self.data.train)} "
                              f"training images; a trial on {self.dp.world} workers needs at least "
                              f"one full global batch")
        source: SourceModel = build_model(cfg.model, pretrained=cfg.pretrained, allow_download=cfg.download,
                                          source_checkpoint=cfg.source_checkpoint)
        self.source = source
        self.model = source.module
        set_bn_momentum(self.model, cfg.bn_momentum)
        if self.dp is not None:  # BatchNorm statistics over the global batch (see distributed.py)
            self.model = sync_batchnorm(self.model)
        self.head_name, _ = head_layer(self.model)
        self.new_head: nn.Linear | None = None
        if cfg.head == "linear":
            self.new_head = replace_head(self.model, self.data.num_classes)
        elif self.data.num_classes > source.num_source_classes:
            raise ValueError(f"head: {self.data.num_classes} target classes cannot be label-mapped "
                             f"onto {source.num_source_classes} source classes; use head='linear'")
        self.label_map = LabelMap(self.data.num_classes, identity=cfg.head == "linear")
        self.prompt: Prompt = build_prompt(cfg.prompt, input_size=cfg.input_size,
                                           output_size=cfg.output_size, mean=source.mean,
                                           std=source.std, pad_size=cfg.pad_size,
                                           prompt_size=cfg.resolved_prompt_size,
                                           plain_frame=cfg.plain_frame)
        #: whether this trial's method ever feeds the prompt (else every pass is a plain one)
        self.uses_prompt = cfg.prompt != "none" and cfg.effective_vp_stages != "none"
        self.prompt.channels_last = self._channels_last()
        self.model.to(self.device)
        self.prompt.to(self.device)
        self.prompt.share_input_gradient(first_layer(self.model)[1])  # batch-summed input grad
        self.label_map.to(self.device)
        # Weight rewinding (LTH) needs the state the trial started from (pretrained, new head init).
        self.pretrained_state = ({k: v.detach().clone() for k, v in self.model.state_dict().items()}
                                 if self.method.rewinds else None)

        exclude = []
        if not cfg.prune_head:
            exclude.append(self.head_name)
        if not cfg.prune_first or cfg.nm is not None:  # N:M: the first conv stays dense (3 inputs)
            exclude.append(first_layer(self.model)[0])
        self.net = MaskedNetwork(self.model, self.method.weight_sparsity(cfg),
                                 allocation=cfg.allocation, exclude=tuple(exclude),
                                 density_floor=cfg.density_floor,
                                 pattern=cfg.nm if self.method.prunes and not self.method.structured else None)
        #: channel methods' dependency groups, gates and physical removal (set by their ``setup``)
        self.channels: ChannelPruner | None = None
        self.method.setup(self)
        self.mask_file_masks = self._load_mask_file() if cfg.mask_file else None

        if self.device.type == "cuda":  # fixed input shapes: let cuDNN pick the fastest kernels once
            torch.backends.cudnn.benchmark = True
        self.amp_dtype = amp_dtype(self.device) if cfg.amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.history: list[dict[str, Any]] = []
        self.completed: list[str] = []
        self.grad_steps = 0
        self.prompted_steps = 0
        self.forward_passes = 0
        self.backward_passes = 0
        self.wall_time = 0.0
        self.eval_time = 0.0  # validation, test and label mapping passes (cumulative)
        self._stage_step: StepFn | None = None
        self._mean_loss: Tensor | None = None  # data-parallel: the ranks' mean loss of the last step
        self._after_backward: Callable[[], None] | None = None
        self.best: dict[str, Any] | None = None
        self.mapping_done = False
        self.resume_state: dict[str, Any] | None = None
        if saved is not None:
            self._restore(saved)

    def _channels_last(self) -> bool:
        if self.cfg.channels_last is not None:
            return self.cfg.channels_last
        return prefers_channels_last(self.model, self.device)

    # --- data -------------------------------------------------------------------------------

    def _on_device(self, dataset) -> bool:
        """Whether ``dataset`` is served from a copy on the device (``cfg.data_on_device``)."""
        size = device_copy_bytes(dataset)
        if size is None:
            return False
        if self.cfg.data_on_device is not None:
            return self.cfg.data_on_device
        return self.device.type == "cuda" and size <= _DEVICE_COPY_BYTES

    def loader(self, dataset, train: bool, generator: torch.Generator | None = None,
               shard: bool = True) -> DataLoader:
        """Batches of uint8 images and labels of ``dataset`` (a split of ``self.data``): shuffled
        by ``generator`` to train, in order to evaluate; held on the device where it fits.

        In a data-parallel trial (``shard``), this rank's shard: its ``batch_size / N`` part of
        every global training batch, or its part of every ``eval_batch_size * N`` images in
        order (:class:`~vpns_core.distributed.ShardedBatches`). ``shard=False``: the whole split
        on every rank (the same batches everywhere, e.g. a method's scoring batches)."""
        cfg = self.cfg
        batch_size = cfg.batch_size if train else cfg.eval_batch_size
        drop_last = train and len(dataset) >= cfg.batch_size
        sampler = None
        if self.dp is not None and shard:
            local = self.dp.local_batch(batch_size) if train else batch_size
            sampler = ShardedBatches(len(dataset), local, self.dp.rank, self.dp.world, shuffle=train,
                                     drop_last=drop_last, generator=generator)
        if self._on_device(dataset):
            if id(dataset) not in self._device_splits:
                self._device_splits[id(dataset)] = hold_on_device(dataset, self.device)
            return DeviceBatches(self._device_splits[id(dataset)], dataset.size, batch_size,
                                 shuffle=train, drop_last=drop_last, generator=generator,
                                 batch_sampler=sampler)
        workers = cfg.num_workers
        # Evaluation splits are read in a fixed order four times an epoch: keep their loaders and
        # worker processes (starting a loader's workers costs time each pass; benchmarks/input_pipeline.py).
        # Training loaders stay per epoch: their shuffling is seeded per epoch for exact resume.
        persistent = (workers > 0 and not train
                      and any(dataset is d for d in (self.data.train_eval, self.data.val, self.data.test)))
        if persistent and (id(dataset), sampler is not None) in self._eval_loaders:
            return self._eval_loaders[(id(dataset), sampler is not None)]
        batching = dict(batch_sampler=sampler) if sampler is not None else \
            dict(batch_size=batch_size, shuffle=train, drop_last=drop_last)
        loader = DataLoader(dataset, **batching, generator=generator, num_workers=workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=persistent)
        if persistent:
            self._eval_loaders[(id(dataset), sampler is not None)] = loader
        return loader

    def to_device(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """A batch from :meth:`loader` on the trial's device, images as floats in [0, 1]."""
        x = x.to(self.device, non_blocking=True).float().div_(255.0)
        return x, y.to(self.device, non_blocking=True)

    # --- forward ----------------------------------------------------------------------------

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def forward(self, x: Tensor, prompted: bool) -> Tensor:
        return self.label_map(self.model(self.prompt(x, enabled=prompted)))

    def prompt_params(self) -> list[nn.Parameter]:
        return list(self.prompt.parameters())

    def prompt_groups(self, lr: float) -> list[dict[str, Any]]:
        """The prompt's optimiser group at ``lr``, or none when ``cfg.learn_prompt`` is False:
        the prompt then stays at its init (frozen, so without gradient) while the stage still
        takes its prompted passes and steps."""
        if not self.cfg.learn_prompt:
            return []
        return [{"params": self.prompt_params(), "lr": lr}]

    def head_groups(self, lr: float) -> list[dict[str, Any]]:
        """A new linear head is trained in the mask stage too (its weights are not pretrained)."""
        if self.new_head is None:
            return []
        params = [p for n, p in self.new_head.named_parameters() if n in ("weight", "bias")]
        return [{"params": params, "lr": lr}]

    def rng_untouched(self):
        """A context in which the global RNGs are saved and restored: evaluation passes must not
        change training. Without it every evaluation loader draws its base seed from the global
        generator (as does a random prompt's location), so a method that evaluates one more pass
        (VPNs with and without its prompt, HYDRA once) trained later epochs with other dropout
        masks: VPNs with an immovable prompt differed from HYDRA by 6 points at one seed."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    @torch.no_grad()
    def evaluate(self, dataset, prompted: bool) -> tuple[float, float]:
        """Top-1 accuracy and mean loss on ``dataset`` (eval mode); no effect on training."""
        self.model.eval()
        correct = torch.zeros((), device=self.device)
        loss = torch.zeros((), device=self.device)
        seen = 0
        with self.rng_untouched():
            for x, y in self.loader(dataset, train=False):
                x, y = self.to_device(x, y)
                with self.autocast():
                    logits = self.forward(x, prompted).float()
                loss += F.cross_entropy(logits, y, reduction="sum")
                correct += (logits.argmax(1) == y).sum()
                seen += len(y)
        n = len(dataset)
        if self.dp is not None:  # each rank evaluated its shard: sum, and every image counts once
            correct, loss, seen = self.dp.sum_scalars(correct, loss, seen, device=self.device)
            seen = int(seen.item())
            if seen != n:
                raise RuntimeError(f"evaluate: the {self.dp.world} ranks evaluated {seen} images of a "
                                   f"split of {n}")
        return correct.item() / n, loss.item() / n

    def label_mapping_indices(self) -> np.ndarray:
        """Positions in the training split whose images set the label mapping: all of them
        (``label_mapping_samples=None``, as the authors' code), or that many drawn from
        ``data_seed`` across the whole split, stratified by class. Never the first N: a dataset
        stored class by class would map most classes from no image at all. Fixed by the config,
        so a resumed trial maps from the same images."""
        data, n = self.data.train_eval, self.cfg.label_mapping_samples
        if n is None or n >= len(data):
            return np.arange(len(data))
        rng = np.random.default_rng([self.cfg.data_seed, 3])
        labels = getattr(data, "labels", None)
        if labels is None:  # labels unknown without decoding: a plain seeded draw
            return np.sort(rng.permutation(len(data))[:n])
        return stratified_sample(labels, n, rng)

    @torch.no_grad()
    def compute_label_mapping(self, prompted: bool) -> Tensor:
        """FLM over the training images of :meth:`label_mapping_indices` (test-time transform)."""
        if self.label_map.identity:
            return self.label_map.mapping
        data = self.data.train_eval
        indices = self.label_mapping_indices()
        self.model.eval()
        preds, targets = [], []
        subset = data if len(indices) == len(data) else Subset(data, indices.tolist())
        with self.rng_untouched():
            for x, y in self.loader(subset, train=False):
                x, y = self.to_device(x, y)
                with self.autocast():
                    preds.append(self.model(self.prompt(x, enabled=prompted)).argmax(1))
                targets.append(y)
        if self.dp is None:
            mapping = frequency_label_mapping(torch.cat(preds), torch.cat(targets),
                                              self.source.num_source_classes, self.data.num_classes)
            self.label_map.mapping.copy_(mapping.to(self.device))
            return mapping
        # Each rank counted its shard of the mapping images; rank 0 maps the summed counts once
        # and every rank takes its mapping.
        empty = torch.zeros(0, dtype=torch.long, device=self.device)
        counts = label_counts(torch.cat(preds) if preds else empty, torch.cat(targets) if targets else empty,
                              self.source.num_source_classes, self.data.num_classes)
        counts = self.dp.sum(counts.to(self.device)).cpu()
        mapping = greedy_mapping(counts).to(self.device) if self.dp.is_main else \
            torch.empty(self.data.num_classes, dtype=torch.long, device=self.device)
        self.dp.broadcast_(mapping)
        self.label_map.mapping.copy_(mapping)
        return mapping.cpu()

    @torch.no_grad()
    def recalibrate_bn(self, prompted: bool) -> None:
        """Re-estimate BatchNorm running statistics for the (sparse) model on training images."""
        bns = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not bns or self.cfg.bn_recalibrate_batches == 0:
            return
        saved = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
        self.model.train()
        with self.rng_untouched():
            for i, (x, y) in enumerate(self.loader(self.data.train_eval, train=False, shard=False)):
                if i >= self.cfg.bn_recalibrate_batches:
                    break
                self.model(self.prompt(self.to_device(x, y)[0], enabled=prompted))
        for m, momentum in zip(bns, saved):
            m.momentum = momentum

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

    def count_passes(self, forward: int = 0, backward: int = 0) -> None:
        """Add mini-batch forward/backward passes done outside the standard step (scoring, BiP)."""
        self.forward_passes += forward
        self.backward_passes += backward

    def scoring_batches(self, n: int) -> list[tuple[Tensor, Tensor]]:
        """The first ``n`` shuffled training batches (test-time transform) on the device, drawn
        from ``cfg.seed`` alone: the data of SNIP/GraSP-style scores."""
        batches: list[tuple[Tensor, Tensor]] = []
        gen = torch.Generator().manual_seed(self.cfg.seed)
        for x, y in self.loader(self.data.train_eval, train=True, generator=gen, shard=False):
            if len(batches) == n:
                break
            batches.append(self.to_device(x, y))
        return batches

    @torch.no_grad()
    def rewind(self) -> None:
        """Reset every parameter and buffer to its value at the start of the trial (pretrained
        weights, a new head's init), keeping the masks; needs ``method.rewinds``."""
        if self.pretrained_state is None:
            raise RuntimeError(f"rewind: method '{self.cfg.method}' keeps no pretrained copy")
        missing, unexpected = self.model.load_state_dict(self.pretrained_state, strict=False)
        if unexpected or any(not k.endswith("weight_mask") for k in missing):
            raise RuntimeError(f"rewind: model keys changed (missing {missing[:3]}, unexpected {unexpected[:3]})")

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
        cfg = self.cfg
        if not self.stage_pending(stage):
            return
        epochs = cfg.stage_epochs("tune") if epochs is None else epochs
        prompted = cfg.prompt_in_tune_stage if prompted is None else prompted
        if train_weights is None:
            train_weights = not (stage == "tune" and cfg.post_prompt == "zero_shot")
        groups = ([{"params": list(self.model.parameters()), "lr": cfg.tune_lr}] if train_weights
                  else self.head_groups(cfg.tune_lr))
        if prompted:
            groups += self.prompt_groups(cfg.tune_prompt_lr or cfg.tune_lr)
        if cfg.prompt_in_mask_stage and not prompted:
            with torch.no_grad():  # "VP only in mask finding": the prompt is dropped here
                for p in self.prompt_params():
                    p.zero_()
        self.run_stage(stage, groups, optimizer="sgd", epochs=epochs, prompted=prompted,
                       recalibrate=stage != "warmup", extra_metrics=extra_metrics,
                       after_backward=after_backward)

    def optimizer(self, kind: str, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """The stage optimizer (``adam`` or ``sgd``) over ``groups``; only their parameters train:
        every other model and prompt parameter is frozen."""
        cfg = self.cfg
        trainable = {id(p) for g in groups for p in g["params"]}
        for p in list(self.model.parameters()) + self.prompt_params():
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
        cfg = self.cfg
        opt = self.optimizer(optimizer, groups)
        steps_per_epoch = self._steps_per_epoch()
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
        elif not self.mapping_done:
            # After the threshold is set, with the zero-initialised prompt: the frame a prompted
            # pass sees (the authors' code), or the plain input for a method without a prompt.
            self.compute_label_mapping(prompted=self.uses_prompt)
            self.mapping_done = True
        if recalibrate and start == 0:
            self.recalibrate_bn(prompted)
        if self.dp is not None:  # every rank starts the stage from rank 0's state (DDP does the same)
            self.dp.broadcast_state(self.model, self.prompt, self.label_map)
            self.net.refresh(force=True)
            self.dp.check_replicas(self.replica_digests(), f"at the start of {stage}")
        self._stage_step = step
        self._after_backward = after_backward
        for epoch in range(start, epochs):
            if cfg.head == "ilm":
                self.compute_label_mapping(prompted=prompted)
            lrs = [g["lr"] for g in opt.param_groups]  # at the start of the epoch
            t0 = time.perf_counter()
            train_metrics = self._train_epoch(stage, epoch, opt, sched, prompted, steps_per_epoch)
            if cfg.lr_per_epoch:
                sched.step()
            if self.dp is not None:  # one model on every rank: checked, not assumed
                self.dp.check_replicas(self.replica_digests(), f"after {stage} epoch {epoch + 1}")
            elapsed = time.perf_counter() - t0
            self.wall_time += elapsed
            metrics = self._epoch_metrics(stage, epoch, prompted, train_metrics, elapsed, lrs,
                                          last_of_stage=epoch == epochs - 1)
            metrics.update(extra_metrics or {})
            self.history.append(metrics)
            last = epoch == epochs - 1
            if last:
                self.completed.append(stage)
            self._save(stage, epoch + 1, opt, sched)
            self.reporter({**metrics, "dataset": dict(self.dataset)})
        self._stage_step = None
        self._after_backward = None
        if epochs == 0:
            self.completed.append(stage)

    def _steps_per_epoch(self) -> int:
        n = len(self.data.train) // self.cfg.batch_size or 1
        return min(n, self.cfg.max_steps_per_epoch or n)

    def _epoch_seed(self, stage: str, epoch: int) -> int:
        return (self.cfg.seed * 1_000_003 + stage_index(stage) * 10_007 + epoch) % 2**62

    def _train_epoch(self, stage: str, epoch: int, opt, sched, prompted: bool,
                     steps: int) -> dict[str, float]:
        """One epoch of ``steps`` iterations.

        ``paper`` schedule: one step per iteration on an augmented batch, prompted if the stage
        uses the prompt. ``reference`` schedule (the authors' code) with the prompt: two steps
        per iteration, first on a prompted batch with the test-time transform, drawn from its
        own shuffle of the training split, then on an unprompted augmented batch from an
        independent shuffle; every optimised group (scores or weights) takes both steps, the
        prompt only gets a gradient from the first. Without the prompt: one unprompted step.
        """
        cfg = self.cfg
        self.model.train()
        seed = self._epoch_seed(stage, epoch)
        augment = torch.Generator(device=self.device).manual_seed(seed)
        loader = self.loader(self.data.train, train=True, generator=torch.Generator().manual_seed(seed))
        two_step = cfg.schedule == "reference" and prompted
        if two_step:  # a second, independent stream (an LCG step away from every epoch's seed)
            prompted_seed = (seed * 6364136223846793005 + 1442695040888963407) % 2**62
            prompted_loader = self.loader(self.data.train_eval, train=True,
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
                xp, yp = self.to_device(*prompted_batch)
                self.train_step(opt, sched, xp, yp, prompted=True, scheduler_step=False)
            x, y = self.to_device(*batch)
            if self.dp is None:
                x = random_crop_flip(x, cfg.input_size, augment)
            else:  # drawn for the whole global batch: this rank crops its rows of it
                x = random_crop_flip(x, cfg.input_size, augment, draws=cfg.batch_size,
                                     offset=self.dp.rank * len(y))
            loss, logits = self.train_step(opt, sched, x, y, prompted=prompted and not two_step,
                                      scheduler_step=per_step)
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            checked = loss if self.dp is None else self._mean_loss  # the same decision on every rank
            if step % check_every == 0 and not torch.isfinite(checked):
                raise NonFiniteLossError(f"loss became {checked.item()} at {stage} epoch {epoch} step {step}")
            if self.progress is not None:
                self.progress({"stage": stage, "epoch": epoch + 1, "step": step + 1, "steps": steps,
                               "images": seen, "elapsed": time.perf_counter() - started})
        if self.dp is not None:  # the epoch's numbers over all ranks' images
            loss_sum, correct, seen = self.dp.sum_scalars(loss_sum, correct, seen, device=self.device)
            seen = int(seen.item())
        if not torch.isfinite(loss_sum):
            raise NonFiniteLossError(f"loss became non-finite in {stage} epoch {epoch}")
        return {"train_loss": loss_sum.item() / max(1, seen), "train_acc": correct.item() / max(1, seen),
                "images": seen}

    def train_step(self, opt, sched, x: Tensor, y: Tensor, prompted: bool,
                   scheduler_step: bool = True) -> tuple[Tensor, Tensor]:
        """One optimizer step on the device batch ``x, y`` (with the prompt if ``prompted``),
        under the current stage's step function and AMP scaling; returns the loss and logits."""
        if self._stage_step is not None:  # e.g. BiP: sets the grads, we apply the update
            opt.zero_grad(set_to_none=True)
            loss, logits = self._stage_step(x, y, prompted, opt)
            opt.step()
        else:
            with self.autocast():
                logits = self.forward(x, prompted).float()
                loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.dp is not None:  # weights, scores, head and prompt: the ranks' mean gradient
                self._mean_loss = self.dp.average_gradients(opt, loss)
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

    def _epoch_metrics(self, stage: str, epoch: int, prompted: bool, train: dict[str, float],
                       elapsed: float, lrs: list[float], last_of_stage: bool = False) -> dict[str, Any]:
        """The epoch's row. Validation is evaluated every epoch (with and without the prompt);
        the test set only where a result reads it (``cfg.test_every_epoch`` False): at the end
        of mask finding and at each tuning epoch that becomes the validation-selected one."""
        cfg = self.cfg
        if self.net.mode == "score":
            self.net.refresh()
        t0 = time.perf_counter()
        # A method without a prompt has one (plain) pass; a prompt that adds nothing (a pad
        # prompt still at its zero init, in the same frame) gives the same numbers with and
        # without it: one pass, not two.
        if not self.uses_prompt:
            passes = (False,)
        else:
            passes = (True,) if self.prompt.is_identity() else (True, False)
        val = {p: self.evaluate(self.data.val, prompted=p)[0] if len(self.data.val) else math.nan
               for p in passes}
        val_p, val_n = val[passes[0]], val[passes[-1]]
        # Headline accuracy: prompted when this stage trains with the prompt under the paper
        # schedule; the reference code measures without the prompt.
        headline_prompted = prompted and cfg.schedule == "paper"
        val_acc = val_p if headline_prompted else val_n
        selected = stage == "tune" and (self.best is None or val_acc > self.best["val_acc"])
        tested = cfg.test_every_epoch or selected or (stage == "mask" and last_of_stage)
        test_metrics: dict[str, float] = {}
        if tested:
            test = {p: self.evaluate(self.data.test, prompted=p) for p in passes}
            (test_p, test_loss), test_n = test[passes[0]], test[passes[-1]][0]
            test_metrics = {"test_loss": test_loss, "test_acc_prompt": test_p,
                            "test_acc_noprompt": test_n,
                            "test_acc": test_p if headline_prompted else test_n}
        eval_time = time.perf_counter() - t0
        self.eval_time += eval_time
        report = self.method.sparsity_report(self)
        metrics = {
            "stage": stage,
            "stage_index": stage_index(stage),
            "stage_epoch": epoch + 1,
            "epoch": len(self.history) + 1,
            "train_loss": train["train_loss"],
            "train_acc": train["train_acc"],
            **test_metrics,
            "val_acc_prompt": val_p,
            "val_acc_noprompt": val_n,
            "val_acc": val_acc,
            "sparsity": report["sparsity"],
            "sparsity_all_layers": report["sparsity_all_layers"],
            "min_layer_density": report["min_layer_density"],
            "lr": lrs[0],
            "prompt_lr": lrs[-1] if prompted and cfg.learn_prompt else 0.0,
            "epoch_time_s": elapsed,
            "eval_time_s": eval_time,
            "images_per_s": train["images"] / elapsed if elapsed > 0 else 0.0,
            "grad_steps": self.grad_steps,
            "prompted_steps": self.prompted_steps,
            "forward_passes": self.forward_passes,
            "backward_passes": self.backward_passes,
            "wall_time_s": self.wall_time,
        }
        if selected:
            self.best = {"val_acc": val_acc, "epoch": metrics["epoch"],
                         "test_acc": test_metrics["test_acc"],
                         "test_acc_prompt": test_metrics["test_acc_prompt"],
                         "test_acc_noprompt": test_metrics["test_acc_noprompt"]}
            self._keep_best()
        return metrics

    # --- checkpoints ------------------------------------------------------------------------

    def _keep_best(self) -> None:
        masks = self.net.current_masks() if self.net.mode != "dense" else {}
        self.best_state = {
            "model": {k: v.cpu() for k, v in plain_state_dict(self.model, masks).items()},
            "prompt": {k: v.detach().cpu().clone() for k, v in self.prompt.state_dict().items()},
            "mapping": self.label_map.mapping.cpu().clone(),
        }

    def _save(self, stage: str, stage_epoch: int, opt, sched) -> None:
        if self.dp is not None and not self.dp.is_main:
            return  # rank 0 writes; every rank holds the same state
        atomic_save({
            "format": "vpns-trial-1",
            "config": self.cfg.to_dict(),
            "stage": stage,
            "stage_epoch": stage_epoch,
            "completed": list(self.completed),
            "net_mode": self.net.mode,
            "model": self.model.state_dict(),
            "prompt": self.prompt.state_dict(),
            "label_map": self.label_map.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(self.device),
            "history": self.history,
            "grad_steps": self.grad_steps,
            "prompted_steps": self.prompted_steps,
            "forward_passes": self.forward_passes,
            "backward_passes": self.backward_passes,
            "wall_time": self.wall_time,
            "eval_time": self.eval_time,
            "best": self.best,
            "best_state": getattr(self, "best_state", None),
            **self.method.checkpoint_state(self),
        }, self.workdir / CHECKPOINT)

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("format") != "vpns-trial-1":
            raise CheckpointError(f"checkpoint: {self.workdir / CHECKPOINT} is not a vpns trial checkpoint")
        saved = {k: v for k, v in state["config"].items() if k not in _RUNTIME_FIELDS}
        current = {k: v for k, v in self.cfg.to_dict().items() if k not in _RUNTIME_FIELDS}
        if saved != current:
            diff = sorted(k for k in current if saved.get(k) != current[k])
            raise CheckpointError(f"checkpoint: {self.workdir / CHECKPOINT} was written with a "
                                  f"different config (fields {diff}); use another workdir")
        if state["net_mode"] == "score":
            self.net.attach_scores()
        elif state["net_mode"] == "fixed":
            prefix_masks = {n: state["model"][f"{n}.weight_mask"] for n, _ in self.net.layers}
            self.net.fix(prefix_masks)
        self.method.restore(self, state)
        self.model.load_state_dict(state["model"])
        self.prompt.load_state_dict(state["prompt"])
        self.label_map.load_state_dict(state["label_map"])
        self.completed = list(state["completed"])
        self.history = list(state["history"])
        self.grad_steps = state["grad_steps"]
        self.prompted_steps = state.get("prompted_steps", 0)
        self.forward_passes = state.get("forward_passes", 0)
        self.backward_passes = state.get("backward_passes", 0)
        self.wall_time = state["wall_time"]
        self.eval_time = state.get("eval_time", 0.0)
        self.best = state["best"]
        if state["best_state"] is not None:
            self.best_state = state["best_state"]
        self.mapping_done = True
        if state["stage"] in self.completed:
            set_rng_state(state["rng"], self.device)
        else:
            self.resume_state = state

    def replica_digests(self) -> dict[str, str]:
        """Digests of what every rank of a data-parallel trial must hold identically: masks (top-k
        of the current scores, or the fixed ones), thresholds, model parameters and buffers
        (BatchNorm statistics, masks), prompt and label mapping."""
        self.net.refresh()
        masks = self.net.current_masks() if self.net.mode != "dense" else {}
        thresholds = [m.weight_threshold for _, m in self.net.layers] if self.net.mode == "score" else []
        return {"masks": digest(masks[n] for n in sorted(masks)), "thresholds": digest(thresholds),
                "parameters": digest(self.model.parameters()), "buffers": digest(self.model.buffers()),
                "prompt": digest(self.prompt.state_dict().values()),
                "label_mapping": digest([self.label_map.mapping])}

    # --- method helpers ---------------------------------------------------------------------

    def first_images(self, n: int) -> Tensor:
        """The first ``n`` training images in evaluation order (test-time transform) on the
        device, e.g. to check that a change of the model kept its outputs; no effect on training."""
        with self.rng_untouched():
            x, _ = next(iter(self.loader(self.data.train_eval, train=False, shard=False)))
        return self.to_device(x, torch.zeros(0, dtype=torch.long))[0][:n]

    def _load_mask_file(self) -> dict[str, Tensor]:
        payload = safe_load(self.cfg.mask_file)
        masks = payload.get("masks", payload) if isinstance(payload, dict) else None
        names = {n for n, _ in self.net.layers}
        if not isinstance(masks, dict) or not names <= set(masks):
            raise CheckpointError(f"mask_file: {self.cfg.mask_file} has no masks for layers "
                                  f"{sorted(names - set(masks or {}))[:5]} of {self.cfg.model}")
        shapes = {n: tuple(m.weight.shape) for n, m in self.net.layers}  # dense mode here
        wrong = [n for n in sorted(names) if tuple(masks[n].shape) != shapes[n]]
        if wrong:
            raise CheckpointError(f"mask_file: {self.cfg.mask_file} does not fit {self.cfg.model}: "
                                  f"layer {wrong[0]} has a mask of shape {tuple(masks[wrong[0]].shape)}, "
                                  f"its weight {shapes[wrong[0]]} ({len(wrong)} layers differ)")
        return {n: masks[n].bool() for n in names}

    # --- the whole trial --------------------------------------------------------------------

    def run(self) -> TrialResult:
        """The method's stages, or for ``cfg.mask_file`` (transfer) its fine-tuning of that mask."""
        if self.mask_file_masks is not None:
            self.method.transfer(self)
        else:
            self.method.run(self)
        return self.finish()

    def finish(self) -> TrialResult:
        """Write masks, per-layer stats, the prompt image and the exported model; summarise.
        In a data-parallel trial only rank 0 writes and measures the cost record (the other ranks'
        summaries, without it, are not reported: sweeps/data_parallel.py)."""
        writes = self.dp is None or self.dp.is_main
        stats = [dict(name=s.name, numel=s.numel, kept=s.kept, density=s.density, pruned=s.pruned)
                 for s in self.net.layer_stats()] if self.net.mode != "dense" else []
        masks = self.net.current_masks() if self.net.mode != "dense" else {}
        if writes:
            atomic_save({"masks": {k: v.cpu() for k, v in masks.items()}, "model": self.cfg.model,
                         "sparsity": self.cfg.sparsity}, self.workdir / "masks.pt")
            (self.workdir / "layer_stats.json").write_text(json.dumps(stats, indent=1))
        best = getattr(self, "best_state", None)
        if best is None:
            self._keep_best()
            best = self.best_state
        export = {"state_dict": best["model"], "masks": {k: v.cpu() for k, v in masks.items()},
                  "model": self.cfg.model, "num_source_classes": self.source.num_source_classes,
                  "head": self.cfg.head, "label_mapping": best["mapping"],
                  "num_classes": self.data.num_classes, "prompt": best["prompt"],
                  "prompt_type": self.cfg.prompt, "input_size": self.cfg.input_size, "dataset": self.cfg.dataset,
                  "output_size": self.cfg.output_size, "mean": list(self.source.mean),
                  "std": list(self.source.std)}
        export.update(self.method.export_entries(self))
        if writes:
            atomic_save(export, self.workdir / "model_export.pt")
            # the state dict needs the architecture's code (vpns' own for the tiny ResNet); the
            # torch.export programs carry it: plain torch loads them (vpns_core.export)
            save_programs(self.predictor(export, best), export, self.workdir)
        final = dict(self.history[-1]) if self.history else {}
        final["dataset"] = dict(self.dataset)
        if self.best is not None:
            final.update({"selected_epoch": self.best["epoch"], "selected_val_acc": self.best["val_acc"],
                          "selected_test_acc": self.best["test_acc"],
                          "selected_test_acc_prompt": self.best["test_acc_prompt"],
                          "selected_test_acc_noprompt": self.best["test_acc_noprompt"]})
        mask_stage = [h for h in self.history if h["stage"] == "mask"]
        if mask_stage:
            final["mask_stage_test_acc_prompt"] = mask_stage[-1]["test_acc_prompt"]
            final["mask_stage_test_acc_noprompt"] = mask_stage[-1]["test_acc_noprompt"]
        final.update(self.method.final_metrics(self))
        if writes:  # one rank times the model; the others would only queue on the timing lock
            final.update(self.costs(export))
        final["trial_time_s"] = self.wall_time + self.eval_time  # training and evaluation
        final["prompt_tunable"] = self.prompt.tunable_count if self.uses_prompt else 0
        if self.cfg.nm is not None:  # the layers an N:M pattern leaves dense, by name
            final["nm_dense_layers"] = ", ".join(n for n, _ in self.net.excluded)
        pad = self.uses_prompt and self.cfg.prompt == "pad"
        final["prompt_input_fraction"] = self.cfg.prompt_input_fraction if pad else 0.0
        final["prompt_image_fraction"] = self.cfg.prompt_image_fraction if pad else 0.0
        return TrialResult(self.cfg, final, list(self.history), stats, self.workdir)

    def predictor(self, export: dict[str, Any], best: dict[str, Any]) -> Predictor:
        """The exported (validation-selected) model as one CPU module, built from ``export``
        and ``best`` as a user rebuilds it: a new prompt holding the selected prompt's values,
        the plain network (:func:`vpns_core.models.plain_model`), the selected label mapping."""
        cfg = self.cfg
        prompt = build_prompt(cfg.prompt, input_size=cfg.input_size, output_size=cfg.output_size,
                              mean=self.source.mean, std=self.source.std, pad_size=cfg.pad_size,
                              prompt_size=cfg.resolved_prompt_size, plain_frame=cfg.plain_frame)
        prompt.load_state_dict(best["prompt"])
        label_map = LabelMap(self.data.num_classes, identity=self.label_map.identity)
        label_map.mapping.copy_(best["mapping"])
        return Predictor(prompt, plain_model(export), label_map, prompted=self.uses_prompt)

    def costs(self, export: dict[str, Any]) -> dict[str, Any]:
        """The cost record of the model this trial exports, with ``cfg.cost_record`` (else
        ``{}``): :func:`vpns_core.costs.trial_costs` on the trial's device, input layout and
        autocast; a 2:4 trial's semi-structured check runs on real unprompted test images."""
        @torch.no_grad()
        def images() -> Tensor:
            x = torch.stack([self.data.test[i][0] for i in range(min(64, len(self.data.test)))])
            return self.prompt(x.to(self.device).float().div(255), enabled=False)
        return trial_costs(export, self.cfg, device=self.device, amp_dtype=self.amp_dtype,
                           channels_last=self._channels_last(), inputs=images)


_RUNTIME_FIELDS = ("device", "amp", "num_workers", "num_threads", "eval_batch_size", "tags", "data_root",
                   "download", "channels_last", "cost_record", "count_flops", "measure_repeats",
                   "latency_batch")  # no effect on training


def run_trial(cfg: Config, workdir: str | Path, reporter: Reporter | None = None,
              resume: bool = True, progress: Progress | None = None) -> TrialResult:
    """Run (or resume) one trial in ``workdir``; see :class:`Trial`."""
    return Trial(cfg, workdir, reporter, resume, progress).run()
