"""The portable scorer: the compiled scoring function (calibration included) as a serialized
`jax.export` artifact plus a manifest. Loading and running it needs only jax and numpy: no model
code, no config, no parameters file (they are constants inside the artifact).

    multitower export-scorer --workdir runs/quickstart --out runs/scorer

    scorer = PortableScorer.load("runs/scorer")              # in any process with jax + numpy
    out = scorer(e_user_BxD, e_context_BxD, e_ad_BxNxD, ad_part_BxNxH, bid_BxN, quality_BxN)
    out["top_index"], out["top_ecpm"], out["pctr"], ...

Folder (written by `portable_export.write_portable`):
    manifest.json               inputs/outputs, buckets, objective, calibration, model fingerprint
    score_<placement>.jaxexport the scorer, symbolic in batch b and candidates n (n >= top_n)
    ad_part_<placement>.jaxexport  e_ad [n, D] -> a W_a [n, H] (the export computes it per ad)

Both functions are exported with symbolic shapes, so one artifact serves every bucket;
`PortableScorer` pads to the manifest's buckets so each bucket compiles once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from multitower_jax import run_identity

MANIFEST = "manifest.json"
KIND = "multitower-scorer"
FORMAT = 2  # 2: the score function takes the requests' logit offsets (8 inputs); 1 had 7
SCORE_INPUTS = ("e_user", "e_context", "e_ad", "ad_part", "bid", "quality", "valid", "offsets")


class PortableScorerError(ValueError):
    """A portable scorer folder is missing, malformed, or was asked for something it lacks."""


def _pad(x: Any, rows: int, cols: int | None = None) -> np.ndarray:
    x = np.asarray(x)
    widths = [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    if cols is not None:
        widths[1] = (0, cols - x.shape[1])
    return np.pad(x, widths)


def _bucket(n: int, buckets: list[int], what: str) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise PortableScorerError(f"{n} {what} exceed the largest bucket {buckets[-1]} of this scorer")


class PortableScorer:
    """A loaded `export-scorer` folder: call it like `Scorer.score`, per placement."""

    def __init__(self, manifest: dict, score: dict[str, Any], ad_part: dict[str, Any]):
        self.manifest = manifest
        self._exported = score
        self._score = {p: jax.jit(e.call) for p, e in score.items()}
        self._ad_part = {p: jax.jit(e.call) for p, e in ad_part.items()}

    @classmethod
    def load(cls, folder: str | os.PathLike, workdir: str | os.PathLike | None = None,
             allow_other_run: bool = False) -> PortableScorer:
        """Load an `export-scorer` folder; with `workdir`, refuse (RunMismatchError) a scorer
        exported from another training run than the workdir's (`allow_other_run` only warns)."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {folder} a `multitower export-scorer` folder?")
        manifest = json.loads(path.read_text())
        if manifest.get("kind") != KIND or manifest.get("format") != FORMAT:
            raise PortableScorerError(f"{path}: kind {manifest.get('kind')!r} format {manifest.get('format')!r}, "
                                      f"expected {KIND!r} format {FORMAT} (re-run `multitower export-scorer`)")
        if workdir is not None:
            run_identity.check(manifest.get("run"), run_identity.stamp(run_identity.read(workdir)), f"scorer {folder}",
                               allow_other_run=allow_other_run)
        score, ad_part = {}, {}
        for placement, files in manifest["placements"].items():
            for name, into in (("score", score), ("ad_part", ad_part)):
                file = folder / files[name]
                if not file.is_file():
                    raise FileNotFoundError(f"{file} (listed in {path}) not found")
                into[placement] = jax.export.deserialize(bytearray(file.read_bytes()))
        return cls(manifest, score, ad_part)

    @property
    def placements(self) -> tuple[str, ...]:
        return tuple(self.manifest["placements"])

    def _placement(self, placement: str | None) -> str:
        placement = placement or self.placements[0]
        if placement not in self._score:
            raise PortableScorerError(f"placement {placement!r} not in this scorer; it has {self.placements}")
        return placement

    def ad_part(self, e_ad_NxD: np.ndarray, placement: str | None = None) -> np.ndarray:
        """a W_a per ad (what `multitower export` stores as fusion_ad_part_<placement>.npy)."""
        return np.asarray(self._ad_part[self._placement(placement)](np.asarray(e_ad_NxD, np.float32)))

    def __call__(self, e_user_BxD, e_context_BxD, e_ad_BxNxD, ad_part_BxNxH, bid_BxN, quality_BxN,
                 num_valid_B=None, placement: str | None = None, offsets_BxL=None) -> dict[str, np.ndarray]:
        """Score B requests x N candidates: pads to the buckets, runs, un-pads (as `Scorer.score`);
        `offsets_BxL`: the requests' logit offsets (default 0)."""
        placement = self._placement(placement)
        m = self.manifest
        e_ad = np.asarray(e_ad_BxNxD, np.float32)
        b, n = e_ad.shape[:2]
        num_valid = np.full(b, n) if num_valid_B is None else np.asarray(num_valid_B)
        valid = np.arange(n)[None, :] < num_valid[:, None]
        bb = _bucket(b, m["batch_buckets"], "requests")
        nb = _bucket(n, m["buckets"], "candidates")
        f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
        offsets = np.zeros((b, 1 if m["head"] == "ctr" else 2), np.float32) if offsets_BxL is None else offsets_BxL
        out = self._score[placement](
            _pad(f32(e_user_BxD), bb), _pad(f32(e_context_BxD), bb), _pad(e_ad, bb, nb),
            _pad(f32(ad_part_BxNxH), bb, nb), _pad(f32(bid_BxN), bb, nb), _pad(f32(quality_BxN), bb, nb),
            _pad(valid, bb, nb), _pad(f32(offsets), bb))
        out = jax.device_get(out)
        t = min(m["top_n"], n)
        return {k: (v[:b, :t] if k.startswith("top_") else v[:b, :n]) for k, v in out.items()}
