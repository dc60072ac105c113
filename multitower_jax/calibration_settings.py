"""The ``config.calibration`` section: one method per head, ECE bins, output clipping; its
defaults and its checks (`multitower_jax.calibration` fits and applies the methods).

Outside the `calibration` package, whose `core` reads workdir configs through `config`, so that
`config.validate` checks this section at module level without an import cycle, and experiment
files read its defaults without importing JAX.
"""

from __future__ import annotations

import ml_collections

from multitower_jax.config_checks import is_int, require, require_known

METHODS = ("isotonic", "platt", "temperature", "identity")
PRODUCT = "product"  # calibration.ctcvr only
HEADS = ("ctr", "cvr", "ctcvr")
DEFAULT_EPS = 1e-6


def default_config() -> ml_collections.ConfigDict:
    """The ``config.calibration`` section (experiments/base.py uses it; old workdirs fall back to it)."""
    c = ml_collections.ConfigDict()
    c.ctr = "isotonic"  # "isotonic" | "platt" | "temperature" | "identity"
    c.cvr = "temperature"  # fitted on clicked impressions only, like the CVR loss
    # "product": calibrated pCTR x calibrated pCVR (keeps ESMM's identity); or a method of its own.
    c.ctcvr = PRODUCT
    c.ece_bins = 15  # bins of the expected calibration error and the reliability diagram
    # Calibrated probabilities stay in [eps, 1 - eps]: isotonic returns exactly 0 where a
    # validation bin had no positive, which would make log loss and logit(p) infinite.
    c.clip_eps = DEFAULT_EPS
    return c


def section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config.calibration`` with defaults for missing keys (workdirs written before it existed)."""
    out = default_config()
    if "calibration" in config:
        require_known("calibration", config.calibration.keys(), out.keys())
        out.update(config.calibration)
    return out


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check ``config.calibration``; returns the section with defaults filled in."""
    c = section(config)

    def check(ok: bool, key: str, expected: str) -> None:
        hint = " (an override `=none` reads as None: write `=identity`)" if c[key] is None else ""
        require(ok, f"calibration.{key}", expected, c[key], hint)

    check(c.ctr in METHODS, "ctr", f"one of {METHODS}")
    check(c.cvr in METHODS, "cvr", f"one of {METHODS}")
    check(c.ctcvr in (PRODUCT, *METHODS), "ctcvr", f"one of {(PRODUCT, *METHODS)}")
    check(is_int(c.ece_bins) and 2 <= c.ece_bins <= 1000, "ece_bins", "an integer in [2, 1000]")
    check(isinstance(c.clip_eps, float | int) and 0 < c.clip_eps < 0.01, "clip_eps", "a float in (0, 0.01)")
    return c
