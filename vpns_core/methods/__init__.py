"""Pruning methods, registered by name in ``METHODS``; :mod:`vpns_core.loop` owns the one loop;
a trial creates its own instance of its method.

Each module holds one method (and its "VPNs w. X" variant where the paper has one):

- ``score``: ``vpns`` (prompt + learned scores), ``hydra`` (the same without prompt)
- ``dense``: ``dense`` fine-tuning (reference line)
- ``random_mask``: ``random``, ``vpns_random``; ``magnitude``: ``omp``, ``vpns_omp``
- ``lottery``: ``lth`` (IMP with rewinding), ``vpns_lth``
- ``snip``, ``grasp``, ``synflow``: pruning at the pretrained weights, then fine-tuning
- ``bip``: bi-level pruning
- ``channel``: channel pruning — ``vpns_structured``, ``slim`` (Network Slimming), ``depgraph``
  (the mechanism they share is :mod:`vpns_core.channel_pruning`)

Each registered method carries its display ``label`` and ``plot_order``, which figures read.
"""
from .base import METHODS, POST_PROMPTS, Method, PruneThenTrain, TrialContext, method_for, register, with_prompt
from . import bip, channel, dense, grasp, lottery, magnitude, random_mask, score, snip, synflow  # noqa: F401  (registers)
from .score import Hydra, ScoreMethod, VPNs

__all__ = ["METHODS", "POST_PROMPTS", "Method", "PruneThenTrain", "ScoreMethod", "TrialContext", "VPNs",
           "Hydra", "method_for", "register", "with_prompt"]
