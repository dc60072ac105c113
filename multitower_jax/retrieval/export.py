"""`multitower export`: run the ad tower over the whole catalogue (and the user tower over known
users) in jitted fixed-size batches, streaming, and write the embeddings with a manifest.

Output folder:
    manifest.json        model step, embed dim, query rule, config fingerprint, counts
    ad_ids.npy           int64[N]
    embeddings.npy       float32[N, D]  E_ad, raw (the index normalizes under the cosine rule)
    bid.npy, quality.npy float32[N]     (quality 1.0 where the catalogue has no `quality` column)
    targeting.npy        uint64[N, W]   targeting bitsets (see `targeting`)
    fusion_ad_part_<placement>.npy  float32[N, H]  a W_a, the ad's share of the first fusion layer
                                    (the serving scorer's factorization; `serving.scorer.write_ad_parts`)
    user_ids.npy, user_embeddings.npy   E_user of every catalogued user (warms the user cache)

The catalogue is read with `ParquetFile.iter_batches`, and every output array is a memory-mapped
.npy file written batch by batch, so memory stays bounded by one batch whatever N is. One batch
shape means one compilation: the last batch is padded and the padding dropped.
An extra per-ad array is one more entry in `AD_ARRAYS` plus a line in `_ad_batches`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from multitower_jax import features as F
from multitower_jax.data import multi_hot, schema
from multitower_jax.retrieval import targeting as targeting_lib
from multitower_jax.retrieval.index import MANIFEST, atomic_dir, check_replaceable, query_rule

CATALOGUE_DIR = "catalogue"


class CatalogueError(ValueError):
    """A catalogue file lacks a column, or holds nulls or values of the wrong shape."""


def default_catalogue(config, name: str = "ads") -> Path:
    return Path(config.data.dir) / CATALOGUE_DIR / f"{name}.parquet"


def _open(path: Path, required: list[str], what: str) -> pq.ParquetFile:
    if not path.is_file():
        raise FileNotFoundError(f"{what} catalogue {path} not found (expected Parquet with {required[0]} and the "
                                f"{what}.<feature> columns{', bid' if what == 'ad' else ''}, as `multitower generate` "
                                "and `multitower ingest` write into <data.dir>/catalogue/; or pass "
                                f"{'--catalogue' if what == 'ad' else '--users'} FILE)")
    file = pq.ParquetFile(path)
    missing = [c for c in required if c not in file.schema_arrow.names]
    if missing:
        raise CatalogueError(f"{path}: missing column(s) {missing}; a {what} catalogue needs {required}")
    return file


def _raw_categorical(col: pa.Array, name: str, feature: F.Categorical, path: Path) -> np.ndarray:
    """A categorical column of strings, as in the logs: `hash` -> `stable_hash64` keys, `vocab` ->
    the value's index in the vocabulary (-1, the OOV row, for others)."""
    if feature.encoding == "hash":
        enc = pc.dictionary_encode(col)  # hash each distinct string once
        return schema.stable_hash64(enc.dictionary.to_pylist())[enc.indices.to_numpy(zero_copy_only=False)]
    if feature.encoding == "vocab":
        idx = pc.index_in(col, value_set=pa.array(feature.vocab, pa.string())).fill_null(-1)
        return idx.to_numpy(zero_copy_only=False).astype(np.int64)
    raise CatalogueError(f"{path}: column {name!r} holds strings, but feature {feature.name!r} has encoding 'ids' "
                         "(integer ids); give it encoding 'hash' or 'vocab', or store the ids")


_STRINGS = (pa.string(), pa.large_string())


def _multi_hot(col: pa.Array, name: str, feature: F.MultiHot, path: Path) -> np.ndarray:
    """Lists of any length (as in the logs) -> [N, max_items] stored items padded with -1, cut:
    integer ids, or for a vocab / hash feature strings (a list column, or text cells such as
    "Comedy|Drama" split at the feature's separator; `multi_hot`)."""
    if col.type in _STRINGS:
        parents, values = multi_hot.split_text(col, feature.separator)
    else:
        parents = pc.list_parent_indices(col).to_numpy(zero_copy_only=False).astype(np.int64)
        values = pc.list_flatten(col)
    if values.type in _STRINGS:
        if feature.encoding == "ids":
            raise CatalogueError(f"{path}: column {name!r} holds strings, but feature {feature.name!r} has encoding "
                                 "'ids' (integer ids); give it encoding 'vocab' or 'hash', or store the ids")
        items = (multi_hot.vocab_indices(values, feature) if feature.encoding == "vocab"
                 else multi_hot.hash_keys(values))
    else:
        try:
            items = values.to_numpy(zero_copy_only=False).astype(np.int64)
        except (TypeError, ValueError):
            raise CatalogueError(f"{path}: column {name!r}: expected {multi_hot.expected(feature)}, "
                                 f"got {col.type}") from None
    return multi_hot.pack(parents, items, len(col), feature.max_items)[0]


