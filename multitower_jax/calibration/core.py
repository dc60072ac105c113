"""Per-head calibrators: fitted on the host, applied as pure jnp functions inside `jax.jit`.

A `Calibration` is a pytree: its leaves are the fitted parameters (float32 arrays), its
static part the method per head, so the scorer can close over it or pass it to a jitted
function, and `jax.export` serializes it with the compiled function.

    cal = calibration.load(workdir)              # identity (with a notice) when none was fitted
    out = jax.jit(cal.outputs)(pctr_B, pcvr_B)   # {"pctr", "pcvr", "pctcvr"}, calibrated
    pctr_B = cal.apply("ctr", raw_pctr_B)        # one head

Order inside `apply`: clip the model's probability to [eps, 1 - eps], undo negative
downsampling (CTR only, when the run trained without importance weights), then the head's
map. Methods:

- isotonic: a monotone step function (scikit-learn's IsotonicRegression) evaluated by linear
  interpolation between its thresholds, exactly as `IsotonicRegression.predict` does; inputs
  outside the fitted range take the end values (out_of_bounds="clip").
- platt: sigmoid(a * logit(p) + b), fitted by maximum likelihood.
- temperature: sigmoid(logit(p) / T); one parameter, so it can fix over- or under-confidence
  but not a shifted base rate (hence the downsampling correction before it).
- identity: the (corrected) model probability.
  ("none" would not do: `--config.x=none` sets None.)

pCTCVR is, by default ("product"), calibrated pCTR x calibrated pCVR: ESMM defines
pCTCVR = pCTR x pCVR and the multi-objective ranking mixes the two, so keeping the identity
after calibration keeps the three outputs consistent. Set `calibration.ctcvr` to a method to
fit a map of its own on pCTCVR over all impressions instead (its input is then corrected
pCTR x pCVR).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from etils import epath
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from multitower_jax import config as config_lib
from multitower_jax import fileio, run_identity
from multitower_jax.calibration_settings import DEFAULT_EPS, HEADS, METHODS, PRODUCT, section

log = logging.getLogger(__name__)

FILE = "calibration.json"
FORMAT_VERSION = 1


class CalibrationError(ValueError):
    """A calibration file is missing, malformed or belongs to another model; or a head cannot be fitted."""


def heads_of(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The heads a model's config has: ("ctr",) or ("ctr", "cvr", "ctcvr")."""
    return ("ctr",) if config.model.head == "ctr" else HEADS


def downsample_correction_rate(config: ml_collections.ConfigDict) -> float:
    """The rate r to undo, or 1.0: negatives were kept at rate r < 1 and NOT weighted 1/r.

    Such a model predicts the click probability of the downsampled data, p' = p / (p + (1 - p) r);
    with importance weights the loss already targets p and there is nothing to undo.
    """
    data = config.data
    rate = float(data.negative_downsample_rate)
    return rate if rate < 1.0 and not bool(data.get("importance_weights", True)) else 1.0


def correct_downsampling(p_B: jax.Array, rate: jax.Array | float) -> jax.Array:
    """p = p' / (p' + (1 - p') / r): the click probability before keeping negatives at rate r.

    Equivalently logit(p) = logit(p') + log(r); written as a ratio so it is exact at 0 and 1.
    """
    return p_B * rate / (p_B * rate + (1.0 - p_B))


def _logit(p: jax.Array) -> jax.Array:
    return jnp.log(p) - jnp.log1p(-p)


def _apply_isotonic(params: Mapping[str, jax.Array], p_B: jax.Array) -> jax.Array:
    return jnp.interp(p_B, params["x"], params["y"])  # clamps to the end values outside [x0, xn]


def _apply_platt(params: Mapping[str, jax.Array], p_B: jax.Array) -> jax.Array:
    return jax.nn.sigmoid(params["a"] * _logit(p_B) + params["b"])


def _apply_temperature(params: Mapping[str, jax.Array], p_B: jax.Array) -> jax.Array:
    return jax.nn.sigmoid(_logit(p_B) / params["temperature"])


_APPLY = {"isotonic": _apply_isotonic, "platt": _apply_platt, "temperature": _apply_temperature,
          "identity": lambda params, p_B: p_B}
_PARAM_NAMES = {"isotonic": ("x", "y"), "platt": ("a", "b"), "temperature": ("temperature",), "identity": ()}


