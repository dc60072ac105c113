"""The recipe shared by the TPU pod experiments (`pod_v5e.py`, `pod_v5p.py`, `pod_v6e.py`).

The seeds' full search model (`search_full.py`) with production-sized hashed id tables
(advertiser 10M buckets, brand 5M, 64-d), bf16 compute, on a bigger synthetic world, scaled to
a slice by four rules (the README's "Scaling notes" explain them):

* **Global batch** = ``rows_per_replica x mesh.data``. ``config.data.batch_size`` is the global
  batch; each of the slice's JAX processes (one per TPU VM) feeds ``batch_size / processes`` rows.
* **Mesh** ``data x model = chips``, laid out by ``mesh_utils``; the batch is split over every
  chip (``data`` and ``model`` together), so no chip repeats another's rows. Tables of at least
  ``sharding.large_table_bytes`` (64 MiB: the advertiser and brand ids) are row-sharded over
  every chip with their Adam moments; ``model > 1`` also shards the smaller tables row-wise over
  ``model`` devices (rule ``("vocab", "model")``). Rows are padded to ``model.vocab_multiple``
  (128). ``model`` must divide the 4 chips of a TPU VM, so a replica never spans two processes.
  ``multitower compile --config <pod config>`` compiles the step for the config's slice
  (``config.tpu``) on any machine and reports its HBM, FLOPs, collectives and a step-time estimate.
* **Learning rate**: square-root scaling from the reference run (``base.py``: batch 1,024,
  peak 1e-4, end 1e-5): ``peak_lr = 1e-4 * sqrt(batch / 1024)``, ``end_lr`` by the same
  factor. For Adam the update size is set by the learning rate, not by the gradient's scale, and
  the square-root rule keeps the update noise of a ``k``-times larger batch the same
  (Malladi et al., 2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms").
* **Warm-up** covers as many examples as the reference's 10,000 steps x 1,024, but never fewer
  than 1,000 updates: with ``b2 = 0.999`` Adam's second-moment estimate averages over ~1,000
  steps, and the large peak rate must not arrive before it has settled.

Checkpoints every 1,000 steps (keep 3): a preempted Spot slice loses at most that much, and the
relaunch resumes from the gs:// workdir.
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
CHIPS_PER_VM = 4  # every multi-host v5e, v5p and v6e slice

# Production-sized hashed id tables: 15M rows x 64 x 4 bytes = 3.84 GB of float32 parameters,
# 15.4 GB in training with the gradient and Adam's two moments.
AD_ID_BUCKETS = {"advertiser_id": 10_000_000, "brand_id": 5_000_000}


def scaled_peak_lr(global_batch: int) -> float:
    return REFERENCE_PEAK_LR * math.sqrt(global_batch / REFERENCE_BATCH)


def scaled_end_lr(global_batch: int) -> float:
    return REFERENCE_END_LR * math.sqrt(global_batch / REFERENCE_BATCH)


def scaled_warmup_steps(global_batch: int) -> int:
    return max(MIN_WARMUP_STEPS, math.ceil(REFERENCE_WARMUP_STEPS * REFERENCE_BATCH / global_batch))


def table_bytes(config: ml_collections.ConfigDict) -> int:
    """float32 bytes of the categorical and multi-hot embedding tables (rows x dim x 4), whole.

    Training holds 4x this (parameters, gradient, Adam's two moments), divided by mesh.model.
    """
    towers = [config.features.user, config.features.ad]
    towers += [config.features.context[p] for p in config.data.placements]
    return sum((f["size"] + 1) * f["dim"] * 4 for tower in towers for f in tower.values()
               if f["type"] in ("categorical", "multi_hot"))


def pod_config(*, chips: int, processes: int, model: int, rows_per_replica: int,
               num_steps: int = 10_000) -> ml_collections.ConfigDict:
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

    for name, buckets in AD_ID_BUCKETS.items():
        config.features.ad[name].size = buckets
    config.model.dtype = "bfloat16"  # bf16 compute; parameters and Adam moments stay float32
    # Table rows padded to a multiple of every model size and chip count used (1 ... 128).
    config.model.vocab_multiple = 128
    # Tables of 64 MiB and more (the advertiser and brand ids: 2.6 and 1.3 GB) are row-sharded
    # over every chip together with their Adam moments (`sharding.state_shardings`): each chip
    # holds, updates and reduces 1/chips of them, so there is no replicated dense table step and
    # no full-table gradient all-reduce. Smaller tables follow the rules below.
    config.sharding.large_table_bytes = 64 << 20
    if model > 1:
        config.sharding.rules = tuple(("vocab", "model") if name == "vocab" else (name, axis)
                                      for name, axis in config.sharding.rules)

    config.optim.peak_lr = scaled_peak_lr(batch)
    config.optim.end_lr = scaled_end_lr(batch)
    config.optim.warmup_steps = scaled_warmup_steps(batch)
    config.optim.decay_steps = num_steps - config.optim.warmup_steps

    config.train.num_steps = num_steps
    config.train.log_every = 100
    config.train.eval_every = 500
    config.train.patience = 4
    config.train.checkpoint_every = 1_000
    config.train.keep_checkpoints = 3

    # A world big enough to keep a pod busy: 20M training impressions, ~27 GB on each VM's disk
    # with the catalogues (1.1 KB per stored impression). tpu_scripts/data.sh --generate writes it
    # on every VM at once; measured at 7,600 impressions/s on a loaded 2-core VM, up to ~50 min.
    config.synthetic.num_users = 2_000_000
    config.synthetic.num_ads = 500_000
    config.synthetic.num_advertisers = 50_000
    config.synthetic.impressions.train = 20_000_000
    config.synthetic.impressions.validation = 1_000_000
    config.synthetic.impressions.test = 1_000_000
    return config
