"""Frequency label mapping (FLM) from source classes to target classes (ILM-VP, Chen et al. 2023).

The source head is kept; target class ``t`` reads the logit of source class ``mapping[t]``.
FLM counts, over training images, how often each source class is predicted for each target
class, then greedily assigns the largest remaining count (one source class per target class).
Iterative label mapping (ILM) repeats this every epoch with the current prompt and model.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def frequency_label_mapping(source_pred: Tensor, target: Tensor, num_source: int,
                            num_target: int) -> Tensor:
    """Greedy one-to-one mapping from the co-occurrence counts of predictions and labels.

    Args:
        source_pred: ``[N]`` predicted source class per image.
        target: ``[N]`` true target class per image.
    Returns:
        ``[num_target]`` long tensor of distinct source classes.
    """
    return greedy_mapping(label_counts(source_pred, target, num_source, num_target))


def label_counts(source_pred: Tensor, target: Tensor, num_source: int, num_target: int) -> Tensor:
    """``[num_target, num_source]`` float64 counts of (true target class, predicted source
    class) pairs, on the CPU; counts of several shards add up to the counts of their union."""
    if num_target > num_source:
        raise ValueError(f"cannot map {num_target} target classes onto {num_source} source classes")
    counts = torch.zeros(num_target, num_source, dtype=torch.float64)
    counts.index_put_((target.long().cpu(), source_pred.long().cpu()),
                      torch.ones(len(target), dtype=torch.float64), accumulate=True)
    return counts


def greedy_mapping(counts: Tensor) -> Tensor:
    """FLM's greedy one-to-one assignment from :func:`label_counts` (not modified)."""
    counts = counts.clone()
    num_target, num_source = counts.shape
    mapping = torch.full((num_target,), -1, dtype=torch.long)
    for _ in range(num_target):
        flat = int(torch.argmax(counts))
        t, s = divmod(flat, num_source)
        mapping[t] = s
        counts[t, :] = -1.0
        counts[:, s] = -1.0
    return mapping


class LabelMap(nn.Module):
    """Selects target logits from source logits: ``logits[:, mapping]``.

    Kept apart from the classifier so the model's own state dict (and its export) is unchanged.
    ``identity=True`` (a new linear head) passes logits through.
    """

    def __init__(self, num_target: int, identity: bool = False) -> None:
        super().__init__()
        self.identity = identity
        self.register_buffer("mapping", torch.arange(num_target, dtype=torch.long))

    def forward(self, logits: Tensor) -> Tensor:
        return logits if self.identity else logits[:, self.mapping]
