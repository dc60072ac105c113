"""Large embedding tables on the SparseCores (``sharding.large_table_placement = "sparsecore"``).

The SparseCores of a v5p (4 per chip) or v6e (2 per chip) look embedding rows up and apply an
optimizer to them next to the TensorCores, from tables sharded over every SparseCore of the
slice. jax-tpu-embedding drives them: its lookup (`tpu_sparse_dense_matmul`) and its backward
(`tpu_sparse_dense_matmul_grad`, which applies the optimizer to the looked-up rows inside the
SparseCore program: the table's gradient never exists), from CSR-like buffers its C++ input
preprocessing builds on the host for every chip and SparseCore.

The train step here is `train.batch_rows`'s with the SparseCores in it:

1. per id feature that a large table reads, the step's *slots* are, per chip, id 0 (the OOV /
   padding row), every id of the chip's rows of the batch (every placement's) in order, and
   padding up to a multiple of 8 per SparseCore; a slot the model never reads (padding, an id
   0 past the first) holds an id spread over the shards instead, of weight 0 (`_slots`):
   ``chips * slots_per_chip`` ids, which the host preprocesses for the SparseCores
   (`host_inputs`) and the step builds again on the device (`slot_ids`);
2. the large tables' rows for the slots are looked up (SparseCore's lookup, or `jnp.take`), a
   smaller table reading the same feature (the wide part's) takes its rows for them, and the
   model runs on those rows, ``[chips, slots_per_chip, dim]``, with each id replaced by its
   slot on its chip (0 stays 0: `relabel`): every chip reads and differentiates its own rows
   (`layers.Embed`), no rows cross chips;
3. the gradient with respect to a large table's slots goes, scaled by the one global clipping
   factor, to SparseCore's Adagrad (`update`), which sums each row's slots' gradients and
   updates the row; the rest go through optax. The global norm counts each slot's gradient on
   its own (summing a row's slots across chips first, as the plain step's table gradient does,
   would move every slot's gradient between the chips): an id repeated in a batch weighs less
   in it than in the plain step's, so the step clips a little less often.

The tables live in the SparseCores' MOD-sharded row order: natural row ``i`` is row
``(i % G) * (rows // G) + i // G`` of the stored table, with G SparseCores in all (`mod_rows`).
The train state stores them so (and records G: a checkpoint cannot be continued on another
count); everything else (evaluation, the best checkpoint, export, serving) reads the natural
order (`Trainer.model_params`).

``sharding.sparsecore_kernel = "reference"`` runs the same steps with XLA's gather and an
Adagrad of the looked-up rows (their gradients summed per row first, as SparseCore does), on
any backend: a CPU test checks it against the plain step with ``optim.large_table_optimizer =
"adagrad"`` (without clipping); ``"tpu"`` only runs (and compiles: `multitower compile`) on a
TPU with SparseCores.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from multitower_jax import features as F
from multitower_jax.data import fake
from multitower_jax.model_settings import on_sparsecore
from multitower_jax.train import optim
from multitower_jax.train.batch_rows import BatchRows, FeatureKey, Path, copy_dicts
from multitower_jax.train.optim import param_names
from multitower_jax.train.sharding import BATCH_AXES

SPARSECORE = "sparsecore"  # the train batch's entry of preprocessed inputs; the state's of accumulators


def mod_rows(ids: jax.Array, rows: int, shards: int) -> jax.Array:
    """Where natural row `ids` of a `rows`-row table lies in its MOD-sharded order over `shards`."""
    return (ids % shards) * (rows // shards) + ids // shards


def mod_order(table: jax.Array, shards: int) -> jax.Array:
    """A [rows, dim] table in natural row order -> the SparseCores' MOD-sharded order."""
    rows, dim = table.shape
    return table.reshape(rows // shards, shards, dim).swapaxes(0, 1).reshape(rows, dim)


def natural_order(table: jax.Array, shards: int) -> jax.Array:
    """The inverse of `mod_order`."""
    rows, dim = table.shape
    return table.reshape(shards, rows // shards, dim).swapaxes(0, 1).reshape(rows, dim)


def _tpu_embedding():
    """jax-tpu-embedding's modules (``pip install -e '.[tpu]'``), or a clear error."""
    try:
        from jax_tpu_embedding.sparsecore.lib.nn import embedding, embedding_spec  # noqa: PLC0415
        from jax_tpu_embedding.sparsecore.utils import utils  # noqa: PLC0415
    except ImportError as e:
        raise RuntimeError("sharding.sparsecore_kernel='tpu' needs jax-tpu-embedding: pip install -e '.[tpu]' "
                           "(or set sharding.sparsecore_kernel='reference')") from e
    return embedding, embedding_spec, utils


class SparseCoreTables:
    """The large id tables of a run placed on the SparseCores, and the train step's parts for them.

    `params`: the model's parameters (arrays or shapes, raw or boxed); `large`: the paths of the
    tables of at least ``optim.large_table_bytes`` (`optim.large_table_paths`). The ones that
    look up one id feature are placed (a large token table stays a TensorCore one)."""

    def __init__(self, config: ml_collections.ConfigDict, params: Any, spec: F.FeatureSpec,
                 large: frozenset[Path], mesh: Mesh):
        placements = tuple(config.data.placements)
        self.view_of = BatchRows(params, spec, placements, large)
        self.paths = self.view_of.large
        if not self.paths:
            raise ValueError("sharding.large_table_placement='sparsecore': optim.large_table_bytes="
                             f"{config.optim.large_table_bytes} selects no table of an id feature")
        self.mesh, self.chips = mesh, int(mesh.devices.size)
        self.kernel = str(config.sharding.get("sparsecore_kernel", "tpu"))
        if self.kernel == "tpu":
            self.per_chip = _tpu_embedding()[2].num_sparsecores_per_device(mesh.devices.flat[0])
        else:
            self.per_chip = int(config.sharding.get("sparsecores_per_chip", 4))
        self.shards = self.chips * self.per_chip
        self.shapes = {path: tuple(_get(params, path).shape) for path in self.paths}
        for path, (rows, _) in self.shapes.items():
            if rows % (8 * self.shards):
                raise ValueError(f"sharding.large_table_placement='sparsecore': table {'/'.join(path)} has {rows} "
                                 f"rows, not a multiple of 8 x {self.shards} SparseCores (pad it with "
                                 f"model.vocab_multiple={8 * self.shards})")
        self.max_ids_per_partition = int(config.sharding.get("sparsecore_max_ids_per_partition", 0) or 0)
        self.max_ids_seen = 0  # the most ids one SparseCore sent to one shard in a step, so far (`host_inputs`)
        self.learning_rate = optim.rowwise_schedule(config)
        self.initial_accumulator = float(config.optim.get("rowwise_initial_accumulator", 0.1))
        rows_per_chip = int(config.data.batch_size) // self.chips
        # Per feature: the leading 0 and the ids of one chip's rows (all placements), then padding
        # to a multiple of 8 per SparseCore (each takes an equal share of the chip's slots).
        self.used_slots_per_chip = {key: 1 + rows_per_chip * sum(
            math.prod(fake.random_batch(spec, p, 1, seed=0)[key[1]][key[2]].shape[1:]) for p in self._holders(key))
            for key in self.features()}
        align = 8 * self.per_chip
        self.slots_per_chip = {key: -(-used // align) * align for key, used in self.used_slots_per_chip.items()}
        if self.kernel == "tpu":
            self.feature_specs = self._feature_specs()

    def features(self) -> list[FeatureKey]:
        """The id features the placed tables look up, in a fixed order."""
        return list(dict.fromkeys(self.view_of.readers[path] for path in sorted(self.paths)))

    def _holders(self, key: FeatureKey) -> tuple[str, ...]:
        return (key[0],) if key[0] else self.view_of.placements

    # -- the slots: per chip, 0 and then the chip's ids -----------------------------------------

    def slot_ids(self, batches: Mapping[str, Any], key: FeatureKey) -> jax.Array:
        """int32[chips * slots_per_chip]: the slots' ids (`_slots`) of the global batch."""
        return self._slots(jnp, [ids for _, ids in self.view_of.feature_ids(batches, key)], key, self.chips)[0].ravel()

    def host_slots(self, batches: Mapping[str, Any], key: FeatureKey, local_chips: int) -> tuple[np.ndarray, np.ndarray]:
        """The slots' ids and which ones the model reads (`_slots`, numpy) of this process's batches,
        for its `local_chips` chips."""
        parts = [np.asarray(batches[p][key[1]][key[2]], np.int32) for p in self._holders(key)]
        return self._slots(np, parts, key, local_chips)

    def _slots(self, xp, parts: list, key: FeatureKey, chips: int):
        """(ids, read), ``[chips, slots_per_chip]`` (`xp`: numpy or jax.numpy): per chip, id 0, its
        rows' ids of each part in turn, then padding. The slots the model never reads (an id 0 past
        the first slot: a multi-hot feature's padding, the padding) hold ids 0, 1, 2, ... mod the
        shard count in turn instead, so they spread evenly over the shards (in one shard, they
        would count against ``sharding.sparsecore_max_ids_per_partition`` there); the SparseCores
        give them weight 0."""
        pad = self.slots_per_chip[key] - self.used_slots_per_chip[key]
        ids = xp.concatenate([xp.zeros((chips, 1), xp.int32), *[p.reshape(chips, -1) for p in parts],
                              xp.zeros((chips, pad), xp.int32)], axis=1)
        read = (ids != 0) | (xp.arange(ids.shape[1]) == 0)[None, :]
        turn = xp.cumsum(~read, axis=1, dtype=xp.int32) - 1  # each unread slot's rank on its chip
        return xp.where(read, ids, turn % self.shards), read

    def relabel(self, batches: Mapping[str, Any]) -> dict[str, Any]:
        """`batches` with every placed feature's ids replaced by their slots on their chip (id 0
        by slot 0, which holds id 0 on every chip)."""
        new = copy_dicts(batches)
        for key in self.features():
            offset = 1
            for p, ids in self.view_of.feature_ids(batches, key):
                per_chip = ids.reshape(self.chips, -1)
                slots = offset + jnp.arange(per_chip.shape[1], dtype=jnp.int32)[None, :]
                new[p][key[1]][key[2]] = jnp.where(per_chip == 0, 0, slots).reshape(ids.shape)
                offset += per_chip.shape[1]
        return new

    def view(self, params: Any, batches: Mapping[str, Any], inputs: Any) -> tuple[Any, dict[str, Any], dict[Path, jax.Array]]:
        """(the parameters with every reader table of a placed feature replaced by its rows for the
        slots, ``[chips, slots_per_chip, dim]``, the relabelled batches, {reader table path: its
        slot ids})."""
        ids = {key: self.slot_ids(batches, key) for key in self.features()}
        slots = {path: ids[key] for path, key in self.view_of.readers.items()}
        looked_up = self.lookup(params, inputs, ids)

        def rows_of(path, table):
            path = param_names(path)
            found = slots.get(path)
            if found is None:
                return table
            # (a small table may have fewer rows than a padding slot's id: clipped, never read)
            rows = looked_up[path] if path in looked_up else jnp.take(table, found, axis=0, mode="clip")
            return rows.reshape(self.chips, -1, rows.shape[-1])

        return jax.tree_util.tree_map_with_path(rows_of, params), self.relabel(batches), slots

    # -- the SparseCores' part: lookup and Adagrad -----------------------------------------------

    def lookup(self, params: Any, inputs: Any, ids: Mapping[FeatureKey, jax.Array]) -> dict[Path, jax.Array]:
        """{placed table path: its rows for the slots, [chips * slots_per_chip, dim]}."""
        if self.kernel == "reference":
            return {path: jnp.take(_get(params, path), mod_rows(ids[self.view_of.readers[path]],
                                                                self.shapes[path][0], self.shards), axis=0)
                    for path in self.paths}
        embedding = _tpu_embedding()[0]
        tables = {_name(path): embedding.EmbeddingVariables(table=_get(params, path), slot=())
                  for path in self.paths}
        run = functools.partial(embedding.tpu_sparse_dense_matmul, feature_specs=self.feature_specs,
                                global_device_count=self.chips, num_sc_per_device=self.per_chip,
                                sharding_strategy="MOD")
        out = self._shard_map(run, 2)(inputs, tables)
        return {path: out[_name(path)] for path in self.paths}

    def _row_sums(self, path: Path, grad: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(the distinct stored rows of `ids`, padded past the table's end; their summed gradients)."""
        size = self.shapes[path][0]
        stored = mod_rows(ids, size, self.shards)
        rows, where = jnp.unique(stored, size=stored.size, fill_value=size, return_inverse=True)
        grad = grad.reshape(stored.size, -1).astype(jnp.float32)
        return rows, jax.ops.segment_sum(grad, where.ravel(), num_segments=stored.size)

    def update(self, params: Any, accumulators: Any, inputs: Any, grads: Any, ids: Mapping[Path, jax.Array],
               step: jax.Array) -> tuple[dict[Path, jax.Array], Any]:
        """Adagrad on the placed tables' rows, from their slots' (clipped) gradients in `grads`:
        ({path: new table}, the new `accumulators`); rows outside the batch keep their values bit
        for bit."""
        if self.kernel == "reference":
            lr = self.learning_rate(step)
            tables, sums = {}, {}
            for path in self.paths:
                table, acc = _get(params, path), _get(accumulators, path)
                rows, g = self._row_sums(path, _get(grads, path), ids[path])
                a = jnp.take(acc, rows, axis=0, mode="fill", fill_value=1.0) + jnp.square(g)
                p = jnp.take(table, rows, axis=0, mode="fill", fill_value=0.0) - lr * g / jnp.sqrt(a)
                tables[path] = table.at[rows].set(p.astype(table.dtype), mode="drop")
                sums[path] = acc.at[rows].set(a, mode="drop")
            return tables, replace_paths(accumulators, sums)
        embedding = _tpu_embedding()[0]
        variables = {_name(path): embedding.EmbeddingVariables(
            table=_get(params, path), slot=(_get(accumulators, path),)) for path in self.paths}
        run = functools.partial(embedding.tpu_sparse_dense_matmul_grad, feature_specs=self.feature_specs,
                                global_device_count=self.chips, num_sc_per_device=self.per_chip,
                                sharding_strategy="MOD", step=step)
        grads = {_name(path): _get(grads, path).reshape(-1, self.shapes[path][1]) for path in self.paths}
        out = self._shard_map(run, 3)(grads, inputs, variables)
        return ({path: out[_name(path)].table for path in self.paths},
                replace_paths(accumulators, {path: out[_name(path)].slot[0] for path in self.paths}))

    @staticmethod
    def apply_updates(params: Any, updates: Any, tables: Mapping[Path, jax.Array]) -> Any:
        """`optax.apply_updates`, except that each table in `tables` (the placed ones, updated by
        `update`) is replaced by its new value."""
        def apply(path, p, u):
            found = tables.get(param_names(path))
            return optax.apply_updates(p, u) if found is None else found

        return jax.tree_util.tree_map_with_path(apply, params, updates)

    def _shard_map(self, fn, num_args: int):
        return jax.shard_map(fn, mesh=self.mesh, in_specs=(P(BATCH_AXES),) * num_args, out_specs=P(BATCH_AXES),
                             check_vma=False)

    # -- the host's part: jax-tpu-embedding's input preprocessing ----------------------------------

    def _feature_specs(self) -> dict[str, Any]:
        """One jax-tpu-embedding feature per placed table: one id per slot, summed (no combining)."""
        embedding, embedding_spec, _ = _tpu_embedding()
        specs = {}
        for path in sorted(self.paths):
            key, (rows, dim) = self.view_of.readers[path], self.shapes[path]
            slots = self.slots_per_chip[key]
            # Ids one SparseCore may send to one partition (another SparseCore's shard): at most
            # all of its slots, unless the config says fewer (the SparseCore programs are sized by
            # it; a batch over it is an error, never dropped ids: allow_id_dropping=False).
            limit = self.max_ids_per_partition or slots // self.per_chip
            table = embedding_spec.TableSpec(
                vocabulary_size=rows, embedding_dim=dim, initializer=jax.nn.initializers.zeros,
                optimizer=embedding_spec.AdagradOptimizerSpec(learning_rate=self.learning_rate,
                                                              initial_accumulator_value=self.initial_accumulator),
                combiner="sum", name=_name(path), max_ids_per_partition=limit, max_unique_ids_per_partition=limit)
            specs[_name(path)] = embedding_spec.FeatureSpec(
                table_spec=table, input_shape=(self.chips * slots, 1), output_shape=(self.chips * slots, dim),
                name=_name(path))
        embedding.prepare_feature_specs_for_training(specs, global_device_count=self.chips,
                                                     num_sc_per_device=self.per_chip)
        for name, feature in specs.items():
            stacked = feature.table_spec.stacked_table_spec
            if (stacked.stack_vocab_size, stacked.stack_embedding_dim) != self.shapes[_path(name)]:
                raise ValueError(f"SparseCore table {name}: jax-tpu-embedding wants it "
                                 f"{stacked.stack_vocab_size} x {stacked.stack_embedding_dim}, the model's is "
                                 f"{self.shapes[_path(name)]}")
        return specs

    def host_inputs(self, batches: Mapping[str, Any]) -> Any:
        """This process's batches -> the SparseCores' preprocessed inputs (None with the reference
        kernel), to send with the batch under `SPARSECORE` (`sharding.shard_batch`). One id per
        slot, of weight 0 in the slots the model never reads. With either kernel, the ids per shard are counted
        (`max_ids_seen`) and checked against the bound."""
        local = int(self.mesh.local_mesh.size)
        features, weights = {}, {}
        for path in sorted(self.paths):
            key = self.view_of.readers[path]
            slots, read = self.host_slots(batches, key, local)
            self._count_ids_per_shard(_name(path), slots)
            features[_name(path)] = slots.reshape(-1, 1)
            weights[_name(path)] = read.astype(np.float32).reshape(-1, 1)
        if self.kernel == "reference":
            return None
        inputs, _ = _tpu_embedding()[0].preprocess_sparse_dense_matmul_input(
            features, weights, self.feature_specs, local_device_count=local, global_device_count=self.chips,
            num_sc_per_device=self.per_chip, sharding_strategy="MOD", allow_id_dropping=False)
        return inputs

    def _count_ids_per_shard(self, name: str, slots: np.ndarray) -> None:
        """Note the most ids one SparseCore's share of a chip's `slots` ([chips, slots]) sends to
        one shard (`max_ids_seen`, what ``sharding.sparsecore_max_ids_per_partition`` bounds), and
        stop with a clear error over the bound, where jax-tpu-embedding's preprocessing would
        abort the process."""
        chips, per_sc = slots.shape[0], slots.shape[1] // self.per_chip
        sparsecore = np.arange(chips * self.per_chip).repeat(per_sc)  # each slot's SparseCore, in order
        counts = np.bincount(sparsecore * self.shards + slots.ravel() % self.shards,
                             minlength=chips * self.per_chip * self.shards)
        most = int(counts.max())
        self.max_ids_seen = max(self.max_ids_seen, most)
        if self.max_ids_per_partition and most > self.max_ids_per_partition:
            where = int(counts.argmax())
            raise ValueError(
                f"SparseCore table {name}: {most} ids of one SparseCore's share of the batch (chip "
                f"{where // self.shards // self.per_chip}, SparseCore {where // self.shards % self.per_chip}) fall in one "
                f"shard ({where % self.shards} of {self.shards}), more than sharding.sparsecore_max_ids_per_partition="
                f"{self.max_ids_per_partition}: raise it (0 takes every id a SparseCore holds)")

    def abstract_inputs(self) -> Any:
        """ShapeDtypeStructs of the global `host_inputs` (to compile the train step ahead of time)."""
        if self.kernel == "reference":
            return None
        embedding = _tpu_embedding()[0]
        shapes = embedding.eval_preprocess_sparse_dense_matmul_input_shape(
            self.feature_specs, local_device_count=self.chips, global_device_count=self.chips,
            num_sc_per_device=self.per_chip)
        sharding = NamedSharding(self.mesh, P(BATCH_AXES))
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)

    # -- the state ------------------------------------------------------------------------------

    def stored(self, params: Any) -> Any:
        """`params` (raw or boxed) with the placed tables in MOD-sharded order."""
        return _map_paths(params, self.paths, lambda t: mod_order(t, self.shards))

    def natural(self, params: Any) -> Any:
        """`params` with the placed tables back in natural order (`stored`'s inverse)."""
        return _map_paths(params, self.paths, lambda t: natural_order(t, self.shards))

    def init_state(self, params: Any) -> dict[str, Any]:
        """The state's `SPARSECORE` entry for (boxed) `params`: every placed table's Adagrad
        accumulator (its shape and logical axes, so it is sharded with it) and the SparseCore count."""
        accumulators: dict[str, Any] = {}
        for path in self.paths:
            node = accumulators
            for name in path[:-1]:
                node = node.setdefault(name, {})
            node[path[-1]] = jax.tree.map(lambda t: jnp.full(t.shape, self.initial_accumulator, jnp.float32),
                                          _get(params, path, boxed=True))
        return {"accumulators": accumulators, "shards": jnp.asarray(self.shards, jnp.int32)}

    def check_restored(self, state: Mapping[str, Any]) -> None:
        """A restored state's tables must be in this run's MOD order."""
        saved = int(state[SPARSECORE]["shards"])
        if saved != self.shards:
            raise ValueError(f"the checkpoint's SparseCore tables are sharded over {saved} SparseCores, this run's "
                             f"over {self.shards} ({self.chips} chips x {self.per_chip}): their row order differs, "
                             "so it cannot be continued here (evaluate or export it on its own topology)")


def _name(path: Path) -> str:
    return "/".join(path)


def _path(name: str) -> Path:
    return tuple(name.split("/"))


def _get(tree: Any, path: Path, boxed: bool = False) -> Any:
    for name in path:
        tree = tree[name]
    return tree if boxed else getattr(tree, "value", tree)


def replace_paths(tree: Any, values: Mapping[Path, Any]) -> Any:
    """`tree` with the leaves at the `values`' paths replaced by them."""
    return jax.tree_util.tree_map_with_path(lambda path, leaf: values.get(param_names(path), leaf), tree)


def _map_paths(params: Any, paths: frozenset[Path], fn) -> Any:
    """`params` with `fn` applied to the arrays at `paths` (inside their boxes, if boxed)."""
    def apply(path, leaf):
        if param_names(path) not in paths:
            return leaf
        return leaf.replace_boxed(fn(leaf.value)) if hasattr(leaf, "replace_boxed") else fn(leaf)

    return jax.tree_util.tree_map_with_path(apply, params, is_leaf=lambda x: hasattr(x, "replace_boxed"))


def from_config(config: ml_collections.ConfigDict, params: Any, spec: F.FeatureSpec, mesh: Mesh) -> SparseCoreTables | None:
    """The `SparseCoreTables` of a run with ``sharding.large_table_placement = "sparsecore"``, or None."""
    if not on_sparsecore(config):
        return None
    large = optim.large_table_paths(params, int(config.optim.large_table_bytes))
    return SparseCoreTables(config, params, spec, large, mesh)
