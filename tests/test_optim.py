"""Optimizer tests: the schedule's values, AdamW against a numpy reference (clipping, decay
mask, boxed parameters) and gradient accumulation against one large batch."""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from multitower_jax import config as config_lib
from multitower_jax.train import optim

# These tests compile many small programs and run each once or twice: skipping LLVM's
# optimizations halves the compile time on a small CPU and changes nothing but float rounding.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit(fn, **kwargs):
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


BASE = Path(__file__).resolve().parents[1] / "experiments" / "base.py"


def config_with(**optim_values) -> ml_collections.ConfigDict:
    config = config_lib.load_config_file(BASE)
    for key, value in optim_values.items():
        config.optim[key] = value
    return config


def test_schedule_defaults_warm_up_linearly_then_decay_by_cosine():
    schedule = optim.learning_rate_schedule(config_with())
    lr = lambda step: float(schedule(step))  # noqa: E731
    np.testing.assert_allclose(lr(0), 1e-6, rtol=1e-5)
    np.testing.assert_allclose(lr(5_000), (1e-6 + 1e-4) / 2, rtol=1e-5)
    np.testing.assert_allclose(lr(10_000), 1e-4, rtol=1e-5)
    np.testing.assert_allclose(lr(10_000 + 500_000), (1e-4 + 1e-5) / 2, rtol=1e-4)  # cosine midpoint
    quarter = 1e-5 + (1e-4 - 1e-5) * 0.5 * (1 + np.cos(np.pi / 4))
    np.testing.assert_allclose(lr(10_000 + 250_000), quarter, rtol=1e-4)
    np.testing.assert_allclose(lr(1_010_000), 1e-5, rtol=1e-5)
    np.testing.assert_allclose(lr(5_000_000), 1e-5, rtol=1e-5)