def _column(batch: pa.RecordBatch, name: str, feature: F.Feature | type, first_row: int, path: Path) -> np.ndarray:
    """One column of a record batch as the numpy array the preprocessor expects (`feature` is a
    feature of the spec, or a numpy scalar type for ids, bids and quality). Values are taken as
    the datasets store them or raw as in the logs: strings for `hash` / `vocab` categoricals,
    multi-hot lists of any length."""
    col = batch.column(batch.schema.names.index(name))
    if col.null_count:
        bad = first_row + int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise CatalogueError(f"{path}: row {bad}, column {name!r} is null")
    if isinstance(feature, F.Categorical) and col.type in _STRINGS:
        return _raw_categorical(col, name, feature, path)
    if isinstance(feature, F.MultiHot) and (isinstance(col.type, pa.ListType | pa.LargeListType)
                                            or (col.type in _STRINGS and feature.encoding != "ids")):
        return _multi_hot(col, name, feature, path)
    if isinstance(feature, F.Dense | F.MultiHot):
        width = feature.dim if isinstance(feature, F.Dense) else feature.max_items
        lengths = col.value_lengths().to_numpy(zero_copy_only=False) if hasattr(col, "value_lengths") else None
        if lengths is None or (lengths != width).any():
            row = 0 if lengths is None else int(np.flatnonzero(lengths != width)[0])
            raise CatalogueError(f"{path}: row {first_row + row}, column {name!r}: expected a list of {width} "
                                 f"values ({type(feature).__name__.lower()} feature), got {col.type}")
        values = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), width)
        return values.astype(np.float16) if isinstance(feature, F.Dense) else values.astype(np.int64)
    if isinstance(feature, F.Text):
        return col.to_numpy(zero_copy_only=False).astype(object)
    try:
        dtype = feature if isinstance(feature, type) else np.float32 if isinstance(feature, F.Numeric) else np.int64
        return col.to_numpy(zero_copy_only=False).astype(dtype)
    except (TypeError, ValueError, pa.ArrowInvalid):
        raise CatalogueError(f"{path}: column {name!r} must be numeric, got {col.type}") from None


def _tower_fn(trained, method: str) -> Callable:
    model, params = trained.model, trained.params
    return jax.jit(lambda feats: model.apply({"params": params}, feats, method=getattr(model, method)))


def _padded(x: np.ndarray, size: int) -> np.ndarray:
    return x if len(x) == size else np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


def _embed_catalogue(trained, path: Path, tower: str, id_col: str, batch_size: int, extra: Callable,
                     arrays: dict[str, np.ndarray], desc: str) -> int:
    """Stream `path` through one tower into the memory-mapped `arrays`; returns rows written."""
    spec = trained.spec.user if tower == "user" else trained.spec.ad
    transforms = trained.preprocessor().transforms[tower]
    required = [id_col, *(f"{tower}.{f.name}" for f in spec.features)]
    file = _open(path, required, tower)
    embed = _tower_fn(trained, f"embed_{tower}")
    done, pending = 0, None
    with tqdm(total=file.metadata.num_rows, desc=desc, unit=tower) as bar:
        for batch in file.iter_batches(batch_size=batch_size):
            n = batch.num_rows
            feats = {f.name: _padded(transforms[f.name](_column(batch, f"{tower}.{f.name}", f, done, path)), batch_size)
                     for f in spec.features}
            e_BxD = embed(feats)  # async: the next batch is read while this one runs
            if pending is not None:
                _write(arrays, *pending)
            rows = slice(done, done + n)
            arrays["ids"][rows] = _column(batch, id_col, np.int64, done, path)
            for name, value in extra(batch, done, path).items():
                arrays[name][rows] = value
            pending = (rows, e_BxD, n)
            done += n
            bar.update(n)
        if pending is not None:
            _write(arrays, *pending)
    return done


