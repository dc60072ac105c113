"""The jitted batched scorer: embeddings of B requests x N candidates -> calibrated pCTR, pCVR,
pCTCVR, the ranking value (eCPM) and the top-N, in one compiled function.

The first fusion layer is factorized. Its input is [u, c, a] (+ [u.a, u.c, c.a] for "dot"), so

    x W + b = (u W_u + c W_c + (u.c) w_uc + b)  +  a W_a  +  (u.a) w_ua + (c.a) w_ca
              `------- once per request -------'  `per ad'  `--- two D-dots per candidate ---'

`a W_a` is computed once per ad at export time (`ad_part`), so a candidate costs two D-wide dot
products and an H-wide add instead of a (3D + 3) x H matmul row. For "product" the input adds
[u*a, u*c, c*a] and

    (u*a) W_ua + (c*a) W_ca = a (diag(u) W_ua + diag(c) W_ca)
                                 `---- a D x H matrix per request ----'

so a candidate costs one D x H matvec (instead of a 6D x H one) and an H-wide add. The rest of the fusion MLP and
the heads run through the model's own modules (`layers.Block`, `layer_norm`, `Heads`), so they
cannot drift from training. The calibrators run inside the same compiled function.

Candidate counts are padded to `ServingSettings.buckets` and request counts to
`batch_buckets`; padded candidates get -inf eCPM and never rank. Each (batch bucket,
candidate bucket) pair compiles once.

A batch of requests is one vectorised program over all its B x N candidates (the first layer
as a batched [N, D] x [D, H] product per request, the rest of the MLP on the flat [B*N, H]
matrix), so a batch costs less per request than a lone request. The serving path
(`score_rows`) hands the compiled call only the candidates' catalogue rows: the catalogue (ad
embeddings, fusion ad parts, bids, qualities) lives on the device (`device_catalogue`, put there
once), the candidates are gathered inside the compiled call, and only the top-N rows of each
request come back. Copying a request's gathered candidates in from the host instead cost ~0.75
ms of a lone request's ~2.1 ms on a 2-core CPU (`bench score`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from multitower_jax import model_settings
from multitower_jax.models import layers
from multitower_jax.models.heads import Heads
from multitower_jax.models.model import ModelConfig
from multitower_jax.serving.settings import ServingSettings, bucket_for

Array = jax.Array
Params = Mapping[str, Any]
AD_PART_FILE = "fusion_ad_part_{placement}.npy"  # written by `multitower export` next to embeddings.npy


class Calibrator(Protocol):
    """What the scorer needs from `multitower_jax.calibration.Calibration` (a pytree)."""

    def outputs(self, pctr_B: Array, pcvr_B: Array | None = None) -> dict[str, Array]: ...


@dataclasses.dataclass(frozen=True)
class ScorerSpec:
    """The static description of one placement's scorer (what the compiled function depends on)."""

    fusion: str  # "concat" | "dot" | "product"
    fusion_hidden: tuple[int, ...]
    head: str  # "ctr" | "ctr_cvr" | "esmm"
    embed_dim: int
    objective: str = "ecpm"
    ctr_weight: float = 1.0
    cvr_weight: float = 0.0
    top_n: int = 20
    compute_dtype: str = "float32"  # the matmuls' inputs (accumulation is float32)

    @classmethod
    def from_model(cls, model_config: ModelConfig, settings: ServingSettings) -> ScorerSpec:
        return cls(fusion=model_config.fusion, fusion_hidden=tuple(model_config.fusion_hidden),
                   head=model_config.head, embed_dim=model_config.embed_dim, objective=settings.objective,
                   ctr_weight=float(settings.ctr_weight), cvr_weight=float(settings.cvr_weight),
                   top_n=settings.top_n, compute_dtype=settings.compute_dtype)

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.compute_dtype)

    @property
    def has_cvr(self) -> bool:
        return self.head != "ctr"

    @property
    def num_logits(self) -> int:
        """Width of the per-request logit offsets (the context's `Wide` terms): CTR[, CVR]."""
        return model_settings.num_logits(self.head)


