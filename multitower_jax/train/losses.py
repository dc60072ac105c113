"""Losses: ranking (weighted BCE for the ctr / ctr_cvr / esmm heads) + in-batch retrieval.

    total = alpha * ranking + beta * retrieval                         (seeds, eq. 5.1)

Every binary loss is an importance-weighted mean, sum_i w_i l_i / sum_i w_i: with negatives
downsampled at rate r and weighted 1/r, it estimates the log loss over all impressions, and its
scale does not move with r (so the learning rate needs no retuning when r changes).
All losses take logits, never probabilities, so they stay finite at any logit.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from multitower_jax import kernels
from multitower_jax.model_settings import RETRIEVAL_POSITIVES
from multitower_jax.train import fused_softmax

Array = jax.Array

# Candidates masked out of a retrieval row get this logit: exp() of it is exactly 0, and,
# unlike -inf, it cannot turn into NaN through an inf - inf.
_MASKED_LOGIT = -1e9


@dataclasses.dataclass(frozen=True)
class LossConfig:
    head: str = "esmm"
    alpha: float = 1.0
    beta: float = 0.5
    temperature: float = 0.05
    l2_normalize: bool = True
    logq_correction: bool = True
    ctr_weight: float = 0.7
    cvr_weight: float = 0.3
    retrieval_positives: str = "clicks"  # "clicks" | "impressions": the rows whose ad is a positive
    wide_cvr_weight: float = 0.0  # BCE(the wide part's CVR logit, conversion) on clicked rows (CVR heads)
    retrieval_kernel: str = "xla"  # `model_settings.KERNELS`: "pallas" never writes the logits (TPUs)
    compute_dtype: str = "float32"  # `model.dtype`: the fused softmax's matmuls and ads all-gather

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> LossConfig:
        """From ``config.loss`` and ``config.model.head``."""
        loss = config.loss
        return cls(
            head=str(config.model.head),
            alpha=float(loss.alpha),
            beta=float(loss.beta),
            temperature=float(loss.temperature),
            l2_normalize=bool(loss.l2_normalize),
            logq_correction=bool(loss.logq_correction),
            ctr_weight=float(loss.ctr_weight),
            cvr_weight=float(loss.cvr_weight),
            retrieval_positives=str(loss.get("retrieval_positives", "clicks")),
            wide_cvr_weight=float(loss.get("wide_cvr_weight", 0.0)),
            retrieval_kernel=str(loss.get("retrieval_kernel", "xla")),
            compute_dtype=str(config.model.get("dtype", "float32")),
        )


def weighted_mean(values_B: Array, weights_B: Array | None = None) -> Array:
    """sum(w * v) / sum(w); 0 when all weights are 0 (e.g. a CVR term in a batch without clicks)."""
    if weights_B is None:
        return jnp.mean(values_B)
    weights_B = weights_B.astype(values_B.dtype)
    return jnp.sum(weights_B * values_B) / jnp.maximum(jnp.sum(weights_B), 1e-12)


def sigmoid_bce(logits_B: Array, labels_B: Array) -> Array:
    """Per-row -[y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))], stable for any x."""
    logits_B = logits_B.astype(jnp.float32)
    labels_B = labels_B.astype(jnp.float32)
    return jnp.maximum(logits_B, 0.0) - logits_B * labels_B + jnp.log1p(jnp.exp(-jnp.abs(logits_B)))


def weighted_bce(logits_B: Array, labels_B: Array, weights_B: Array | None = None) -> Array:
    """Importance-weighted binary cross-entropy from logits (a scalar)."""
    return weighted_mean(sigmoid_bce(logits_B, labels_B), weights_B)


def ctcvr_log_probs(ctr_logit_B: Array, cvr_logit_B: Array) -> tuple[Array, Array]:
    """(log pCTCVR, log(1 - pCTCVR)) with pCTCVR = sigmoid(a) * sigmoid(b), from the logits.

    log p = log_sigmoid(a) + log_sigmoid(b). For log(1 - p) we use the exact identity
        1 - s(a) s(b) = (e^-a + e^-b + e^-(a+b)) / ((1 + e^-a)(1 + e^-b))
    i.e. logsumexp(-a, -b, -a-b) - softplus(-a) - softplus(-b). This is exact for every a, b,
    unlike log1mexp(log p): once a and b pass ~87, log p underflows to 0 in float32, and
    log1mexp(0) = -inf would have to be clamped, giving a wrong loss and a zero gradient exactly
    where the model is confidently wrong.
    """
    a = ctr_logit_B.astype(jnp.float32)
    b = cvr_logit_B.astype(jnp.float32)
    log_p = jax.nn.log_sigmoid(a) + jax.nn.log_sigmoid(b)
    terms_Bx3 = jnp.stack([-a, -b, -a - b], axis=-1)
    log_1mp = jax.nn.logsumexp(terms_Bx3, axis=-1) - jax.nn.softplus(-a) - jax.nn.softplus(-b)
    return log_p, jnp.minimum(log_1mp, 0.0)


def ctcvr_bce(ctr_logit_B: Array, cvr_logit_B: Array, labels_B: Array, weights_B: Array | None = None) -> Array:
    """Weighted BCE of pCTCVR = pCTR x pCVR against click-and-convert labels (ESMM)."""
    log_p, log_1mp = ctcvr_log_probs(ctr_logit_B, cvr_logit_B)
    labels_B = labels_B.astype(jnp.float32)
    return weighted_mean(-(labels_B * log_p + (1.0 - labels_B) * log_1mp), weights_B)


def ranking_loss(outputs: Mapping[str, Array], batch: Mapping[str, Any], head: str,
                 ctr_weight: float = 0.7, cvr_weight: float = 0.3,
                 wide_cvr_weight: float = 0.0) -> tuple[Array, dict[str, Array]]:
    """The head's loss and its terms.

    ctr      BCE(ctr_logit, click)
    ctr_cvr  ctr_weight * BCE(ctr_logit, click) + cvr_weight * BCE(cvr_logit, conversion) on
             clicked rows only (a non-click says nothing about conversion given a click)
    esmm     BCE(ctr_logit, click) + BCE(pCTR x pCVR, click x conversion); no direct CVR term

    With a wide part (``wide_cvr_logit`` in `outputs`) and a CVR head, `wide_cvr_weight` > 0 adds
    wide_cvr_weight * BCE(wide_cvr_logit, conversion) on clicked rows: the wide part's CVR column
    is fitted as a logistic regression of conversion given click (its gradient reaches the wide
    part only); it is also part of the CVR logit the other terms see. The "ctr" head has no CVR
    logit and ignores it, as ESMM ignores `ctr_weight` and `cvr_weight`.
    """
    click_B = jnp.asarray(batch["click"], jnp.float32)
    conversion_B = jnp.asarray(batch["conversion"], jnp.float32)
    weight_B = jnp.asarray(batch["weight"], jnp.float32)
    ctr = weighted_bce(outputs["ctr_logit"], click_B, weight_B)
    if head == "ctr":
        return ctr, {"ctr_loss": ctr}
    if head == "ctr_cvr":
        cvr = weighted_bce(outputs["cvr_logit"], conversion_B, weight_B * click_B)
        loss, terms = ctr_weight * ctr + cvr_weight * cvr, {"ctr_loss": ctr, "cvr_loss": cvr}
    elif head == "esmm":
        ctcvr = ctcvr_bce(outputs["ctr_logit"], outputs["cvr_logit"], click_B * conversion_B, weight_B)
        loss, terms = ctr + ctcvr, {"ctr_loss": ctr, "ctcvr_loss": ctcvr}
    else:
        raise ValueError(f"head: expected 'ctr', 'ctr_cvr' or 'esmm', got {head!r}")
    if wide_cvr_weight > 0:
        if "wide_cvr_logit" not in outputs:
            raise ValueError("loss.wide_cvr_weight > 0 needs the model's wide part (model.wide=True)")
        wide = weighted_bce(outputs["wide_cvr_logit"], conversion_B, weight_B * click_B)
        loss, terms = loss + wide_cvr_weight * wide, {**terms, "wide_cvr_loss": wide}
    return loss, terms


def _constrain(x: Array, mesh: Mesh | None, spec: P) -> Array:
    return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _l2_normalize(x_BxD: Array) -> Array:
    return x_BxD * jax.lax.rsqrt(jnp.maximum(jnp.sum(x_BxD * x_BxD, axis=-1, keepdims=True), 1e-12))


def retrieval_logits(e_user_BxD: Array, e_context_BxD: Array, e_ad_BxD: Array, ad_id_B: Array,
                     ad_log_q_B: Array | None, temperature: float, logq_correction: bool = True,
                     l2_normalize: bool = True, mesh: Mesh | None = None,
                     data_axis: str | tuple[str, ...] = "data") -> Array:
    """In-batch logits [B, B]: row i scores query Q_i = E_user_i + E_context_i against every
    ad of the batch; the positive of row i is column i (its own impression's ad).

    logits_ij = sim(Q_i, E_ad_j) / temperature - log q(ad_j)   (the second term if logq_correction)
    Frequent ads appear as in-batch negatives more often than the softmax assumes; subtracting
    log q removes that sampling bias (Yi et al., RecSys 2019). Column j != i holding the same
    ad as column i is masked: it is the positive again, not a negative.

    With a mesh, rows stay sharded over `data_axis` and only E_ad (and the ids) are gathered,
    so each device holds a B_local x B_global block, never B_global^2.
    """
    q_BxD = (e_user_BxD + e_context_BxD).astype(jnp.float32)
    e_ad_BxD = e_ad_BxD.astype(jnp.float32)
    if l2_normalize:
        q_BxD, e_ad_BxD = _l2_normalize(q_BxD), _l2_normalize(e_ad_BxD)
    rows, replicated = P(data_axis), P()
    q_BxD = _constrain(q_BxD, mesh, P(data_axis, None))
    ads_GxD = _constrain(e_ad_BxD, mesh, P(None, None))  # the all-gather
    logits_BxG = _constrain(q_BxD @ ads_GxD.T / temperature, mesh, P(data_axis, None))
    ad_id_B = jnp.asarray(ad_id_B)
    if logq_correction:
        if ad_log_q_B is None:
            raise ValueError("logq_correction needs batch['ad_log_q']")
        logits_BxG = logits_BxG - _constrain(jnp.asarray(ad_log_q_B, jnp.float32), mesh, replicated)[None, :]
    size = ad_id_B.shape[0]
    row_B = _constrain(jnp.arange(size), mesh, rows)
    col_G = _constrain(jnp.arange(size), mesh, replicated)
    same_ad_BxG = (_constrain(ad_id_B, mesh, rows)[:, None] == _constrain(ad_id_B, mesh, replicated)[None, :])
    duplicate_BxG = same_ad_BxG & (row_B[:, None] != col_G[None, :])
    return jnp.where(duplicate_BxG, _MASKED_LOGIT, logits_BxG)


def _fused_nll(e_user_BxD: Array, e_context_BxD: Array, e_ad_BxD: Array, ad_id_B: Array, ad_log_q_B: Array | None,
               temperature: float, logq_correction: bool, l2_normalize: bool, mesh: Mesh | None,
               data_axis: str | tuple[str, ...], interpret: bool, matmul_dtype: Any) -> Array:
    """`retrieval_loss`'s per-row nll by `fused_softmax` (the logits never written); with a mesh,
    per shard of the rows, the ads all-gathered inside (their gradient reduce-scattered back)."""
    q_BxD = (e_user_BxD + e_context_BxD).astype(jnp.float32)
    ads_BxD = e_ad_BxD.astype(jnp.float32)
    if l2_normalize:
        q_BxD, ads_BxD = _l2_normalize(q_BxD), _l2_normalize(ads_BxD)
    # The matmuls (and the ads' all-gather, and their gradient's reduce-scatter) take the model's
    # compute dtype: bf16 on the TPU pods, as XLA's own f32 matmuls there; float32 accumulation.
    q_BxD, ads_BxD = q_BxD.astype(matmul_dtype), ads_BxD.astype(matmul_dtype)
    if logq_correction and ad_log_q_B is None:
        raise ValueError("logq_correction needs batch['ad_log_q']")
    log_q_B = jnp.asarray(ad_log_q_B, jnp.float32) if logq_correction else jnp.zeros(q_BxD.shape[:1], jnp.float32)
    ad_id_B = jnp.asarray(ad_id_B).astype(jnp.int32)

    def local(q_bxD, ads_bxD, log_q_b, ad_id_b):
        first_row = 0
        if mesh is not None:
            gather = functools.partial(jax.lax.all_gather, axis_name=data_axis, tiled=True)
            ads_bxD, log_q_b, all_ad_id = gather(ads_bxD), gather(log_q_b), gather(ad_id_b)
            first_row = jax.lax.axis_index(data_axis) * q_bxD.shape[0]
        else:
            all_ad_id = ad_id_b
        rows = first_row + jnp.arange(q_bxD.shape[0], dtype=jnp.int32)
        return fused_softmax.in_batch_nll(q_bxD, ads_bxD, log_q_b, rows, ad_id_b, all_ad_id, temperature, interpret)

    if mesh is None:
        return local(q_BxD, ads_BxD, log_q_B, ad_id_B)
    rows = P(data_axis)
    return jax.shard_map(local, mesh=mesh, in_specs=(rows,) * 4, out_specs=rows,
                         check_vma=False)(q_BxD, ads_BxD, log_q_B, ad_id_B)


def retrieval_loss(e_user_BxD: Array, e_context_BxD: Array, e_ad_BxD: Array, batch: Mapping[str, Any],
                   temperature: float, logq_correction: bool = True, l2_normalize: bool = True,
                   mesh: Mesh | None = None, data_axis: str | tuple[str, ...] = "data",
                   positives: str = "clicks", kernel: str = "xla", matmul_dtype: Any = jnp.float32) -> Array:
    """In-batch sampled softmax (seeds, eq. 5.2), importance-weighted, over the clicked impressions
    (`positives="clicks"`) or over every impression (the ad server's choice as the positive: it
    teaches query-ad relevance from every row, not only from the few clicked ones). `kernel`
    ("pallas", `kernels.runs_fused`): the per-row losses by `fused_softmax`, same math, its
    matmuls in `matmul_dtype`."""
    if kernels.runs_fused(kernel, mesh):
        nll_B = _fused_nll(e_user_BxD, e_context_BxD, e_ad_BxD, batch["ad_id"], batch.get("ad_log_q"), temperature,
                           logq_correction, l2_normalize, mesh, data_axis, kernel == "pallas_interpret", matmul_dtype)
    else:
        logits_BxG = retrieval_logits(e_user_BxD, e_context_BxD, e_ad_BxD, batch["ad_id"], batch.get("ad_log_q"),
                                      temperature, logq_correction, l2_normalize, mesh, data_axis)
        size = logits_BxG.shape[0]
        row_B = _constrain(jnp.arange(size), mesh, P(data_axis))
        col_G = _constrain(jnp.arange(size), mesh, P())
        positive_B = jnp.sum(jnp.where(row_B[:, None] == col_G[None, :], logits_BxG, 0.0), axis=1)
        nll_B = jax.nn.logsumexp(logits_BxG, axis=1) - positive_B
    weights_B = jnp.asarray(batch["weight"], jnp.float32)
    if positives == "clicks":
        weights_B = jnp.asarray(batch["click"], jnp.float32) * weights_B
    elif positives != "impressions":
        raise ValueError(f"retrieval positives: expected one of {RETRIEVAL_POSITIVES}, got {positives!r}")
    return weighted_mean(nll_B, weights_B)


def total_loss(outputs: Mapping[str, Array], batch: Mapping[str, Any], config: LossConfig,
               mesh: Mesh | None = None, data_axis: str | tuple[str, ...] = "data") -> tuple[Array, dict[str, Array]]:
    """alpha * ranking + beta * retrieval, and a dict of every term (for logging)."""
    ranking, metrics = ranking_loss(outputs, batch, config.head, config.ctr_weight, config.cvr_weight,
                                    config.wide_cvr_weight)
    total = config.alpha * ranking
    metrics = dict(metrics, ranking_loss=ranking)
    if config.beta > 0:
        retrieval = retrieval_loss(outputs["e_user"], outputs["e_context"], outputs["e_ad"], batch,
                                   config.temperature, config.logq_correction, config.l2_normalize, mesh, data_axis,
                                   config.retrieval_positives, config.retrieval_kernel, jnp.dtype(config.compute_dtype))
        total = total + config.beta * retrieval
        metrics["retrieval_loss"] = retrieval
    metrics["loss"] = total
    return total, metrics
