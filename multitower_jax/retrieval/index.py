"""`multitower index`: the ad index, a ScaNN searcher (or exact search for small catalogues) over
exported ad embeddings, with live add / update / delete and a rebuild when it has drifted.

Layout of an index folder:
    manifest.json      model fingerprint, embed dim, query rule, ScaNN settings, mutation counts
    ad_ids.npy, embeddings.npy, bid.npy, quality.npy, targeting.npy    the ad store
    scann/             the serialized ScaNN searcher (absent in exact mode)

Row i of the store is ScaNN datapoint i. ScaNN 1.4's `upsert` appends new points and updates
existing ones in place; `delete` moves the last point into the freed slot. The store mirrors
both, so search results index the store directly, with no id translation in the hot path.
The embeddings are kept as the tower wrote them (the scorer needs them raw); with the cosine
rule ScaNN holds their normalized copies and exact search multiplies by 1 / norm.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from multitower_jax.retrieval.settings import RetrievalSettings

MANIFEST = "manifest.json"
STORE_ARRAYS = ("ad_ids", "embeddings", "bid", "quality", "targeting")
FORMAT = 1


class IndexMismatchError(ValueError):
    """An index or an embedding export does not belong to this model (or is not an index at all)."""


class StaleIndexWarning(UserWarning):
    """The index (or export) was built from another checkpoint of the same model."""


def query_rule(l2_normalize: bool) -> dict[str, Any]:
    """How Q is computed from the towers; training (`retrieval_logits`) and serving must agree."""
    return {"query": "e_user + e_context", "l2_normalize": bool(l2_normalize)}


def check_compatible(manifest: dict, *, fingerprint: str, embed_dim: int, rule: dict, where: str) -> None:
    """IndexMismatchError naming the first field of `manifest` that differs from the model."""
    for key, want in (("embed_dim", embed_dim), ("query_rule", rule), ("fingerprint", fingerprint)):
        have = manifest.get(key)
        if have != want:
            raise IndexMismatchError(
                f"{where}: {key} is {have!r} but the model has {want!r}; rebuild it from this model "
                "(`multitower export`, then `multitower index`)")


def check_model_step(manifest: dict, step: int | None, where: str) -> bool:
    """Warn (StaleIndexWarning) when `manifest` was exported from another checkpoint than `step`:
    same architecture and query rule, so it loads, but its embeddings are not this model's.
    Returns True when the steps agree."""
    have = manifest.get("model_step")
    if step is None or have == step:
        return True
    warnings.warn(f"{where}: built from the checkpoint at model_step {have}, but the model is at step {step}; "
                  "its ad embeddings are stale: re-run `multitower export` and `multitower index`",
                  StaleIndexWarning, stacklevel=3)
    return False


def read_manifest(folder: str | os.PathLike, kind: str) -> dict:
    path = Path(folder) / MANIFEST
    if not Path(folder).exists():
        _recover(Path(folder))
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {folder} a `multitower {kind.removeprefix('multitower-')}` "
                                "folder?")
    manifest = json.loads(path.read_text())
    if manifest.get("kind") != kind:
        raise IndexMismatchError(f"{path}: kind is {manifest.get('kind')!r}, expected {kind!r}")
    return manifest


class OutputExistsError(FileExistsError):
    """`--out` names a folder that is not an artifact of the kind being written, or an input."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _leftovers(out: Path, tag: str) -> list[tuple[Path, int]]:
    """Siblings `.<out>.<tag>-<pid>` that `atomic_dir` left behind, with their pids, oldest first."""
    found = []
    if out.parent.is_dir():
        prefix = f".{out.name}.{tag}-"
        for path in out.parent.iterdir():
            if path.name.startswith(prefix) and path.name[len(prefix):].isdigit():
                found.append((path, int(path.name[len(prefix):])))
    return sorted(found, key=lambda item: item[0].stat().st_mtime)


def _recover(out: Path) -> None:
    """Undo a crash between `atomic_dir`'s two renames: `out` is gone but the folder it held waits
    as `.<out>.old-<pid>` (of a process that no longer runs); put it back. Stale half-written
    `.partial-<pid>` folders of dead processes are removed."""
    for path, pid in _leftovers(out, "partial"):
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
    if out.exists():
        return
    stale = [path for path, pid in _leftovers(out, "old") if pid != os.getpid() and not _pid_alive(pid)]
    if stale:
        stale[-1].rename(out)  # the newest one is what `out` last held
        print(f"{out}: restored from {stale[-1].name} (left by an interrupted write)", file=sys.stderr)