def split_first_layer(mlp_params: Params, mode: str, embed_dim: int) -> dict[str, Array]:
    """Slice a fusion MLP's first Dense kernel [(3D [+3 | +3D]) x H] into its user/context/ad/cross parts."""
    d = embed_dim
    dense = mlp_params["block_0"]["dense"]
    kernel, bias = jnp.asarray(dense["kernel"], jnp.float32), jnp.asarray(dense["bias"], jnp.float32)
    expected = 3 * d + {"dot": 3, "product": 3 * d}.get(mode, 0)
    if kernel.shape[0] != expected:
        raise ValueError(f"fusion kernel has {kernel.shape[0]} input rows; fusion {mode!r} with "
                         f"embed_dim {d} needs {expected}")
    parts = {"w_user": kernel[:d], "w_context": kernel[d:2 * d], "w_ad": kernel[2 * d:3 * d], "bias": bias}
    if mode == "dot":  # row order of fusion.pairwise_dots: user.ad, user.context, context.ad
        parts.update(w_ua=kernel[3 * d], w_uc=kernel[3 * d + 1], w_ca=kernel[3 * d + 2])
    elif mode == "product":  # row order of fusion.interaction_features: user*ad, user*context, context*ad
        parts.update(w_ua=kernel[3 * d:4 * d], w_uc=kernel[4 * d:5 * d], w_ca=kernel[5 * d:6 * d])
    return parts


def ad_part(fusion_params: Params, spec: ScorerSpec, e_ad_NxD: Array) -> Array:
    """a W_a: the ad's share of the first fusion layer [N, H], computed once per ad at export."""
    w_ad = split_first_layer(fusion_params["mlp"], spec.fusion, spec.embed_dim)["w_ad"]
    return jnp.asarray(e_ad_NxD, jnp.float32) @ w_ad


def _first_layer(mlp_params: Params, spec: ScorerSpec, u_BxD: Array, c_BxD: Array, a_BxNxD: Array,
                 ad_part_BxNxH: Array) -> Array:
    """The first fusion Dense's output [B, N, H], from the per-request, per-ad and cross parts."""
    parts = split_first_layer(mlp_params, spec.fusion, spec.embed_dim)
    u, c, a = u_BxD, c_BxD, a_BxNxD.astype(spec.dtype)

    def per_candidate(equation: str, x: Array, y: Array) -> Array:  # compute dtype in, float32 out
        return jnp.einsum(equation, x, y.astype(spec.dtype), preferred_element_type=jnp.float32)

    # Per request: the user and context rows of the first layer, once.
    r_BxH = u @ parts["w_user"] + c @ parts["w_context"] + parts["bias"]
    x_BxNxH = ad_part_BxNxH + r_BxH[:, None, :]
    if spec.fusion == "dot":
        r_BxH_dot = jnp.sum(u * c, axis=-1, keepdims=True) * parts["w_uc"]
        ua_BxN = per_candidate("bnd,bd->bn", a, u)
        ca_BxN = per_candidate("bnd,bd->bn", a, c)
        x_BxNxH = (x_BxNxH + r_BxH_dot[:, None, :] + ua_BxN[..., None] * parts["w_ua"]
                   + ca_BxN[..., None] * parts["w_ca"])
    elif spec.fusion == "product":
        r_BxH_uc = (u * c) @ parts["w_uc"]
        m_BxDxH = u[:, :, None] * parts["w_ua"] + c[:, :, None] * parts["w_ca"]
        x_BxNxH = x_BxNxH + r_BxH_uc[:, None, :] + per_candidate("bnd,bdh->bnh", a, m_BxDxH)
    return x_BxNxH


