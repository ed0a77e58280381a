"""The checks of a :class:`~vpns_core.config.Config` that need the registries (methods, prompts,
datasets, models, mask allocations) or several fields at once; ``Config`` holds values and
checks plain ones itself, then calls :func:`validate`. Each error is one
:class:`~vpns_core.errors.ConfigError` that names the field."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .data import DATASETS
from .errors import ConfigError
from .masking import ALLOCATIONS
from .methods import METHODS, POST_PROMPTS, method_for
from .models import is_model_name
from .prompts import PROMPTS

if TYPE_CHECKING:  # pragma: no cover
    from .config import Config


def validate(cfg: "Config") -> None:
    """Raise :class:`ConfigError` for the first invalid field of ``cfg``."""
    def fail(name: str, message: str) -> None:
        raise ConfigError(f"{name}: {message} (got {getattr(cfg, name)!r})")

    def choice(name: str, allowed) -> None:
        if getattr(cfg, name) not in allowed:
            fail(name, f"choose from {', '.join(map(str, allowed))}")

    choice("allocation", ALLOCATIONS)
    if cfg.pattern != "unstructured":
        parts = cfg.pattern.split(":") if isinstance(cfg.pattern, str) else []
        if len(parts) != 2 or not all(p.isdigit() for p in parts) or not 0 < int(parts[0]) < int(parts[1]) <= 32:
            fail("pattern", "choose unstructured or N:M with 0 < N < M <= 32 (2:4, 1:4, 4:8, ...)")
        n, m = int(parts[0]), int(parts[1])
        if abs(cfg.sparsity - (1 - n / m)) > 1e-9:
            fail("sparsity", f"a {n}:{m} pattern removes {1 - n / m:g} of each pruned layer's "
                             f"weights; set sparsity={1 - n / m:g}")
    choice("prompt", PROMPTS.names())
    choice("method", METHODS.names())
    choice("post_prompt", POST_PROMPTS)
    choice("dataset", DATASETS.names())
    if not is_model_name(cfg.model):
        fail("model", "unknown model; choose from efficientnet_lite0, tiny_resnet or any "
                      "torchvision classification model (resnet18, resnet50, vgg16, ...)")
    # Geometry (MISSION.md): pad may exceed the zero border and overlap the image.
    if cfg.input_size > cfg.output_size:
        fail("input_size", f"must not exceed output_size={cfg.output_size}")
    if 2 * cfg.pad_size > cfg.output_size:
        fail("pad_size", f"must be at most output_size/2 = {cfg.output_size // 2}")
    if cfg.prompt_size is not None and cfg.prompt_size > cfg.output_size:
        fail("prompt_size", f"must not exceed output_size={cfg.output_size}")
    if cfg.prompt in ("fix", "random") and cfg.prompt_size is None and cfg.pad_size == 0:
        fail("prompt_size", "needed for fix/random prompts when pad_size is 0")
    method = method_for(cfg.method)
    vp_stages = method.vp_stages(cfg)
    if cfg.prompt == "pad" and cfg.pad_size == 0 and vp_stages != "none":
        fail("pad_size", "a pad prompt needs pad_size >= 1 (use prompt='none' for no prompt)")
    if cfg.learn_prompt is False and (cfg.prompt == "none" or vp_stages == "none"):
        fail("learn_prompt", "False freezes a prompt, but this trial feeds none (prompt='none' "
                             "or a method without a prompt): leave it True")
    method.validate(cfg)
