"""Calibration of the CTR / CVR / CTCVR heads: fit on validation, apply inside `jax.jit`.

    from multitower_jax import calibration
    cal = calibration.load(workdir)                     # a pytree; identity when none was fitted
    pctr_B = cal.apply("ctr", pctr_B)                   # pure jnp, usable inside jit / jax.export
    out = cal.outputs(pctr_B, pcvr_B)                   # {"pctr", "pcvr", "pctcvr"}

`multitower calibrate --workdir W` fits (see `workflow.calibrate_workdir`), reports ECE, log
loss and AUC before and after on the test split, and draws a reliability diagram per head.
"""

from multitower_jax.calibration.core import (
    FILE,
    Calibration,
    CalibrationError,
    correct_downsampling,
    downsample_correction_rate,
    exists,
    heads_of,
    load,
    save,
)
from multitower_jax.calibration.fitting import fit, fit_isotonic, fit_platt, fit_temperature
from multitower_jax.calibration.metrics import ece, equal_mass_bins, equal_width_bins, head_report
from multitower_jax.calibration_settings import HEADS, METHODS, PRODUCT, default_config, validate_config

__all__ = [
    "FILE", "HEADS", "METHODS", "PRODUCT", "Calibration", "CalibrationError", "correct_downsampling",
    "default_config", "downsample_correction_rate", "exists", "heads_of", "load", "save", "validate_config",
    "fit", "fit_isotonic", "fit_platt", "fit_temperature", "ece", "equal_mass_bins", "equal_width_bins",
    "head_report",
]
