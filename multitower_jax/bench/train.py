"""`multitower bench train`: training examples/s of the jitted step against the machine's matmul peak.

The step is the real one (`Trainer.train_step`, sharded over every device) on random batches of
the configured shapes, so input is excluded. FLOPs per example come from XLA's cost analysis of
the whole (not yet partitioned) step; the peak is the best of a few large matmuls in the step's
compute dtype (`config.model.dtype`) on the same devices. Each step and each matmul is timed on
its own: `fraction_of_peak` is the fastest step against the fastest matmul, `*_median` the medians.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from multitower_jax import bench
from multitower_jax import features as F
from multitower_jax.data import fake
from multitower_jax.train.trainer import Trainer


def matmul_peak_flops(sizes=(1024, 2048, 4096), repeats: int = 5, dtype=jnp.float32) -> tuple[float, float]:
    """Measured matmul FLOP/s in `dtype` over all devices (each multiplies its own pair), as
    (fastest, median) run of the best size."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("d",))
    fastest = median = 0.0
    for n in sizes:
        spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
        a = jax.device_put(jnp.ones((jax.device_count() * n, n), dtype), spec)
        f = jax.jit(lambda x: jnp.einsum("dij,djk->dik", x.reshape(-1, n, n), x.reshape(-1, n, n)))
        f(a).block_until_ready()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            f(a).block_until_ready()
            seconds.append(time.perf_counter() - start)
        flops = 2 * n**3 * jax.device_count() / np.asarray(seconds)
        fastest, median = max(fastest, float(flops.max())), max(median, float(np.median(flops)))
    return fastest, median


def run(config: ml_collections.ConfigDict, json_path: str | None = None, steps: int = 10) -> dict:
    spec = F.parse_spec(config.features)
    placement = config.data.placements[0]
    batch_size = int(config.data.batch_size)
    trainer = Trainer(config, workdir=None)  # random batches: no data; parameters start at random
    # (with the large tables on the SparseCores, with their preprocessed inputs)
    batches = [trainer.shard_batches({placement: fake.random_batch(spec, placement, batch_size, seed=i)})
               for i in range(steps)]
    state = trainer.init_state()
    lowered = trainer.train_step.lower(state, batches[0])
    # The lowered (not yet partitioned) program: the whole step's count, however the mesh is
    # cut. The compiled one counts a single device's part.
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops_per_example = float(cost["flops"]) / batch_size
    state, metrics = trainer.train_step(state, batches[0])  # warm-up
    jax.block_until_ready(metrics)
    step_seconds = []
    for batch in batches:
        start = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready((state, metrics))
        step_seconds.append(time.perf_counter() - start)
    step_seconds = np.asarray(step_seconds)
    # The peak in the step's compute dtype: bf16 matmuls run at a different rate than float32.
    peak, peak_median = matmul_peak_flops(dtype=jnp.dtype(str(config.model.dtype)))
    # On a shared machine neighbours slow single runs down now and then: the fraction compares
    # the fastest step with the fastest matmul, and the median with the median.
    examples_per_sec = batch_size / float(step_seconds.min())
    median_examples_per_sec = batch_size / float(np.median(step_seconds))
    figures = {
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "batch_size": batch_size,
        "steps": steps,
        "step_ms": 1000 * float(step_seconds.min()),
        "step_ms_median": 1000 * float(np.median(step_seconds)),
        "examples_per_sec": examples_per_sec,
        "examples_per_sec_median": median_examples_per_sec,
        "flops_per_example": flops_per_example,
        "achieved_flops": examples_per_sec * flops_per_example,
        "compute_dtype": str(config.model.dtype),
        "peak_flops": peak,
        "peak_flops_median": peak_median,
        "fraction_of_peak": examples_per_sec * flops_per_example / peak,
        "fraction_of_peak_median": median_examples_per_sec * flops_per_example / peak_median,
    }
    bench.report("train step (seeds' search model)", figures, json_path)
    return figures
