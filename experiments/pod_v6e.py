"""The search model on a TPU v6e-32 slice: 32 chips on 8 TPU VMs, 2 epochs.

Global batch 32,768 (1,024 rows per chip, 4,096 per VM), mesh data=32 x model=1: no chip repeats
another's rows. The advertiser and brand tables (over ``sharding.large_table_bytes``) are
row-sharded over the 32 chips and updated by row-wise Adagrad; the small tables are replicated
and take AdamW (``multitower compile --config experiments/pod_v6e.py`` reports the compiled step
per chip). 2 epochs of the 20M-impression world = 1,221 steps (evaluation and a checkpoint every
153, a quarter epoch); learning rate by the square-root rule of ``pod_base.py``: peak 1e-4 x
sqrt(32,768 / 1,024) = 5.66e-4, warm-up 122 updates (a tenth of the run), cosine decay; bf16
compute.

Launch (tpu_scripts/, every script takes --dry-run to print its commands first; pick a zone with
v6e capacity):

    export TPU_PROJECT=my-project TPU_ZONE=us-east5-b TPU_NAME=multitower-v6e
    tpu_scripts/create.sh --type v6e-32
    tpu_scripts/setup.sh
    tpu_scripts/data.sh --generate experiments/pod_v6e.py
    tpu_scripts/launch.sh --config experiments/pod_v6e.py --workdir gs://my-bucket/multitower/pod_v6e
    tpu_scripts/logs.sh --follow
    tpu_scripts/delete.sh --fetch-logs runs/pod_v6e_logs --type v6e-32

Expected runtime (an estimate, not measured: no TPU was at hand): the compiled step is estimated
at ~1.5 ms (`multitower compile`, a roofline lower bound, 2026-12-04), ~2 s for 1,221 steps; the input feeds
~720k examples/s if each of the 8 processes reaches the ~90k examples/s that `multitower bench
input` measured with the quickstart's settings on a 2-core CPU VM, about a minute for the 40M
examples, plus the feature statistics pass and eight validation passes. Before that, data.sh
generates the 22M-impression world on every VM in parallel (up to ~50 min at the 7,600
impressions/s measured on a loaded 2-core VM; stage it once with `multitower generate` +
`data.sh --from gs://...` to reuse it), which dominates. Early stopping on validation CTR AUC
can end the run sooner.
"""

import ml_collections

from experiments import pod_base


def get_config() -> ml_collections.ConfigDict:
    config = pod_base.pod_config(chips=32, processes=8, model=1, rows_per_replica=1024)
    # The slice `multitower compile --config experiments/pod_v6e.py` compiles for (v6e-32).
    config.tpu = ml_collections.ConfigDict(dict(topology="v6e:4x8", chip_config_name="default", num_slices=1))
    return config
