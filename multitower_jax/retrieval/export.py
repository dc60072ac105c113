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
import pyarrow.parquet as pq
from tqdm import tqdm

from multitower_jax.data.catalogue_columns import CatalogueError, read_column
from multitower_jax.retrieval import targeting as targeting_lib
from multitower_jax.retrieval.index import MANIFEST, atomic_dir, check_replaceable, query_rule
from multitower_jax.retrieval.settings import RetrievalSettings
from multitower_jax.serving.scorer import write_ad_parts

CATALOGUE_DIR = "catalogue"


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
            feats = {f.name: _padded(transforms[f.name](read_column(batch, f"{tower}.{f.name}", f, done, path)),
                                     batch_size)
                     for f in spec.features}
            e_BxD = embed(feats)  # async: the next batch is read while this one runs
            if pending is not None:
                _write(arrays, *pending)
            rows = slice(done, done + n)
            arrays["ids"][rows] = read_column(batch, id_col, np.int64, done, path)
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
    quality = (read_column(batch, "quality", np.float32, first_row, path) if "quality" in names
               else np.ones(batch.num_rows, np.float32))
    return {"bid": read_column(batch, "bid", np.float32, first_row, path), "quality": quality,
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