def np_adamw(params, grads, lrs, weight_decay, clip_norm, decays, b1=0.9, b2=0.999, eps=1e-8):
    """Textbook AdamW with global-norm clipping, in float64, on flat dicts of arrays."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        norm = np.sqrt(sum(np.sum(np.square(x)) for x in g.values()))
        scale = min(1.0, clip_norm / norm)
        for k in p:
            gk = g[k] * scale
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk * gk
            update = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
            rate = weight_decay if decays[k] is True else float(decays[k])  # a number: its own rate
            update = update + rate * p[k]
            p[k] = p[k] - lr * update
    return p


@pytest.mark.parametrize("boxed, embedding_decay", [(False, None), (True, None), (True, 2.0)])
def test_adamw_matches_a_numpy_reference(boxed, embedding_decay):
    config = config_with(init_lr=0.01, peak_lr=0.1, end_lr=0.001, warmup_steps=2, decay_steps=4,
                         weight_decay=0.5, clip_norm=1.0, embedding_weight_decay=embedding_decay)
    rng = np.random.default_rng(0)
    flat = {"kernel": rng.normal(size=(3, 2)), "bias": rng.normal(size=(2,)), "scale": rng.normal(size=(2,)),
            "embedding": rng.normal(size=(4, 2))}
    grads = [{k: rng.normal(size=v.shape) * s for k, v in flat.items()} for s in (100.0, 0.1, 1.0)]  # 1st clipped

    def tree(d):
        arrays = {k: jnp.asarray(v, jnp.float32) for k, v in d.items()}
        if boxed:  # as the model's parameters come: nn.Partitioned with logical names
            arrays = {k: nn.Partitioned(v, names=(None,) * v.ndim) for k, v in arrays.items()}
        return {"dense": {"kernel": arrays["kernel"], "bias": arrays["bias"]},
                "layer_norm": {"scale": arrays["scale"]}, "embed": {"embedding": arrays["embedding"]}}

    tx = optim.make_optimizer(config)
    params = tree(flat)
    state = tx.init(params)
    step = jit(lambda p, s, g: (lambda u, s2: (jax.tree_util.tree_map(jnp.add, p, u), s2))(*tx.update(g, s, p)))
    for g in grads:
        params, state = step(params, state, tree(g))
    schedule = optim.learning_rate_schedule(config)
    expected = np_adamw(flat, grads, [float(schedule(t)) for t in range(3)], 0.5, 1.0,
                        decays={"kernel": True, "embedding": True if embedding_decay is None else embedding_decay,
                                "bias": False, "scale": False})
    got = nn.meta.unbox(params)
    got = {"kernel": got["dense"]["kernel"], "bias": got["dense"]["bias"], "scale": got["layer_norm"]["scale"],
           "embedding": got["embed"]["embedding"]}
    for k in flat:
        np.testing.assert_allclose(np.asarray(got[k]), expected[k], rtol=2e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("boxed", [False, True])
def test_wide_lr_multiplier_scales_only_the_wide_parts_updates(boxed):
    rng = np.random.default_rng(3)
    raw = {"dense": {"kernel": rng.normal(size=(3, 2))}, "context_wides_search": {
        "wide_query": {"embedding": rng.normal(size=(5, 2))}, "wide_numeric": {"kernel": rng.normal(size=(2, 2))}}}
    box = (lambda x: nn.Partitioned(jnp.asarray(x, jnp.float32), names=(None,) * x.ndim)) if boxed else jnp.asarray
    params = jax.tree_util.tree_map(box, raw)
    grads = jax.tree_util.tree_map(lambda x: box(rng.normal(size=x.shape)), raw)
    updates = {}
    for multiplier in (1.0, 7.0):
        tx = optim.make_optimizer(config_with(warmup_steps=1, decay_steps=10, weight_decay=0.1,
                                              wide_lr_multiplier=multiplier))
        u, _ = tx.update(grads, tx.init(params), params)
        updates[multiplier] = nn.meta.unbox(u)
    base, fast = updates[1.0], updates[7.0]
    np.testing.assert_allclose(fast["dense"]["kernel"], base["dense"]["kernel"], rtol=1e-6)
    for name, leaf in (("wide_query", "embedding"), ("wide_numeric", "kernel")):
        got, want = fast["context_wides_search"][name][leaf], base["context_wides_search"][name][leaf]
        assert np.abs(want).min() > 0
        np.testing.assert_allclose(got, 7.0 * want, rtol=1e-5, err_msg=name)


def test_decay_mask_spares_biases_and_layer_norm():
    params = {"block": {"dense": {"kernel": np.ones((2, 2)), "bias": np.ones(2)},
                        "layer_norm": {"scale": np.ones(2), "bias": np.ones(2)}},
              "attention": {"query": {"kernel": np.ones((2, 1, 2)), "bias": np.ones((1, 2))}}}
    mask = optim.decay_mask(params)
    assert mask["block"]["dense"] == {"kernel": True, "bias": False}
    assert mask["block"]["layer_norm"] == {"scale": False, "bias": False}
    assert mask["attention"]["query"] == {"kernel": True, "bias": False}  # a 2-D bias is still a bias


def test_embedding_mask_selects_the_tables_and_dense_mask_the_kernels():
    params = {"embed_country": {"embedding": np.ones((3, 2))}, "dense": {"kernel": np.ones((2, 2)), "bias": np.ones(2)}}
    assert optim.embedding_mask(params) == {"embed_country": {"embedding": True}, "dense": {"kernel": False, "bias": False}}
    assert optim.dense_decay_mask(params) == {"embed_country": {"embedding": False}, "dense": {"kernel": True, "bias": False}}


def test_accumulating_k_micro_batches_equals_one_big_batch_step():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 32, 3)).astype(np.float32)  # two big batches of 32
    y = rng.normal(size=(2, 32)).astype(np.float32)
    params0 = {"w": jnp.asarray(rng.normal(size=(3,)), jnp.float32), "b": jnp.zeros((), jnp.float32)}

    def loss(p, xb, yb):
        return jnp.mean(jnp.square(xb @ p["w"] + p["b"] - yb))

    def run(accumulation_steps: int, micro: int):
        tx = optim.make_optimizer(config_with(init_lr=0.05, peak_lr=0.1, end_lr=0.01, warmup_steps=1, decay_steps=3,
                                              clip_norm=0.5, weight_decay=0.1, accumulation_steps=accumulation_steps))
        state = tx.init(params0)

        @jit
        def step(p, s, xb, yb):
            updates, s = tx.update(jax.grad(loss)(p, xb, yb), s, p)
            return jax.tree_util.tree_map(jnp.add, p, updates), s

        params, history = params0, []
        for xb, yb in zip(x.reshape(-1, micro, 3), y.reshape(-1, micro)):
            params, state = step(params, state, xb, yb)
            history.append(params)
        return params, history

    big, _ = run(1, 32)
    accumulated, history = run(4, 8)
    for k in big:
        np.testing.assert_allclose(np.asarray(accumulated[k]), np.asarray(big[k]), rtol=1e-5, atol=1e-7)
    # No update until the k-th micro-batch.
    for params in history[:3]:
        np.testing.assert_array_equal(np.asarray(params["w"]), np.asarray(params0["w"]))
    assert np.abs(np.asarray(history[3]["w"] - params0["w"])).max() > 1e-4


# -- row-wise Adagrad for large tables -------------------------------------------------------------

ROWWISE = dict(init_lr=0.01, peak_lr=0.1, end_lr=0.001, warmup_steps=2, decay_steps=4, weight_decay=0.5,
               clip_norm=1.0, large_table_optimizer="rowwise_adagrad", large_table_bytes=100,
               rowwise_learning_rate=0.5, rowwise_initial_accumulator=0.1)


def _tables_tree(flat, boxed=False):
    arrays = {k: jnp.asarray(v, jnp.float32) for k, v in flat.items()}
    if boxed:
        names = {"big": ("vocab", "embed"), "small": ("vocab", "embed"), "kernel": ("embed", "mlp"), "bias": ("mlp",)}
        arrays = {k: nn.Partitioned(v, names=names[k]) for k, v in arrays.items()}
    return {"embed_big": {"embedding": arrays["big"]}, "embed_small": {"embedding": arrays["small"]},
            "dense": {"kernel": arrays["kernel"], "bias": arrays["bias"]}}


def _flat(tree):
    tree = nn.meta.unbox(tree)
    return {"big": tree["embed_big"]["embedding"], "small": tree["embed_small"]["embedding"],
            "kernel": tree["dense"]["kernel"], "bias": tree["dense"]["bias"]}


@pytest.mark.parametrize("choice", ["rowwise_adagrad", "adagrad"])
def test_rowwise_adagrad_moves_only_the_batch_rows_as_a_numpy_reference(choice):
    """A 10 x 4 table (160 bytes, over the 100-byte threshold) takes row-wise Adagrad (or Adagrad,
    one accumulator per element), the 3 x 4 table (48 bytes) and the dense layer AdamW, both after
    one global clipping; the gradients are zero outside the rows of the batch's ids, as an
    embedding lookup's are."""
    config = config_with(**dict(ROWWISE, large_table_optimizer=choice))
    per_element = choice == "adagrad"
    rng = np.random.default_rng(1)
    flat = {"big": rng.normal(size=(10, 4)), "small": rng.normal(size=(3, 4)), "kernel": rng.normal(size=(4, 2)),
            "bias": rng.normal(size=(2,))}
    touched_per_step = [[1, 3, 7], [3, 8], [1, 3]]  # rows 0, 2, 4, 5, 6, 9 are never in a batch
    grads = []
    for rows, scale in zip(touched_per_step, (30.0, 0.1, 1.0)):  # the first step is clipped
        g = {k: rng.normal(size=v.shape) * scale for k, v in flat.items()}
        g["big"] = np.where(np.isin(np.arange(10), rows)[:, None], g["big"], 0.0)
        grads.append(g)

    tx = optim.make_optimizer(config, _tables_tree(flat))
    params, state = _tables_tree(flat), tx.init(_tables_tree(flat))
    step = jit(lambda p, s, g: (lambda u, s2: (jax.tree_util.tree_map(jnp.add, p, u), s2))(*tx.update(g, s, p)))
    for g in grads:
        params, state = step(params, state, _tables_tree(g))
    got = {k: np.asarray(v) for k, v in _flat(params).items()}

    # The reference, in float64: clipping over every gradient, then row-wise Adagrad on the big
    # table with the AdamW schedule's shape scaled to peak at 0.5, AdamW on the rest.
    schedule = optim.learning_rate_schedule(config)
    lrs = [float(schedule(t)) for t in range(3)]
    clipped = []
    for g in grads:
        norm = np.sqrt(sum(np.sum(np.square(x)) for x in g.values()))
        clipped.append({k: v * min(1.0, 1.0 / norm) for k, v in g.items()})
    table, sum_sq = flat["big"].copy(), np.full((10, 4) if per_element else 10, 0.1)
    for g, lr in zip(clipped, lrs):
        if per_element:  # SparseCore's Adagrad: no eps
            sum_sq += g["big"] ** 2
            table -= lr * (0.5 / 0.1) * g["big"] / np.sqrt(sum_sq)
        else:
            sum_sq += np.mean(g["big"] ** 2, axis=1)
            table -= lr * (0.5 / 0.1) * g["big"] / (np.sqrt(sum_sq)[:, None] + 1e-8)
    rest = np_adamw({k: flat[k] for k in ("small", "kernel", "bias")},
                    [{k: g[k] for k in ("small", "kernel", "bias")} for g in clipped], lrs, 0.5, np.inf,
                    decays={"small": True, "kernel": True, "bias": False})
    never = [0, 2, 4, 5, 6, 9]
    np.testing.assert_allclose(got["big"], table, rtol=2e-5, atol=1e-6)
    moved = np.abs(got["big"] - flat["big"].astype(np.float32)).max(axis=1)
    assert (moved[[1, 3, 7, 8]] > 1e-2).all(), moved
    np.testing.assert_array_equal(got["big"][never], flat["big"][never].astype(np.float32))  # bit for bit
    for k in ("small", "kernel", "bias"):
        np.testing.assert_allclose(got[k], rest[k], rtol=2e-5, atol=1e-6, err_msg=k)

    # The state: one accumulator per row (or element) of the big table (untouched rows keep 0.1
    # exactly); AdamW's moments only for the other parameters.
    accumulators = [x for x in jax.tree.leaves(state) if getattr(x, "shape", None) == sum_sq.shape]
    assert len(accumulators) == 1
    np.testing.assert_allclose(np.asarray(accumulators[0]), sum_sq, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(accumulators[0])[never], np.float32(0.1))
    assert len([x for x in jax.tree.leaves(state) if getattr(x, "shape", None) == (10, 4)]) == int(per_element)
    assert len([x for x in jax.tree.leaves(state) if getattr(x, "shape", None) == (3, 4)]) == 2


