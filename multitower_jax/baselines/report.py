"""The model next to the baselines: what `multitower evaluate` prints when the workdir has an
``eval_baseline.json`` (written by `multitower baseline`). Light: no learner is imported."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from etils import epath

RESULT_FILE = "eval_baseline.json"
# report key -> column header (cvr_entire_space_auc: pCVR ranking conversions over every impression)
KEYS = {"ctr_auc": "ctr_auc", "ctr_logloss": "ctr_logloss", "ctcvr_auc": "ctcvr_auc", "cvr_auc": "cvr_auc",
        "cvr_entire_space_auc": "cvr_all_auc"}
# On synthetic data: the expected AUCs against the oracle's probabilities (no label noise; one
# test split's CTCVR AUC moves by ~0.01 with its ~200 conversions, these by ~0.002)
EXPECTED_KEYS = {"expected_ctr_auc": "exp_ctr_auc", "expected_ctcvr_auc": "exp_ctcvr_auc"}


def load(workdir: str | os.PathLike) -> dict[str, Any] | None:
    path = epath.Path(workdir) / RESULT_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _cell(value: Any) -> str:
    return f"{value:>14.4f}" if isinstance(value, int | float) and not math.isnan(value) else f"{'-':>14}"


def comparison(model: dict[str, Any], workdir: str | os.PathLike, split: str) -> str | None:
    """A table of the model's report and every baseline's on the same split; a note when the
    baselines were scored on another split; None when there are none."""
    baselines = load(workdir)
    if baselines is None:
        return None
    if baselines.get("split") != split:
        return (f"({RESULT_FILE} scores the {baselines.get('split')} split, not {split}: rerun "
                f"`multitower baseline --workdir {workdir} --split {split}` to compare)")
    keys = {**KEYS, **(EXPECTED_KEYS if "expected_ctr_auc" in model else {})}
    rows = [f"{split:<24}" + "".join(f"{h:>14}" for h in keys.values())]
    for name, report in [("model", model), *baselines["baselines"].items()]:
        rows.append(f"{name:<24}" + "".join(_cell(report.get(k)) for k in keys))
    return "\n".join(rows)