def _mlp_tail(mlp_params: Params, spec: ScorerSpec, x_MxH: Array) -> Array:
    """First block's LayerNorm + ReLU, then the remaining blocks, exactly as `layers.MLP` with
    the scorer's compute dtype."""
    h = layers.layer_norm(dtype=spec.dtype).apply({"params": mlp_params["block_0"]["layer_norm"]}, x_MxH)
    h = nn.relu(h)
    for i, width in enumerate(spec.fusion_hidden[1:], start=1):
        h = layers.Block(width, 0.0, spec.dtype).apply({"params": mlp_params[f"block_{i}"]}, h)
    return h


def ranking_value(spec: ScorerSpec, pctr: Array, pcvr: Array | None, bid: Array, quality: Array) -> Array:
    """eCPM = bid x pCTR x quality x 1000, or bid x (a pCTR + b pCVR) for objective "weighted"."""
    if spec.objective == "ecpm":
        return bid * pctr * quality * 1000.0
    value = spec.ctr_weight * pctr
    if pcvr is not None and spec.cvr_weight:
        value = value + spec.cvr_weight * pcvr
    return bid * value


def score_candidates(params: Params, calibration: Calibrator | None, spec: ScorerSpec,
                     e_user_BxD: Array, e_context_BxD: Array, e_ad_BxNxD: Array, ad_part_BxNxH: Array,
                     bid_BxN: Array, quality_BxN: Array, valid_BxN: Array,
                     offsets_BxL: Array | None = None) -> dict[str, Array]:
    """The pure scoring function. `params` = {"fusion": ..., "heads": ...} of one placement;
    `calibration` maps the heads' probabilities (None: uncalibrated); `offsets_BxL` are the
    request's logit offsets (`MultiTowerModel.embed_context_wide`; None or zeros without them).

    Returns pctr, (pcvr, pctcvr,) ecpm [B, N] and top_index (int32), top_ecpm [B, T] with
    T = min(top_n, N); invalid candidates have ecpm -inf.
    """
    fusion_params, head_params = params["fusion"], params["heads"]
    x_BxNxH = _first_layer(fusion_params["mlp"], spec, e_user_BxD.astype(jnp.float32),
                           e_context_BxD.astype(jnp.float32), e_ad_BxNxD.astype(jnp.float32),
                           ad_part_BxNxH.astype(jnp.float32))
    b, n, h = x_BxNxH.shape
    fused = _mlp_tail(fusion_params["mlp"], spec, x_BxNxH.reshape(b * n, h))
    if offsets_BxL is not None:  # one row per request, the same for each of its candidates
        k = offsets_BxL.shape[-1]
        offsets_BxL = jnp.broadcast_to(offsets_BxL.astype(jnp.float32)[:, None, :], (b, n, k)).reshape(b * n, k)
    out = Heads(spec.head, spec.dtype).apply({"params": head_params}, fused, offsets_BxL)  # float32 out

    keys = ("pctr", "pcvr", "pctcvr") if spec.has_cvr else ("pctr",)
    result = {k: out[k].reshape(b, n) for k in keys}
    if calibration is not None:
        result = dict(calibration.outputs(result["pctr"], result.get("pcvr")))
    value = ranking_value(spec, result["pctr"], result.get("pcvr"), bid_BxN.astype(jnp.float32),
                          quality_BxN.astype(jnp.float32))
    value = jnp.where(valid_BxN, value, -jnp.inf)
    result["ecpm"] = value
    top_ecpm, top_index = jax.lax.top_k(value, min(spec.top_n, n))
    result.update(top_index=top_index.astype(jnp.int32), top_ecpm=top_ecpm)
    return result


TOP_KEYS = ("top_index", "top_ecpm")


def top_rows(result: Mapping[str, Array]) -> dict[str, Array]:
    """The top-N rows of a `score_candidates` result: top_index, top_ecpm and top_<key> [B, T]
    for pctr (pcvr, pctcvr), the candidates' values in ranking order."""
    out = {k: result[k] for k in TOP_KEYS}
    for key in ("pctr", "pcvr", "pctcvr"):
        if key in result:
            out[f"top_{key}"] = jnp.take_along_axis(result[key], result["top_index"], axis=1)
    return out


