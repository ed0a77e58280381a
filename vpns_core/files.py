"""The files of a trial without torch: checks of the files it reads (``mask_file``,
``source_checkpoint``, a trial's ``checkpoint.pt``), so that a front door refuses a missing file,
a folder or a file that is no torch checkpoint at all in its own words before torch is imported,
and the atomic write every file of a trial or sweep goes through. Whether a torch file holds only
tensors and plain containers is :func:`vpns_core.checkpoint.check_readable`'s.
"""
from __future__ import annotations

import glob
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import ConfigError

#: the first byte of a pickle of protocol 2 or later: ``torch.save``'s legacy (non-zip) format
_PICKLE_PROTO = 0x80
#: the file a folder given instead of a file most likely meant, per field
_IN_A_TRIAL_FOLDER = {"mask_file": "masks.pt", "source_checkpoint": "checkpoint.pt",
                      "checkpoint": "checkpoint.pt"}


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or not a vpns checkpoint."""


def check_file_path(field: str, path: str | os.PathLike) -> None:
    """Raise :class:`ConfigError` (message starting with ``field``) unless ``path`` is a file; a
    folder gets the file of a trial folder it probably meant."""
    path = Path(path)
    if path.is_dir():
        inside = path / _IN_A_TRIAL_FOLDER.get(field, "checkpoint.pt")
        hint = f"; did you mean {inside}?" if inside.is_file() else f"; give the {inside.name} of a trial"
        raise ConfigError(f"{field}: {path} is a folder, not a file{hint}")
    if not path.is_file():
        raise ConfigError(f"{field}: file not found (got {str(path)!r})")


def torch_file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be a file written by ``torch.save`` (a zip archive, or a pickle in the
    legacy format), judged from its first bytes; None if it may be one."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    if not head:
        return "the file is empty"
    if head[0] == _PICKLE_PROTO or zipfile.is_zipfile(path):
        return None
    text = head.isascii() and all(32 <= b < 127 or b in b"\t\r\n" for b in head)
    return ("not a torch checkpoint: torch.save writes a zip archive and this file starts with text"
            if text else "not a torch checkpoint: torch.save writes a zip archive and this file is not one")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, fsync it and rename it into
    place, so a reader never sees a half-written file (a kill mid-write leaves the old one, or
    none; its temporary file is removed by the next successful write of the same path).
    Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a killed writer
        stale.unlink(missing_ok=True)
    return path
