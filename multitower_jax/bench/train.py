"""`multitower bench train`: training examples/s of the jitted step against the machine's matmul peak.

The step is the real one (`Trainer.train_step`, sharded over every device) on random batches of
the configured shapes, so input is excluded. FLOPs per example come from XLA's cost analysis of
the compiled step; the peak is the best of a few large matmuls in the step's compute dtype
(`config.model.dtype`) timed on the same devices.
"""

from __future__ import annotations

import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from multitower_jax import bench
from multitower_jax import features as F
from multitower_jax.data import fake
from multitower_jax.data.preprocess import FeatureStats
from multitower_jax.train import sharding
from multitower_jax.train.trainer import Trainer


def matmul_peak_flops(sizes=(1024, 2048, 4096), repeats: int = 5, dtype=jnp.float32) -> float:
    """Best measured matmul FLOP/s in `dtype` over all devices (each multiplies its own pair)."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("d",))
    best = 0.0
    for n in sizes:
        spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
        a = jax.device_put(jnp.ones((jax.device_count() * n, n), dtype), spec)
        f = jax.jit(lambda x: jnp.einsum("dij,djk->dik", x.reshape(-1, n, n), x.reshape(-1, n, n)))
        f(a).block_until_ready()
        start = time.perf_counter()
        for _ in range(repeats):
            out = f(a)
        out.block_until_ready()
        seconds = (time.perf_counter() - start) / repeats
        best = max(best, 2 * n**3 * jax.device_count() / seconds)
    return best


def run(config: ml_collections.ConfigDict, json_path: str | None = None, steps: int = 10) -> dict:
    spec = F.parse_spec(config.features)
    placement = config.data.placements[0]
    batch_size = int(config.data.batch_size)
    # Statistics are not needed for random batches; the trainer only requires that they exist.
    with tempfile.TemporaryDirectory() as workdir:
        FeatureStats({}, np.zeros(0, np.int64), np.zeros(0, np.int64), 1).save(workdir)
        trainer = Trainer(config, workdir)
    batches = [sharding.shard_batch(fake.random_batch(spec, placement, batch_size, seed=i), trainer.mesh)
               for i in range(steps)]
    state = trainer.init_state()
    compiled = trainer.train_step.lower(state, batches[0]).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops_per_example = float(cost["flops"]) / batch_size
    state, metrics = trainer.train_step(state, batches[0])  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for batch in batches:
        state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - start
    examples_per_sec = steps * batch_size / seconds
    # The peak in the step's compute dtype: bf16 matmuls run at a different rate than float32.
    peak = matmul_peak_flops(dtype=jnp.dtype(str(config.model.dtype)))
    figures = {
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "batch_size": batch_size,
        "steps": steps,
        "step_ms": 1000 * seconds / steps,
        "examples_per_sec": examples_per_sec,
        "flops_per_example": flops_per_example,
        "achieved_flops": examples_per_sec * flops_per_example,
        "compute_dtype": str(config.model.dtype),
        "peak_flops": peak,
        "fraction_of_peak": examples_per_sec * flops_per_example / peak,
    }
    bench.report("train step (seeds' search model)", figures, json_path)
    return figures
