"""The optimizer (seeds, section 5.2): AdamW, linear warm-up then cosine decay, clipping.

    init_lr --(warmup_steps, linear)--> peak_lr --(decay_steps, cosine)--> end_lr (then constant)

Steps count optimizer *updates*: with ``accumulation_steps = k`` the gradients of k
micro-batches are averaged (`optax.MultiSteps`) and the schedule advances once per k
micro-batches. Clipping and weight decay act on the averaged gradient, as they would on one
k-times larger batch.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

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


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(schedule, decoupled weight decay), wrapped in
    `optax.MultiSteps` when ``config.optim.accumulation_steps > 1``."""
    o = config.optim
    parts = []
    if float(o.clip_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(o.clip_norm)))
    embedding_decay = o.get("embedding_weight_decay", None)
    if embedding_decay is None:  # one decoupled weight decay for kernels and tables
        parts.append(optax.adamw(learning_rate_schedule(config), b1=0.9, b2=0.999, eps=1e-8,
                                 weight_decay=float(o.weight_decay), mask=decay_mask))
    else:  # AdamW with its own decay rate for the embedding tables
        parts += [optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
                  optax.add_decayed_weights(float(o.weight_decay), mask=dense_decay_mask),
                  optax.add_decayed_weights(float(embedding_decay), mask=embedding_mask),
                  optax.scale_by_learning_rate(learning_rate_schedule(config))]
    tx = optax.chain(*parts)
    steps = int(o.accumulation_steps)
    if steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=steps).gradient_transformation()
    return tx