def test_the_default_and_a_threshold_over_every_table_keep_plain_adamw():
    """base.py's defaults (large_table_optimizer "adamw", large_table_bytes 0) build the plain
    clip -> AdamW chain: the same state structure and updates as before the option existed."""
    flat = {"big": np.ones((10, 4)), "small": np.ones((3, 4)), "kernel": np.ones((4, 2)), "bias": np.ones(2)}
    params = _tables_tree(flat)
    config = config_with()
    assert config.optim.large_table_optimizer == "adamw" and config.optim.large_table_bytes == 0
    plain = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        optim.learning_rate_schedule(config), b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-5, mask=optim.decay_mask))
    for c in (config, config_with(large_table_bytes=100), config_with(large_table_optimizer="rowwise_adagrad")):
        tx = optim.make_optimizer(c, params)
        assert jax.tree.structure(tx.init(params)) == jax.tree.structure(plain.init(params))
        g = _tables_tree({k: np.full_like(v, 0.3) for k, v in flat.items()})
        ours, theirs = tx.update(g, tx.init(params), params)[0], plain.update(g, plain.init(params), params)[0]
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="selects no embedding table"):
        optim.make_optimizer(config_with(**dict(ROWWISE, large_table_bytes=10**9)), params)
    with pytest.raises(ValueError, match="config.optim.large_table_optimizer: expected .* got 'sgd'"):
        optim.make_optimizer(config_with(large_table_optimizer="sgd"))


