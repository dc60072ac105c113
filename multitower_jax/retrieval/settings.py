"""`config.retrieval`: every knob of export, the ScaNN index and targeting-aware search.

Workdirs trained before this section existed have no `retrieval` keys; `RetrievalSettings.from_config`
fills whatever is missing from `default_config()`, so old workdirs export and index unchanged.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from multitower_jax.config_checks import require, require_bool, require_choice, require_known

REORDER_DTYPES = ("float32", "int8", "bfloat16")


def default_config() -> ml_collections.ConfigDict:
    r = ml_collections.ConfigDict()
    r.export_batch_size = 1024  # ads (and users) per jitted tower call; the last batch is padded
    r.exact_below = 20_000  # catalogues smaller than this are searched exactly (no ScaNN tree)
    # ScaNN: tree (k-means) partitioning, asymmetric hashing, exact re-scoring of the best candidates.
    r.num_leaves = 0  # 0: round(sqrt(num_ads))
    r.leaves_to_search = 0  # 0: leaves_fraction * num_leaves
    r.leaves_fraction = 0.03
    r.training_sample_size = 250_000  # vectors used to train the partitioner and the codebooks
    r.dims_per_block = 2  # asymmetric hashing: 2 dims per 16-centroid block (4 bits)
    r.anisotropic_threshold = 0.2  # score-aware quantization (dot product); <= 0 turns it off (NaN to ScaNN)
    # SOAR (ScaNN's spilled assignments): > 0 also puts each ad in a second leaf chosen with this
    # lambda (ScaNN suggests 1.5), so fewer leaves reach a recall on data whose neighbours straddle
    # leaves; 0 turns it off. The index holds ~2x the assignments (memory, build time).
    r.soar_lambda = 0.0
    # Spherical k-means for the tree (centroids kept on the unit sphere) when the index holds unit
    # vectors (the query rule L2-normalizes); a raw dot-product index keeps plain k-means.
    r.spherical = True
    r.reorder_multiplier = 5  # re-score reorder_multiplier * k candidates exactly before returning k
    r.min_reorder = 100
    # What the exact re-scoring reads: "float32" (the vectors themselves), "int8" (ScaNN's
    # per-dimension fixed point: a quarter of the bytes) or "bfloat16" (half).
    r.reorder_dtype = "float32"
    # Targeting: ask ScaNN for k / eligible_fraction * overfetch candidates, then filter; a query
    # whose eligible set is small (or that comes back short) is searched exactly over that set.
    r.overfetch = 1.5
    r.exact_eligible_below = 5_000
    # Live updates: rebuild (retrain the partitioner and codebooks) once this fraction of the
    # index has been added, updated or deleted since the last build.
    r.rebuild_fraction = 0.25
    # AdIndex.upsert / delete rebuild the live index themselves once it needs it (needs_rebuild():
    # the drift above, or the size crossed exact_below); False leaves that to the caller.
    r.auto_rebuild = True
    return r


@dataclasses.dataclass(frozen=True)
class RetrievalSettings:
    export_batch_size: int = 1024
    exact_below: int = 20_000
    num_leaves: int = 0
    leaves_to_search: int = 0
    leaves_fraction: float = 0.03
    training_sample_size: int = 250_000
    dims_per_block: int = 2
    anisotropic_threshold: float = 0.2
    soar_lambda: float = 0.0
    spherical: bool = True
    reorder_multiplier: int = 5
    min_reorder: int = 100
    reorder_dtype: str = "float32"
    overfetch: float = 1.5
    exact_eligible_below: int = 5_000
    rebuild_fraction: float = 0.25
    auto_rebuild: bool = True

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict | None) -> RetrievalSettings:
        """From ``config.retrieval`` (missing keys take their defaults); ConfigError names a bad key."""
        section = config.get("retrieval") if config is not None else None
        values = dict(default_config())
        if section is not None:
            require_known("retrieval", section, values)
            values.update(dict(section))
        for f in dataclasses.fields(cls):
            if isinstance(f.default, bool):
                require_bool(values[f.name], f"retrieval.{f.name}")
        out = cls(**{f.name: type(f.default)(values[f.name]) for f in dataclasses.fields(cls)})
        out.validate()
        return out

    def validate(self) -> None:
        def need(ok: bool, key: str, expected: str) -> None:
            require(ok, f"retrieval.{key}", expected, getattr(self, key))

        for key in ("export_batch_size", "dims_per_block", "reorder_multiplier", "training_sample_size"):
            need(getattr(self, key) > 0, key, "a positive integer")
        for key in ("exact_below", "num_leaves", "leaves_to_search", "min_reorder", "exact_eligible_below"):
            need(getattr(self, key) >= 0, key, "a non-negative integer")
        need(0 < self.leaves_fraction <= 1, "leaves_fraction", "a fraction in (0, 1]")
        need(self.overfetch >= 1, "overfetch", "a number >= 1")
        need(self.soar_lambda >= 0, "soar_lambda", "a number >= 0 (0: off)")
        need(0 < self.rebuild_fraction, "rebuild_fraction", "a positive fraction")
        require_choice(self.reorder_dtype, "retrieval.reorder_dtype", REORDER_DTYPES)

    def leaves(self, num_ads: int) -> int:
        """Number of k-means leaves for a catalogue of `num_ads` (about sqrt(n) by default)."""
        n = self.num_leaves or round(math.sqrt(num_ads))
        return max(1, min(n, num_ads))

    def search_leaves(self, num_leaves: int, k: int | None = None, num_ads: int | None = None) -> int:
        """Leaves to visit per query: `leaves_to_search`, or `leaves_fraction` of them; given k and
        the catalogue size, at least enough leaves to hold twice the candidates re-scored exactly
        (visiting fewer points than we re-score would waste the reordering)."""
        n = self.leaves_to_search or math.ceil(self.leaves_fraction * num_leaves)
        if k and num_ads:
            n = max(n, math.ceil(2 * self.reorder(k) * num_leaves / num_ads))
        return max(1, min(n, num_leaves))

    def reorder(self, k: int) -> int:
        return max(self.min_reorder, self.reorder_multiplier * k)
