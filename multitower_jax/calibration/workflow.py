"""`multitower calibrate`: fit per head on validation, report before/after on test, draw diagrams.

Writes into the workdir: ``calibration.json`` (the fitted maps; `calibration.load` reads it),
``calibration_report.json`` and ``reliability_<head>.png``. A head whose method cannot be fitted
(temperature scaling with 1/T <= 0: the scores rank the wrong way round) falls back to identity
with a warning, printed and listed under ``warnings`` / ``fallbacks`` in the report.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from etils import epath
from typing import Any

import jax
import ml_collections
import numpy as np

from multitower_jax import config as config_lib
from multitower_jax import calibration_settings, fileio, run_identity
from multitower_jax.calibration import core, fitting, plot
from multitower_jax.calibration.evaluation import calibrated_outputs, compare, head_predictions
from multitower_jax.train import evaluate
from multitower_jax.train import trainer as trainer_lib

log = logging.getLogger(__name__)

REPORT_FILE = "calibration_report.json"


def calibrate_workdir(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Fit on the validation split, report on test, save the calibration, draw the diagrams."""
    workdir = epath.Path(workdir)
    settings = calibration_settings.validate_config(config)
    heads = core.heads_of(config)
    methods = {h: settings[h] for h in heads}
    rate = core.downsample_correction_rate(config)

    trainer = trainer_lib.Trainer(config, workdir)
    params, step = trainer.restore_final()  # what `evaluate`, export and serving load too

    def predict(split: str) -> dict[str, np.ndarray]:
        return evaluate.collect(trainer.predict, params, trainer.dataset(split, train=False),
                                trainer.mesh, desc=f"predict {split}")

    validation = predict("validation")
    reasons: dict[str, str] = {}
    cal = fitting.fit(validation, heads, methods, rate, float(settings.clip_eps), fallbacks=reasons)
    warnings = []
    for head, reason in reasons.items():  # one head that cannot be fitted does not fail the others
        warnings.append(f"calibration.{head}={methods[head]} could not be fitted on validation ({reason}); "
                        f"{head} uses identity (the model's own probabilities) instead")
        log.warning("%s", warnings[-1])
        if jax.process_index() == 0:
            print(f"multitower calibrate: warning: {warnings[-1]}", file=sys.stderr)
    fallbacks = {h: {"requested": methods[h], "used": "identity", "reason": r} for h, r in reasons.items()}
    test = predict("test")
    bins = int(settings.ece_bins)
    heads_report = compare(test, cal, bins)
    fitted_on = {h: len(y) for h, (_, y) in head_predictions(validation, validation).items()}
    result = {
        "step": step, "methods": {h: cal.method(h) for h in heads}, "requested_methods": methods,
        "fallbacks": fallbacks, "warnings": warnings, "negative_rate_corrected": rate,
        "fitted_on": {"split": "validation", "examples": fitted_on}, "evaluated_on": "test",
        "ece_bins": bins, "heads": heads_report,
    }
    if jax.process_index() == 0:
        diagrams = {}
        for head, (y, before, after) in _diagram_inputs(test, cal).items():
            path = plot.reliability_diagram(
                workdir / f"reliability_{head}.png", head, y, before, after, bins,
                title=f"{head} on test ({cal.method(head)}, fitted on validation; {bins} equal-mass bins)")
            diagrams[head] = str(path)
        result["diagrams"] = diagrams
        fileio.write_json(workdir / REPORT_FILE, result)
        core.save(cal, workdir, fingerprint=config_lib.fingerprint(config), step=step,
                  run=run_identity.stamp(run_identity.read(workdir)),
                  fitted_on={"split": "validation", "examples": fitted_on}, fallbacks=fallbacks)
    result["calibration"] = str(workdir / core.FILE)
    return result


def _diagram_inputs(pred: Mapping[str, np.ndarray], cal: core.Calibration) -> dict[str, tuple]:
    before = head_predictions(pred, {k: pred[k] for k in ("pctr", "pcvr", "pctcvr") if k in pred})
    after = head_predictions(pred, calibrated_outputs(cal, pred))
    return {h: (before[h][1], before[h][0], after[h][0]) for h in cal.heads}


def workdir_config(workdir: str | os.PathLike, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """A workdir's resolved config plus overrides; the calibration section gets its defaults first,
    so workdirs trained before it existed take ``--config.calibration.*`` overrides too."""
    path = epath.Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {workdir} a `multitower train` workdir?")
    config = config_lib.from_json(path)
    config.calibration = calibration_settings.section(config)
    config = config_lib.apply_overrides(config, overrides)
    config_lib.validate(config)
    return config
