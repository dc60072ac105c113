"""The baselines' settings (``config.baselines``) and the config a baseline run reads.

The section is added to the workdir's resolved config before the overrides, so
``--config.baselines.lr.C=(0.1,)`` works on any workdir, also those written before it existed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import ml_collections
from etils import epath

from multitower_jax import config as config_lib
from multitower_jax.config_checks import require


LEARNERS = ("rates", "lr", "gbdt")


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.run = LEARNERS  # which learners to fit
    c.placement = ""  # "" = the primary placement (config.data.placements[0])
    c.seed = 0  # folds, subsamples, bagging

    # Per-id rates: (clicks + m * global rate) / (impressions + m), and conversions per click
    # likewise; the prior strength m is chosen on the validation split (log loss) from the list.
    c.rates = ml_collections.ConfigDict()
    c.rates.ids = ("ad_id", "user_id", "ad.advertiser_id")
    c.rates.prior_strengths = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)

    # Query-ad text similarity fitted without labels (`text.TextSpace`): LSA dimensions, k-means topics.
    c.text = ml_collections.ConfigDict()
    c.text.dims = 128
    c.text.topics = 64

    # Logistic regression on hashed sparse features (see `features.HashedFeatures`).
    c.lr = ml_collections.ConfigDict()
    c.lr.hash_bits = 22  # 4M weights
    c.lr.num_bins = 16  # quantile bins per numeric column (fitted on train)
    c.lr.max_cross_size = 256  # categorical columns crossed across towers: those with size <= this
    # Extra crosses "a*b" of any two columns (ids included): a user's taste for an industry.
    c.lr.id_crosses = ("user_id*ad.industry_category",)
    c.lr.word_crosses = True  # query word x ad title / description word
    # Hashed features seen fewer times in train are dropped (rare crosses are mostly noise, and
    # L-BFGS's cost per iteration grows with the number of weights: 3 halves it on the quickstart).
    c.lr.min_count = 3
    c.lr.C = (0.003, 0.01, 0.03)  # inverse L2 strength, chosen per head on validation AUC
    c.lr.max_iter = 300
    c.lr.tol = 1e-4

    # Gradient-boosted trees (LightGBM, the `baselines` extra): raw columns, word overlaps and
    # out-of-fold target encodings; early stopping on the validation split.
    c.gbdt = ml_collections.ConfigDict()
    c.gbdt.target_encode = ("user_id", "ad_id", "ad.advertiser_id", "ad.brand_id", "user_id*ad.industry_category")
    c.gbdt.folds = 5  # out-of-fold target encodings on train
    c.gbdt.prior_strength = 20.0  # smoothing of the target encodings
    c.gbdt.learning_rate = 0.05
    c.gbdt.num_leaves = 31
    c.gbdt.min_data_in_leaf = 200
    c.gbdt.feature_fraction = 0.8
    c.gbdt.lambda_l2 = 10.0
    c.gbdt.max_rounds = 1500
    c.gbdt.early_stopping = 50
    c.gbdt.max_train_rows = 0  # > 0: fit on a random subsample of this many train rows
    c.gbdt.num_threads = 0  # 0 = LightGBM's default (all cores)
    return c


def section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config.baselines`` completed with the defaults of keys it lacks."""
    def merge(base: dict, given: dict) -> dict:
        return {**base, **{k: merge(base[k], v) if isinstance(base.get(k), dict) and isinstance(v, dict) else v
                           for k, v in given.items()}}

    given = config.baselines.to_dict() if "baselines" in config else {}
    return ml_collections.ConfigDict(merge(defaults().to_dict(), given))


def baseline_config(workdir: str | os.PathLike, config_file: str | None = None,
                    overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config a baseline run uses: ``--config FILE`` if given, else the workdir's resolved
    ``config.json`` (written by `train`, `generate` or `ingest`), with the baselines section,
    then the overrides. An empty ``config.data.dir`` means ``<workdir>/data``, as in `train`."""
    workdir = epath.Path(workdir)
    if config_file:
        config = config_lib.load_config_file(config_file)
    else:
        path = workdir / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: give a workdir written by `multitower train` (or a "
                                    f"folder written by `generate` / `ingest`), or --config FILE")
        config = config_lib.from_json(path)
    config.baselines = section(config)
    config = config_lib.apply_overrides(config, overrides)
    config_lib.validate(config)
    if not config.data.dir:
        config.data.dir = str(workdir / "data")
    require(set(config.baselines.run) <= set(LEARNERS), "baselines.run", f"some of {LEARNERS}",
            tuple(config.baselines.run))
    return config