def score_batch(params: Params, calibration: Calibrator | None, spec: ScorerSpec, *arrays: Array,
                top_only: bool = False) -> dict[str, Array]:
    """`score_candidates` over B requests in one vectorised program (B = 1 is the same program).

    With `top_only` only the top-N rows come back (`top_rows`): [B, T] instead of [B, N] per
    output, which is what the serving path hands to the host.
    """
    result = score_candidates(params, calibration, spec, *arrays)
    return top_rows(result) if top_only else result


class AdCatalogue(NamedTuple):
    """Every ad's scoring inputs, indexed by store row: what the scorer gathers candidates from.
    The serving path holds them on the device (`device_catalogue`); host arrays (numpy arrays or
    memmaps) passed to `score_rows` are copied in on every call."""

    embeddings: Any  # float32[N, D]
    ad_part: Any  # float32[N, H] (a W_a, see `ad_part`)
    bid: Any  # float32[N]
    quality: Any  # float32[N]


def device_catalogue(catalogue: AdCatalogue) -> AdCatalogue:
    """The catalogue as float32 device arrays, rows padded (with zeros, never gathered: padded
    rows are not in any index) to the next power of two, so a catalogue that grows by live upserts
    recompiles the scorer only when it doubles."""
    n = len(catalogue.bid)
    rows = 1 << max(n - 1, 0).bit_length()
    return AdCatalogue(*(jax.device_put(pad_to(np.asarray(x, np.float32), rows)) for x in catalogue))


def gather_candidates(catalogue: AdCatalogue, rows_BxN: Array) -> tuple[Array, ...]:
    """The candidates of catalogue rows `rows_BxN` (-1: none): ad embeddings [B, N, D], ad parts
    [B, N, H], bids and qualities [B, N] and the valid mask, in `score_candidates`' order."""
    valid_BxN = rows_BxN >= 0
    safe_BxN = jnp.where(valid_BxN, rows_BxN, 0)
    return (*(jnp.take(x, safe_BxN, axis=0) for x in catalogue), valid_BxN)


def placement_params(params: Params, placement: str) -> dict[str, Any]:
    """The fusion and head parameters of one placement, from the model's (unboxed) params."""
    params = nn.meta.unbox(params)
    params = params.get("params", params)
    key = f"fusions_{placement}"
    if key not in params:
        have = sorted(k.removeprefix("fusions_") for k in params if k.startswith("fusions_"))
        raise ValueError(f"placement {placement!r} has no fusion parameters; the model has {have}")
    return {"fusion": params[key], "heads": params[f"heads_{placement}"]}


