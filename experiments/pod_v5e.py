"""The search model on a TPU v5e (v5litepod-16) slice: 16 chips on 4 TPU VMs, 2 epochs.

Global batch 16,384 (1,024 rows per chip, 4,096 per VM), mesh data=16 x model=1: no chip repeats
another's rows. The advertiser and brand tables (over ``sharding.large_table_bytes``) are
row-sharded over the 16 chips and updated by row-wise Adagrad; the small tables are replicated
and take AdamW; ``multitower compile --config experiments/pod_v5e.py`` checks the step fits a
v5e chip's 16 GiB. 2 epochs of the 20M-impression world = 2,442 steps (evaluation and a
checkpoint every 306, a quarter epoch); learning rate by the square-root rule of
``pod_base.py``: peak 1e-4 x sqrt(16,384 / 1,024) = 4e-4, warm-up 244 updates (a tenth of the
run), cosine decay; bf16 compute.

Launch (tpu_scripts/, every script takes --dry-run to print its commands first; pick a zone with
v5e capacity):

    export TPU_PROJECT=my-project TPU_ZONE=us-west4-a TPU_NAME=multitower-v5e
    tpu_scripts/create.sh --type v5litepod-16 --spot
    tpu_scripts/setup.sh
    tpu_scripts/data.sh --generate experiments/pod_v5e.py
    tpu_scripts/launch.sh --config experiments/pod_v5e.py --workdir gs://my-bucket/multitower/pod_v5e
    tpu_scripts/logs.sh --follow
    tpu_scripts/delete.sh --fetch-logs runs/pod_v5e_logs --type v5litepod-16

Expected runtime (an estimate, not measured: no TPU was at hand): the compiled step is estimated
at ~3.8 ms (`multitower compile`, a roofline lower bound, 2026-12-04), ~10 s for 2,442 steps; the input feeds
~360k examples/s if each of the 4 processes reaches the ~90k examples/s that `multitower bench
input` measured with the quickstart's settings on a 2-core CPU VM, about 2 minutes for the 40M
examples, plus the feature statistics pass and eight validation passes. Before that, data.sh
generates the 22M-impression world on every VM in parallel (up to ~50 min at the 7,600
impressions/s measured on a loaded 2-core VM; stage it once with `multitower generate` +
`data.sh --from gs://...` to reuse it), which dominates. Early stopping on validation CTR AUC
can end the run sooner.

On Spot capacity a preemption costs at most a quarter epoch: rerun launch.sh (after create.sh,
setup.sh and data.sh if the slice was reclaimed) and it resumes from the workdir.
"""

import ml_collections

from experiments import pod_base


def get_config() -> ml_collections.ConfigDict:
    config = pod_base.pod_config(chips=16, processes=4, model=1, rows_per_replica=1024)
    # The slice `multitower compile --config experiments/pod_v5e.py` compiles for (v5litepod-16).
    config.tpu = ml_collections.ConfigDict(dict(topology="v5e:4x4", chip_config_name="default", num_slices=1))
    return config
