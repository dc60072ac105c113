"""One text-encoder layer as a single Pallas kernel (forward and backward), for TPUs.

With XLA's ops, a 128-wide encoder layer is bound by HBM, not by the MXU: every intermediate
(LayerNorm outputs, Q/K/V, the [rows, L, L] scores, the [rows, L, mlp] hidden layer) is written
to HBM in the forward pass and read back in the backward pass; on the v5p pod config the text
encoders were ~two thirds of the train step's bytes. Here a block of rows goes through the whole
layer in VMEM: the forward kernel reads x and writes y, the backward kernel reads x and dy,
recomputes the layer in VMEM (as flash attention does) and writes dx and the parameters'
gradients, so a layer moves ~5 token-widths per token instead of ~150.

The math is `EncoderLayer`'s with pre-LayerNorm, attention dropout and sublayer dropout off:
  h = LN_attn(x); x = x + Attention(h, keys masked);  y = x + MLP(LN_mlp(x))
MLP = Dense(mlp) -> GELU (tanh) -> Dense(dim). Matmuls take the compute dtype and accumulate in
float32; LayerNorm, softmax and the residual stream are float32 inside the kernel. The backward
kernel is `jax.vjp` of that math, traced inside the kernel.

`encoder_layer` runs it on any backend: compiled by Mosaic on a TPU, in Pallas' interpreter
elsewhere (slow: for tests). With a mesh it runs per shard of the batch (`shard_map`): each
device's rows stay on it, and the parameter gradients are summed over the batch axes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, PartitionSpec as P

Array = jax.Array

# The parameters of one layer, flattened to 2-D (a bias is [1, n]): name -> flax path in the layer.
PARAM_PATHS = {
    "ln_attention_scale": ("ln_attention", "scale"), "ln_attention_bias": ("ln_attention", "bias"),
    "query_kernel": ("attention", "query", "kernel"), "query_bias": ("attention", "query", "bias"),
    "key_kernel": ("attention", "key", "kernel"), "key_bias": ("attention", "key", "bias"),
    "value_kernel": ("attention", "value", "kernel"), "value_bias": ("attention", "value", "bias"),
    "out_kernel": ("attention", "out", "kernel"), "out_bias": ("attention", "out", "bias"),
    "ln_mlp_scale": ("ln_mlp", "scale"), "ln_mlp_bias": ("ln_mlp", "bias"),
    "mlp_in_kernel": ("mlp_in", "kernel"), "mlp_in_bias": ("mlp_in", "bias"),
    "mlp_out_kernel": ("mlp_out", "kernel"), "mlp_out_bias": ("mlp_out", "bias"),
}
LN_EPSILON = 1e-6  # flax.linen.LayerNorm's default
ROWS_PER_BLOCK = 8  # texts per grid step: 8 x L tokens (384 for L = 48) through the layer in VMEM
# Mosaic's default scoped-VMEM limit (16 MiB) holds the backward of a 128-wide layer at L = 48
# with one or two heads, not with eight heads of 16 (18.8 MiB). Raised: eight heads compile for
# v5e, v5p and v6e (a v4 core's 16 MiB of VMEM still holds one head, not eight).
VMEM_LIMIT_BYTES = 48 << 20


def flatten_params(layer_params: Mapping[str, Any], dim: int) -> dict[str, Array]:
    """The flax parameters of one `EncoderLayer` as the kernel's 2-D arrays."""
    flat = {}
    for name, path in PARAM_PATHS.items():
        value = layer_params
        for key in path:
            value = value[key]
        value = jnp.asarray(value)
        if name in ("query_kernel", "key_kernel", "value_kernel"):
            value = value.reshape(dim, -1)  # [D, H, K] -> [D, H*K]
        elif name == "out_kernel":
            value = value.reshape(-1, dim)  # [H, K, D] -> [H*K, D]
        elif value.ndim == 1 or name in ("query_bias", "key_bias", "value_bias"):
            value = value.reshape(1, -1)
        flat[name] = value
    return flat


def _layer_norm(x: Array, scale: Array, bias: Array) -> Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centered = x - mean
    var = jnp.mean(centered * centered, axis=-1, keepdims=True)
    return centered * jax.lax.rsqrt(var + LN_EPSILON) * scale + bias


def _dense(x: Array, kernel: Array, bias: Array, dtype: Any) -> Array:
    return jnp.dot(x.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32) + bias


