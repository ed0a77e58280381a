"""Atomic checkpoints with full RNG state, loadable with ``torch.load(weights_only=True)``."""
from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

# CheckpointError and atomic_write live in .files (no torch there); imported from here too
from .files import CheckpointError, atomic_write, torch_file_problem  # noqa: F401


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(..., weights_only=True)`` with a clear error for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint: file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, pickle refused by weights_only, ...
        raise _cannot_read("checkpoint", path, err) from err


def _cannot_read(field: str, path: Path, err: Exception) -> CheckpointError:
    """The error for a file ``torch.load(weights_only=True)`` refused, in our words (torch's own
    message for pickled objects advises ``weights_only=False``, which vpns never does)."""
    if isinstance(err, pickle.UnpicklingError):
        return CheckpointError(f"{field}: cannot read {path}: it holds pickled Python objects besides "
                               f"tensors and plain containers, and vpns never unpickles those (loading "
                               f"them could run code from the file); save tensors, dicts and lists only")
    first = str(err).splitlines()[0] if str(err) else ""
    return CheckpointError(f"{field}: cannot read {path}: a damaged or incomplete torch file "
                           f"({type(err).__name__}: {first})")


def check_readable(path: str | os.PathLike, field: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` (message starting with ``field``) unless ``path`` is a torch
    file that ``torch.load(weights_only=True)`` accepts: missing, truncated, not a torch file, or
    holding pickled objects other than tensors and plain containers. Memory-maps the file (zip
    format), so the check reads little of the tensors' data."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{field}: file not found: {path}")
    problem = torch_file_problem(path)
    if problem:
        raise CheckpointError(f"{field}: cannot read {path}: {problem}")
    try:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # not the zip format (legacy torch.save, or not torch at all)
            if "mmap" not in str(err):
                raise
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every failure means "not loadable"
        raise _cannot_read(field, path, err) from err


def rng_state(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Python, NumPy and torch CPU generator states as weights_only-safe values, plus the CUDA
    generator of the trial's own device (only that one: a trial resumed where another number of
    GPUs is visible must not restore states to devices that are not there)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": _tuples_to_lists(random.getstate()),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    device = torch.device(device)
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | str = "cpu") -> None:
    """Restore :func:`rng_state`. The saved CUDA state goes to the trial's device when it runs on
    one (a CPU checkpoint resumed on a GPU keeps that GPU's seeded generator; a GPU checkpoint
    resumed on the CPU drops it). Checkpoints of older versions hold a list, one state per
    visible GPU: the trial device's entry, or the first, is used."""
    random.setstate(_lists_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    device = torch.device(device)
    saved = state.get("cuda")
    if device.type == "cuda" and saved is not None:
        if isinstance(saved, (list, tuple)):
            if not saved:
                return
            saved = saved[device.index or 0] if (device.index or 0) < len(saved) else saved[0]
        torch.cuda.set_rng_state(saved, device)


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict[str, Any]) -> None:
    """Load a GradScaler's saved state, skipping an empty one: a checkpoint written on a CPU or
    under bf16 (scaler disabled, state ``{}``) resumed under fp16 starts a fresh scale, where
    ``GradScaler.load_state_dict({})`` would raise."""
    if state:
        scaler.load_state_dict(state)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _tuples_to_lists(value: Any) -> Any:
    return [_tuples_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _lists_to_tuples(value: Any) -> Any:
    return tuple(_lists_to_tuples(v) for v in value) if isinstance(value, list) else value
