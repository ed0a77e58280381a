"""The error a sweep's user gets for a wrong flag, ``--set`` or what they point at.

Its own module so that the parser (:mod:`sweeps.flags`), the checks (:mod:`sweeps.preflight`) and
the scripts raise one class without importing each other.
"""
from __future__ import annotations


class UsageError(ValueError):
    """A flag, a ``--set`` or what they point at is wrong; the message names it and the fix."""