def _describe(folder: Path) -> str:
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            kind = json.loads(manifest.read_text()).get("kind")
        except (ValueError, AttributeError):
            return f"an unreadable {MANIFEST}"
        return f"a {MANIFEST} of kind {kind!r}"
    names = sorted(p.name for p in folder.iterdir())
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    return f"no {MANIFEST} and {len(names)} entries ({shown})"


def check_replaceable(out: str | os.PathLike, kind: str | None, inputs=()) -> None:
    """OutputExistsError unless writing a `kind` folder at `out` is safe: `out` is absent, an empty
    folder, or a folder whose manifest says it is a `kind` artifact (an older copy to replace);
    and it is none of `inputs`, nor a folder holding one of them."""
    out = Path(out)
    where = out.resolve()
    for src in inputs:
        if src is None:
            continue
        src = Path(src).resolve()
        if src == where or where in src.parents:
            raise OutputExistsError(f"--out {out} would replace the input {src}; write to another folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputExistsError(f"--out {out} exists and is not a folder; remove it or choose another --out")
    if not any(out.iterdir()):
        return
    have = None
    if (out / MANIFEST).is_file():
        try:
            have = json.loads((out / MANIFEST).read_text()).get("kind")
        except (ValueError, AttributeError):
            have = None
    if kind is None or have != kind:
        want = f"a `{kind}` folder" if kind else "an artifact of the same kind"
        raise OutputExistsError(f"--out {out} exists and is not {want} (found {_describe(out)}); refusing to "
                                "replace it: choose another --out or remove it yourself")


def atomic_dir(out: Path, write, kind: str | None = None, inputs=()) -> None:
    """Write a folder through `write(tmp)` into a sibling temp folder, then swap it in.

    An existing `out` is replaced only when it is empty or holds an artifact of the same kind
    (`kind`, and the `kind` of the manifest `write` produced), never when it is one of `inputs`
    (see `check_replaceable`), so `--out` pointed at a workdir or at the export being indexed
    fails instead of deleting it. The swap is two renames; a crash between them leaves the old
    folder as `.<out>.old-<pid>`, which the next write to `out` (or `recover`) puts back.
    """
    out = Path(out)
    _recover(out)
    check_replaceable(out, kind, inputs)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        written = json.loads((tmp / MANIFEST).read_text()).get("kind") if (tmp / MANIFEST).is_file() else None
        if kind is not None and written != kind:
            raise AssertionError(f"atomic_dir: wrote a {written!r} folder, expected {kind!r}")
        check_replaceable(out, written, inputs)  # again: `out` may have appeared while writing
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:  # put the old folder back (a hard crash here is `_recover`'s case)
        if old.exists() and not out.exists():
            old.rename(out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    for path, pid in _leftovers(out, "old"):  # older copies of `out` that interrupted writes kept
        if not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def recover(out: str | os.PathLike) -> None:
    """Put back a folder that an interrupted `atomic_dir` left as `.<out>.old-<pid>`."""
    _recover(Path(out))


@dataclasses.dataclass
class AdStore:
    """Per-ad arrays; row i is search datapoint i."""

    ad_ids: np.ndarray  # int64[N]
    embeddings: np.ndarray  # float32[N, D], as the ad tower wrote them
    bid: np.ndarray  # float32[N]
    quality: np.ndarray  # float32[N]
    targeting: np.ndarray  # uint64[N, targeting.NUM_WORDS]

    def __len__(self) -> int:
        return len(self.ad_ids)

    @classmethod
    def load(cls, folder: Path, mmap: bool = False) -> AdStore:
        mode = "r" if mmap else None
        return cls(**{name: np.load(folder / f"{name}.npy", mmap_mode=mode) for name in STORE_ARRAYS})

    def save(self, folder: Path) -> None:
        for name in STORE_ARRAYS:
            np.save(folder / f"{name}.npy", np.ascontiguousarray(getattr(self, name)))

    def rows(self, rows: np.ndarray) -> AdStore:
        return AdStore(**{name: getattr(self, name)[rows] for name in STORE_ARRAYS})


def _normalized(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def _top_k(scores_BxN: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k per row, best first; k <= N."""
    part = np.argpartition(-scores_BxN, k - 1, axis=1)[:, :k] if k < scores_BxN.shape[1] else \
        np.broadcast_to(np.arange(scores_BxN.shape[1]), scores_BxN.shape).copy()
    s = np.take_along_axis(scores_BxN, part, 1)
    order = np.argsort(-s, axis=1, kind="stable")
    return np.take_along_axis(part, order, 1), np.take_along_axis(s, order, 1)


def scann_builder(db_NxD: np.ndarray, s: RetrievalSettings, leaves: int, unit_norm: bool = False):
    """The ScaNN builder for `db_NxD` (dot product): a k-means tree of `leaves` leaves (spherical
    when `s.spherical` and the rows are `unit_norm`; with SOAR spilling when `soar_lambda` > 0),
    asymmetric hashing, exact reordering (over `reorder_dtype` copies of the vectors).
    `anisotropic_threshold <= 0` is ScaNN's "off", NaN (its default);
    0 itself would be passed through as a threshold."""
    import scann  # heavy; only when a tree is needed
    from scann.scann_ops.py.scann_builder import ReorderType

    quantize = {"float32": ReorderType.FLOAT32, "int8": ReorderType.INT8, "bfloat16": ReorderType.BFLOAT16}

    threshold = float(s.anisotropic_threshold) if s.anisotropic_threshold > 0 else float("nan")
    n = len(db_NxD)
    return (scann.scann_ops_pybind.builder(db_NxD, 10, "dot_product")
            .tree(num_leaves=leaves, num_leaves_to_search=s.search_leaves(leaves),
                  training_sample_size=min(n, s.training_sample_size),
                  soar_lambda=float(s.soar_lambda) if s.soar_lambda > 0 else None,
                  spherical=bool(s.spherical and unit_norm))
            .score_ah(s.dims_per_block, anisotropic_quantization_threshold=threshold)
            .reorder(s.reorder(10), quantize=quantize[s.reorder_dtype]))


class AdIndex:
    """A searchable, mutable set of ads. `search` returns store rows (-1 pads a short result)."""

    def __init__(self, store: AdStore, manifest: dict, settings: RetrievalSettings, searcher=None):
        self.store, self.manifest, self.settings, self.searcher = store, manifest, settings, searcher
        self.l2_normalize = bool(manifest["query_rule"]["l2_normalize"])
        self._refresh()

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def build(cls, store: AdStore, manifest: dict, settings: RetrievalSettings) -> AdIndex:
        """Index `store` (exact below `settings.exact_below` ads, else a ScaNN tree + AH searcher)."""
        manifest = {k: v for k, v in manifest.items() if k not in ("arrays", "num_users")}
        manifest.update(kind="multitower-index", format=FORMAT)
        index = cls(store, manifest, settings)
        index._build_searcher()
        return index

    def _build_searcher(self) -> None:
        n, s = len(self.store), self.settings
        start = time.perf_counter()
        self.searcher, leaves = None, 0
        if n >= max(s.exact_below, 2):
            leaves = s.leaves(n)
            self.searcher = scann_builder(self._search_vectors(np.arange(n)), s, leaves, self.l2_normalize).build()
        self.manifest.update(mode="scann" if self.searcher else "exact", num_leaves=leaves, built_size=n,
                             mutations_since_build=0, build_seconds=round(time.perf_counter() - start, 3),
                             settings=dataclasses.asdict(s))
        self._refresh()

    def save(self, out: str | os.PathLike, inputs=()) -> None:
        """Write the index folder atomically (a half-written index never replaces a good one);
        an existing `out` must be an index folder, and none of `inputs` (OutputExistsError)."""
        def write(tmp: Path) -> None:
            self.store.save(tmp)
            if self.searcher is not None:
                (tmp / "scann").mkdir()
                self.searcher.serialize(str(tmp / "scann"), relative_path=True)
            self.manifest["num_ads"] = len(self.store)
            (tmp / MANIFEST).write_text(json.dumps(self.manifest, indent=2))
        atomic_dir(Path(out), write, kind="multitower-index", inputs=inputs)

    @classmethod
    def load(cls, folder: str | os.PathLike, settings: RetrievalSettings | None = None) -> AdIndex:
        """Load an index folder; `settings` (search-time knobs) default to those it was built with."""
        folder = Path(folder)
        manifest = read_manifest(folder, "multitower-index")
        if settings is None:
            settings = RetrievalSettings(**manifest["settings"])
        searcher = None
        if manifest["mode"] == "scann":
            import scann

            searcher = scann.scann_ops_pybind.load_searcher(str(folder / "scann"))
        index = cls(AdStore.load(folder), manifest, settings, searcher)
        if searcher is not None and searcher.size() != len(index.store):
            raise IndexMismatchError(f"{folder}: the ScaNN searcher holds {searcher.size()} points, "
                                     f"the store {len(index.store)}; rebuild the index")
        return index

    # -- search --------------------------------------------------------------------------------
    def _refresh(self) -> None:
        """Derived arrays: 1 / norm per row (cosine rule) and the id -> row lookup."""
        e = self.store.embeddings
        self._scale = (1.0 / np.maximum(np.linalg.norm(e, axis=1), 1e-12)).astype(np.float32) \
            if self.l2_normalize else np.ones(len(e), np.float32)
        self._order = np.argsort(self.store.ad_ids, kind="stable")
        self._sorted_ids = self.store.ad_ids[self._order]

    def _search_vectors(self, rows: np.ndarray) -> np.ndarray:
        e = np.asarray(self.store.embeddings[rows], np.float32)
        return _normalized(e) if self.l2_normalize else e

    def __len__(self) -> int:
        return len(self.store)

    @property
    def mode(self) -> str:
        return self.manifest["mode"]

    def rows_of(self, ad_ids: np.ndarray) -> np.ndarray:
        """Store rows of `ad_ids` (-1 where an id is not in the index)."""
        ad_ids = np.asarray(ad_ids, np.int64)
        pos = np.clip(np.searchsorted(self._sorted_ids, ad_ids), 0, max(len(self._sorted_ids) - 1, 0))
        if not len(self._sorted_ids):
            return np.full(ad_ids.shape, -1, np.int64)
        return np.where(self._sorted_ids[pos] == ad_ids, self._order[pos], -1)

    def exact(self, q_BxD: np.ndarray, k: int, rows: np.ndarray | None = None,
              chunk_bytes: int = 1 << 28) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k by the index's similarity, over all rows or the given subset; -1 pads."""
        q_BxD = np.asarray(q_BxD, np.float32)
        rows = np.arange(len(self.store)) if rows is None else np.asarray(rows, np.int64)
        B = len(q_BxD)
        out_rows, out_scores = np.full((B, k), -1, np.int64), np.full((B, k), -np.inf, np.float32)
        kk = min(k, len(rows))
        if kk == 0:
            return out_rows, out_scores
        e_NxD = np.asarray(self.store.embeddings[rows], np.float32)
        step = max(1, chunk_bytes // (4 * max(len(rows), 1)))
        for s in range(0, B, step):
            scores = (q_BxD[s:s + step] @ e_NxD.T) * self._scale[rows]
            idx, sc = _top_k(scores, kk)
            out_rows[s:s + step, :kk], out_scores[s:s + step, :kk] = rows[idx], sc
        return out_rows, out_scores

    def search(self, q_BxD: np.ndarray, k: int, leaves_to_search: int | None = None,
               reorder: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k (exact in exact mode): store rows int64[B, k] and scores float32[B, k]."""
        q_BxD = np.ascontiguousarray(q_BxD, np.float32)
        if self.searcher is None:
            return self.exact(q_BxD, k)
        B, kk = len(q_BxD), min(k, len(self.store))
        leaves = leaves_to_search or self.settings.search_leaves(self.manifest["num_leaves"], kk, len(self.store))
        pre = max(kk, reorder or self.settings.reorder(kk))
        if B == 1:
            idx, dist = self.searcher.search(q_BxD[0], kk, pre, leaves)
            idx, dist = idx[None], dist[None]
        else:
            idx, dist = self.searcher.search_batched_parallel(q_BxD, kk, pre, leaves)
        rows, scores = np.full((B, k), -1, np.int64), np.full((B, k), -np.inf, np.float32)
        got = idx.shape[1]
        rows[:, :got], scores[:, :got] = idx, dist
        return rows, scores

    # -- live updates --------------------------------------------------------------------------
    def upsert(self, ads: AdStore) -> None:
        """Add new ads and replace existing ones (matched by ad id), without a rebuild."""
        if len(np.unique(ads.ad_ids)) != len(ads.ad_ids):
            raise ValueError("upsert: duplicate ad ids in one call")
        if ads.embeddings.shape[1:] != self.store.embeddings.shape[1:]:
            raise IndexMismatchError(f"upsert: embeddings of dim {ads.embeddings.shape[1:]}, the index holds "
                                     f"{self.store.embeddings.shape[1:]}")
        rows = self.rows_of(ads.ad_ids)
        old, new = rows >= 0, rows < 0
        store = {name: np.array(getattr(self.store, name)) for name in STORE_ARRAYS}  # writable copies
        for name in STORE_ARRAYS:
            store[name][rows[old]] = getattr(ads, name)[old]
            store[name] = np.concatenate([store[name], getattr(ads, name)[new]])
        if self.searcher is not None:
            # ScaNN appends the None-indexed points in order, exactly as the store does.
            order = np.concatenate([np.flatnonzero(old), np.flatnonzero(new)])
            vecs = ads.embeddings[order].astype(np.float32)
            vecs = _normalized(vecs) if self.l2_normalize else vecs
            indices = [int(r) for r in rows[old]] + [None] * int(new.sum())
            self.searcher.searcher.upsert(indices, np.ascontiguousarray(vecs), max(1, len(indices)))
        self.store = AdStore(**store)
        self.manifest["mutations_since_build"] += len(ads.ad_ids)
        self._refresh()
        self._maybe_rebuild()

    def delete(self, ad_ids: np.ndarray) -> None:
        """Remove ads by id (KeyError for an unknown id); each freed row takes the current last row."""
        ad_ids = np.asarray(ad_ids, np.int64)
        rows = self.rows_of(ad_ids)
        if (rows < 0).any():
            raise KeyError(f"delete: ad ids not in the index: {ad_ids[rows < 0][:10].tolist()}")
        if len(np.unique(ad_ids)) != len(ad_ids):
            raise ValueError("delete: duplicate ad ids in one call")
        perm = np.arange(len(self.store))  # perm[slot] = original row now in slot
        where = np.arange(len(self.store))  # where[original row] = its slot
        size, indices = len(self.store), []
        for r in rows:
            slot, last = where[r], size - 1
            indices.append(int(slot))
            moved = perm[last]
            perm[slot], where[moved] = moved, slot
            size -= 1
        if self.searcher is not None:
            self.searcher.searcher.delete(indices)
        self.store = self.store.rows(perm[:size])
        self.manifest["mutations_since_build"] += len(ad_ids)
        self._refresh()
        self._maybe_rebuild()

    @property
    def drift(self) -> float:
        """Mutations since the last build, as a fraction of the size then."""
        return self.manifest["mutations_since_build"] / max(self.manifest["built_size"], 1)

    def needs_rebuild(self) -> bool:
        """True once the partitioner and codebooks were trained on a set that has drifted too far,
        or the catalogue crossed `exact_below` in either direction."""
        want_scann = len(self.store) >= max(self.settings.exact_below, 2)
        return self.drift > self.settings.rebuild_fraction or want_scann != (self.searcher is not None)

    def rebuild(self) -> None:
        """Retrain the tree and the codebooks on the current ads (same settings)."""
        self._build_searcher()
        self.manifest["rebuilds"] = self.manifest.get("rebuilds", 0) + 1

    def _maybe_rebuild(self) -> None:
        """After a mutation: rebuild when `settings.auto_rebuild` and the index has drifted. The
        rebuild runs in the caller's thread (seconds to minutes on a large catalogue)."""
        if self.settings.auto_rebuild and self.needs_rebuild():
            self.rebuild()


def build_from_export(embeddings_dir: str | os.PathLike, out: str | os.PathLike,
                      settings: RetrievalSettings, tune=None) -> AdIndex:
    """`multitower index`: read an export folder, build the index, `tune(index)` it when given
    (`tuning.tune_index`: search settings for a target recall), and save it."""
    embeddings_dir = Path(embeddings_dir)
    manifest = read_manifest(embeddings_dir, "multitower-export")
    check_replaceable(out, "multitower-index", [embeddings_dir])  # before the (long) build
    store = AdStore.load(embeddings_dir)
    store = AdStore(**{n: np.asarray(getattr(store, n)) for n in STORE_ARRAYS})
    index = AdIndex.build(store, {**manifest, "embeddings": str(embeddings_dir)}, settings)
    if tune is not None:
        tune(index)
    index.save(out, inputs=[embeddings_dir])
    return index
