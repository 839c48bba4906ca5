"""Where a run's files go: one folder per run, the one that holds its `checkpoints/`."""

from __future__ import annotations

from pathlib import Path


def run_dir(trainer) -> Path:
    """Return `<save_dir>/<logger name>/<version>` as Lightning's ModelCheckpoint builds it, or the root folder
    when there is no logger; plots, configs and predictions sit beside the checkpoints there."""
    logger = trainer.logger
    if logger is None:
        return Path(trainer.default_root_dir)
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version
