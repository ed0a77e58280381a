"""What a trial's process uses, sampled at each report: the trainable puts :meth:`Usage.sample`
under ``"system"`` in every epoch report and the tracker logs it as MLflow ``system/`` metrics
(the run page's "System metrics" tab). Measured from inside the trial's process, so a trial's
numbers are its own even when several trials share a machine (MLflow's own sampler, run from the
driver, would see the driver)."""
from __future__ import annotations

import psutil
import torch

MB = 2**20


class Usage:
    """Samples of one trial process's CPU, memory and (when it trains on CUDA) GPU memory.

    ``process_cpu_percentage`` is the process's CPU time over the wall time since the previous
    sample (100 = one core busy; more with several threads), ``cpu_utilization_percentage`` the
    same for the whole machine (0-100). Memory: the process's resident set and the machine's
    memory in use; on CUDA the peak memory torch allocated on the trial's GPU so far and what its
    allocator holds now."""

    def __init__(self, device: str) -> None:
        self.process = psutil.Process()
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.process.cpu_percent(None)  # the first call starts the interval of the next
        psutil.cpu_percent(None)

    def sample(self) -> dict[str, float]:
        """This process's use since the previous sample (or since construction)."""
        memory = psutil.virtual_memory()
        values = {"process_cpu_percentage": self.process.cpu_percent(None),
                  "process_memory_rss_megabytes": self.process.memory_info().rss / MB,
                  "cpu_utilization_percentage": psutil.cpu_percent(None),
                  "system_memory_usage_megabytes": (memory.total - memory.available) / MB,
                  "system_memory_usage_percentage": memory.percent}
        if self.cuda:
            values["gpu_max_memory_allocated_megabytes"] = torch.cuda.max_memory_allocated() / MB
            values["gpu_memory_reserved_megabytes"] = torch.cuda.memory_reserved() / MB
        return values
