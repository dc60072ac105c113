"""The optimizer (seeds, section 5.2): AdamW, linear warm-up then cosine decay, clipping.

    init_lr --(warmup_steps, linear)--> peak_lr --(decay_steps, cosine)--> end_lr (then constant)

Steps count optimizer *updates*: with ``accumulation_steps = k`` the gradients of k
micro-batches are averaged (`optax.MultiSteps`) and the schedule advances once per k
micro-batches. Clipping and weight decay act on the averaged gradient, as they would on one
k-times larger batch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from multitower_jax.config_checks import fail, require_choice
from multitower_jax.model_settings import LARGE_TABLE_OPTIMIZERS

# Parameters whose last name is one of these are not weight-decayed: shrinking a bias or a
# LayerNorm gain towards 0 regularizes nothing, it only shifts or shrinks the activations.
NO_DECAY_NAMES = ("bias", "scale")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The learning rate as a function of the update count, from ``config.optim``."""
    o = config.optim
    return optax.warmup_cosine_decay_schedule(
        init_value=float(o.init_lr),
        peak_value=float(o.peak_lr),
        warmup_steps=int(o.warmup_steps),
        decay_steps=int(o.warmup_steps) + int(o.decay_steps),  # optax counts the warm-up in
        end_value=float(o.end_lr),
    )


# nn.Embed's table parameter: embedding tables get their own weight decay (`embedding_weight_decay`).
EMBEDDING_NAMES = ("embedding",)


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
    """The moving average's decay at `step` (0-based count of updates before this one): at most
    `decay`, and (1 + step) / (10 + step) early on, so the first steps are not averaged with the
    random start for thousands of steps (TensorFlow's ``ExponentialMovingAverage(num_updates)``)."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def ema_update(ema: Any, params: Any, decay: float, step: jax.Array) -> Any:
    """``ema * d + params * (1 - d)`` leaf by leaf, d = `ema_decay_at` (decay, step)."""
    d = ema_decay_at(decay, step)
    return jax.tree.map(lambda e, p: (e * d + p.astype(e.dtype) * (1.0 - d)).astype(e.dtype), ema, params)


def _last_name(path: tuple) -> str | None:
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return names[-1] if names else None


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: kernels and embedding tables.

    Works on raw and on `nn.Partitioned`-boxed parameter trees (the box is a pytree node).
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: _last_name(path) not in NO_DECAY_NAMES, params)


def dense_decay_mask(params: Any) -> Any:
    """True for the decayed parameters that are not embedding tables (kernels)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _last_name(path) not in NO_DECAY_NAMES + EMBEDDING_NAMES, params)


def embedding_mask(params: Any) -> Any:
    """True for embedding tables (token, categorical and multi-hot ids)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _last_name(path) in EMBEDDING_NAMES, params)


def wide_mask(params: Any) -> Any:
    """True for the parameters of the model's `Wide` part (named ``wide_*``)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(isinstance(k, jax.tree_util.DictKey) and str(k.key).startswith("wide_") for k in path),
        params)


def zero_last_column() -> optax.GradientTransformation:
    """Updates with their last column (the last logit of a `Wide` parameter: CVR) set to 0."""
    return optax.stateless(lambda updates, params=None: jax.tree.map(lambda u: u.at[..., -1].set(0), updates))


def _dense_parts(config: ml_collections.ConfigDict) -> list[optax.GradientTransformation]:
    """AdamW with the schedule and the decoupled weight decay(s), after clipping."""
    o = config.optim
    embedding_decay = o.get("embedding_weight_decay", None)
    if embedding_decay is None:  # one decoupled weight decay for kernels and tables
        return [optax.adamw(learning_rate_schedule(config), b1=0.9, b2=0.999, eps=1e-8,
                            weight_decay=float(o.weight_decay), mask=decay_mask)]
    # AdamW with its own decay rate for the embedding tables
    return [optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
            optax.add_decayed_weights(float(o.weight_decay), mask=dense_decay_mask),
            optax.add_decayed_weights(float(embedding_decay), mask=embedding_mask),
            optax.scale_by_learning_rate(learning_rate_schedule(config))]