@flax.struct.dataclass
class Calibration:
    """Fitted calibrators of one model. Leaves: ``params[head][name]`` (float32) and ``negative_rate``."""

    params: dict[str, dict[str, jax.Array]]
    negative_rate: jax.Array  # scalar; 1.0 = no downsampling correction
    methods: tuple[tuple[str, str], ...] = flax.struct.field(pytree_node=False)
    clip_eps: float = flax.struct.field(pytree_node=False)

    @property
    def heads(self) -> tuple[str, ...]:
        return tuple(h for h, _ in self.methods)

    def method(self, head: str) -> str:
        for h, m in self.methods:
            if h == head:
                return m
        raise KeyError(f"no calibrator for head {head!r}; this model has {self.heads}")

    def apply(self, head: str, p_B: jax.Array) -> jax.Array:
        """Calibrated probabilities of one head; pure jnp (jit-, vmap- and export-safe).

        ``p_B`` is the model's probability for ``head`` ("ctr": pctr, "cvr": pcvr), any shape.
        For "ctcvr" with a method of its own, ``p_B`` is corrected pCTR x pCVR (what `outputs`
        passes); with "product" there is no map of its own: use `outputs`.
        """
        method = self.method(head)
        if method == PRODUCT:
            raise ValueError("pCTCVR is calibrated pCTR x calibrated pCVR (calibration.ctcvr='product'): "
                             "use Calibration.outputs(pctr, pcvr)")
        eps = self.clip_eps
        p_B = jnp.clip(jnp.asarray(p_B, jnp.float32), eps, 1.0 - eps)
        if head == "ctr":
            p_B = correct_downsampling(p_B, self.negative_rate)
        return jnp.clip(_APPLY[method](self.params[head], p_B), eps, 1.0 - eps)

    def outputs(self, pctr_B: jax.Array, pcvr_B: jax.Array | None = None) -> dict[str, jax.Array]:
        """{"pctr"} or {"pctr", "pcvr", "pctcvr"}, calibrated, from the model's pCTR and pCVR."""
        out = {"pctr": self.apply("ctr", pctr_B)}
        if pcvr_B is None:
            return out
        out["pcvr"] = self.apply("cvr", pcvr_B)
        if self.method("ctcvr") == PRODUCT:
            out["pctcvr"] = out["pctr"] * out["pcvr"]
        else:
            out["pctcvr"] = self.apply("ctcvr", self.uncalibrated_ctcvr(pctr_B, pcvr_B))
        return out

    def uncalibrated_ctcvr(self, pctr_B: jax.Array, pcvr_B: jax.Array) -> jax.Array:
        """The input of a ctcvr map of its own: downsampling-corrected pCTR x pCVR (no fitted map)."""
        eps = self.clip_eps
        pctr_B = correct_downsampling(jnp.clip(jnp.asarray(pctr_B, jnp.float32), eps, 1 - eps), self.negative_rate)
        return pctr_B * jnp.clip(jnp.asarray(pcvr_B, jnp.float32), eps, 1 - eps)

    # -- construction and files -------------------------------------------------------------

    @classmethod
    def identity(cls, heads: tuple[str, ...] = HEADS, negative_rate: float = 1.0,
                 clip_eps: float = DEFAULT_EPS) -> Calibration:
        """No fitted map (only the downsampling correction, if any); pCTCVR stays pCTR x pCVR."""
        methods = tuple((h, PRODUCT if h == "ctcvr" else "identity") for h in heads)
        return cls.create({h: {} for h in heads}, methods, negative_rate, clip_eps)

    @classmethod
    def create(cls, params: Mapping[str, Mapping[str, Any]], methods: tuple[tuple[str, str], ...],
               negative_rate: float, clip_eps: float) -> Calibration:
        arrays = {h: {k: jnp.asarray(np.asarray(v, np.float32)) for k, v in params.get(h, {}).items()}
                  for h, _ in methods}
        for h, m in methods:
            expected = _PARAM_NAMES.get(m, ())
            if sorted(arrays[h]) != sorted(expected):
                raise CalibrationError(f"head {h!r} ({m}): expected parameters {expected}, got {sorted(arrays[h])}")
        return cls(params=arrays, negative_rate=jnp.asarray(negative_rate, jnp.float32),
                   methods=tuple(methods), clip_eps=float(clip_eps))

    def to_json(self, **extra: Any) -> dict[str, Any]:
        heads = {h: {"method": m, **{k: np.asarray(v, np.float64).tolist() for k, v in self.params[h].items()}}
                 for h, m in self.methods}
        return {"version": FORMAT_VERSION, "negative_rate": float(self.negative_rate),
                "clip_eps": self.clip_eps, "heads": heads, **extra}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = FILE) -> Calibration:
        try:
            if data.get("version") != FORMAT_VERSION:
                raise CalibrationError(f"{source}: format version {data.get('version')!r}, expected {FORMAT_VERSION}")
            methods = tuple((h, str(spec["method"])) for h, spec in data["heads"].items())
            for h, m in methods:
                if h not in HEADS or m not in (*METHODS, PRODUCT) or (m == PRODUCT and h != "ctcvr"):
                    raise CalibrationError(f"{source}: head {h!r} with method {m!r} is not a valid calibrator")
            params = {h: {k: v for k, v in spec.items() if k != "method"} for h, spec in data["heads"].items()}
            return cls.create(params, methods, float(data["negative_rate"]), float(data["clip_eps"]))
        except (KeyError, TypeError, AttributeError) as e:
            raise CalibrationError(f"{source}: malformed calibration file ({type(e).__name__}: {e})") from None


