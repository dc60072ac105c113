"""The in-batch softmax's per-row loss as Pallas kernels that never write the logits, for TPUs.

`losses.retrieval_loss` scores every local row against every ad of the global batch: on the v5p
pod config a chip's logits are 1,024 x 65,536 float32 (268 MB), written once and read three times
per step, the largest part of the step's HBM bytes once the text encoders are fused. Here the
logits of a block of rows against a block of ads live only in VMEM, as in flash attention:

* forward (grid rows x ad blocks): the running max, the running sum of exp() and the positive's
  logit per row, so nll_i = max_i + log(sum_i) - positive_i;
* backward, two kernels that recompute the block's logits: dq (grid rows x ad blocks,
  accumulating over the ads) and dads (grid ad blocks x rows, accumulating over the rows), with
  dlogits_ij = g_i (softmax_ij - [j is i's positive]).

The logits are `losses.retrieval_logits`' (with the query and the ads already L2-normalized):
``q_i . ad_j / temperature - log_q_j``, an ad equal to row i's own ad in another column masked,
padding columns masked. Matmuls take the inputs' dtype and accumulate in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

Array = jax.Array

MASKED_LOGIT = -1e9  # as `losses`: exp() of it is exactly 0, and it never makes an inf - inf
ROW_BLOCK = 256  # rows of q per grid step
AD_BLOCK = 1024  # ads per grid step: a [256, 1024] float32 block of logits in VMEM
VMEM_LIMIT_BYTES = 48 << 20


def _params(semantics: tuple[str, ...]) -> pltpu.CompilerParams:
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=VMEM_LIMIT_BYTES)


def _logits(q_ref, ads_ref, log_q_ref, row_id_ref, row_ad_ref, col_ad_ref, col_block, num_ads, inv_temperature):
    """The [rows, ads] block of logits (positive and duplicate columns resolved) and the mask of
    each row's positive column."""
    s = jax.lax.dot_general(q_ref[...], ads_ref[...], (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * inv_temperature - log_q_ref[...]
    rows, ads = s.shape
    col = col_block * ads + jax.lax.broadcasted_iota(jnp.int32, (rows, ads), 1)
    positive = col == row_id_ref[...]
    masked = ((row_ad_ref[...] == col_ad_ref[...]) & ~positive) | (col >= num_ads)
    return jnp.where(masked, MASKED_LOGIT, s), positive


def _specs(row_block, ad_block, dim, rows_first):
    """BlockSpecs of (q, ads, log_q, row ids, row ads, column ads) for a grid (i, j) over
    (row blocks, ad blocks) if `rows_first`, else (ad blocks, row blocks)."""
    r = (lambda i, j: i) if rows_first else (lambda i, j: j)  # noqa: E731
    c = (lambda i, j: j) if rows_first else (lambda i, j: i)  # noqa: E731
    return [pl.BlockSpec((row_block, dim), lambda i, j: (r(i, j), 0)),
            pl.BlockSpec((ad_block, dim), lambda i, j: (c(i, j), 0)),
            pl.BlockSpec((1, ad_block), lambda i, j: (0, c(i, j))),
            pl.BlockSpec((row_block, 1), lambda i, j: (r(i, j), 0)),
            pl.BlockSpec((row_block, 1), lambda i, j: (r(i, j), 0)),
            pl.BlockSpec((1, ad_block), lambda i, j: (0, c(i, j)))]


def _forward(inputs, num_ads, inv_temperature, interpret):
    q, ads = inputs[0], inputs[1]
    rows, dim = q.shape
    padded_ads = ads.shape[0]
    row_block, ad_block = min(ROW_BLOCK, rows), min(AD_BLOCK, padded_ads)

    def kernel(*refs):
        max_ref, sum_ref, positive_ref = refs[6:]
        j = pl.program_id(1)

        @pl.when(j == 0)
        def _():
            max_ref[...] = jnp.full(max_ref.shape, MASKED_LOGIT, jnp.float32)
            sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)
            positive_ref[...] = jnp.zeros(positive_ref.shape, jnp.float32)

        s, positive = _logits(*refs[:6], j, num_ads, inv_temperature)
        old_max = max_ref[...]
        new_max = jnp.maximum(old_max, jnp.max(s, axis=1, keepdims=True))
        sum_ref[...] = sum_ref[...] * jnp.exp(old_max - new_max) + jnp.sum(jnp.exp(s - new_max), axis=1,
                                                                           keepdims=True)
        max_ref[...] = new_max
        positive_ref[...] += jnp.sum(jnp.where(positive, s, 0.0), axis=1, keepdims=True)

    stat = jax.ShapeDtypeStruct((rows, 1), jnp.float32)
    stat_spec = pl.BlockSpec((row_block, 1), lambda i, j: (i, 0))
    flops = 2 * rows * padded_ads * dim
    return pl.pallas_call(
        kernel, grid=(rows // row_block, padded_ads // ad_block),
        in_specs=_specs(row_block, ad_block, dim, rows_first=True),
        out_specs=[stat_spec] * 3, out_shape=[stat] * 3,
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=rows * padded_ads,
                                      bytes_accessed=_bytes(inputs, 0, 1, rows // row_block) + 3 * rows * 4),
        compiler_params=_params(("parallel", "arbitrary")), interpret=interpret,
    )(*inputs)


def _bytes(inputs, row_stats, row_passes, ad_passes):
    """HBM bytes a kernel reads: the rows' inputs (q, ids and `row_stats` more bytes per
    row set) `row_passes` times, the ads' (ads, log q, ids) `ad_passes` times."""
    q, ads, log_q, row_id, row_ad, col_ad = inputs
    return (row_passes * (q.nbytes + row_id.nbytes + row_ad.nbytes + row_stats)
            + ad_passes * (ads.nbytes + log_q.nbytes + col_ad.nbytes))


def _backward(inputs, lse, g, num_ads, inv_temperature, interpret):
    """dq [rows, dim] and dads [padded ads, dim] of sum_i g_i nll_i."""
    q, ads = inputs[0], inputs[1]
    rows, dim = q.shape
    padded_ads = ads.shape[0]
    row_block, ad_block = min(ROW_BLOCK, rows), min(AD_BLOCK, padded_ads)

    def accumulating(rows_first, product):
        """A kernel that adds product(dlogits, q, ads) of each block into its output block over
        the grid's second axis (the ads for dq, the rows for dads)."""

        def kernel(*refs):
            out_ref = refs[8]

            @pl.when(pl.program_id(1) == 0)
            def _():
                out_ref[...] = jnp.zeros(out_ref.shape, jnp.float32)

            s, positive = _logits(*refs[:6], pl.program_id(1 if rows_first else 0), num_ads, inv_temperature)
            lse_ref, g_ref = refs[6:8]
            ds = g_ref[...] * (jnp.exp(s - lse_ref[...]) - positive.astype(jnp.float32)) * inv_temperature
            out_ref[...] += product(ds, refs[0][...], refs[1][...])

        return kernel

    dq_kernel = accumulating(True, lambda ds, q, ads: jnp.dot(ds.astype(ads.dtype), ads,
                                                                preferred_element_type=jnp.float32))
    dads_kernel = accumulating(False, lambda ds, q, ads: jax.lax.dot_general(
        ds.astype(q.dtype), q, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32))

    flops = 2 * rows * padded_ads * dim
    row_stats = lambda rows_first: [pl.BlockSpec((row_block, 1), (lambda i, j: (i, 0)) if rows_first  # noqa: E731
                                                 else (lambda i, j: (j, 0)))] * 2
    dq = pl.pallas_call(
        dq_kernel, grid=(rows // row_block, padded_ads // ad_block),
        in_specs=_specs(row_block, ad_block, dim, rows_first=True) + row_stats(True),
        out_specs=pl.BlockSpec((row_block, dim), lambda i, j: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((rows, dim), jnp.float32),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=rows * padded_ads,
                                      bytes_accessed=_bytes(inputs, 2 * lse.nbytes, 1, rows // row_block)
                                      + rows * dim * 4),
        compiler_params=_params(("parallel", "arbitrary")), interpret=interpret,
    )(*inputs, lse, g)
    dads = pl.pallas_call(
        dads_kernel, grid=(padded_ads // ad_block, rows // row_block),
        in_specs=_specs(row_block, ad_block, dim, rows_first=False) + row_stats(False),
        out_specs=pl.BlockSpec((ad_block, dim), lambda i, j: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((padded_ads, dim), jnp.float32),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=rows * padded_ads,
                                      bytes_accessed=_bytes(inputs, 2 * lse.nbytes, padded_ads // ad_block, 1)
                                      + padded_ads * dim * 4),
        compiler_params=_params(("parallel", "arbitrary")), interpret=interpret,
    )(*inputs, lse, g)
    return dq, dads


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _nll(q, ads, log_q, row_id, row_ad, col_ad, num_ads, inv_temperature, interpret):
    return _nll_fwd(q, ads, log_q, row_id, row_ad, col_ad, num_ads, inv_temperature, interpret)[0]


def _nll_fwd(q, ads, log_q, row_id, row_ad, col_ad, num_ads, inv_temperature, interpret):
    inputs = (q, ads, log_q, row_id, row_ad, col_ad)
    row_max, row_sum, positive = _forward(inputs, num_ads, inv_temperature, interpret)
    lse = row_max + jnp.log(row_sum)
    return (lse - positive)[:, 0], (inputs, lse)


def _nll_bwd(num_ads, inv_temperature, interpret, residuals, g):
    inputs, lse = residuals
    dq, dads = _backward(inputs, lse, g[:, None].astype(jnp.float32), num_ads, inv_temperature, interpret)
    q, ads = inputs[:2]
    return dq.astype(q.dtype), dads.astype(ads.dtype), None, None, None, None  # log q and ids: data


_nll.defvjp(_nll_fwd, _nll_bwd)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_to(x: Array, size: int, value=0) -> Array:
    return jnp.pad(x, [(0, size - x.shape[0])] + [(0, 0)] * (x.ndim - 1), constant_values=value)


def in_batch_nll(q_BxD: Array, ads_GxD: Array, log_q_G: Array, row_index_B: Array, row_ad_B: Array,
                 ad_id_G: Array, temperature: float, interpret: bool = False) -> Array:
    """nll_i = logsumexp_j logits_ij - logits_i,row_index_i per row of `q_BxD` against the G ads,
    logits as in the module docstring (`log_q_G` zeros for no correction). `row_index_B`: each
    row's column among the ads (its own impression's ad). Rows are padded to the row block and
    ads to the ad block (padding ads are masked); the gradient reaches `q_BxD` and `ads_GxD`."""
    rows, num_ads = q_BxD.shape[0], ads_GxD.shape[0]
    # The blocks' shapes follow these paddings: min(block, padded size) divides the padded size.
    padded_rows = _round_up(rows, min(ROW_BLOCK, _round_up(rows, 8)))
    padded_ads = _round_up(num_ads, min(AD_BLOCK, _round_up(num_ads, 128)))
    int32 = lambda x: jnp.asarray(x).astype(jnp.int32)  # noqa: E731
    nll = _nll(_pad_to(q_BxD, padded_rows), _pad_to(ads_GxD, padded_ads),
               _pad_to(jnp.asarray(log_q_G, jnp.float32), padded_ads)[None, :],
               _pad_to(int32(row_index_B), padded_rows, -1)[:, None],
               _pad_to(int32(row_ad_B), padded_rows, -1)[:, None],
               _pad_to(int32(ad_id_G), padded_ads, -2)[None, :],
               num_ads, 1.0 / temperature, interpret)
    return nll[:rows]