def test_rowwise_accumulators_are_sharded_with_their_table():
    """On boxed parameters the accumulator carries the table's "vocab" axis, so
    `sharding.state_shardings` row-shards it over every device together with the large table
    (8 fake CPU devices), while the small table stays replicated."""
    from jax.sharding import PartitionSpec as P

    from multitower_jax.train import sharding

    flat = {"big": np.ones((16, 4)), "small": np.ones((3, 4)), "kernel": np.ones((4, 2)), "bias": np.ones(2)}
    tx = optim.make_optimizer(config_with(**ROWWISE), _tables_tree(flat))
    boxed = jax.eval_shape(lambda: {"params": _tables_tree(flat, boxed=True),
                                    "opt_state": tx.init(_tables_tree(flat, boxed=True))})
    mesh = sharding.make_mesh(config_with(), jax.devices()[:8])
    rules = (("vocab", None), ("embed", None), ("mlp", None))
    shardings = sharding.state_shardings(boxed, mesh, rules, large_table_bytes=200)
    unboxed = nn.meta.unbox(boxed)
    by_shape = {}
    for leaf, s in zip(jax.tree.leaves(unboxed), jax.tree.leaves(shardings)):
        by_shape.setdefault(leaf.shape, set()).add(s.spec)
    assert by_shape[(16,)] == {P(("data", "model"))}  # the accumulator (64 bytes), with its table
    assert by_shape[(16, 4)] == {P(("data", "model"), None)}
    assert by_shape[(3, 4)] == {P()} or by_shape[(3, 4)] == {P(None, None)}
