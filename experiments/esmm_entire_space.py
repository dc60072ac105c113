"""ESMM's claim on the synthetic world: pCVR trained over the entire impression space (ESMM)
ranks conversions among *all* impressions better than a CVR head trained on clicks only.

    multitower train --config experiments/esmm_entire_space.py --workdir runs/esmm
    multitower train --config experiments/esmm_entire_space.py --workdir runs/ctr_cvr --config.model.head=ctr_cvr

Compare `cvr_entire_space_auc` (AUC of pCVR against conversion over every test impression) in
the two `eval_test.json` files; `oracle_cvr_entire_space_auc` is the ceiling of p(convert | click)
on that task. Same data and budget as the quickstart.
"""

import ml_collections

from experiments import quickstart


def get_config() -> ml_collections.ConfigDict:
    config = quickstart.get_config()
    config.model.head = "esmm"
    return config
