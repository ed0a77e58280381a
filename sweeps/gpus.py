"""The NVIDIA GPUs a sweep started on this machine can give its trials, counted without importing
torch or starting Ray: a sweep on a machine without them pays nothing for the question.

The count is the one a local Ray declares: Ray asks NVIDIA's management library (NVML, the
``libnvidia-ml.so.1`` every NVIDIA driver installs; Ray's vendored pynvml) how many GPUs there
are, and keeps at most as many as ``CUDA_VISIBLE_DEVICES`` lists. Asking NVML the same way, with
``ctypes``, gives the same answer in the same places: bare metal, containers given GPUs by the
NVIDIA runtime, WSL2 (which has no ``/proc/driver/nvidia``). NVML neither creates a CUDA context
nor reserves memory, so the sweep's driver can still fork (:func:`sweeps.sweep._supervise`).
Whether torch can use the GPUs is checked before Ray starts
(:func:`sweeps.preflight.check_local_resources`) and again in each trial
(:func:`sweeps.placement.place`).
"""
from __future__ import annotations

import ctypes
import os


def local_gpus() -> int:
    """How many GPUs a local Ray started by this process would have (0 without an NVIDIA driver)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "NoDevFiles"):
        return 0  # hidden (the test suite hides them this way): no need to ask the driver
    count = _nvml_device_count()
    if visible is not None:
        count = min(count, len([v for v in visible.split(",") if v.strip()]))
    return count


def _nvml_device_count() -> int:
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:  # no NVIDIA driver on this machine
        return 0
    if nvml.nvmlInit_v2() != 0:  # NVML_SUCCESS; e.g. a driver/library version mismatch
        return 0
    try:
        count = ctypes.c_uint(0)
        return count.value if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0 else 0
    finally:
        nvml.nvmlShutdown()
