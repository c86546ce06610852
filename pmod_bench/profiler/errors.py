"""The profiler's error type: bad input, with a message that names the fix (the CLI exits 2 on it)."""

from __future__ import annotations


class ProfileError(ValueError):
    """Bad input to the profiler; the message says what to change."""


__all__ = ["ProfileError"]
