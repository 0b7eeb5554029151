"""Errors a user or operator can cause. Torch-free: shared by every layer.

The CLI prints ``error: <message>`` for any ``PolymorphError`` and exits 2, so
every message must name the value, what was expected and what to do.
"""

from __future__ import annotations


class PolymorphError(Exception):
    """Base class for errors caused by input, configuration or environment."""


class DataError(PolymorphError):
    """A dataset file is malformed (names the file, the entry and the problem)."""


class ConfigError(PolymorphError):
    """A configuration value is invalid."""


class BundleError(PolymorphError):
    """A bundle is missing, corrupt, unsigned when it must be signed, or mismatched."""


class CheckpointError(PolymorphError):
    """A checkpoint file has an unknown format or does not fit the model."""


class MissingExtraError(PolymorphError):
    """An optional dependency (the train or jetson extra) is not installed."""