def _write(arrays: dict[str, np.ndarray], rows: slice, e_BxD: jax.Array, n: int) -> None:
    arrays["embeddings"][rows] = np.asarray(e_BxD)[:n]


def _ad_extras(batch: pa.RecordBatch, first_row: int, path: Path) -> dict[str, np.ndarray]:
    names = batch.schema.names
    quality = (_column(batch, "quality", np.float32, first_row, path) if "quality" in names
               else np.ones(batch.num_rows, np.float32))
    return {"bid": _column(batch, "bid", np.float32, first_row, path), "quality": quality,
            "targeting": targeting_lib.from_arrow(batch, first_row, str(path))}


def _check_ids(ids: np.ndarray, path: Path, id_col: str) -> None:
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise CatalogueError(f"{path}: {id_col} {int(uniq[counts > 1][0])} appears {int(counts.max())} times; "
                             "ids must be unique")


def export(trained, out: str | os.PathLike, ads_path: str | os.PathLike | None = None,
           users_path: str | os.PathLike | None = None, batch_size: int | None = None) -> dict[str, Any]:
    """Write the export folder `out` (atomically); returns its manifest.

    `ads_path` defaults to `<data.dir>/catalogue/ads.parquet` (needs `ad_id`, `bid` and every raw
    `ad.<feature>`; optional `quality` and `target.*`). Users come from `users_path`, default
    `<data.dir>/catalogue/users.parquet` when it exists; pass "" to skip them.
    """
    from multitower_jax.retrieval.settings import RetrievalSettings

    config = trained.config
    batch_size = batch_size or RetrievalSettings.from_config(config).export_batch_size
    ads_path = Path(ads_path) if ads_path else default_catalogue(config, "ads")
    if users_path is None:
        users_path = default_catalogue(config, "users")
        users_path = users_path if users_path.is_file() else None
    users_path = Path(users_path) if users_path else None
    inputs = [trained.workdir, ads_path, users_path]
    check_replaceable(out, "multitower-export", inputs)  # before running the towers over the catalogue
    num_ads = _open(ads_path, ["ad_id", "bid", *(f"ad.{f.name}" for f in trained.spec.ad.features)],
                    "ad").metadata.num_rows
    if num_ads == 0:
        raise CatalogueError(f"{ads_path}: the ads catalogue has no rows; an index of no ads cannot rank anything")
    D = trained.embed_dim
    manifest: dict[str, Any] = {
        "kind": "multitower-export", "format": 1, "fingerprint": trained.fingerprint, "embed_dim": D,
        "query_rule": query_rule(config.loss.l2_normalize), "model_step": trained.step, "run": trained.identity,
        "workdir": str(trained.workdir), "ads_catalogue": str(ads_path.absolute()),
        "users_catalogue": str(users_path.absolute()) if users_path else None,
        "targeting_attributes": {a: c for a, (c, _) in targeting_lib.ATTRIBUTES.items()},
    }

    def write(tmp: Path) -> None:
        def mm(name, dtype, shape):
            return np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)

        ads = {"ids": mm("ad_ids", np.int64, (num_ads,)), "embeddings": mm("embeddings", np.float32, (num_ads, D)),
               "bid": mm("bid", np.float32, (num_ads,)), "quality": mm("quality", np.float32, (num_ads,)),
               "targeting": mm("targeting", np.uint64, (num_ads, targeting_lib.NUM_WORDS))}
        _embed_catalogue(trained, ads_path, "ad", "ad_id", batch_size, _ad_extras, ads, "export ads")
        _check_ids(ads["ids"], ads_path, "ad_id")
        from multitower_jax.serving.scorer import write_ad_parts  # the factorized scorer's per-ad share, a W_a

        manifest["fusion_ad_part"] = write_ad_parts(trained, ads["embeddings"], tmp)
        manifest["num_ads"] = num_ads
        manifest["num_users"] = 0
        if users_path is not None:
            num_users = _open(users_path, ["user_id"], "user").metadata.num_rows
            users = {"ids": mm("user_ids", np.int64, (num_users,)),
                     "embeddings": mm("user_embeddings", np.float32, (num_users, D))}
            _embed_catalogue(trained, users_path, "user", "user_id", batch_size, lambda *a: {}, users,
                             "export users")
            manifest["num_users"] = num_users
        for arrays in (ads, *([users] if users_path is not None else [])):
            for a in arrays.values():
                a.flush()
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))

    atomic_dir(Path(out), write, kind="multitower-export", inputs=inputs)
    return manifest
