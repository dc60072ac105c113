"""Built-in baselines: standard learners fitted on the same train split and raw features as the model.

`multitower baseline --workdir W` fits per-id smoothed click / conversion rates, a logistic
regression on hashed ids, binned numerics, words and crosses, and (with the ``baselines`` extra)
gradient-boosted trees, tunes each on the validation split and writes ``W/eval_baseline.json``
with the same report keys as ``eval_test.json``. A deep model that loses to them is a bug to find.

This package file stays light (the CLI imports `BaselineError` for its list of user errors);
the learners live in `rates`, `models`, and the command in `commands`.
"""

from __future__ import annotations


class BaselineError(ValueError):
    """The workdir, its config or its data cannot be used for the baselines (the user's to fix)."""
