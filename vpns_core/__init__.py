"""vpns_core: visual-prompt-upgraded network sparsification (VPNs) for torchvision models."""
from .config import Config, ConfigError
from .registry import UnknownNameError

__all__ = ["Config", "ConfigError", "UnknownNameError", "run_trial"]
__version__ = "0.1.0"


def run_trial(*args, **kwargs):
    """Run one trial; see :func:`vpns_core.train.run_trial`."""
    from .train import run_trial as _run
    return _run(*args, **kwargs)
