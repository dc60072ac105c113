"""Quickstart: the search placement on the built-in synthetic world, sized for a laptop CPU.

    pip install -e . && multitower generate --config experiments/quickstart.py --out runs/quickstart/data

Writes train / validation / test splits (TFDS ArrayRecord) with the oracle columns
`p_click` and `p_convert_given_click`; takes well under a minute on 2 CPU cores.
"""

import ml_collections

from experiments import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.data.placements = ("search",)
    config.synthetic.num_users = 20_000
    config.synthetic.num_ads = 5_000
    config.synthetic.num_advertisers = 500
    config.synthetic.impressions.train = 400_000
    config.synthetic.impressions.validation = 50_000
    config.synthetic.impressions.test = 50_000
    return config
