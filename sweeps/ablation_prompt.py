"""Prompt-type ablation: pad, fix and random prompts at an equal number of tunable values,
searched with both learning rates."""
import sys

from search_spaces import prompt_type
from sweeps.sweep import run_sweep, single_phase

plan = single_phase(prompt_type)


def main(argv=None):
    return run_sweep("ablation_prompt", plan, argv, doc=__doc__, num_samples=9)


if __name__ == "__main__":
    sys.exit(main())
