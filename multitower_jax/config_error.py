"""`ConfigError`: a config file, an override or a config value is wrong.

A module of its own, below `config`, so that the section checks `config.validate` calls
(`calibration_settings`) raise it without importing `config`; `config.ConfigError` is the same class.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """The config file, an override or a config value is wrong."""
