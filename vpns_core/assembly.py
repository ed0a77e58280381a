"""The assembled model of a trial (:class:`Assembly`): the pretrained network with its weight
masks, its head (label-mapped or a new linear one), the visual prompt, and the label map, on the
trial's device. ``forward(x, prompted)`` is the one forward pass every step, evaluation and
method uses: ``label_map(model(prompt(x)))``.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from .config import Config
from .data import DataSplits
from .distributed import digest
from .errors import ConfigError
from .export import Predictor
from .label_mapping import LabelMap
from .masking import MaskedNetwork, plain_state_dict
from .models import (SourceModel, build_model, first_layer, head_layer, plain_model, prefers_channels_last,
                     replace_head, set_bn_momentum)
from .prompts import Prompt, build_prompt


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype of a trial with ``amp=True``: bf16 where the GPU supports it,
    else fp16 (with loss scaling); None on a CPU (full precision)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def make_prompt(cfg: Config, source: SourceModel) -> Prompt:
    """The prompt of ``cfg`` for a model normalised as ``source`` (at its initial values)."""
    return build_prompt(cfg.prompt, input_size=cfg.input_size, output_size=cfg.output_size,
                        mean=source.mean, std=source.std, pad_size=cfg.pad_size,
                        prompt_size=cfg.resolved_prompt_size, plain_frame=cfg.plain_frame)


class Assembly:
    """Network, masks, head, prompt and label map of one trial.

    ``method`` answers which weights carry masks (``weight_sparsity``, ``prunes``,
    ``structured``) and whether the pretrained state is kept for rewinding (``rewinds``);
    ``prepare`` wraps the network for the trial's collective (global-batch BatchNorm on N ranks).
    """

    def __init__(self, cfg: Config, data: DataSplits, method: Any, device: torch.device,
                 prepare=lambda model: model) -> None:
        self.cfg, self.device = cfg, device
        source: SourceModel = build_model(cfg.model, pretrained=cfg.pretrained, allow_download=cfg.download,
                                          source_checkpoint=cfg.source_checkpoint)
        self.source = source
        self.num_classes = data.num_classes
        self.model = source.module
        set_bn_momentum(self.model, cfg.bn_momentum)
        self.model = prepare(self.model)
        self.head_name, _ = head_layer(self.model)
        self.new_head: nn.Linear | None = None
        if cfg.head == "linear":
            self.new_head = replace_head(self.model, data.num_classes)
        elif data.num_classes > source.num_source_classes:
            raise ConfigError(f"head: {data.num_classes} target classes cannot be label-mapped "
                              f"onto {source.num_source_classes} source classes; use head='linear'")
        self.label_map = LabelMap(data.num_classes, identity=cfg.head == "linear")
        self.prompt: Prompt = make_prompt(cfg, source)
        #: whether this trial's method ever feeds the prompt (else every pass is a plain one)
        self.uses_prompt = cfg.prompt != "none" and cfg.effective_vp_stages != "none"
        self.channels_last = (cfg.channels_last if cfg.channels_last is not None
                              else prefers_channels_last(self.model, device))
        self.prompt.channels_last = self.channels_last
        self.model.to(device)
        self.prompt.to(device)
        self.prompt.share_input_gradient(first_layer(self.model)[1])  # batch-summed input grad
        self.label_map.to(device)
        # Weight rewinding (LTH) needs the state the trial started from (pretrained, new head init).
        self.pretrained_state = ({k: v.detach().clone() for k, v in self.model.state_dict().items()}
                                 if method.rewinds else None)
        exclude = []
        if not cfg.prune_head:
            exclude.append(self.head_name)
        if not cfg.prune_first or cfg.nm is not None:  # N:M: the first conv stays dense (3 inputs)
            exclude.append(first_layer(self.model)[0])
        self.net = MaskedNetwork(self.model, method.weight_sparsity(cfg), allocation=cfg.allocation,
                                 exclude=tuple(exclude), density_floor=cfg.density_floor,
                                 pattern=cfg.nm if method.prunes and not method.structured else None)
        self.amp_dtype = amp_dtype(device) if cfg.amp else None

    # --- the forward pass -------------------------------------------------------------------

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def forward(self, x: Tensor, prompted: bool) -> Tensor:
        return self.label_map(self.model(self.prompt(x, enabled=prompted)))

    # --- what a stage optimises ---------------------------------------------------------------

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

    @torch.no_grad()
    def rewind(self) -> None:
        """Reset every parameter and buffer to its value at the start of the trial (pretrained
        weights, a new head's init), keeping the masks; needs ``method.rewinds``."""
        if self.pretrained_state is None:
            raise RuntimeError(f"rewind: method '{self.cfg.method}' keeps no pretrained copy")
        missing, unexpected = self.model.load_state_dict(self.pretrained_state, strict=False)
        if unexpected or any(not k.endswith("weight_mask") for k in missing):
            raise RuntimeError(f"rewind: model keys changed (missing {missing[:3]}, unexpected {unexpected[:3]})")

    # --- snapshots ----------------------------------------------------------------------------

    def masks(self) -> dict[str, Tensor]:
        """The current weight masks by layer (none for a dense network)."""
        return self.net.current_masks() if self.net.mode != "dense" else {}

    def snapshot(self) -> dict[str, Any]:
        """The plain network (masks applied), the prompt and the label mapping, on the CPU: what
        the export holds of the selected epoch."""
        return {"model": {k: v.cpu() for k, v in plain_state_dict(self.model, self.masks()).items()},
                "prompt": {k: v.detach().cpu().clone() for k, v in self.prompt.state_dict().items()},
                "mapping": self.label_map.mapping.cpu().clone()}

    def replica_digests(self) -> dict[str, str]:
        """Digests of what every rank of a data-parallel trial must hold identically: masks (top-k
        of the current scores, or the fixed ones), thresholds, model parameters and buffers
        (BatchNorm statistics, masks), prompt and label mapping."""
        self.net.refresh()
        masks = self.masks()
        thresholds = [m.weight_threshold for _, m in self.net.layers] if self.net.mode == "score" else []
        return {"masks": digest(masks[n] for n in sorted(masks)), "thresholds": digest(thresholds),
                "parameters": digest(self.model.parameters()), "buffers": digest(self.model.buffers()),
                "prompt": digest(self.prompt.state_dict().values()),
                "label_mapping": digest([self.label_map.mapping])}

    def predictor(self, export: dict[str, Any], best: dict[str, Any]) -> Predictor:
        """The exported (validation-selected) model as one CPU module, built from ``export``
        and ``best`` as a user rebuilds it: a new prompt holding the selected prompt's values,
        the plain network (:func:`vpns_core.models.plain_model`), the selected label mapping."""
        prompt = make_prompt(self.cfg, self.source)
        prompt.load_state_dict(best["prompt"])
        label_map = LabelMap(self.num_classes, identity=self.label_map.identity)
        label_map.mapping.copy_(best["mapping"])
        return Predictor(prompt, plain_model(export), label_map, prompted=self.uses_prompt)
