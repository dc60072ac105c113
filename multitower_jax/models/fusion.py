"""Fusion of the three tower embeddings (seeds, section 2.4).

Pattern A ("concat"): [E_user, E_context, E_ad] -> MLP.
Pattern B ("dot"): the same plus the pairwise dot products user.ad, user.context and
context.ad, which are the terms of the retrieval score (E_user + E_context) . E_ad; giving
them to the MLP explicitly ties scoring to retrieval.
"product": [E_user, E_context, E_ad] plus the elementwise products user*ad, user*context and
context*ad, so the first layer learns its own weighted bilinear forms between towers (the dots
are their unweighted sums): explicit cross-tower interactions such as device x campaign.
The MLP is 256 -> 128 -> 64 of Dense -> LayerNorm -> ReLU -> Dropout(0.3) blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from multitower_jax.model_settings import FUSIONS
from multitower_jax.models import layers

Array = jax.Array
Dtype = Any

def pairwise_dots(e_user_BxD: Array, e_context_BxD: Array, e_ad_BxD: Array) -> Array:
    """[user.ad, user.context, context.ad] per row -> [B, 3]."""
    return jnp.stack(
        [
            jnp.sum(e_user_BxD * e_ad_BxD, axis=-1),
            jnp.sum(e_user_BxD * e_context_BxD, axis=-1),
            jnp.sum(e_context_BxD * e_ad_BxD, axis=-1),
        ],
        axis=-1,
    )


def interaction_features(e_user_BxD: Array, e_context_BxD: Array, e_ad_BxD: Array, mode: str) -> Array:
    """The fusion MLP's input: [B, 3D] for "concat", [B, 3D + 3] for "dot", [B, 6D] for "product"."""
    parts = [e_user_BxD, e_context_BxD, e_ad_BxD]
    if mode == "dot":
        parts.append(pairwise_dots(e_user_BxD, e_context_BxD, e_ad_BxD))
    elif mode == "product":  # row order: user*ad, user*context, context*ad (as pairwise_dots)
        parts += [e_user_BxD * e_ad_BxD, e_user_BxD * e_context_BxD, e_context_BxD * e_ad_BxD]
    elif mode != "concat":
        raise ValueError(f"fusion: expected one of {FUSIONS}, got {mode!r}")
    return jnp.concatenate(parts, axis=-1)


class Fusion(nn.Module):
    """(E_user, E_context, E_ad) -> fused representation [B, hidden_sizes[-1]]."""

    mode: str = "dot"
    hidden_sizes: Sequence[int] = (256, 128, 64)
    dropout_rate: float = 0.3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, e_user_BxD: Array, e_context_BxD: Array, e_ad_BxD: Array, train: bool = False) -> Array:
        x_BxF = interaction_features(e_user_BxD, e_context_BxD, e_ad_BxD, self.mode).astype(self.dtype)
        return layers.MLP(tuple(self.hidden_sizes), self.dropout_rate, self.dtype, name="mlp")(x_BxF, train)
