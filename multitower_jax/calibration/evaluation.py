"""Calibrated predictions and their metrics: what `multitower calibrate` reports before and after
fitting, and what `multitower evaluate` adds to a report when the workdir is calibrated (the
trainer's `evaluate` calls `evaluation_metrics` and `calibrated_columns`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from multitower_jax import calibration_settings
from multitower_jax.calibration import core, metrics


def head_predictions(pred: Mapping[str, np.ndarray], outputs: Mapping[str, Any]) -> dict[str, tuple]:
    """Per head: (probabilities, labels) on the rows where the head's label is defined."""
    click = np.asarray(pred["click"], np.float64)
    out = {"ctr": (np.asarray(outputs["pctr"]), click)}
    if "pcvr" in outputs:
        conversion = np.asarray(pred["conversion"], np.float64)
        clicked = click > 0.5
        out["cvr"] = (np.asarray(outputs["pcvr"])[clicked], conversion[clicked])
        out["ctcvr"] = (np.asarray(outputs["pctcvr"]), click * conversion)
    return out


def compare(pred: Mapping[str, np.ndarray], cal: core.Calibration, num_bins: int) -> dict[str, dict[str, Any]]:
    """Per head: metrics of the model's own probabilities ("before") and the calibrated ones ("after");
    with a downsampling correction also "corrected" (the correction alone, no fitted map)."""
    raw = {k: pred[k] for k in ("pctr", "pcvr", "pctcvr") if k in pred}
    stages = {"before": raw, "after": calibrated_outputs(cal, pred)}
    if float(cal.negative_rate) < 1.0:
        stages["corrected"] = calibrated_outputs(core.Calibration.identity(cal.heads, float(cal.negative_rate),
                                                                           cal.clip_eps), pred)
    per_stage = {name: head_predictions(pred, outputs) for name, outputs in stages.items()}
    return {head: {name: metrics.head_report(*per_stage[name][head], num_bins) for name in stages}
            for head in cal.heads}


def calibrated_outputs(cal: core.Calibration, pred: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The calibrated {"pctr"[, "pcvr", "pctcvr"]} of the model's predictions, as host arrays."""
    out = jax.jit(core.Calibration.outputs)(cal, pred["pctr"], pred.get("pcvr"))
    return {k: np.asarray(v) for k, v in out.items()}


def calibrated_columns(pred: Mapping[str, np.ndarray], cal: core.Calibration) -> dict[str, np.ndarray]:
    """``pctr_calibrated`` (and ``pcvr_calibrated``, ``pctcvr_calibrated``) for the predictions file."""
    return {f"{k}_calibrated": v for k, v in calibrated_outputs(cal, pred).items()}


def evaluation_metrics(pred: Mapping[str, np.ndarray], cal: core.Calibration,
                       config: ml_collections.ConfigDict) -> dict[str, float]:
    """Flat keys for `multitower evaluate`: ``<head>_ece``, ``<head>_ece_equal_width`` and
    ``calibrated_<head>_{auc,logloss,mean_pred,ece,ece_equal_width}``."""
    out: dict[str, float] = {}
    for head, stages in compare(pred, cal, int(calibration_settings.section(config).ece_bins)).items():
        out[f"{head}_ece"] = stages["before"]["ece"]
        out[f"{head}_ece_equal_width"] = stages["before"]["ece_equal_width"]
        for key in ("auc", "logloss", "mean_pred", "ece", "ece_equal_width"):
            out[f"calibrated_{head}_{key}"] = stages["after"][key]
    return out