def layer_math(x_RxLxD: Array, key_mask_RxL: Array, p: Mapping[str, Array], num_heads: int, dtype: Any) -> Array:
    """The layer on a block of rows, float32 in and out (the kernels' body)."""
    rows, length, dim = x_RxLxD.shape
    head_dim = dim // num_heads
    x_NxD = x_RxLxD.reshape(rows * length, dim)
    h_NxD = _layer_norm(x_NxD, p["ln_attention_scale"], p["ln_attention_bias"])
    q_NxD = _dense(h_NxD, p["query_kernel"], p["query_bias"], dtype) * (1.0 / math.sqrt(head_dim))
    k_NxD = _dense(h_NxD, p["key_kernel"], p["key_bias"], dtype)
    v_NxD = _dense(h_NxD, p["value_kernel"], p["value_bias"], dtype)
    masked_Rx1xL = jnp.logical_not(key_mask_RxL)[:, None, :]
    heads = []
    for head in range(num_heads):
        cols = slice(head * head_dim, (head + 1) * head_dim)
        q_RxLxK = q_NxD[:, cols].reshape(rows, length, head_dim).astype(dtype)
        k_RxLxK = k_NxD[:, cols].reshape(rows, length, head_dim).astype(dtype)
        v_RxLxK = v_NxD[:, cols].reshape(rows, length, head_dim).astype(dtype)
        scores_RxLxL = jnp.einsum("rqk,rlk->rql", q_RxLxK, k_RxLxK, preferred_element_type=jnp.float32)
        scores_RxLxL = jnp.where(masked_Rx1xL, jnp.finfo(jnp.float32).min, scores_RxLxL)
        scores_RxLxL = scores_RxLxL - jnp.max(scores_RxLxL, axis=-1, keepdims=True)
        weights_RxLxL = jnp.exp(scores_RxLxL)
        weights_RxLxL = weights_RxLxL / jnp.sum(weights_RxLxL, axis=-1, keepdims=True)
        heads.append(jnp.einsum("rql,rlk->rqk", weights_RxLxL.astype(dtype), v_RxLxK,
                                preferred_element_type=jnp.float32).reshape(rows * length, head_dim))
    attended_NxD = heads[0] if num_heads == 1 else jnp.concatenate(heads, axis=-1)
    x_NxD = x_NxD + _dense(attended_NxD, p["out_kernel"], p["out_bias"], dtype)
    h_NxD = _layer_norm(x_NxD, p["ln_mlp_scale"], p["ln_mlp_bias"])
    hidden_NxM = jax.nn.gelu(_dense(h_NxD, p["mlp_in_kernel"], p["mlp_in_bias"], dtype), approximate=True)
    x_NxD = x_NxD + _dense(hidden_NxM, p["mlp_out_kernel"], p["mlp_out_bias"], dtype)
    return x_NxD.reshape(rows, length, dim)


def layer_cost(rows: int, length: int, dim: int, mlp_dim: int) -> tuple[int, int]:
    """(FLOPs, transcendentals) of the layer's forward pass on `rows` texts of `length` tokens."""
    tokens = rows * length
    flops = 2 * tokens * (4 * dim * dim + 2 * dim * mlp_dim) + 4 * tokens * length * dim
    return flops, tokens * (length + mlp_dim + 2)


def _param_spec(value: Array) -> pl.BlockSpec:
    return pl.BlockSpec(value.shape, lambda *_: (0,) * value.ndim)


def _forward_call(x_BxLxD: Array, mask_BxL: Array, params: dict[str, Array], num_heads: int, dtype: Any,
                  interpret: bool) -> Array:
    batch, length, dim = x_BxLxD.shape
    names = list(params)

    def kernel(x_ref, mask_ref, *refs):
        p = {name: ref[...].astype(jnp.float32) for name, ref in zip(names, refs[:-1])}
        y = layer_math(x_ref[...].astype(jnp.float32), mask_ref[...] > 0, p, num_heads, dtype)
        refs[-1][...] = y.astype(refs[-1].dtype)

    flops, transcendentals = layer_cost(batch, length, dim, params["mlp_in_kernel"].shape[1])
    io_bytes = 2 * x_BxLxD.nbytes + mask_BxL.nbytes + sum(v.nbytes for v in params.values())
    return pl.pallas_call(
        kernel,
        grid=(batch // ROWS_PER_BLOCK,),
        in_specs=[pl.BlockSpec((ROWS_PER_BLOCK, length, dim), lambda i: (i, 0, 0)),
                  pl.BlockSpec((ROWS_PER_BLOCK, length), lambda i: (i, 0))]
                 + [_param_spec(params[n]) for n in names],
        out_specs=pl.BlockSpec((ROWS_PER_BLOCK, length, dim), lambda i: (i, 0, 0)),
        out_shape=jax.ShapeDtypeStruct(x_BxLxD.shape, x_BxLxD.dtype),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=transcendentals, bytes_accessed=io_bytes),
        compiler_params=_compiler_params(("parallel",)),
        interpret=interpret,
    )(x_BxLxD, mask_BxL, *(params[n] for n in names))


