"""Implicit feedback: every row is an interaction (a view, a play, a purchase), none a non-click.

    multitower ingest --config experiments/implicit_feedback.py --config.data.logs.paths="('logs/*.parquet',)" \
        --config.data.logs.validation_start=2024-03-01 --config.data.logs.test_start=2024-03-08 --out D
    multitower train --config experiments/implicit_feedback.py --config.data.dir=D --workdir W

The logs need no click or conversion column (each row counts as a click; a conversion column
is read when present). With positives only, the CTR / CVR heads have nothing to learn from, so
the towers train by the retrieval loss alone (in-batch softmax over every row, logQ-corrected),
and early stopping and `eval_<split>.json` use the towers' in-split retrieval hit rates
(`hit_rate_at_10`, `hit_rate_at_100`, `retrieval_mrr`: each row's ad ranked among every ad of
the split) instead of AUCs, which are undefined when every label is 1. Export and index the ad
embeddings as usual for retrieval. On the built-in synthetic world (the default source) every
impression counts as an interaction.
"""

import ml_collections

from experiments import quickstart


def get_config() -> ml_collections.ConfigDict:
    config = quickstart.get_config()
    config.data.feedback = "implicit"
    config.loss.alpha = 0.0  # the heads: no non-clicks to learn from
    config.loss.beta = 1.0
    config.loss.retrieval_positives = "impressions"
    config.model.wide = False  # the wide part feeds the heads only
    config.model.wide_init = "zeros"
    config.optim.freeze_wide_cvr = False
    config.loss.wide_cvr_weight = 0.0
    config.train.early_stopping_metric = "hit_rate_at_10"
    return config
