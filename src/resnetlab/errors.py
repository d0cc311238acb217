"""The project's own error types: each message says what went wrong and what to do."""

from __future__ import annotations


class ResNetLabError(Exception):
    """Base class; the CLI prints these as one clear line instead of a traceback."""


class UnknownModelError(ResNetLabError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class WeightsError(ResNetLabError):
    """A checkpoint or weights file cannot be used with this model."""


class DataError(ResNetLabError):
    """A dataset path, archive or image is missing, malformed or unsafe."""


class InputError(ResNetLabError, ValueError):
    """A tensor given to a model has the wrong shape or channel count."""


class ConfigError(ResNetLabError, ValueError):
    """A recipe, config or override is invalid."""
