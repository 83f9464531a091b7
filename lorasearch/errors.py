"""Error types that map to the CLI's exit codes and the API's 4xx answers."""
from __future__ import annotations


class LoraSearchError(Exception):
    """Base class for every error the project raises on purpose."""


class BadInput(LoraSearchError):
    """The input is not something we can read (exit code 2, HTTP 4xx).

    Args:
        message: one line naming the file and what is wrong with it.
        code: a short machine-readable reason, e.g. ``"truncated"``.
    """

    def __init__(self, message: str, code: str = "bad_input") -> None:
        super().__init__(message)
        self.code = code


class UnsupportedLayout(BadInput):
    """The file is valid safetensors but its keys are not a LoRA layout we know."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="unsupported_layout")


class PickleRefused(BadInput):
    """Pickled weights are never unpickled."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="pickle_refused")
