"""Dense fine-tuning: the unpruned reference line of the sparsity curves."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Method, register

if TYPE_CHECKING:  # pragma: no cover
    from .base import TrialContext


@register
class Dense(Method):
    """Dense fine-tuning of the whole pretrained model (with the prompt if VP is on in tuning)."""

    name = "dense"
    label = "dense"
    plot_order = 40
    prunes = False
    uses_prompt = True

    def run(self, ctx: "TrialContext") -> None:
        ctx.run_tune_stage()
