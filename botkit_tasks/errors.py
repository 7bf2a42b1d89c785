"""The exception hierarchy: one base class, driver errors converted and chained."""

from __future__ import annotations

__all__ = ["BotkitError", "ConfigurationError", "StoreError"]


class BotkitError(Exception):
    """Base class of every error botkit-tasks raises on purpose."""


class ConfigurationError(BotkitError, ValueError):
    """A setting (environment variable, URL, option) is malformed."""


class StoreError(BotkitError):
    """A key-value backend failed; the driver's exception is chained."""
