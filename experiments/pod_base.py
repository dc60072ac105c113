"""The recipe shared by the TPU pod experiments (`pod_v5e.py`, `pod_v5p.py`, `pod_v6e.py`).

The seeds' full search model (`search_full.py`), bf16 compute, on a bigger synthetic world (50,000
advertisers, 500,000 ads, 2M users, 20M training impressions), trained for ``EPOCHS`` passes over
it, and scaled to a slice by these rules (the README's "Scaling notes" explain them):

* **Epochs, not steps.** ``train.num_steps = ceil(EPOCHS x train impressions / global batch)``
  with ``EPOCHS = 2``: CTR models with large id tables overfit after about one pass, and early
  stopping on validation AUC (evaluated every quarter epoch, patience 2) ends the run at the
  best point. Checkpoints every quarter epoch (keep 3).
* **Hashed tables sized to the ids they hash**: ``HASH_BUCKETS_PER_ID = 16`` buckets per distinct
  id of the world (advertisers, their ~2 brands each, cities), so an id shares its bucket with
  another about 1 - exp(-1/16) = 6 % of the time; not 10M buckets for 50,000 advertisers.

* **Global batch** = ``rows_per_replica x mesh.data``. ``config.data.batch_size`` is the global
  batch; each of the slice's JAX processes (one per TPU VM) feeds ``batch_size / processes`` rows.
* **Mesh** ``data x model = chips``, laid out by ``mesh_utils``; the batch is split over every
  chip (``data`` and ``model`` together), so no chip repeats another's rows. Tables of at least
  ``sharding.large_table_bytes`` (64 MiB: the advertiser and brand ids) are row-sharded over
  every chip and updated by row-wise Adagrad (``optim.large_table_optimizer``: one accumulator
  per row, sharded with it; only the batch's rows move); the small tables are replicated and
  take AdamW. ``model > 1`` would also shard the smaller tables row-wise over ``model`` devices
  (rule ``("vocab", "model")``); the pod configs use ``model = 1``. Rows are padded to
  ``model.vocab_multiple`` (128). ``model`` must divide the 4 chips of a TPU VM, so a replica
  never spans two processes.
  ``multitower compile --config <pod config>`` compiles the step for the config's slice
  (``config.tpu``) on any machine and reports its HBM, FLOPs, collectives and a step-time estimate.
* **Learning rate**: square-root scaling from the reference run (``base.py``: batch 1,024,
  peak 1e-4, end 1e-5): ``peak_lr = 1e-4 * sqrt(batch / 1024)``, ``end_lr`` by the same
  factor. For Adam the update size is set by the learning rate, not by the gradient's scale, and
  the square-root rule keeps the update noise of a ``k``-times larger batch the same
  (Malladi et al., 2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms").
* **Warm-up** covers as many examples as the reference's 10,000 steps x 1,024 (at least 1,000
  updates, `scaled_warmup_steps`), but at most ``WARMUP_FRACTION`` (a tenth) of the run: a run
  of two epochs is only a few hundred to a few thousand updates long.

A preempted Spot slice loses at most a quarter epoch; the relaunch resumes from the gs:// workdir.
"""

from __future__ import annotations

import math

import ml_collections

from experiments import base

# The reference run the learning-rate rule scales from (the values of base.py).
REFERENCE_BATCH = 1024
REFERENCE_PEAK_LR = 1e-4
REFERENCE_END_LR = 1e-5
REFERENCE_WARMUP_STEPS = 10_000
MIN_WARMUP_STEPS = 1_000  # ~ 1 / (1 - b2) Adam updates
WARMUP_FRACTION = 0.1  # ... but at most this much of the run
CHIPS_PER_VM = 4  # every multi-host v5e, v5p and v6e slice
EPOCHS = 2

# The world: 50,000 advertisers with 1-3 brands each (2 on average, `data/synthetic_catalogue.py`), 5,000
# cities. Each hashed table gets HASH_BUCKETS_PER_ID buckets per distinct id.
NUM_ADVERTISERS = 50_000
BRANDS_PER_ADVERTISER = 2
NUM_CITIES = 5_000
HASH_BUCKETS_PER_ID = 16


def scaled_peak_lr(global_batch: int) -> float:
    return REFERENCE_PEAK_LR * math.sqrt(global_batch / REFERENCE_BATCH)


def scaled_end_lr(global_batch: int) -> float:
    return REFERENCE_END_LR * math.sqrt(global_batch / REFERENCE_BATCH)


