"""Errors a user can fix, shared by every layer (the message names the problem and the fix)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and the fix."""


class QuantizationError(ConfigError):
    """A method or set-up that cannot run on a quantized base (or bitsandbytes is missing)."""