def make_optimizer(config: ml_collections.ConfigDict, params: Any = None,
                   sparsecore_paths: frozenset[tuple[str, ...]] = frozenset()) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(schedule, decoupled weight decay), wrapped in
    `optax.MultiSteps` when ``config.optim.accumulation_steps > 1``.

    With ``optim.large_table_optimizer = "rowwise_adagrad"`` and ``optim.large_table_bytes > 0``,
    embedding tables of at least that many bytes in `params` (arrays or shapes, raw or boxed;
    needed then) take `rowwise_adagrad` (learning rate ``optim.rowwise_learning_rate`` on the
    same warm-up / cosine shape, no weight decay), the rest AdamW, both after the one global
    clipping. Which tables those are is decided here, once, by their paths: the update may then
    get a large table's gradient for the batch's rows only (`train.batch_rows`) and pass
    ``rows=`` on to `rowwise_adagrad`. ``"adagrad"`` is the same with one accumulator per element.

    `sparsecore_paths`: the large tables placed on the SparseCores (`train.sparsecore`). They are
    not optax's: their updates here are zeros, with no state (the SparseCores update them), and
    there is then no clipping here: the train step clips every gradient itself, the SparseCore
    tables' with the rest (`Trainer._sparsecore_update`)."""
    o = config.optim
    parts = []
    if float(o.clip_norm) > 0 and not sparsecore_paths:
        parts.append(optax.clip_by_global_norm(float(o.clip_norm)))
    choice = str(o.get("large_table_optimizer", "adamw"))
    threshold = int(o.get("large_table_bytes", 0) or 0)
    require_choice(choice, "optim.large_table_optimizer", LARGE_TABLE_OPTIMIZERS)
    if choice == "adamw" or threshold <= 0:
        parts += _dense_parts(config)
    else:
        if params is None:
            raise ValueError(f"make_optimizer: optim.large_table_optimizer={choice!r} needs the parameters "
                             "(arrays or shapes) to choose the large tables")
        large = large_table_paths(params, threshold)
        if not large:
            fail("optim.large_table_bytes", f"a size that selects an embedding table for {choice} (lower it, "
                 "or set optim.large_table_optimizer='adamw'): it selects no embedding table", threshold)
        rowwise = rowwise_adagrad(rowwise_schedule(config), float(o.get("rowwise_initial_accumulator", 0.1)),
                                  per_element=choice == "adagrad")

        def group(path, _):
            path = param_names(path)
            return "sparsecore" if path in sparsecore_paths else "rowwise" if path in large else "dense"

        parts.append(_without_boxed_masks(optax.multi_transform(
            {"dense": optax.chain(*_dense_parts(config)), "rowwise": rowwise, "sparsecore": optax.set_to_zero()},
            lambda tree: jax.tree_util.tree_map_with_path(group, tree))))
    wide_lr = float(o.get("wide_lr_multiplier", 1.0))
    if wide_lr != 1.0:  # Wide & Deep trains its wide part at its own (higher) rate
        parts.append(_without_boxed_masks(optax.masked(optax.scale(wide_lr), wide_mask)))
    if bool(o.get("freeze_wide_cvr", False)) and config.model.head != "ctr":  # the CVR column keeps its start
        parts.append(_without_boxed_masks(optax.masked(zero_last_column(), wide_mask)))
    tx = optax.chain(*parts)
    steps = int(o.accumulation_steps)
    if steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=steps).gradient_transformation()
    return tx


# -- row-wise Adagrad for large embedding tables --------------------------------------------------


def _nbytes(x: Any) -> int:
    return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def large_table_mask(params: Any, min_bytes: int) -> Any:
    """True for embedding tables of at least `min_bytes` bytes (raw or boxed parameter trees)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: _last_name(path) in EMBEDDING_NAMES and _nbytes(x) >= min_bytes, params)


def param_names(path: tuple) -> tuple[str, ...]:
    """The dict keys of a pytree path: the same for a raw and a boxed (`nn.Partitioned`) leaf."""
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def large_table_paths(params: Any, min_bytes: int) -> frozenset[tuple[str, ...]]:
    """The `param_names` of the embedding tables of at least `min_bytes` bytes."""
    return frozenset(param_names(path) for path, big in jax.tree_util.tree_flatten_with_path(
        large_table_mask(params, min_bytes))[0] if big)


def _without_boxed_masks(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """`tx` whose state, initialized on boxed parameters, holds a bare `MaskedNode` (no leaves)
    where `optax.masked` left ``nn.Partitioned(MaskedNode())``: the state's logical partition
    specs (`nn.get_partition_spec`) then match its arrays leaf for leaf."""
    def unbox_masked(x):
        if isinstance(x, nn.Partitioned) and isinstance(x.value, optax.MaskedNode):
            return x.value
        return x

    def init_fn(params):
        return jax.tree.map(unbox_masked, tx.init(params), is_leaf=lambda x: isinstance(x, nn.Partitioned))

    return optax.GradientTransformationExtraArgs(init_fn, optax.with_extra_args_support(tx).update)


def rowwise_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The AdamW schedule's shape (warm-up, cosine) scaled to peak at ``optim.rowwise_learning_rate``."""
    o = config.optim
    base, scale = learning_rate_schedule(config), float(o.get("rowwise_learning_rate", 0.05)) / float(o.peak_lr)
    return lambda count: base(count) * scale


