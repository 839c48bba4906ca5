"""Errors a user can fix. `tea-lightning` prints their message (which names the file, line or option and what to
do) and exits with status 1 instead of a traceback; library callers catch them as the built-in type they extend."""

from __future__ import annotations


class UserError(Exception):
    """A problem in the input, the options or the machine that the message explains."""


class ConfigError(UserError, ValueError):
    """An option value that cannot work; the message names the option."""


class CheckpointWriteError(UserError, OSError):
    """A checkpoint that could not be written (disk full, read-only folder); earlier checkpoints are intact."""


class NonFiniteLoss(UserError, FloatingPointError):
    """Training produced a NaN or infinite loss; the message names the step and the batch's images."""
