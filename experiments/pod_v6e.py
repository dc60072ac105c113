"""The search model on a TPU v6e-32 slice: 32 chips on 8 TPU VMs, large tables over all chips.

Global batch 32,768 (2,048 rows per data replica, 4,096 per VM), mesh data=16 x model=2: a v6e
chip has 32 GB of HBM: the advertiser and brand tables (over ``sharding.large_table_bytes``) are
row-sharded over all 32 chips with their Adam moments, the smaller ones over the 2 "model" chips
(rule ("vocab", "model"), rows padded to a multiple of 128); the batch is split over all 32 chips. Learning rate by the square-root rule of ``pod_base.py``: peak
1e-4 x sqrt(32,768 / 1,024) = 5.66e-4, warm-up 1,000 updates, cosine decay to step 10,000; bf16
compute; checkpoints every 1,000 steps.

Launch (tpu_scripts/, every script takes --dry-run to print its commands first; pick a zone with
v6e capacity):

    export TPU_PROJECT=my-project TPU_ZONE=us-east5-b TPU_NAME=multitower-v6e
    tpu_scripts/create.sh --type v6e-32
    tpu_scripts/setup.sh
    tpu_scripts/data.sh --generate experiments/pod_v6e.py
    tpu_scripts/launch.sh --config experiments/pod_v6e.py --workdir gs://my-bucket/multitower/pod_v6e
    tpu_scripts/logs.sh --follow
    tpu_scripts/delete.sh --fetch-logs runs/pod_v6e_logs --type v6e-32

Expected runtime (an estimate, not measured: no TPU was at hand): input-bound; 8 processes at the
~90k examples/s per process that `multitower bench input` measures on a 2-core CPU VM feed ~720k
examples/s, so 10,000 steps of 32,768 take about 8 minutes, plus the feature statistics pass and
the evaluations; before that, data.sh generates the 22M-impression world on every VM in parallel
(up to ~50 min at the 7,600 impressions/s measured on a loaded 2-core VM; stage it once with
`multitower generate` + `data.sh --from gs://...` to reuse it). Early stopping on validation CTR
AUC can end the run sooner.
"""

import ml_collections

from experiments import pod_base


def get_config() -> ml_collections.ConfigDict:
    config = pod_base.pod_config(chips=32, processes=8, model=2, rows_per_replica=2048)
    # The slice `multitower compile --config experiments/pod_v6e.py` compiles for (v6e-32).
    config.tpu = ml_collections.ConfigDict(dict(topology="v6e:4x8", chip_config_name="default", num_slices=1))
    return config
