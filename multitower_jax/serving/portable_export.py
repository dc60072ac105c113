"""`multitower export-scorer`: a trained workdir's calibrated scorer, every placement, written as
the portable artifact that `portable.PortableScorer` loads (the folder is described there).

A module of its own so that `portable` stays loadable with jax and numpy only: exporting needs
the model, its config and the serving scorer; loading needs none of them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from multitower_jax import calibration as calibration_lib
from multitower_jax import config as config_lib
from multitower_jax.inference import load_trained
from multitower_jax.retrieval.index import atomic_dir, check_replaceable
from multitower_jax.serving import settings as settings_lib
from multitower_jax.serving.portable import FORMAT, KIND, MANIFEST, SCORE_INPUTS
from multitower_jax.serving.scorer import Scorer, ad_part, score_batch


def export_scorer(workdir: str | os.PathLike, out: str | os.PathLike, overrides: tuple[str, ...] = (),
                  platforms: tuple[str, ...] | None = None, allow_other_run: bool = False) -> dict:
    """`multitower export-scorer`: the portable scorer of every placement of a trained workdir,
    with its calibration (`multitower calibrate`) baked in when there is one (refused when it
    was fitted for another training run, unless `allow_other_run`)."""
    trained = load_trained(workdir)
    if "serving" not in trained.config:
        with trained.config.unlocked():
            trained.config.serving = settings_lib.defaults()
    trained.config = config_lib.apply_overrides(trained.config, overrides)
    return write_portable(trained, calibration_lib.load(workdir, allow_other_run=allow_other_run), out, platforms)


def write_portable(trained: Any, calibration: Any, out: str | os.PathLike,
                   platforms: tuple[str, ...] | None = None) -> dict:
    """Export the scorer of every placement of `trained` (an `inference.Trained`) into `out`."""
    check_replaceable(out, KIND, [trained.workdir])  # before the work: `out` is not ours to replace

    settings = settings_lib.ServingSettings.from_config(trained.config)
    platforms = tuple(platforms or (jax.default_backend(),))
    d = trained.embed_dim
    b, n = jax.export.symbolic_shape("b, n", constraints=(f"n >= {settings.top_n}",))
    manifest: dict[str, Any] = {
        "kind": KIND, "format": FORMAT, "fingerprint": trained.fingerprint, "model_step": trained.step,
        "run": trained.identity,
        "workdir": str(trained.workdir), "jax_version": jax.__version__, "platforms": list(platforms),
        "embed_dim": d, "head": trained.config.model.head, "fusion": trained.config.model.fusion,
        "objective": settings.objective, "ctr_weight": settings.ctr_weight, "cvr_weight": settings.cvr_weight,
        "top_n": settings.top_n, "buckets": list(settings.buckets), "batch_buckets": list(settings.batch_buckets),
        "calibration": calibration.to_json() if calibration is not None else None, "placements": {},
    }
    blobs: dict[str, bytes] = {}
    for placement in trained.config.data.placements:
        scorer = Scorer.from_trained(trained, placement, calibration, settings)
        spec, params, h = scorer.spec, scorer.params, scorer.spec.fusion_hidden[0]
        f32 = lambda *shape: jax.ShapeDtypeStruct(shape, np.float32)  # noqa: E731
        args = (f32(b, d), f32(b, d), f32(b, n, d), f32(b, n, h), f32(b, n), f32(b, n),
                jax.ShapeDtypeStruct((b, n), np.bool_), f32(b, spec.num_logits))

        def score(*arrays, params=params, spec=spec):  # parameters and calibration become constants
            return score_batch(params, calibration, spec, *arrays)

        exported = jax.export.export(jax.jit(score), platforms=platforms)(*args)
        (m,) = jax.export.symbolic_shape("m")
        exported_ad = jax.export.export(jax.jit(lambda e, params=params, spec=spec: ad_part(params["fusion"], spec, e)),
                                        platforms=platforms)(f32(m, d))
        files = {"score": f"score_{placement}.jaxexport", "ad_part": f"ad_part_{placement}.jaxexport"}
        blobs[files["score"]], blobs[files["ad_part"]] = exported.serialize(), exported_ad.serialize()
        manifest["placements"][placement] = {
            **files, "fusion_hidden": h,
            "inputs": {name: {"shape": str(a.shape), "dtype": str(np.dtype(a.dtype))}
                       for name, a in zip(SCORE_INPUTS, args)},
            "outputs": sorted(exported.out_tree.unflatten(range(len(exported.out_avals))).keys()),
        }

    def write(tmp: Path) -> None:
        for name, blob in blobs.items():
            (tmp / name).write_bytes(blob)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))

    # Refused before anything is written when `out` is the workdir or another kind of folder.
    atomic_dir(Path(out), write, kind=KIND, inputs=[trained.workdir])
    return manifest
