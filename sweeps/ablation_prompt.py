"""Prompt-type ablation: pad, fix and random prompts at an equal number of tunable values.
Optuna (TPE) over prompt type and both learning rates, ASHA early stopping;
``--search grid --scheduler fifo`` runs the exact grid of the figure.
"""
import sys

from search_spaces import prompt_type
from sweeps.common import run_sweep


def plan(sweep):
    sweep.run_phase("trials", prompt_type.base(sweep.preset), prompt_type.space(sweep.preset))


def main(argv=None):
    return run_sweep("ablation_prompt", plan, argv, doc=__doc__, num_samples=9)


if __name__ == "__main__":
    sys.exit(main())
