"""The cold-start world (experiments/cold_start.py) trained without the `user_id` and `ad_id`
features: the baseline that the id features must not lose to on users unseen in train.

    multitower train --config experiments/cold_start_no_ids.py --workdir runs/cold_start_no_ids

Same as `--config experiments/cold_start.py --config.features.user.user_id=None
--config.features.ad.ad_id=None`.
"""

import ml_collections

from experiments import cold_start


def get_config() -> ml_collections.ConfigDict:
    config = cold_start.get_config()
    config.features.user.user_id = None  # a feature set to None is dropped from the spec
    config.features.ad.ad_id = None
    return config
