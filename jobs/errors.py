"""Which errors are the user's to fix: the CLI turns these into one line and a non-zero exit."""

from __future__ import annotations

from models.artifact import ArtifactError
from pipeline.colorize import ColorizeError
from pipeline.storage import StorageError
from pipeline.train_data import TrainingConfigError, TrainingDataError

# Anything else is a bug and keeps its traceback, so it can be reported and fixed.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ArtifactError,
    ColorizeError,
    StorageError,
    TrainingConfigError,
    TrainingDataError,
    FileNotFoundError,
    PermissionError,
)
