"""Large embedding tables seen through the rows a batch looks up (``optim.sparse_row_updates``).

With row-wise Adagrad on the large tables (`optim.rowwise_adagrad`), the plain train step
differentiates the model with respect to each whole table: the gradient is a table-sized
scatter-add of the batch's row gradients into zeros, and the optimizer then reads and writes
every row of the table and its accumulator, although only the batch's rows change. Here the
train step instead

1. collects, per id feature that a large table reads, the batch's distinct ids (plus id 0, the
   OOV / padding row, always first): ``rows``, a fixed number of slots (one per id in the
   batch, so it compiles once), the unused ones past the table's end;
2. runs the model on a *view*: every table reading such a feature replaced by its ``rows``
   (``[slots, dim]``, looked up in the whole table; the model's `layers.Embed` takes them from
   the `layers.BATCH_ROWS` collection, `variables`) and the batch's ids by their positions in
   ``rows``, so the model sees the same embeddings;
3. differentiates with respect to the view: the large tables' gradients are ``[slots, dim]``.
   Row-wise Adagrad updates those rows and their accumulators only (`optim.rowwise_adagrad`,
   its ``rows`` argument), and `apply_updates` writes them back; other tables reading the same
   feature get their usual table-sized gradient back (`dense_gradients`).

The result equals the plain step's: the ids' positions are a one-to-one relabelling (equality,
``id > 0`` and the OOV row 0 are kept), a row outside the batch gets a zero gradient there and
keeps its parameters and accumulator bit for bit here, and the global gradient norm is the same
sum of squares. Only tables that look up one categorical or multi-hot feature (the towers'
``embed_<feature>`` and the wide part's ``wide_<feature>``) are seen this way; a large token
table (read by a text encoder) keeps the plain update.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from multitower_jax import features as F
from multitower_jax.model_settings import updates_batch_rows
from multitower_jax.models.layers import BATCH_ROWS
from multitower_jax.train import optim
from multitower_jax.train.optim import param_names

Path = tuple[str, ...]
FeatureKey = tuple[str, str, str]  # (placement or "", batch section, feature name)

# A slot of ``rows`` past the ids of the batch: larger than any table's row count, so a lookup
# fills it with zeros and a write-back drops it.
UNUSED_ROW = jnp.iinfo(jnp.int32).max


def table_feature(path: Path, spec: F.FeatureSpec, placements: tuple[str, ...]) -> FeatureKey | None:
    """The id feature an embedding table at `path` looks up, or None (a token table, or a table
    this module does not know). The user and ad towers are shared by the placements: their
    features' key has no placement ("")."""
    if len(path) < 2 or path[-1] != "embedding":
        return None
    module, table = path[0], path[-2]
    if path[1:-2] == ("features",) and table.startswith("embed_"):
        feature = table[len("embed_"):]
        if module in ("user_tower", "ad_tower"):
            section = module[:-len("_tower")]
            return _id_feature(("", section, feature), getattr(spec, section))
        for p in placements:
            if module == f"context_towers_{p}":
                return _id_feature((p, "context", feature), spec.context(p))
    if len(path) == 3 and table.startswith("wide_"):
        for p in placements:
            if module == f"context_wides_{p}":
                return _id_feature((p, "context", table[len("wide_"):]), spec.context(p))
    return None


def _id_feature(key: FeatureKey, tower: F.TowerSpec) -> FeatureKey | None:
    found = [f for f in tower.features if f.name == key[2]]
    return key if found and isinstance(found[0], F.Categorical | F.MultiHot) else None