class RowwiseAdagradState(NamedTuple):
    count: jax.Array  # updates so far (the schedule's step)
    sum_sq: Any  # per table: the running sum of each row's mean squared gradient, [rows]


def rowwise_adagrad(learning_rate: float | optax.Schedule, initial_accumulator: float = 0.1,
                    eps: float = 1e-8, per_element: bool = False) -> optax.GradientTransformationExtraArgs:
    """Row-wise Adagrad for [rows, dim] tables (the optimizer of TPU embedding and DLRM tables):

        sum_sq[r] += mean_d g[r, d]^2
        p[r, :]   -= lr * g[r, :] / (sqrt(sum_sq[r]) + eps)

    A row whose gradient is zero (its id is not in the batch) keeps its parameters and its
    accumulator bit for bit. The state is one float per row. On boxed (`nn.Partitioned`)
    parameters the accumulator carries the table's first logical axis ("vocab"), so it is
    sharded like the table's rows and every chip updates its own rows with no communication.

    ``update(..., rows={path: int32[slots]})`` (`param_names` paths; `train.batch_rows`): the
    gradient of each table named there is ``[slots, dim]``, that of its rows ``rows`` (an index
    past the table's end is an unused slot); only those rows' accumulators change, and the
    update returned is ``[slots, dim]`` too, for `batch_rows.BatchRows.apply_updates`.

    `per_element`: Adagrad with one accumulator per element, exactly as SparseCore applies it
    (`train.sparsecore`; no `eps`, the accumulator starts at `initial_accumulator` > 0):

        sum_sq[r, d] += g[r, d]^2
        p[r, d]      -= lr * g[r, d] / sqrt(sum_sq[r, d])"""
    schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)
    kept = 2 if per_element else 1  # the accumulator's axes: the table's rows (and columns)

    def init_row_sums(x):
        if isinstance(x, nn.Partitioned):
            if not hasattr(x.value, "shape"):  # another group's parameter (optax.masked's MaskedNode)
                return x
            return nn.Partitioned(jnp.full(x.value.shape[:kept], initial_accumulator, jnp.float32),
                                  names=tuple(x.names[:kept]), mesh=x.mesh)
        if x.ndim != 2:
            raise ValueError(f"rowwise_adagrad takes [rows, dim] tables, got shape {x.shape}")
        return jnp.full(x.shape[:kept], initial_accumulator, jnp.float32)

    def init_fn(params):
        sums = jax.tree.map(init_row_sums, params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        return RowwiseAdagradState(count=jnp.zeros((), jnp.int32), sum_sq=sums)

    def update_fn(updates, state, params=None, rows=None, **extra_args):
        del params, extra_args
        lr = schedule(state.count)
        rows = rows or {}

        def batch_sums(path, g, s):  # the accumulators of the rows `g` is the gradient of
            found = rows.get(param_names(path))
            before = s if found is None else jnp.take(s, found, mode="fill", fill_value=0)
            squares = jnp.square(g.astype(jnp.float32))
            return before + (squares if per_element else jnp.mean(squares, axis=1))

        def store(path, s, sums):
            found = rows.get(param_names(path))
            return sums if found is None else s.at[found].set(sums, mode="drop")

        used_sums = jax.tree_util.tree_map_with_path(batch_sums, updates, state.sum_sq)
        new_sums = jax.tree_util.tree_map_with_path(store, state.sum_sq, used_sums)
        def step(g, s):
            scale = jnp.sqrt(s) if per_element else jnp.sqrt(s)[:, None] + eps
            return (-lr * g / scale).astype(g.dtype)

        new = jax.tree.map(step, updates, used_sums)
        return new, RowwiseAdagradState(count=optax.safe_int32_increment(state.count), sum_sq=new_sums)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
