"""The query / ad-text Transformer encoder (seeds, Appendix A and B).

token embeddings + positional embeddings (sinusoidal or learned) -> N encoder layers
(8-head self-attention + MLP, pre- or post-LayerNorm) -> mean pooling or the [CLS] output.

Token id 0 is padding and id 1 is [CLS] (the tokenizer reserves both). Padding is masked
everywhere: as attention keys and in the pooling, so neither the number of pad positions nor
what sits under the mask changes the output.

With ``kernel="pallas"`` each layer runs as one Pallas kernel (`fused_encoder`) on TPUs, with
the same parameters and the same math; elsewhere, and with ``"xla"``, as XLA's ops.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh

from multitower_jax import kernels
from multitower_jax.models import fused_encoder, layers
from multitower_jax.train.sharding import BATCH_AXES

Array = jax.Array
Dtype = Any

PAD_ID = 0
CLS_ID = 1


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int
    max_len: int  # longest token sequence fed to the encoder, without the [CLS] slot
    dim: int = 128
    num_layers: int = 2
    num_heads: int = 8
    mlp_dim: int = 512
    positional: str = "sinusoidal"  # "sinusoidal" | "learned"
    pooling: str = "mean"  # "mean" | "cls"
    norm: str = "pre"  # "pre" | "post" LayerNorm placement
    dropout_rate: float = 0.1
    dtype: Dtype = jnp.float32
    embed_init: str = "normal"  # the token table's (`model_settings.EMBED_INITS`)
    kernel: str = "xla"  # `model_settings.TEXT_KERNELS`
    mesh: Mesh | None = None  # the devices the batch is sharded over (the fused kernel runs per shard)

    def fused(self) -> bool:
        """Whether the layers run as the fused Pallas kernel (`kernels.runs_fused`)."""
        return kernels.runs_fused(self.kernel, self.mesh)


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
    """Fixed encodings of "Attention Is All You Need": sin on even, cos on odd dims; [L, dim]."""
    positions_Lx1 = np.arange(length, dtype=np.float64)[:, None]
    div_H = np.power(10000.0, np.arange(0, dim, 2, dtype=np.float64) / dim)
    table_LxD = np.zeros((length, dim), dtype=np.float64)
    table_LxD[:, 0::2] = np.sin(positions_Lx1 / div_H)
    table_LxD[:, 1::2] = np.cos(positions_Lx1 / div_H[: dim // 2])
    return table_LxD.astype(np.float32)


def dot_product_attention(query_BxQxHxK: Array, key_BxLxHxK: Array, value_BxLxHxK: Array, mask: Array | None = None,
                          dropout_rng: Array | None = None, dropout_rate: float = 0.0, deterministic: bool = True,
                          dtype: Dtype | None = None, precision: Any = None) -> Array:
    """Scaled dot-product attention whose weights are dropped by one `layers.dropout` mask over
    (query, key) positions, shared by the batch and the heads as in flax's default; flax's own
    draws that mask with `jax.random` and materializes it and its scale at [B, H, Q, L]."""
    weights_BxHxQxL = nn.dot_product_attention_weights(
        query_BxQxHxK, key_BxLxHxK, mask=mask, deterministic=True, dtype=dtype, precision=precision)
    if not deterministic:
        weights_BxHxQxL = layers.dropout(weights_BxHxQxL, dropout_rng, dropout_rate, weights_BxHxQxL.shape[-2:])
    return jnp.einsum("...hql,...lhd->...qhd", weights_BxHxQxL, value_BxLxHxK, precision=precision)


class EncoderLayer(nn.Module):
    """Self-attention + MLP with residuals; LayerNorm before (pre) or after (post) each."""

    config: TextEncoderConfig

    @nn.compact
    def __call__(self, x_BxLxD: Array, key_mask_BxL: Array, train: bool) -> Array:
        cfg = self.config
        # The kernel runs per shard of the mesh's batch axes: a batch that does not split evenly
        # over them (e.g. a catalogue's last chunk) takes XLA's ops, the same math.
        splits = cfg.mesh is None or x_BxLxD.shape[0] % cfg.mesh.size == 0
        if cfg.fused() and splits and not self.is_initializing():
            return self._fused(x_BxLxD, key_mask_BxL, train)
        # Only keys are masked: a pad query row produces garbage nobody reads (pads are never
        # attended to and never pooled), and masking it too would make its softmax all-masked.
        mask_Bx1x1xL = key_mask_BxL[:, None, None, :]
        attention = nn.MultiHeadDotProductAttention(
            num_heads=cfg.num_heads,
            qkv_features=cfg.dim,
            out_features=cfg.dim,
            dtype=cfg.dtype,
            dropout_rate=cfg.dropout_rate,
            deterministic=not train,
            attention_fn=dot_product_attention,
            kernel_init=layers.partitioned(layers.DEFAULT_KERNEL_INIT, ("embed", "heads", "kv")),
            out_kernel_init=layers.partitioned(layers.DEFAULT_KERNEL_INIT, ("heads", "kv", "embed")),
            bias_init=layers.partitioned(nn.initializers.zeros_init(), ("heads", "kv")),
            out_bias_init=layers.partitioned(nn.initializers.zeros_init(), ("embed",)),
            name="attention",
        )
        def dropout(h: Array) -> Array:
            return layers.Dropout(cfg.dropout_rate)(h, deterministic=not train)

        def mlp(h_BxLxD: Array) -> Array:
            h = layers.dense(cfg.mlp_dim, "mlp_in", cfg.dtype, ("embed", "mlp"))(h_BxLxD)
            h = nn.gelu(h)
            h = dropout(h)
            return layers.dense(cfg.dim, "mlp_out", cfg.dtype, ("mlp", "embed"))(h)

        ln_attn = layers.layer_norm("ln_attention", cfg.dtype, "embed")
        ln_mlp = layers.layer_norm("ln_mlp", cfg.dtype, "embed")
        if cfg.norm == "pre":
            h = ln_attn(x_BxLxD)
            x_BxLxD = x_BxLxD + dropout(attention(h, h, mask=mask_Bx1x1xL))
            x_BxLxD = x_BxLxD + dropout(mlp(ln_mlp(x_BxLxD)))
        else:
            x_BxLxD = ln_attn(x_BxLxD + dropout(attention(x_BxLxD, x_BxLxD, mask=mask_Bx1x1xL)))
            x_BxLxD = ln_mlp(x_BxLxD + dropout(mlp(x_BxLxD)))
        return x_BxLxD

    def _fused(self, x_BxLxD: Array, key_mask_BxL: Array, train: bool) -> Array:
        """The layer as `fused_encoder`'s kernel, on the parameters the XLA path created."""
        cfg = self.config
        if cfg.norm != "pre" or (train and cfg.dropout_rate > 0):
            raise ValueError(f"the fused encoder layer needs norm 'pre' and no dropout, got norm {cfg.norm!r} "
                             f"and dropout {cfg.dropout_rate}")
        params = fused_encoder.flatten_params(nn.meta.unbox(self.variables["params"]), cfg.dim)
        interpret = cfg.kernel == "pallas_interpret"
        return fused_encoder.encoder_layer(x_BxLxD, key_mask_BxL, params, cfg.num_heads, cfg.dtype, cfg.mesh,
                                           BATCH_AXES if cfg.mesh is not None else (), interpret)