class BatchRows:
    """Which tables the train step sees through the batch's rows, and the three steps to do so.

    `params`: the model's parameters (arrays or shapes, raw or boxed); `large`: the paths of the
    tables row-wise Adagrad updates (`optim.large_table_paths`). A feature is seen through its
    rows when a large table looks it up; every table looking it up is then part of the view."""

    def __init__(self, params: Any, spec: F.FeatureSpec, placements: tuple[str, ...], large: frozenset[Path]):
        self.placements = tuple(placements)
        tables: dict[Path, FeatureKey] = {}
        for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
            key = table_feature(param_names(path), spec, self.placements)
            if key is not None:
                tables[param_names(path)] = key
        seen = {key for path, key in tables.items() if path in large}
        self.readers: dict[Path, FeatureKey] = {path: key for path, key in tables.items() if key in seen}
        self.large = frozenset(path for path in self.readers if path in large)

    def __bool__(self) -> bool:
        return bool(self.readers)

    def feature_ids(self, batches: Mapping[str, Any], key: FeatureKey) -> list[tuple[str, jax.Array]]:
        """(placement, ids) of every placement's batch that holds the feature."""
        placement, section, feature = key
        chosen = (placement,) if placement else self.placements
        return [(p, jnp.asarray(batches[p][section][feature]).astype(jnp.int32)) for p in chosen]

    def view(self, params: Any, batches: Mapping[str, Any]) -> tuple[Any, dict[str, Any], dict[Path, jax.Array]]:
        """(the parameters with every reader table replaced by its batch rows, the batches with
        those features' ids replaced by their positions in the rows, {table path: rows})."""
        by_feature: dict[FeatureKey, jax.Array] = {}
        new_batches = copy_dicts(batches)
        for key in dict.fromkeys(self.readers.values()):
            parts = self.feature_ids(batches, key)
            flat = jnp.concatenate([jnp.zeros((1,), jnp.int32)] + [ids.ravel() for _, ids in parts])
            rows, positions = jnp.unique(flat, size=flat.size, fill_value=UNUSED_ROW, return_inverse=True)
            positions = positions.ravel()[1:].astype(jnp.int32)
            start = 0
            for p, ids in parts:
                new_batches[p][key[1]][key[2]] = positions[start:start + ids.size].reshape(ids.shape)
                start += ids.size
            by_feature[key] = rows
        rows = {path: by_feature[key] for path, key in self.readers.items()}

        def look_up(path, table):
            found = rows.get(param_names(path))
            return table if found is None else jnp.take(table, found, axis=0, mode="fill", fill_value=0)

        return jax.tree_util.tree_map_with_path(look_up, params), new_batches, rows

    def variables(self, view: Any) -> dict[str, Any]:
        """The model's variables for a `view`: its reader tables in the `BATCH_ROWS` collection,
        the rest as the parameters."""
        params, rows = copy_dicts(view), {}
        for path in self.readers:
            node, into = params, rows
            for key in path[:-1]:
                node, into = node[key], into.setdefault(key, {})
            into[path[-1]] = node.pop(path[-1])
        return {"params": params, BATCH_ROWS: rows}

    def dense_gradients(self, grads: Any, params: Any, rows: Mapping[Path, jax.Array]) -> Any:
        """`grads` of the view with each reader table that is not large given its table-sized
        gradient (its rows' gradients scattered into zeros), as the plain step has it."""
        def densify(path, g, table):
            path = param_names(path)
            if path not in self.readers or path in self.large:
                return g
            g = g.reshape(rows[path].shape + table.shape[1:])  # (per chip rows: `train.sparsecore`)
            return jnp.zeros(table.shape, g.dtype).at[rows[path]].add(g, mode="drop")

        return jax.tree_util.tree_map_with_path(densify, grads, params)

    def large_rows(self, rows: Mapping[Path, jax.Array]) -> dict[Path, jax.Array]:
        """The rows of the large tables: what row-wise Adagrad's update takes."""
        return {path: r for path, r in rows.items() if path in self.large}

    @staticmethod
    def apply_updates(params: Any, updates: Any, rows: Mapping[Path, jax.Array]) -> Any:
        """`optax.apply_updates`, with the ``[slots, dim]`` update of each table in `rows` (the
        large tables', `large_rows`) added to its rows."""
        def apply(path, p, u):
            found = rows.get(param_names(path))
            if found is None:
                return optax.apply_updates(p, u)
            return p.at[found].add(u.astype(p.dtype), mode="drop")

        return jax.tree_util.tree_map_with_path(apply, params, updates)


def copy_dicts(tree: Any) -> Any:
    """A copy of the nested dicts of `tree` (the arrays are shared)."""
    return {k: copy_dicts(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def from_config(config: ml_collections.ConfigDict, params: Any, spec: F.FeatureSpec) -> BatchRows | None:
    """The `BatchRows` of a run whose large tables take row-wise Adagrad with
    ``optim.sparse_row_updates`` (the default), or None (the plain step)."""
    if not updates_batch_rows(config.optim):
        return None
    large = optim.large_table_paths(params, int(config.optim.large_table_bytes))
    rows = BatchRows(params, spec, tuple(config.data.placements), large)
    return rows or None
