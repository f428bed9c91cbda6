"""The error a user can fix: a bad config value or workdir, reported by train.py/eval.py as one
line. Every package raises it (train/, data/, evals/), so it lives below all of them."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config or workdir problem the user must fix; reported as one line."""


class CheckpointWriteError(ConfigError):
    """A checkpoint that could not be written (a full disk, lost permissions); the message
    names the newest complete checkpoint, from which a rerun resumes."""


class DamagedCheckpoint(ConfigError):
    """A checkpoint step whose files are missing or cannot be read (a truncated file, a deleted
    `_METADATA` or item directory); the message names the step and what is wrong with it."""

    def __init__(self, message: str, step: int, why: str):
        super().__init__(message)
        self.step = step
        self.why = why


class CheckpointReadError(ConfigError):
    """A checkpoint step whose files are there but could not be read this time for a reason
    outside them (memory, network, permissions, a full disk): not damage, so nothing is moved
    and a rerun reads it again."""