def _backward_call(x_BxLxD: Array, mask_BxL: Array, params: dict[str, Array], dy_BxLxD: Array, num_heads: int,
                   dtype: Any, interpret: bool) -> tuple[Array, dict[str, Array]]:
    """dx, and the parameters' gradients summed over the rows. The grid is (2, blocks / 2): the
    first axis splits the rows between a chip's two TensorCores (megacore), each accumulating
    its own copy of the parameter gradients over the second; the two copies are summed after."""
    batch, length, dim = x_BxLxD.shape
    names = list(params)
    per_core = batch // ROWS_PER_BLOCK // 2

    def kernel(x_ref, mask_ref, dy_ref, *refs):
        param_refs, dx_ref, grad_refs = refs[:len(names)], refs[len(names)], refs[len(names) + 1:]
        p = {name: ref[...].astype(jnp.float32) for name, ref in zip(names, param_refs)}
        mask = mask_ref[...] > 0
        _, vjp = jax.vjp(lambda x, p: layer_math(x, mask, p, num_heads, dtype), x_ref[...].astype(jnp.float32), p)
        dx, dp = vjp(dy_ref[...].astype(jnp.float32))
        dx_ref[...] = dx.astype(dx_ref.dtype)

        @pl.when(pl.program_id(1) == 0)
        def _():
            for ref in grad_refs:
                ref[...] = jnp.zeros(ref.shape, ref.dtype)

        for name, ref in zip(names, grad_refs):
            ref[...] += dp[name][None]

    row_block = lambda c, i: (c * per_core + i, 0, 0)  # noqa: E731
    flops, transcendentals = layer_cost(batch, length, dim, params["mlp_in_kernel"].shape[1])
    io_bytes = (4 * x_BxLxD.nbytes + mask_BxL.nbytes
                + sum(v.nbytes for v in params.values()) + 2 * sum(v.size * 4 for v in params.values()))
    dx, *grads = pl.pallas_call(
        kernel,
        grid=(2, per_core),
        in_specs=[pl.BlockSpec((ROWS_PER_BLOCK, length, dim), row_block),
                  pl.BlockSpec((ROWS_PER_BLOCK, length), lambda c, i: (c * per_core + i, 0)),
                  pl.BlockSpec((ROWS_PER_BLOCK, length, dim), row_block)]
                 + [_param_spec(params[n]) for n in names],
        out_specs=[pl.BlockSpec((ROWS_PER_BLOCK, length, dim), row_block)]
                  + [pl.BlockSpec((1, *params[n].shape), lambda c, i: (c, 0, 0)) for n in names],
        out_shape=[jax.ShapeDtypeStruct(x_BxLxD.shape, x_BxLxD.dtype)]
                  + [jax.ShapeDtypeStruct((2, *params[n].shape), jnp.float32) for n in names],
        # Backward = recomputed forward + twice its FLOPs; report the model's 2x, not the recompute.
        cost_estimate=pl.CostEstimate(flops=2 * flops, transcendentals=2 * transcendentals,
                                      bytes_accessed=io_bytes),
        compiler_params=_compiler_params(("parallel", "arbitrary")),
        interpret=interpret,
    )(x_BxLxD, mask_BxL, dy_BxLxD, *(params[n] for n in names))
    return dx, {n: g.sum(axis=0).astype(params[n].dtype) for n, g in zip(names, grads)}


def _compiler_params(semantics: tuple[str, ...]) -> Any:
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=VMEM_LIMIT_BYTES)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused(x_BxLxD, mask_BxL, params, num_heads, dtype, interpret):
    return _forward_call(x_BxLxD, mask_BxL, params, num_heads, dtype, interpret)


def _fused_fwd(x_BxLxD, mask_BxL, params, num_heads, dtype, interpret):
    return _forward_call(x_BxLxD, mask_BxL, params, num_heads, dtype, interpret), (x_BxLxD, mask_BxL, params)


def _fused_bwd(num_heads, dtype, interpret, residuals, dy_BxLxD):
    x_BxLxD, mask_BxL, params = residuals
    dx, dparams = _backward_call(x_BxLxD, mask_BxL, params, dy_BxLxD, num_heads, dtype, interpret)
    return dx, jnp.zeros_like(mask_BxL), dparams


_fused.defvjp(_fused_fwd, _fused_bwd)


def encoder_layer(x_BxLxD: Array, key_mask_BxL: Array, params: dict[str, Array], num_heads: int, dtype: Any,
                  mesh: Mesh | None = None, batch_axes: tuple[str, ...] = (), interpret: bool | None = None) -> Array:
    """The fused layer on x [B, L, D] with key mask [B, L] and `flatten_params` parameters.
    Rows are padded to a multiple of 2 x ROWS_PER_BLOCK (per shard) and positions to a
    multiple of 8 with masked pads, which change no real output."""
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    mask_BxL = key_mask_BxL.astype(jnp.int32)

    def local(x, mask, p):
        batch, length, _ = x.shape
        rows = -(-batch // (2 * ROWS_PER_BLOCK)) * 2 * ROWS_PER_BLOCK
        positions = -(-length // 8) * 8
        x = jnp.pad(x, ((0, rows - batch), (0, positions - length), (0, 0)))
        mask = jnp.pad(mask, ((0, rows - batch), (0, positions - length)))
        return _fused(x, mask, p, num_heads, dtype, interpret)[:batch, :length]

    if mesh is None or not batch_axes:
        return local(x_BxLxD, mask_BxL, params)
    rows = P(batch_axes)
    return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, P()), out_specs=rows,
                         check_vma=False)(x_BxLxD, mask_BxL, params)