def _serialize_static(aux: tuple) -> bytes:
    methods, clip_eps = aux
    return json.dumps({"methods": [list(m) for m in methods], "clip_eps": clip_eps}).encode()


def _deserialize_static(data: bytes) -> tuple:
    aux = json.loads(data)
    return tuple(tuple(m) for m in aux["methods"]), float(aux["clip_eps"])


# So a `jax.export`ed function may also take a Calibration as an argument (not only close over it).
jax.export.register_pytree_node_serialization(
    Calibration, serialized_name="multitower_jax.calibration.Calibration",
    serialize_auxdata=_serialize_static, deserialize_auxdata=_deserialize_static)


def save(calibration: Calibration, workdir: str | os.PathLike, **extra: Any) -> epath.Path:
    """Write ``<workdir>/calibration.json`` atomically (temp file, then rename)."""
    return fileio.write_json(epath.Path(workdir) / FILE, calibration.to_json(**extra), indent=1)


def exists(workdir: str | os.PathLike) -> bool:
    return (epath.Path(workdir) / FILE).is_file()


def load(workdir: str | os.PathLike, allow_other_run: bool = False) -> Calibration:
    """The workdir's calibration; identity (plus any downsampling correction) with a notice when
    `multitower calibrate` has not been run. Refuses a file fitted for another model, or for
    another training run than the workdir's (`run_identity`; `allow_other_run` only warns)."""
    workdir = epath.Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: is {workdir} a `multitower train` workdir?")
    config = config_lib.from_json(config_path)
    path = workdir / FILE
    if not path.is_file():
        c = section(config)
        log.warning("no %s: using the model's own probabilities%s (run `multitower calibrate --workdir %s`)",
                    path, " with the negative-downsampling correction" if downsample_correction_rate(config) < 1
                    else "", workdir)
        return Calibration.identity(heads_of(config), downsample_correction_rate(config), float(c.clip_eps))
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{path}: not valid JSON ({e})") from None
    cal = Calibration.from_json(data, str(path))
    expected = config_lib.fingerprint(config)
    if data.get("fingerprint") not in (None, expected):
        raise CalibrationError(f"{path} was fitted for model {data['fingerprint']}, but {config_path} describes "
                               f"model {expected}; run `multitower calibrate --workdir {workdir}` again")
    run_identity.check(data.get("run"), run_identity.stamp(run_identity.read(workdir)), str(path),
                       allow_other_run=allow_other_run)
    if set(cal.heads) != set(heads_of(config)):
        raise CalibrationError(f"{path} calibrates heads {cal.heads}, the model has {heads_of(config)}")
    latest = _latest_checkpoint_step(workdir)
    if data.get("step") is not None and latest is not None and latest != data["step"]:
        log.warning("%s was fitted on checkpoint %s but the latest is %s: run `multitower calibrate` again",
                    path, data["step"], latest)
    return cal


def _latest_checkpoint_step(workdir: epath.Path) -> int | None:
    steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
    return max(steps) if steps else None
