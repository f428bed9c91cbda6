"""The error a user can fix: a bad config value or workdir, reported by train.py/eval.py as one
line. Every package raises it (train/, data/, evals/), so it lives below all of them."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config or workdir problem the user must fix; reported as one line."""
