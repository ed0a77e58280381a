"""Input-size ablation: accuracy against the size the image is resized to inside a fixed frame
(pad fixed), searched with both learning rates."""
import sys

from search_spaces import input_size
from sweeps.sweep import run_sweep, single_phase

plan = single_phase(input_size)


def main(argv=None):
    return run_sweep("ablation_input_size", plan, argv, doc=__doc__, num_samples=10)


if __name__ == "__main__":
    sys.exit(main())
