"""The one typed description of a trial, validated when it is built.

``Config(**values)`` or ``Config.from_dict(tune_config)`` raise :class:`ConfigError` naming the
field and the allowed values for anything wrong, before any data or model is touched. Unknown keys
fail. Derived values (prompt size at equal tunable count, effective VP stages) are properties.

Only values are checked here, so that a sweep driver can build the configs of trials that will run
on other machines; whether this machine has the trial's device, files, data and weights is
:func:`vpns_core.resources.check_resources`, called where a trial starts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError

__all__ = ["Config", "ConfigError"]

VP_STAGES = ("both", "mask", "tune", "none")
SCHEDULES = ("paper", "reference")
HEADS = ("flm", "ilm", "linear")
DEVICES = ("auto", "cpu", "cuda")
ALLOWED_INPUT_SIZES_PAPER = (32, 64, 96, 128, 160, 192, 224)


@dataclass(frozen=True)
class Config:
    # --- task -------------------------------------------------------------------------------
    dataset: str = "fashion_mnist"
    data_root: str | None = None
    download: bool = False
    train_subset: int | None = 3000
    test_subset: int | None = 2000
    val_fraction: float = 0.1
    data_seed: int = 0
    model: str = "efficientnet_lite0"
    pretrained: bool = True
    source_checkpoint: str | None = None
    head: str = "flm"                   # flm | ilm (mapping recomputed every epoch) | linear
    label_mapping_samples: int | None = 1000  # training images (stratified, seeded) that set
                                        # the label mapping; None = the whole training split
    bn_momentum: float | None = 0.1     # None keeps the model's own (Lite0 ships TF's 0.01)
    bn_recalibrate_batches: int = 0     # >0: re-estimate BN statistics after the mask is set
    # --- prompt -----------------------------------------------------------------------------
    prompt: str = "pad"                 # pad | fix | random | none
    input_size: int = 48
    output_size: int = 64
    pad_size: int = 8
    prompt_size: int | None = None      # fix/random square; None = same tunable count as pad
    vp_stages: str = "both"             # both | mask | tune | none (none = HYDRA)
    learn_prompt: bool = True           # False: the prompt stays at its init (a pad: zero) and
                                        # is never updated, while every prompted pass and step
                                        # still runs (the control with the pads' exact updates)
    schedule: str = "paper"             # paper | reference (the authors' two-step loop; see README)
    matched_updates: bool = False       # reference: a stage without the prompt runs twice its
                                        # epochs, so it takes as many updates as a prompted stage
                                        # (two steps per iteration); no change under paper
    # --- pruning ----------------------------------------------------------------------------
    method: str = "vpns"
    sparsity: float = 0.5
    allocation: str = "erk"             # erk (default: survives 90% on Lite0) | global | layerwise
    pattern: str = "unstructured"       # unstructured | N:M (e.g. 2:4: n of every m weights along
                                        # the input dimension; sparsity must be 1 - n/m)
    prune_first: bool = True
    prune_head: bool = False
    density_floor: float = 0.01
    mask_file: str | None = None        # transfer: fine-tune these masks instead of pruning (any method)
    post_prompt: str = "none"           # pilot study, plain pruners: none | zero_shot | fine_tune
    # --- baselines (vpns_core/methods/) -----------------------------------------------------
    prune_batches: int = 1              # SNIP / GraSP: training batches scored at the pretrained weights
    grasp_temperature: float = 200.0    # GraSP: logits / T (their code's 200)
    synflow_iterations: int = 100       # SynFlow: rounds of the exponential schedule
    lth_rate: float = 0.2               # LTH: fraction of the remaining weights pruned per round
    lth_epochs_per_round: int | None = None  # LTH: epochs per round; None = tune_epochs
    bip_optimizer: str = "adam"         # BiP scores: adam (VPNs paper) | sgd (BiP code, mask_lr 0.1)
    bip_weight_lr: float | None = None  # BiP lower-level SGD step size; None = tune_lr
    bip_implicit_lr: float = 1e-4       # BiP lr2 = 1/γ of the implicit gradient
    # --- channel methods (vpns_structured, slim, depgraph; sparsity = channel sparsity) -----
    channel_allocation: str = "layerwise"  # layerwise (same ratio per group) | global
    warmup_epochs: int = 0              # dense (sparse-regularised) training before pruning
    channel_reg: float | None = None    # slim / depgraph penalty; None = torch-pruning's default
    # --- cost record (vpns_core/costs.py; the sweeps that read it turn it on) ----------------
    cost_record: bool = False           # measure the exported model at the end (params_m, flops_g,
                                        # latency_ms) and, for channel methods, dense vs pruned
    count_flops: bool = True            # the cost record counts FLOPs (flops_g, flops_nonzero_g)
    measure_repeats: int = 5            # timed runs of each latency of the cost record and of the
                                        # channel methods' dense/pruned comparison (0 = skip timing)
    latency_batch: int = 64             # batch size of the cost record's latency (latency_ms)
    # --- stage 1: mask finding (scores + prompt, Adam, cosine) ------------------------------
    mask_epochs: int = 2
    mask_lr: float = 0.01
    mask_prompt_lr: float | None = None  # None = mask_lr
    # --- stage 2: weight tuning (weights + prompt, SGD momentum, cosine) --------------------
    tune_epochs: int = 2
    tune_lr: float = 0.01
    tune_prompt_lr: float | None = None  # None = tune_lr
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 64
    # --- runtime ----------------------------------------------------------------------------
    seed: int = 7
    device: str = "auto"
    amp: bool = True                    # mixed precision on CUDA (ignored on CPU)
    num_workers: int | None = None     # loader workers; None: 0 for splits in memory, else the
                                        # trial's CPUs less one (at most 8): vpns_core.feed.Feed.workers
    num_threads: int | None = None      # torch CPU threads (None = torch's default)
    channels_last: bool | None = None   # NHWC inputs; None: on CUDA, and on a CPU for models with
                                        # depthwise convolutions (Lite0 steps 2x faster there)
    data_on_device: bool | None = None  # in-memory datasets (Fashion-MNIST, digits, CIFAR) held on
                                        # the device at native size, resized/cropped/flipped there in
                                        # batches; None: on CUDA when the copy fits (2 GiB a split)
    eval_batch_size: int = 256
    test_every_epoch: bool = False      # False: test only where read (end of mask finding, selected epochs)
    max_steps_per_epoch: int | None = None  # cap for smoke tests and quick sweeps
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._validate()

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        """Build from a plain dict (a Tune config, an MLflow params dict); unknown keys fail."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown config key; known keys: {', '.join(sorted(names))}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    # --- derived values ---------------------------------------------------------------------

    @property
    def effective_vp_stages(self) -> str:
        from .methods import method_for
        return method_for(self.method).vp_stages(self)

    @property
    def prompt_in_mask_stage(self) -> bool:
        return self.prompt != "none" and self.effective_vp_stages in ("both", "mask")

    @property
    def prompt_in_tune_stage(self) -> bool:
        return self.prompt != "none" and self.effective_vp_stages in ("both", "tune")

    def stage_epochs(self, stage: str) -> int:
        """Epochs of stage ``mask`` or ``tune``: ``mask_epochs`` / ``tune_epochs``, doubled when
        ``matched_updates`` asks a stage that runs without the prompt to take as many updates as
        it would with it. Under the reference schedule a prompted iteration takes two steps (the
        prompted one and the unprompted augmented one) and an unprompted iteration one, so the
        unprompted stage takes twice the iterations: each still one augmented step, as the
        method's own paper defines it (the other way to match, an extra unaugmented step per
        iteration, is exactly ``learn_prompt=False``)."""
        epochs = {"mask": self.mask_epochs, "tune": self.tune_epochs}[stage]
        prompted = self.prompt_in_mask_stage if stage == "mask" else self.prompt_in_tune_stage
        if self.matched_updates and self.schedule == "reference" and not prompted:
            return 2 * epochs
        return epochs

    @property
    def stage_plan(self) -> list[tuple[str, int]]:
        """The training stages this trial runs, in order, with their epochs (a transfer trial
        only fine-tunes)."""
        if self.mask_file is not None:
            return [("tune", self.stage_epochs("tune"))]
        from .methods import method_for
        return method_for(self.method).stages(self)

    @property
    def total_epochs(self) -> int:
        """Epoch rows the trial reports (``max_t`` for an ASHA scheduler on ``epoch``)."""
        return sum(epochs for _, epochs in self.stage_plan)

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(n, m)`` of an N:M ``pattern``; None for unstructured masks."""
        if self.pattern == "unstructured":
            return None
        n, m = (int(part) for part in self.pattern.split(":"))
        return n, m

    @property
    def plain_frame(self) -> bool:
        """Whether unprompted passes keep the zero frame: yes under ``paper`` (the paper's
        equations); under ``reference`` the network sees the bare ``input_size`` image, as in
        the authors' code."""
        return self.schedule == "paper"

    @property
    def lr_per_epoch(self) -> bool:
        """Cosine decay stepped once per epoch (the authors' code) instead of every step."""
        return self.schedule == "reference"

    @property
    def layout(self) -> str:
        """Where the pad prompt lies (MISSION.md, geometry): ``over_image`` (input = output, the
        authors' default: the prompt overlays the image's border), ``around_image`` (a shrunk
        image in a zero frame, the prompt on the frame only) or ``partly_over_image`` (a pad
        wider than the frame's border)."""
        border = (self.output_size - self.input_size) // 2
        if border == 0:
            return "over_image"
        return "around_image" if self.pad_size <= border else "partly_over_image"

    @property
    def prompt_input_fraction(self) -> float:
        """Share of the network's input pixels the pad prompt can change."""
        inner = max(0, self.output_size - 2 * self.pad_size)
        return 1.0 - inner**2 / self.output_size**2

    @property
    def prompt_image_fraction(self) -> float:
        """Share of the image's own pixels the pad prompt overlays (0 around the image)."""
        lo = (self.output_size - self.input_size) // 2
        inner_lo, inner_hi = self.pad_size, self.output_size - self.pad_size
        side = max(0, min(lo + self.input_size, inner_hi) - max(lo, inner_lo))
        return 1.0 - side**2 / self.input_size**2

    @property
    def resolved_prompt_size(self) -> int:
        from .prompts import equal_param_prompt_size
        return self.prompt_size or equal_param_prompt_size(self.output_size, self.pad_size)

    # --- validation -------------------------------------------------------------------------

    def _validate(self) -> None:
        def fail(name: str, message: str) -> None:
            raise ConfigError(f"{name}: {message} (got {getattr(self, name)!r})")

        def choice(name: str, allowed) -> None:
            if getattr(self, name) not in allowed:
                fail(name, f"choose from {', '.join(map(str, allowed))}")

        for name, kind in (("train_subset", int), ("test_subset", int), ("prompt_size", int),
                           ("input_size", int), ("output_size", int), ("batch_size", int),
                           ("eval_batch_size", int), ("label_mapping_samples", int),
                           ("max_steps_per_epoch", int), ("num_threads", int),
                           ("prune_batches", int), ("synflow_iterations", int),
                           ("latency_batch", int)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                fail(name, "must be a positive integer")
        for name in ("pad_size", "mask_epochs", "tune_epochs", "num_workers",
                     "bn_recalibrate_batches", "seed", "data_seed", "lth_epochs_per_round",
                     "warmup_epochs", "measure_repeats"):
            value = getattr(self, name)
            if name in ("lth_epochs_per_round", "num_workers") and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                fail(name, "must be a non-negative integer")
        for name in ("mask_lr", "tune_lr", "mask_prompt_lr", "tune_prompt_lr", "bip_weight_lr",
                     "grasp_temperature"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                fail(name, "must be a positive number")
        if self.channel_reg is not None and not (isinstance(self.channel_reg, (int, float)) and self.channel_reg >= 0):
            fail("channel_reg", "must be a non-negative number or None")
        for name in ("weight_decay", "momentum", "bip_implicit_lr"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) >= 0):
                fail(name, "must be a non-negative number")
        optional = ("channels_last", "data_on_device")
        for name in ("download", "pretrained", "prune_first", "prune_head", "amp", "test_every_epoch",
                     "learn_prompt", "matched_updates", "cost_record", "count_flops", *optional):
            if not isinstance(getattr(self, name), bool) and not (name in optional and getattr(self, name) is None):
                fail(name, "must be True or False" + (" or None" if name in optional else ""))
        if self.train_subset is not None and self.batch_size > self.train_subset:
            fail("batch_size", f"larger than the {self.train_subset} training images (train_subset): "
                               f"every epoch would be one short step; use at most {self.train_subset}")
        if not (isinstance(self.sparsity, (int, float)) and 0.0 <= self.sparsity < 1.0):
            fail("sparsity", "must be in [0, 1)")
        if not (isinstance(self.lth_rate, (int, float)) and 0.0 < self.lth_rate < 1.0):
            fail("lth_rate", "must be in (0, 1)")
        if not 0.0 <= self.val_fraction < 1.0:
            fail("val_fraction", "must be in [0, 1)")
        if not 0.0 <= self.density_floor < 1.0:
            fail("density_floor", "must be in [0, 1)")
        if self.bn_momentum is not None and not 0.0 < self.bn_momentum <= 1.0:
            fail("bn_momentum", "must be in (0, 1] or None")
        choice("vp_stages", VP_STAGES)
        choice("schedule", SCHEDULES)
        choice("head", HEADS)
        choice("device", DEVICES)
        choice("channel_allocation", ("layerwise", "global"))
        choice("bip_optimizer", ("adam", "sgd"))
        if not isinstance(self.tags, dict):
            fail("tags", "must be a dict of strings")
        # the checks against the registries (which import torch) and across fields: after the
        # checks of plain values above, which answer without torch
        from .validation import validate
        validate(self)

    def check_resources(self) -> None:
        """:func:`vpns_core.resources.check_resources` of this config (its device, files, data and
        weights on this machine)."""
        from .resources import check_resources
        check_resources(self)


def check_label_mapping_samples(label_mapping_samples: int | None, train_subset: int | None) -> None:
    """Raise :class:`ConfigError` if ``label_mapping_samples``, as a user gave it, asks for more
    images than the training split has (``train_subset``). The field's default (1000) means "at
    most 1000", so a smaller split maps from all its images; a value given on purpose larger than
    the split is a mistake, and a front door that received it (the CLI's flag, a sweep's
    ``--set``) calls this. Plain values: no torch is imported."""
    n, have = label_mapping_samples, train_subset
    if isinstance(n, int) and isinstance(have, int) and n > have:
        raise ConfigError(f"label_mapping_samples: more than the {have} training images "
                          f"(train_subset) the label mapping can draw from; use at most {have}, "
                          f"or none for all of them (got {n})")
