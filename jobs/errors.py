"""Which errors are the user's to fix: the CLI turns these into one line and a non-zero exit.

Named, not imported: importing them would load Ray and torch for every `chromascan --help`.
An error of a type whose module was never imported cannot have been raised, so looking the
classes up in sys.modules at the moment of the error is exact.
"""

from __future__ import annotations

import sys

# Anything else is a bug and keeps its traceback, so it can be reported and fixed.
USER_ERROR_NAMES: tuple[tuple[str, str], ...] = (
    ("models.artifact", "ArtifactError"),
    ("pipeline.colorize", "ColorizeError"),
    ("pipeline.manifest_tools", "ManifestToolError"),
    ("pipeline.storage", "StorageError"),
    ("pipeline.train_data", "TrainingConfigError"),
    ("pipeline.train_data", "TrainingDataError"),
)
BUILTIN_USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, PermissionError)


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is one the user can fix (a bad path, model, flag, or input)."""
    if isinstance(error, BUILTIN_USER_ERRORS):
        return True
    for module_name, class_name in USER_ERROR_NAMES:
        module = sys.modules.get(module_name)
        error_type = getattr(module, class_name, None) if module is not None else None
        if isinstance(error_type, type) and isinstance(error, error_type):
            return True
    return False


def own_error(error: BaseException) -> BaseException:
    """The task's own error when ``error`` is Ray's wrapper around it, else ``error`` itself.

    A task's error reaches the driver as a RayTaskError subclass of the task's error type whose
    message is the task's whole traceback; the error the task raised, with its one-line
    message, is kept in ``.cause``.
    """
    cause = getattr(error, "cause", None)
    is_task_error = any(cls.__name__ == "RayTaskError" for cls in type(error).__mro__)
    return cause if is_task_error and isinstance(cause, BaseException) else error
