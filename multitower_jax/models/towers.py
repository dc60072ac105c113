"""The three towers (seeds, section 2), as one module configured per tower.

user     categorical + numeric + interest vector (400-d) -> 256 -> 128      E_user
context  one per placement; search: query encoder + session / geo features
         (~190-d) -> Dense(128) -> LayerNorm -> ReLU                        E_context
ad       title + description encoder, image embedding, categorical, numeric
         (~512-d) -> 256 -> 128                                             E_ad

A tower's text features (query; title and description) are concatenated into one token
sequence and encoded once, so each tower has one text vector (the seeds' E_query, E_text_ad);
padding inside the sequence is masked, so a short title does not shift the description's
meaning, only its positions. Every tower ends in the same Dense -> LayerNorm -> ReLU block, so
the three embeddings share one scale, as the dot products of fusion pattern B and the
retrieval score Q . E_ad (Q = E_user + E_context) assume.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from multitower_jax import features as F
from multitower_jax.models import layers
from multitower_jax.models.text_encoder import TextEncoder, TextEncoderConfig

Array = jax.Array
Dtype = Any


def text_length(spec: F.TowerSpec) -> int:
    """Length of the tower's concatenated token sequence (0 when it has no text)."""
    return sum(f.max_len for f in spec.of_type("text"))


def text_vocab_size(spec: F.TowerSpec) -> int:
    return max((f.vocab_size for f in spec.of_type("text")), default=0)


def tower_input_dim(spec: F.TowerSpec, text_dim: int) -> int:
    """Width of the concatenated input of the tower's first dense layer."""
    non_text = sum(layers.feature_width(f) for f in spec.features if not isinstance(f, F.Text))
    return non_text + (text_dim if spec.of_type("text") else 0)


class Tower(nn.Module):
    """features of one tower -> [text encoder] + feature embedding -> concat -> MLP -> E[B, D].

    `hidden_sizes` ends with the embedding width D; every layer is a
    Dense -> LayerNorm -> ReLU -> Dropout block. `text_encoder` is a shared encoder owned by
    the parent model; when it is None and the tower has text, the tower builds its own from
    `text_config`.
    """

    spec: F.TowerSpec
    hidden_sizes: Sequence[int]
    dropout_rate: float = 0.0
    text_encoder: nn.Module | None = None
    text_config: TextEncoderConfig | None = None
    dtype: Dtype = jnp.float32
    vocab_multiple: int = 1
    embed_init: str = "normal"  # `model_settings.EMBED_INITS`
    output_activation: bool = True  # False: the last block ends at its LayerNorm (both signs)

    @nn.compact
    def __call__(self, features: Mapping[str, Array], train: bool = False) -> Array:
        parts = []
        texts = self.spec.of_type("text")
        if texts:
            encoder = self.text_encoder
            if encoder is None:
                if self.text_config is None:
                    raise ValueError(f"tower {self.spec.name!r} has text features but no text encoder config")
                encoder = TextEncoder(self.text_config, name="text_encoder")
            tokens_BxL = jnp.concatenate([jnp.asarray(features[f.name]) for f in texts], axis=1)
            parts.append(encoder(tokens_BxL, train=train).astype(self.dtype))
        if len(texts) < len(self.spec.features):
            parts.append(layers.FeatureEmbedding(self.spec, self.dtype, self.vocab_multiple, self.embed_init,
                                                 name="features")(features, train))
        x_BxI = jnp.concatenate(parts, axis=-1)
        return layers.MLP(tuple(self.hidden_sizes), self.dropout_rate, self.dtype, self.output_activation,
                          name="mlp")(x_BxI, train)
