"""The suite runs on the CPU, also on a machine with a GPU: its exact-resume comparisons (1e-6)
would not hold under cuDNN's nondeterminism, and its timings are sized for a CPU. The CUDA tests
(``-m cuda``) run with ``VPNS_TEST_CUDA=1``, as ``scripts/gpu_check.sh`` does. Set here, before
anything initialises CUDA, so that Ray's worker processes inherit it too."""
import os

if os.environ.get("VPNS_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
