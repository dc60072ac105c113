"""The search model on a TPU v5p-128 slice: 64 chips on 16 TPU VMs, 2 epochs.

Global batch 65,536 (1,024 rows per chip, 4,096 per VM), mesh data=64 x model=1: no chip repeats
another's rows. The advertiser and brand tables (over ``sharding.large_table_bytes``) are
row-sharded over the 64 chips and updated by row-wise Adagrad; the small tables are replicated
and take AdamW (``multitower compile --config experiments/pod_v5p.py`` reports the compiled step
per chip). 2 epochs of the 20M-impression world = 611 steps (evaluation and a checkpoint every
77, a quarter epoch); learning rate by the square-root rule of ``pod_base.py``: peak 1e-4 x
sqrt(65,536 / 1,024) = 8e-4 (end 8e-5), warm-up 61 updates (a tenth of the run), cosine decay;
bf16 compute.

Launch (tpu_scripts/, every script takes --dry-run to print its commands first; pick a zone with
v5p capacity):

    export TPU_PROJECT=my-project TPU_ZONE=us-east5-a TPU_NAME=multitower-v5p
    tpu_scripts/create.sh --type v5p-128
    tpu_scripts/setup.sh
    tpu_scripts/data.sh --generate experiments/pod_v5p.py
    tpu_scripts/launch.sh --config experiments/pod_v5p.py --workdir gs://my-bucket/multitower/pod_v5p
    tpu_scripts/logs.sh --follow
    tpu_scripts/delete.sh --fetch-logs runs/pod_v5p_logs --type v5p-128

Expected runtime (an estimate, not measured: no TPU was at hand): the compiled step is estimated
at ~1.1 ms (`multitower compile`, a roofline lower bound, 2026-12-04), so 611 steps are about a
second of TPU time; the
input feeds ~1.4M examples/s if each of the 16 processes reaches the ~90k examples/s that
`multitower bench input` measured with the quickstart's settings on a 2-core CPU VM (the pod hosts
have ~200 vCPUs, but the loader uses one core), about 30 s for the 40M examples, plus a pass over
the training split for the feature statistics and eight validation passes. Before that, data.sh
generates the 22M-impression world on every VM in parallel (up to ~50 min at the 7,600
impressions/s measured on a loaded 2-core VM; stage it once with `multitower generate` +
`data.sh --from gs://...` to reuse it), which dominates. Early stopping on validation CTR AUC
can end the run sooner.
"""

import ml_collections

from experiments import pod_base


def get_config() -> ml_collections.ConfigDict:
    config = pod_base.pod_config(chips=64, processes=16, model=1, rows_per_replica=1024)
    # The slice `multitower compile --config experiments/pod_v5p.py` compiles for (v5p-128).
    config.tpu = ml_collections.ConfigDict(dict(topology="v5:4x4x4", chip_config_name="default", num_slices=1))
    return config
