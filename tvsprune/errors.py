"""The one user-facing error type.

Anything the user can fix (a bad path, a corrupt image, a mismatched checkpoint) raises
:class:`TvsError`; the CLI prints its message on one line and exits with its code.
Internal bugs keep their traceback.
"""
from __future__ import annotations


class TvsError(Exception):
    """A problem with the user's input or environment, shown without a traceback."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class MissingDependencyError(TvsError):
    """An optional backend (TensorRT, onnxruntime-gpu, CUDA) is not available."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=2)
