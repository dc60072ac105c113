"""Building blocks shared by the towers: the Dense->LayerNorm->ReLU->Dropout block, an MLP of
such blocks, and the embedding of a tower's non-text features.

Every parameter carries logical axis names (``nn.with_logical_partitioning``) so that the
sharding rules in the config decide where it lives; the names used are listed in
`LOGICAL_AXES`. A name without a rule is replicated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from multitower_jax import features as F
from multitower_jax.model_settings import EMBED_INITS

Array = jax.Array
Dtype = Any

# Logical axis names that appear in parameter metadata (map them in the sharding rules):
#   vocab    rows of an embedding table (token, categorical or multi-hot ids)
#   embed    width of an embedding table / of the text encoder's residual stream
#   embed_in input width of an MLP dense kernel
#   mlp      output width of an MLP dense kernel (and its bias / LayerNorm)
#   heads    attention heads;  kv  per-head width;  pos  learned positions
LOGICAL_AXES = ("vocab", "embed", "embed_in", "mlp", "heads", "kv", "pos")

DEFAULT_KERNEL_INIT = nn.initializers.lecun_normal()


def embedding_init(features: int, mode: str = "normal") -> nn.initializers.Initializer:
    """The initializer of an embedding table `features` wide (see `model_settings.EMBED_INITS`)."""
    if mode == "unit":
        return nn.initializers.normal(stddev=1.0 / math.sqrt(features))
    if mode == "normal":
        return nn.initializers.normal(stddev=1.0)
    raise ValueError(f"embedding init: expected one of {EMBED_INITS}, got {mode!r}")


def _mix32(h: Array) -> Array:
    """A bijective avalanche hash of uint32 (Wellons' lowbias32: every input bit flips each
    output bit with probability ~1/2)."""
    h = (h ^ (h >> 16)) * jnp.uint32(0x7FEB352D)
    h = (h ^ (h >> 15)) * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def keep_mask(key: Array, shape: tuple[int, ...], rate: float) -> Array:
    """bool[shape], true with probability 1 - rate (to 2^-32), a counter-based hash of each
    element's (row, column) index and two seed words drawn from `key`.

    XLA fuses the hash into the elementwise consumer, so no random bits are materialized:
    drawing them with ``jax.random`` took ~25 % of a CPU training step of the seeds' search
    model. The mask of an element depends only on the key and its index, so a sharded array
    gets the same mask as an unsharded one.
    """
    seed = jax.random.bits(key, (2,), jnp.uint32)
    rows, cols = math.prod(shape[:-1]), (shape[-1] if shape else 1)
    if rows >= 2**32 or cols >= 2**32:
        raise ValueError(f"dropout on {shape}: more than 2^32 rows or columns")
    row = jax.lax.broadcasted_iota(jnp.uint32, (rows, cols), 0)
    col = jax.lax.broadcasted_iota(jnp.uint32, (rows, cols), 1)
    h = _mix32(_mix32(row ^ seed[0]) ^ (col * jnp.uint32(0x9E3779B9) + seed[1]))
    threshold = min(int(round(rate * 2.0**32)), 2**32 - 1)
    return (h >= jnp.uint32(threshold)).reshape(shape)


def dropout(x: Array, key: Array, rate: float, mask_shape: tuple[int, ...] | None = None) -> Array:
    """Inverted dropout of `x` with the `keep_mask` of `key`: kept elements are scaled by
    1 / (1 - rate), so the expectation is `x`. `mask_shape` (default ``x.shape``) is the shape
    of one mask broadcast over `x`, e.g. its trailing dims to share a mask over the leading ones."""
    if rate <= 0.0:
        return x
    if rate >= 1.0:
        return jnp.zeros_like(x)
    keep = keep_mask(key, x.shape if mask_shape is None else tuple(mask_shape), rate)
    return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros_like(x))


class Dropout(nn.Module):
    """`dropout` drawing its key from the "dropout" RNG stream; the identity when deterministic.
    Unlike flax's, no random bits are materialized: on a CPU they cost more than the layers
    they mask."""

    rate: float

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        if deterministic or self.rate <= 0.0:
            return x
        return dropout(x, self.make_rng("dropout"), self.rate)


def partitioned(init: nn.initializers.Initializer, names: tuple[str | None, ...]) -> Any:
    """An initializer whose parameter is boxed with logical axis `names`."""
    return nn.with_logical_partitioning(init, names)


def dense(features: int, name: str | None = None, dtype: Dtype = jnp.float32,
          names: tuple[str | None, str | None] = ("embed_in", "mlp")) -> nn.Dense:
    """nn.Dense with logically partitioned kernel and bias."""
    return nn.Dense(
        features,
        dtype=dtype,
        kernel_init=partitioned(DEFAULT_KERNEL_INIT, names),
        bias_init=partitioned(nn.initializers.zeros_init(), (names[1],)),
        name=name,
    )


def layer_norm(name: str | None = None, dtype: Dtype = jnp.float32, axis_name: str = "mlp") -> nn.LayerNorm:
    """nn.LayerNorm with logically partitioned scale and bias."""
    return nn.LayerNorm(
        dtype=dtype,
        scale_init=partitioned(nn.initializers.ones_init(), (axis_name,)),
        bias_init=partitioned(nn.initializers.zeros_init(), (axis_name,)),
        name=name,
    )


def padded_rows(num_embeddings: int, multiple: int) -> int:
    """Rows rounded up to a multiple, so a table splits evenly over the devices of the
    "model" mesh axis (JAX shards only evenly divisible dimensions). The extra rows are
    never looked up: ids stay below `num_embeddings`."""
    return -(-num_embeddings // multiple) * multiple


# A variable collection that can stand in for embedding tables: the rows of a table that one
# batch looks up, ``[slots, dim]``, its ids relabelled to positions in them (`train.batch_rows`),
# or ``[chips, slots, dim]``: each chip's rows, its ids relabelled to positions in its own
# (`train.sparsecore`), so the lookup and its gradient stay on the chip.
BATCH_ROWS = "batch_rows"


class Embed(nn.Module):
    """`nn.Embed`'s lookup and parameter ("embedding", [num_embeddings, features], float32, cast
    to `dtype` before the lookup), except that a table given in the `BATCH_ROWS` collection
    replaces the parameter (which is then neither read nor checked)."""

    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32
    embedding_init: nn.initializers.Initializer = nn.initializers.normal(stddev=1.0)

    @nn.compact
    def __call__(self, ids: Array) -> Array:
        if self.has_variable(BATCH_ROWS, "embedding"):
            table = self.get_variable(BATCH_ROWS, "embedding")
        else:
            table = self.param("embedding", self.embedding_init, (self.num_embeddings, self.features), jnp.float32)
        table = jnp.asarray(table, self.dtype)
        if table.ndim == 3:  # per chip: the batch's rows are split over the chips in order
            ids_per_chip = ids.reshape(table.shape[0], -1)
            rows = jax.vmap(lambda t, i: jnp.take(t, i, axis=0))(table, ids_per_chip)
            return rows.reshape(*ids.shape, table.shape[-1])
        return jnp.take(table, ids, axis=0)


def embed(num_embeddings: int, features: int, name: str | None = None, dtype: Dtype = jnp.float32,
          vocab_multiple: int = 1, init: str = "normal") -> Embed:
    """An `Embed` whose table is named ("vocab", "embed"), rows padded to `vocab_multiple`,
    initialized by `embedding_init(features, init)`."""
    return Embed(
        padded_rows(num_embeddings, vocab_multiple),
        features,
        dtype=dtype,
        embedding_init=partitioned(embedding_init(features, init), ("vocab", "embed")),
        name=name,
    )


class Block(nn.Module):
    """Dense -> LayerNorm -> ReLU -> Dropout, the seeds' unit of every tower and the fusion MLP;
    with `activation=False`, Dense -> LayerNorm only (an output that keeps both signs)."""

    features: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    activation: bool = True

    @nn.compact
    def __call__(self, x_BxI: Array, train: bool = False) -> Array:
        h_BxO = dense(self.features, "dense", self.dtype)(x_BxI)
        h_BxO = layer_norm("layer_norm", self.dtype)(h_BxO)
        if not self.activation:
            return h_BxO
        h_BxO = nn.relu(h_BxO)
        # Dropout draws from the "dropout" RNG stream, only when training.
        return Dropout(self.dropout_rate)(h_BxO, deterministic=not train)


class MLP(nn.Module):
    """A stack of `Block`s, one per entry of `hidden_sizes`; `final_activation=False` ends the
    last one at its LayerNorm (the seeds' towers: embeddings of both signs)."""

    hidden_sizes: Sequence[int]
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    final_activation: bool = True

    @nn.compact
    def __call__(self, x_BxI: Array, train: bool = False) -> Array:
        last = len(self.hidden_sizes) - 1
        for i, width in enumerate(self.hidden_sizes):
            activation = self.final_activation or i < last
            x_BxI = Block(width, self.dropout_rate, self.dtype, activation, name=f"block_{i}")(x_BxI, train)
        return x_BxI


def masked_mean(values_BxLxD: Array, mask_BxL: Array) -> Array:
    """Mean over the positions where `mask_BxL` is true; all-masked rows give zeros."""
    mask_BxLx1 = mask_BxL[..., None].astype(values_BxLxD.dtype)
    total_BxD = jnp.sum(values_BxLxD * mask_BxLx1, axis=1)
    count_Bx1 = jnp.maximum(jnp.sum(mask_BxLx1, axis=1), 1.0)
    return total_BxD / count_Bx1


def feature_width(feature: F.Feature) -> int:
    """Width a non-text feature contributes to its tower's concatenated input."""
    if isinstance(feature, F.Categorical | F.MultiHot):
        return feature.dim
    if isinstance(feature, F.Dense):
        return feature.dim
    if isinstance(feature, F.Numeric):
        return 1
    raise TypeError(f"feature {feature.name!r} of type {feature.type!r} has no fixed width here")


class FeatureEmbedding(nn.Module):
    """Embeds and concatenates the non-text features of one tower, in spec order.

    categorical int32[B] -> table of size+1 rows (row 0 is the OOV / missing bucket);
    numeric float32[B] -> one column (already log1p + standardized by the pipeline);
    dense float32[B, dim] -> passed through;
    multi_hot int32[B, max_items] (ids + 1, 0 = pad) -> mean of the embeddings of the real items.
    Text features are left to the tower, which owns (or shares) a text encoder.
    In training, a categorical feature with `oov_rate` > 0 sends that fraction of rows to row 0
    (drawn from the "dropout" rng stream).
    """

    spec: F.TowerSpec
    dtype: Dtype = jnp.float32
    vocab_multiple: int = 1
    embed_init: str = "normal"

    @property
    def output_dim(self) -> int:
        return sum(feature_width(f) for f in self.spec.features if not isinstance(f, F.Text))

    @nn.compact
    def __call__(self, features: Mapping[str, Array], train: bool = False) -> Array:
        parts = []
        for f in self.spec.features:
            if isinstance(f, F.Text):
                continue
            if f.name not in features:
                raise KeyError(f"tower {self.spec.name!r}: batch has no feature {f.name!r}; got {sorted(features)}")
            x = jnp.asarray(features[f.name])
            if isinstance(f, F.Categorical):
                table = embed(f.num_embeddings, f.dim, f"embed_{f.name}", self.dtype, self.vocab_multiple,
                              self.embed_init)
                ids_B = x.astype(jnp.int32)
                if train and f.oov_rate > 0:
                    cold_B = jax.random.bernoulli(self.make_rng("dropout"), f.oov_rate, ids_B.shape)
                    ids_B = jnp.where(cold_B, 0, ids_B)
                parts.append(table(ids_B))
            elif isinstance(f, F.MultiHot):
                table = embed(f.num_embeddings, f.dim, f"embed_{f.name}", self.dtype, self.vocab_multiple,
                              self.embed_init)
                ids_BxM = x.astype(jnp.int32)
                parts.append(masked_mean(table(ids_BxM), ids_BxM > 0))
            elif isinstance(f, F.Numeric):
                parts.append(x.astype(self.dtype)[:, None])
            elif isinstance(f, F.Dense):
                parts.append(x.astype(self.dtype))
            else:
                raise TypeError(f"unknown feature type {f.type!r} for {f.name!r}")
        if not parts:
            raise ValueError(f"tower {self.spec.name!r} has no non-text features")
        return jnp.concatenate(parts, axis=-1)
