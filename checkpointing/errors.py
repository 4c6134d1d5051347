"""Errors of the checkpointing component."""

from __future__ import annotations

from common.errors import UserError


class CheckpointError(UserError):
    """The checkpoint destination is unusable, or no checkpoint can be loaded; says which and why."""


class CorruptCheckpoint(Exception):
    """A committed checkpoint whose files do not match its manifest (size or checksum)."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"checkpoint step {step} is corrupt: {reason}")
        self.step = step
        self.reason = reason


class WriteFailed(Exception):
    """A file could not be written after every retry."""