def scaled_warmup_steps(global_batch: int) -> int:
    return max(MIN_WARMUP_STEPS, math.ceil(REFERENCE_WARMUP_STEPS * REFERENCE_BATCH / global_batch))


def hashed_buckets() -> dict[str, int]:
    """Buckets of each hashed id table: HASH_BUCKETS_PER_ID per distinct id of the world."""
    return {"advertiser_id": HASH_BUCKETS_PER_ID * NUM_ADVERTISERS,
            "brand_id": HASH_BUCKETS_PER_ID * BRANDS_PER_ADVERTISER * NUM_ADVERTISERS,
            "city": HASH_BUCKETS_PER_ID * NUM_CITIES}


def steps_for_epochs(epochs: float, train_impressions: int, global_batch: int) -> int:
    return math.ceil(epochs * train_impressions / global_batch)


def table_bytes(config: ml_collections.ConfigDict) -> int:
    """float32 bytes of the categorical and multi-hot embedding tables (rows x dim x 4), whole."""
    towers = [config.features.user, config.features.ad]
    towers += [config.features.context[p] for p in config.data.placements]
    return sum((f["size"] + 1) * f["dim"] * 4 for tower in towers for f in tower.values()
               if f["type"] in ("categorical", "multi_hot"))


def pod_config(*, chips: int, processes: int, model: int, rows_per_replica: int,
               epochs: float = EPOCHS) -> ml_collections.ConfigDict:
    """The pod recipe for a slice of ``chips`` chips on ``processes`` TPU VMs, ``model``-way table sharding."""
    if chips % model or CHIPS_PER_VM % model:
        raise ValueError(f"mesh.model={model} must divide the {chips} chips and the {CHIPS_PER_VM} chips of a VM")
    config = base.get_config()
    config.data.placements = ("search",)

    data = chips // model
    batch = rows_per_replica * data
    config.mesh.data = data  # explicit, so a run on the wrong slice stops with a clear error
    config.mesh.model = model
    config.data.batch_size = batch
    config.data.eval_batch_size = batch
    # A multiple of every process count used (1, 2, 4, ... 64 VMs): the same batches on any slice, and a
    # checkpoint (its iterator position is saved per shard) resumes on a slice with more or fewer VMs.
    config.data.num_shards = 64
    if batch % processes or batch % config.data.num_shards:
        raise ValueError(f"global batch {batch} must divide over {processes} processes and "
                         f"{config.data.num_shards} shards")

    buckets = hashed_buckets()
    config.features.ad.advertiser_id.size = buckets["advertiser_id"]
    config.features.ad.brand_id.size = buckets["brand_id"]
    config.features.context.search.city.size = buckets["city"]
    config.model.dtype = "bfloat16"  # bf16 compute; parameters and Adam moments stay float32
    # One attention head of 128 instead of the seeds' eight of 16: on a TPU a head's minor
    # dimension is padded to the 128-lane tile and the [rows x heads x L x L] scores go through
    # HBM; the text encoders were ~80 % of the step's bytes with eight heads (two thirds with one).
    # * Eight heads -> two of 64 (2026-12-03, `multitower compile --config experiments/pod_v5p.py`):
    #   estimated step 6.92 -> 4.42 ms, MFU 7.4 -> 11.5 %, peak HBM 1.27 -> 0.90 GiB per chip.
    #   Quality (quickstart, seed 0, its 64-wide encoder: 2 heads of 32 against 8 of 8): expected
    #   CTR / CTCVR AUC 0.7740 / 0.8355 against 0.7739 / 0.8366.
    # * Two heads of 64 -> one of 128 (2026-12-04): the head fills the 128 lanes and there is one
    #   score array, not two. On a 4-chip v5p proxy of pod_v5p (`--topology v5:2x2x1`, 1,024 rows
    #   per chip, the large tables at 1/16 of their rows) the train step's bytes fall from 10.73 to
    #   8.20 GB per chip, its estimated step from 3.88 to 2.97 ms (MFU 10.3 -> 13.4 %). Quality
    #   (quickstart: 1 head of 64 against 2 of 32), 3 seeds: test CTR / CTCVR AUC 0.7750 / 0.8485
    #   against 0.7751 / 0.8443, expected 0.7754 / 0.8375 against 0.7751 / 0.8368: within noise.
    config.model.text.num_heads = 1
    # Each encoder layer as one fused Pallas kernel (models/fused_encoder.py): a block of texts goes
    # through the whole layer in VMEM, and the backward pass recomputes it there, so a layer's
    # intermediates never reach HBM. The kernel has no dropout: text dropout 0 instead of the
    # seeds' 0.1 (the quickstart's encoder has none either; not measured at pod scale).
    # One head -> fused layers (2026-12-04, `multitower compile --config experiments/pod_v5p.py
    # --config.loss.retrieval_kernel=xla`): the train step's bytes per chip 10.31 -> 4.17 GB,
    # estimated step 3.73 -> 1.51 ms, MFU 13.6 -> 31.8 % (a kernel's FLOPs and bytes are the cost
    # estimate it declares).
    config.model.text.kernel = "pallas"
    config.model.text.dropout = 0.0
    # The in-batch softmax by Pallas kernels (train/fused_softmax.py): a block of rows against a
    # block of ads in VMEM, the 1,024 x global-batch logits per chip never written to HBM.
    # Fused layers -> and this (2026-12-04, `multitower compile --config experiments/pod_v5p.py`):
    # 4.17 -> 3.04 GB per chip, est. 1.51 -> 1.10 ms, MFU 31.8 -> 43.1 %, collectives 101 -> 84 MB.
    config.loss.retrieval_kernel = "pallas"
    # Table rows padded to a multiple of every model size and chip count used (1 ... 128).
    config.model.vocab_multiple = 128
    # Tables of 64 MiB and more (the advertiser and brand ids: 205 and 410 MB) are row-sharded
    # over every chip (`sharding.state_shardings`) and take row-wise Adagrad (`optim`), its
    # per-row accumulator sharded with them: each chip holds and updates 1/chips of them, there
    # is no full-table gradient all-reduce, and AdamW's two table-sized moments are not kept.
    # Its peak rate (optim.rowwise_learning_rate, 0.05) is base.py's default, not tuned.
    # Smaller tables follow the rules below (replicated with model = 1) and take AdamW.
    config.sharding.large_table_bytes = 64 << 20
    config.optim.large_table_optimizer = "rowwise_adagrad"
    config.optim.large_table_bytes = 64 << 20
    # The plain row-wise step, not the one through the batch's rows (train/batch_rows.py), and the
    # tables in the backend's layout: with tables sized to this world a chip's shard holds only
    # 3-6 times the ids of a batch (v5e: 100k brand rows per chip, 16,385 ids per step) and XLA
    # streams whole shards either way. 2026-12-04, `multitower compile --config
    # experiments/pod_v5e.py --config.optim.sparse_row_updates=S --config.sharding.large_table_layout=L`,
    # GB per chip / est. ms: plain 3.13 / 3.83; through the rows 3.74 / 4.57; row-major plain
    # 3.19 / 3.89; row-major through the rows 3.74 / 4.57. With 16x the rows
    # (--config.features.ad.advertiser_id.size=12800000 --config.features.ad.brand_id.size=25600000):
    # 13.07 / 15.95, 6.95 / 8.49, 9.14 / 11.16, and 3.18 / 3.89: for tables that big set
    # sparse_row_updates=True and sharding.large_table_layout="row_major".
    config.optim.sparse_row_updates = False
    if model > 1:
        config.sharding.rules = tuple(("vocab", "model") if name == "vocab" else (name, axis)
                                      for name, axis in config.sharding.rules)

    train_impressions = 20_000_000
    num_steps = steps_for_epochs(epochs, train_impressions, batch)
    quarter_epoch = max(1, steps_for_epochs(0.25, train_impressions, batch))
    config.optim.peak_lr = scaled_peak_lr(batch)
    config.optim.end_lr = scaled_end_lr(batch)
    config.optim.warmup_steps = min(scaled_warmup_steps(batch), max(1, int(WARMUP_FRACTION * num_steps)))
    config.optim.decay_steps = num_steps - config.optim.warmup_steps

    config.train.num_steps = num_steps
    config.train.log_every = 10
    config.train.eval_every = quarter_epoch
    config.train.patience = 2
    config.train.checkpoint_every = quarter_epoch
    config.train.keep_checkpoints = 3

    # A world big enough to keep a pod busy: 20M training impressions, ~27 GB on each VM's disk
    # with the catalogues (1.1 KB per stored impression). tpu_scripts/data.sh --generate writes it
    # on every VM at once; measured at 7,600 impressions/s on a loaded 2-core VM, up to ~50 min.
    config.synthetic.num_users = 2_000_000
    config.synthetic.num_ads = 500_000
    config.synthetic.num_advertisers = NUM_ADVERTISERS
    config.synthetic.impressions.train = train_impressions
    config.synthetic.impressions.validation = 1_000_000
    config.synthetic.impressions.test = 1_000_000
    return config