class TextEncoder(nn.Module):
    """tokens int32[B, L] (0 = pad) -> E_text float[B, dim]."""

    config: TextEncoderConfig

    @nn.compact
    def __call__(self, tokens_BxL: Array, mask_BxL: Array | None = None, train: bool = False) -> Array:
        """`mask_BxL` (true = real token) defaults to ``tokens_BxL != 0``; positions under a
        false mask are ignored whatever token they hold."""
        cfg = self.config
        tokens_BxL = jnp.asarray(tokens_BxL).astype(jnp.int32)
        mask_BxL = tokens_BxL != PAD_ID if mask_BxL is None else jnp.asarray(mask_BxL, dtype=bool)
        if cfg.pooling == "cls":
            # The tokenizer never emits [CLS]; we prepend it, and it is always a real position.
            batch = tokens_BxL.shape[0]
            tokens_BxL = jnp.concatenate([jnp.full((batch, 1), CLS_ID, jnp.int32), tokens_BxL], axis=1)
            mask_BxL = jnp.concatenate([jnp.ones((batch, 1), bool), mask_BxL], axis=1)
        length = tokens_BxL.shape[1]

        token_table = layers.embed(cfg.vocab_size, cfg.dim, "token_embed", cfg.dtype, init=cfg.embed_init)
        x_BxLxD = token_table(tokens_BxL)
        if cfg.positional == "learned":
            table_size = cfg.max_len + (1 if cfg.pooling == "cls" else 0)
            if length > table_size:
                raise ValueError(f"text of length {length} exceeds the learned position table ({table_size})")
            positions = self.param(
                "position_embed",
                layers.partitioned(nn.initializers.normal(stddev=0.02), ("pos", "embed")),
                (table_size, cfg.dim),
            )
            x_BxLxD = x_BxLxD + jnp.asarray(positions[:length], cfg.dtype)[None]
        elif cfg.positional == "sinusoidal":
            x_BxLxD = x_BxLxD + jnp.asarray(sinusoidal_positions(length, cfg.dim), cfg.dtype)[None]
        else:
            raise ValueError(f"positional: expected 'sinusoidal' or 'learned', got {cfg.positional!r}")
        x_BxLxD = layers.Dropout(cfg.dropout_rate)(x_BxLxD, deterministic=not train)

        for i in range(cfg.num_layers):
            x_BxLxD = EncoderLayer(cfg, name=f"layer_{i}")(x_BxLxD, mask_BxL, train)
        if cfg.norm == "pre":
            x_BxLxD = layers.layer_norm("ln_final", cfg.dtype, "embed")(x_BxLxD)

        if cfg.pooling == "cls":
            return x_BxLxD[:, 0]
        if cfg.pooling == "mean":
            return layers.masked_mean(x_BxLxD, mask_BxL)
        raise ValueError(f"pooling: expected 'mean' or 'cls', got {cfg.pooling!r}")
