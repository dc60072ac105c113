"""The search model on a TPU v5e (v5litepod-16) slice: 16 chips on 4 TPU VMs, large tables over all chips.

Global batch 16,384 (4,096 rows per data replica = per VM), mesh data=4 x model=4: a v5e chip
has 16 GB of HBM, so the tables' 15.4 GB of training state must be sharded: the advertiser and
brand tables (over ``sharding.large_table_bytes``) over all 16 chips with their Adam moments, the
smaller ones over the 4 "model" chips of each VM; the batch is split over all 16 chips. Learning rate by the square-root rule of ``pod_base.py``: peak
1e-4 x sqrt(16,384 / 1,024) = 4e-4, warm-up 1,000 updates (the reference's 10.24M examples
would be only 625), cosine decay to step 10,000; bf16 compute; checkpoints every 1,000 steps.

Launch (tpu_scripts/, every script takes --dry-run to print its commands first; pick a zone with
v5e capacity):

    export TPU_PROJECT=my-project TPU_ZONE=us-west4-a TPU_NAME=multitower-v5e
    tpu_scripts/create.sh --type v5litepod-16 --spot
    tpu_scripts/setup.sh
    tpu_scripts/data.sh --generate experiments/pod_v5e.py
    tpu_scripts/launch.sh --config experiments/pod_v5e.py --workdir gs://my-bucket/multitower/pod_v5e
    tpu_scripts/logs.sh --follow
    tpu_scripts/delete.sh --fetch-logs runs/pod_v5e_logs --type v5litepod-16

Expected runtime (an estimate, not measured: no TPU was at hand): input-bound; 4 processes at the
~90k examples/s per process that `multitower bench input` measures on a 2-core CPU VM feed ~360k
examples/s, so 10,000 steps of 16,384 take about 8 minutes, plus the feature statistics pass and
the evaluations; before that, data.sh generates the 22M-impression world on every VM in parallel
(up to ~50 min at the 7,600 impressions/s measured on a loaded 2-core VM; stage it once with
`multitower generate` + `data.sh --from gs://...` to reuse it). Early stopping on validation CTR
AUC can end the run sooner.

On Spot capacity a preemption costs at most 1,000 steps: rerun launch.sh (after create.sh,
setup.sh and data.sh if the slice was reclaimed) and it resumes from the workdir.
"""

import ml_collections

from experiments import pod_base


def get_config() -> ml_collections.ConfigDict:
    config = pod_base.pod_config(chips=16, processes=4, model=4, rows_per_replica=4096)
    # The slice `multitower compile --config experiments/pod_v5e.py` compiles for (v5litepod-16).
    config.tpu = ml_collections.ConfigDict(dict(topology="v5e:4x4", chip_config_name="default", num_slices=1))
    return config
