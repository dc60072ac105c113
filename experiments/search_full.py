"""The seeds' full-size search model (user 400->256->128, ad ->256->128, 2-layer 8-head 128-d
query/ad Transformer, fusion pattern B 256->128->64, ESMM head) at batch 1024.

    multitower bench train --config experiments/search_full.py --json train.json
    multitower train --config experiments/search_full.py --workdir runs/search_full

Sized for an accelerator: on a 2-core CPU one step takes seconds (see the README's figures).
"""

import ml_collections

from experiments import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.data.placements = ("search",)
    config.data.batch_size = 1024
    return config