class Scorer:
    """One placement's scorer with its parameters, calibration and settings bound.

        scorer = Scorer.from_trained(load_trained(workdir), calibration=calibration.load(workdir))
        out = scorer.score(e_user_BxD, e_context_BxD, e_ad_BxNxD, bid_BxN, quality_BxN, ad_part_BxNxH)
    """

    def __init__(self, params: Params, model_config: ModelConfig, placement: str,
                 calibration: Calibrator | None = None, settings: ServingSettings | None = None):
        self.settings = settings or ServingSettings()
        self.placement = placement
        s = self.settings
        self.spec = ScorerSpec.from_model(model_config, s)
        if s.objective == "weighted" and s.cvr_weight and not self.spec.has_cvr:
            raise ValueError(f"config.serving.cvr_weight={s.cvr_weight} needs a pCVR, but head "
                             f"{model_config.head!r} has none")
        self.params = jax.device_put(placement_params(params, placement))
        # A pytree argument of the compiled function (not baked in), so recalibrating needs no recompile.
        self.calibration = calibration
        self.trace_count = 0  # compilations of the scoring functions (tests check it stays put)
        self._score = jax.jit(self._traced)  # every output [B, N]
        self._score_rows = jax.jit(self._traced_rows)  # the serving path: gather, score, top-N rows
        self._ad_part = jax.jit(lambda fusion_params, e_ad_NxD: ad_part(fusion_params, self.spec, e_ad_NxD))

    @classmethod
    def from_trained(cls, trained: Any, placement: str | None = None, calibration: Calibrator | None = None,
                     settings: ServingSettings | None = None) -> Scorer:
        """From `inference.load_trained(workdir)`; settings default to the workdir's config.serving."""
        settings = settings or ServingSettings.from_config(trained.config)
        return cls(trained.params, ModelConfig.from_config(trained.config),
                   placement or trained.config.data.placements[0], calibration, settings)

    def _traced(self, params, calibration, *arrays):
        self.trace_count += 1
        return score_batch(params, calibration, self.spec, *arrays)

    def _traced_rows(self, params, calibration, catalogue, e_user_BxD, e_context_BxD, rows_BxN, offsets_BxL):
        self.trace_count += 1
        candidates = gather_candidates(catalogue, rows_BxN)
        return score_batch(params, calibration, self.spec, e_user_BxD, e_context_BxD, *candidates, offsets_BxL,
                           top_only=True)

    def pad_rows(self, e_user_BxD: np.ndarray, e_context_BxD: np.ndarray, rows_BxK: np.ndarray,
                 offsets_BxL: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """`score_rows`' per-request inputs padded to their (batch, candidate) bucket: user and
        context embeddings, catalogue rows (int32, -1 pads) and logit offsets (default 0)."""
        b, k = rows_BxK.shape
        bb = bucket_for(b, self.settings.batch_buckets, "requests")
        rows = np.full((bb, bucket_for(k, self.settings.buckets)), -1, np.int32)
        rows[:b, :k] = rows_BxK
        offsets = np.zeros((b, self.spec.num_logits), np.float32) if offsets_BxL is None else offsets_BxL
        return (pad_to(np.asarray(e_user_BxD, np.float32), bb), pad_to(np.asarray(e_context_BxD, np.float32), bb),
                rows, pad_to(np.asarray(offsets, np.float32), bb))

    def score_padded_rows(self, catalogue: AdCatalogue, e_user_BxD, e_context_BxD, rows_BxN,
                          offsets_BxL) -> dict[str, Array]:
        """The serving path's compiled call on `pad_rows`' inputs: gathers the candidates from the
        catalogue, scores them and returns the top-N rows (`top_rows`), left on the device."""
        return self._score_rows(self.params, self.calibration, catalogue, e_user_BxD, e_context_BxD, rows_BxN,
                                offsets_BxL)

    def score_rows(self, e_user_BxD: np.ndarray, e_context_BxD: np.ndarray, rows_BxK: np.ndarray,
                   catalogue: AdCatalogue, offsets_BxL: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The serving path: B requests whose candidates are catalogue rows (-1: none) -> the top-N
        rows of each (`top_rows`' keys, [B, T] host arrays; top_index indexes rows_BxK's columns).
        `catalogue`: best on the device (`device_catalogue`); `offsets_BxL`: the requests' logit
        offsets (`MultiTowerModel.embed_context_wide`). Only the top rows come back to the host."""
        out = jax.device_get(self.score_padded_rows(catalogue, *self.pad_rows(e_user_BxD, e_context_BxD, rows_BxK,
                                                                              offsets_BxL)))
        return {k: v[: len(rows_BxK)] for k, v in out.items()}

    def ad_part(self, e_ad_NxD: np.ndarray) -> np.ndarray:
        """a W_a for a block of ads (export stores it; the scorer takes it per candidate)."""
        return np.asarray(self._ad_part(self.params["fusion"], np.asarray(e_ad_NxD, np.float32)))

    def score_padded(self, e_user_BxD, e_context_BxD, e_ad_BxNxD, ad_part_BxNxH, bid_BxN, quality_BxN,
                     valid_BxN, offsets_BxL) -> dict[str, Array]:
        """The compiled call on inputs already padded to a (batch, candidate) bucket (`offsets_BxL`
        float32[B, `ScorerSpec.num_logits`]); every output [B, N]."""
        return self._score(self.params, self.calibration, e_user_BxD, e_context_BxD, e_ad_BxNxD, ad_part_BxNxH,
                           bid_BxN, quality_BxN, valid_BxN, offsets_BxL)

    def score(self, e_user_BxD, e_context_BxD, e_ad_BxNxD, bid_BxN, quality_BxN, ad_part_BxNxH=None,
              num_valid_B=None, offsets_BxL=None) -> dict[str, np.ndarray]:
        """Score B requests x N candidates (N <= the largest bucket); pads, runs, un-pads.

        `num_valid_B[i]` candidates of request i are real (default: all N). Without
        `ad_part_BxNxH` it is computed here (what the export normally saves). `offsets_BxL`:
        the requests' logit offsets (default 0; `MultiTowerModel.embed_context_wide`).
        """
        e_ad = np.asarray(e_ad_BxNxD, np.float32)
        b, n, d = e_ad.shape
        if ad_part_BxNxH is None:
            ad_part_BxNxH = np.asarray(self.ad_part(e_ad.reshape(b * n, d))).reshape(b, n, -1)
        num_valid = np.full(b, n) if num_valid_B is None else np.asarray(num_valid_B)
        valid = np.arange(n)[None, :] < num_valid[:, None]
        bb = bucket_for(b, self.settings.batch_buckets, "requests")
        nb = bucket_for(n, self.settings.buckets)
        padded = [pad_to(x, bb, nb) for x in (e_ad, ad_part_BxNxH, bid_BxN, quality_BxN, valid)]
        offsets = np.zeros((b, self.spec.num_logits), np.float32) if offsets_BxL is None else offsets_BxL
        out = self.score_padded(pad_to(e_user_BxD, bb), pad_to(e_context_BxD, bb), *padded,
                                pad_to(np.asarray(offsets, np.float32), bb))
        out = jax.device_get(out)
        t = min(self.spec.top_n, n)
        return {k: (v[:b, :t] if k.startswith("top_") else v[:b, :n]) for k, v in out.items()}


def pad_to(x: Any, rows: int, cols: int | None = None) -> np.ndarray:
    """Zero-pad the first axis to `rows` (and the second to `cols`)."""
    x = np.asarray(x)
    widths = [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    if cols is not None:
        widths[1] = (0, cols - x.shape[1])
    return np.pad(x, widths) if any(w[1] for w in widths) else x


def compute_ad_parts(scorer: Scorer, e_ad_NxD: np.ndarray, out: np.ndarray | None = None,
                     chunk: int = 16_384) -> np.ndarray:
    """a W_a for every ad, in fixed-size chunks (one compilation); writes into `out` if given."""
    n = len(e_ad_NxD)
    out = np.empty((n, scorer.spec.fusion_hidden[0]), np.float32) if out is None else out
    for start in tqdm(range(0, n, chunk), desc=f"fusion ad part ({scorer.placement})", disable=n <= chunk):
        rows = np.asarray(e_ad_NxD[start:start + chunk], np.float32)
        out[start:start + len(rows)] = scorer.ad_part(pad_to(rows, min(chunk, n)))[: len(rows)]
    return out


def write_ad_parts(trained: Any, e_ad_NxD: np.ndarray, folder: Any) -> dict[str, str]:
    """`multitower export`: one `fusion_ad_part_<placement>.npy` float32[N, H] per placement
    beside the embeddings; returns {placement: file name} for the manifest."""
    files = {}
    for placement in trained.config.data.placements:
        scorer = Scorer.from_trained(trained, placement)
        name = AD_PART_FILE.format(placement=placement)
        out = np.lib.format.open_memmap(Path(folder) / name, mode="w+", dtype=np.float32,
                                        shape=(len(e_ad_NxD), scorer.spec.fusion_hidden[0]))
        compute_ad_parts(scorer, e_ad_NxD, out)
        out.flush()
        files[placement] = name
    return files
