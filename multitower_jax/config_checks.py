"""Config checks in one style: `ConfigError`, and the helpers every section's check raises it through.

Each config section keeps its defaults and its checks next to the code that reads it (`config`:
data, features, train, mesh, synthetic; `model_settings`: model, loss, optim;
`calibration_settings`, `retrieval.settings`, `serving.settings`, `baselines.settings`), and
`config.validate` runs them. Every failure reads the same way, naming the key:

    config.<section>.<key>: expected <what is allowed>, got <the value>
    config.<section>: unknown keys [...]; known: [...]

A module of its own, below `config` and free of JAX, so that a section's checks import it without
an import cycle, and `multitower --help` stays fast (not even numpy); `config.ConfigError` is the same class.
"""

from __future__ import annotations

import numbers
from collections.abc import Collection, Iterable
from typing import Any, NoReturn


class ConfigError(ValueError):
    """The config file, an override or a config value is wrong."""


def fail(key: str, expected: str, value: Any, hint: str = "", error: type[ConfigError] = ConfigError) -> NoReturn:
    """Raise `error` naming ``config.<key>``, what it should be and what it is."""
    raise error(f"config.{key}: expected {expected}, got {value!r}{hint}")


def require(ok: bool, key: str, expected: str, value: Any, hint: str = "",
            error: type[ConfigError] = ConfigError) -> None:
    """`fail` unless `ok`."""
    if not ok:
        fail(key, expected, value, hint, error)


def require_present(section: Any, keys: Iterable[str], prefix: str = "") -> None:
    """Raise ConfigError naming the first of `keys` missing from `section` (a ConfigDict or dict)
    whose own key is `prefix` ("" for the whole config)."""
    for key in keys:
        if key not in section:
            raise ConfigError(f"config.{prefix + '.' if prefix else ''}{key}: missing")


def require_known(section: str, given: Iterable[str], known: Collection[str],
                  error: type[ConfigError] = ConfigError) -> None:
    """Raise `error` naming every key of ``config.<section>`` that is not in `known`."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise error(f"config.{section}: unknown keys {unknown}; known: {sorted(known)}")


def is_int(value: Any) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float (numpy's too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_positive_int(value: Any) -> bool:
    return is_int(value) and value > 0


def require_positive_int(value: Any, key: str) -> None:
    require(is_positive_int(value), key, "a positive integer", value)


def require_number(value: Any, key: str, allow_zero: bool = False) -> None:
    """A positive number (or non-negative, with `allow_zero`)."""
    ok = is_number(value) and (value >= 0 if allow_zero else value > 0)
    require(ok, key, "a non-negative number" if allow_zero else "a positive number", value)


def require_fraction(value: Any, key: str, expected: str = "a dropout rate in [0, 1)") -> None:
    """A number in [0, 1)."""
    require(is_number(value) and 0 <= value < 1, key, expected, value)


def require_choice(value: Any, key: str, choices: tuple[str, ...]) -> None:
    require(value in choices, key, " or ".join(repr(c) for c in choices), value)


def require_bool(value: Any, key: str) -> None:
    require(isinstance(value, bool), key, "true or false", value)
