"""The `Trainer`: everything a run needs, built once: model, optimizer, mesh, shardings, jitted functions.

One jitted train step with explicit shardings and donated state, compiled once; the step RNG is
``fold_in(rng, step)``. Checkpoints hold the train state (params, optimizer, step, rng) and
the grain iterator state of every data shard, so a resumed run sees exactly the batches an
uninterrupted one would, on the same or a different number of processes (same ``data.num_shards``).
The loop that drives it, `multitower train`, is `train.loop`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath

from multitower_jax import config as config_lib
from multitower_jax import features as F
from multitower_jax import workdir as workdir_lib
from multitower_jax.calibration import evaluation as calibration_evaluation
from multitower_jax.data import pipeline
from multitower_jax.models import model as model_lib
from multitower_jax.train import batch_rows, evaluate, losses, optim, sharding, sparsecore, text_init, wide_init
from multitower_jax.train.checkpoint_fallback import CheckpointError, CorruptCheckpointWarning, newest_intact
from multitower_jax.train.data_checkpoint import DataRestore, DataSave
from multitower_jax.train.sparsecore import SPARSECORE


class Trainer:
    """Everything a run needs, built once: model, optimizer, mesh, shardings, jitted functions."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path | None, devices: list | None = None):
        """`devices`: the mesh's (default: every device; `multitower compile` passes a TPU
        topology's). With no `workdir` nothing is read from disk: the model, state and step
        functions exist (to compile them ahead of time), but not the data pipeline."""
        self.config = config
        self.workdir = None if workdir is None else epath.Path(workdir)  # a local folder or gs://bucket/...
        self.spec = F.parse_spec(config.features)
        # Every placement trains its own context tower, fusion and heads on its own batches; the
        # user and ad towers are shared. The first placement is the primary one: calibration,
        # export and the flat keys of the evaluation reports are about it.
        self.placements = tuple(config.data.placements)
        self.placement = self.placements[0]
        self.ema_decay = float(config.optim.get("ema_decay", 0.0))
        self.loss_config = losses.LossConfig.from_config(config)
        self.mesh = sharding.make_mesh(config, devices)
        self.model = model_lib.build_model(config, self.spec, self.mesh)
        param_shapes = jax.eval_shape(lambda: model_lib.init_params(self.model, self._key(0))["params"])
        # The large id tables on the SparseCores (`sharding.large_table_placement`), or with
        # (row-wise) Adagrad on them, the step sees them through the batch's rows.
        self.sparsecore = sparsecore.from_config(config, param_shapes, self.spec, self.mesh)
        self.tx = optim.make_optimizer(config, param_shapes, self.sparsecore.paths if self.sparsecore else frozenset())
        self.batch_rows = None if self.sparsecore else batch_rows.from_config(config, param_shapes, self.spec)
        self.rules = sharding.logical_rules(config)
        self.stats = None if workdir is None else pipeline.load_or_compute_stats(config, self.spec, self.workdir)

        boxed = jax.eval_shape(self._init_boxed_state, self._key(0))
        # Shardings, and for the large tables a pinned memory layout (`sharding.pin_large_tables`;
        # SparseCore's own on the SparseCores).
        layout = str(config.sharding.get("large_table_layout", "default"))
        if self.sparsecore is not None and self.sparsecore.kernel == "tpu":
            layout = "sparsecore"
        self.state_shardings = sharding.pin_large_tables(
            sharding.state_shardings(boxed, self.mesh, self.rules, int(config.sharding.get("large_table_bytes", 0) or 0)),
            boxed, layout)
        # With pinned layouts, a state made or restored outside the train step (a checkpoint comes
        # back in the backend's default layout) goes through this identity into the step's formats.
        self._lay_out = (None if layout == "default"
                         else jax.jit(lambda state: state, out_shardings=self.state_shardings))
        if self.sparsecore is not None:  # the placed tables in natural order, sharded as before, any layout
            self._natural = jax.jit(self.sparsecore.natural, out_shardings=jax.tree.map(
                lambda s: getattr(s, "sharding", s), self.state_shardings["params"]))
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), self.state_shardings)
        batch_sharding = sharding.batch_sharding(self.mesh)
        self.train_step = jax.jit(
            self._train_step,
            in_shardings=(self.state_shardings, batch_sharding),
            out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
            donate_argnums=0,
        )
        # Under implicit feedback every row is a positive: the towers are judged by retrieval only.
        self.implicit = config.data.get("feedback", "explicit") == "implicit"
        self.stopping_metric = early_stopping_metric(config)
        with_embeddings = self.implicit or self.stopping_metric in config_lib.RETRIEVAL_METRICS
        self.predict_fns = {p: evaluate.make_predict_fn(self.model, p, self.mesh, with_embeddings)
                            for p in self.placements}
        self.predict = self.predict_fns[self.placement]
        self.restored_from: str | None = None  # what `restore_final` restored: "best" or "checkpoints"

    # -- state and step ---------------------------------------------------------------------

    def _init_boxed_state(self, rng: jax.Array) -> dict[str, Any]:
        """The state with parameters (and their optimizer moments) boxed with logical axis names."""
        init_rng, state_rng = jax.random.split(rng)
        params = model_lib.init_params(self.model, init_rng)["params"]
        if self.sparsecore is not None:  # the SparseCores' tables in their row order, and their accumulators
            params = self.sparsecore.stored(params)
        state = {"step": jnp.zeros((), jnp.int32), "params": params,
                 "opt_state": self.tx.init(params), "rng": jax.random.key_data(state_rng)}
        if self.sparsecore is not None:
            state[SPARSECORE] = self.sparsecore.init_state(params)
        if self.ema_decay:
            state["ema_params"] = params  # same logical axes, so the same shardings
        return state

    def init_state(self) -> dict[str, Any]:
        """The initial state, created directly with its shardings (never materialized whole).
        The starts fitted on the train split (`model.text.init="lsa"`, `model.wide_init="logistic"`)
        need the data: a trainer without a workdir (AOT compiles, benchmarks on random batches)
        starts every parameter at its random initialization."""
        init = jax.jit(lambda rng: nn.unbox(self._init_boxed_state(rng)), out_shardings=self.state_shardings)
        state = init(self._key(int(self.config.seed)))
        with_data = self.workdir is not None
        if with_data and self.config.model.text.get("init", "random") == "lsa":
            state["params"] = self._lsa_token_tables(state["params"])
        if with_data and self.config.model.get("wide_init", "zeros") == "logistic" and self.config.model.head != "ctr":
            state["params"] = self._fitted_wide_cvr(state["params"])
        if self.ema_decay:  # the average starts where the parameters start (its own buffers)
            state["ema_params"] = jax.tree.map(jnp.copy, state["params"])
        return self.laid_out(state)

    def laid_out(self, state: dict[str, Any]) -> dict[str, Any]:
        """`state` in the train step's formats (`sharding.large_table_layout`; as it is without one)."""
        return state if self._lay_out is None else self._lay_out(state)

    def model_params(self, state: dict[str, Any]) -> Any:
        """The parameters a train state stands for: the moving average when the run keeps one
        (``optim.ema_decay``), else the last step's; SparseCore tables in natural row order."""
        params = state.get("ema_params", state["params"])
        return params if self.sparsecore is None else self._natural(params)

    def _fitted_wide_cvr(self, params: Any) -> Any:
        """`params` with each placement's wide CVR column set to a logistic regression of
        conversion given click on its context features, fitted on its train split (`wide_init`)."""
        params = dict(params)
        for p in self.placements:
            name = f"context_wides_{p}"
            params[name] = wide_init.warm_start_cvr(self.config, self.spec, self.stats, p, params[name])
        return params

    def _lsa_token_tables(self, params: Any) -> Any:
        """`params` with every token table warm-started by LSA of the train texts (`text_init`),
        its rows scaled to the norm the table's initialization gives a row."""
        blocks = (block for p in self.placements
                  for block in pipeline.raw_blocks(pipeline.data_source(self.config, p, "train")))
        towers = {name: spec for p in self.placements for name, spec in self.spec.towers(p).items()}
        documents = text_init.tower_documents(blocks, towers)
        vocab_size = max(f.vocab_size for spec in towers.values() for f in spec.of_type("text"))
        fitted: dict[int, tuple[np.ndarray, np.ndarray]] = {}

        def replace(path: tuple, table: jax.Array) -> jax.Array:
            if text_init.TOKEN_TABLE not in [getattr(k, "key", None) for k in path]:
                return table
            dim = table.shape[1]
            if dim not in fitted:
                fitted[dim] = text_init.lsa_token_table(documents, vocab_size, dim, int(self.config.seed))
            lsa_VxD, seen_V = fitted[dim]
            row_norm = np.sqrt(dim) if self.config.model.get("embed_init", "normal") == "normal" else 1.0
            return text_init.warm_start(table, row_norm * lsa_VxD, seen_V)

        return jax.tree_util.tree_map_with_path(replace, params)

    def _key(self, seed: int) -> jax.Array:
        # Dropout draws tens of millions of bits per step; threefry costs seconds per step on a
        # CPU where "rbg" (XLA's RngBitGenerator) costs milliseconds.
        return jax.random.key(seed, impl=self.config.train.rng_impl)

    def shard_batches(self, batches: dict[str, Any]) -> dict[str, Any]:
        """This process's ``{placement: batch}`` (numpy) -> the train step's global batch, with the
        SparseCores' preprocessed inputs when the tables are placed there."""
        out = {p: sharding.shard_batch(b, self.mesh) for p, b in batches.items()}
        inputs = None if self.sparsecore is None else self.sparsecore.host_inputs(batches)
        if inputs is not None:
            out[SPARSECORE] = sharding.shard_batch(inputs, self.mesh)
        return out

    def host_metrics(self) -> dict[str, float]:
        """What the host measured while feeding the steps: with the tables on the SparseCores, the
        most ids one SparseCore has sent to one shard in a step (what
        ``sharding.sparsecore_max_ids_per_partition`` bounds)."""
        return {} if self.sparsecore is None else {"sparsecore_max_ids_per_shard": self.sparsecore.max_ids_seen}

    def placement_batches(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``{placement: batch}`` for every placement; a plain batch is the only placement's."""
        if set(batch) == set(self.placements) and "user" not in batch:
            return batch
        if len(self.placements) == 1:
            return {self.placement: batch}
        raise ValueError(f"a train step needs one batch per placement {list(self.placements)}, got keys {sorted(batch)}")

    def _train_step(self, state: dict[str, Any], batch: dict[str, Any]):
        """One update on ``{placement: batch}`` (or, with one placement, on its plain batch):
        the loss is the mean of the placements' losses."""
        params = state["params"]
        batch = dict(batch)
        inputs = batch.pop(SPARSECORE, None)  # the SparseCores' preprocessed inputs (`host_inputs`)
        batches = self.placement_batches(batch)
        # The model may see some tables through rows and their ids relabelled (`model_batches`); the
        # loss always sees the batch's own ids (the in-batch softmax masks duplicate ads by them).
        view, model_batches, rows = params, batches, None
        views = self.sparsecore.view_of if self.sparsecore is not None else self.batch_rows
        if self.sparsecore is not None:  # the placed tables' rows for the slots, the ids' slots
            view, model_batches, rows = self.sparsecore.view(params, batches, inputs)
        elif self.batch_rows is not None:  # the large tables' batch rows, the ids' positions in them
            view, model_batches, rows = self.batch_rows.view(params, batches)
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"], impl=self.config.train.rng_impl), state["step"])

        def placement_loss(params, placement: str, i: int):
            dropout_rng = rng if i == 0 else jax.random.fold_in(rng, i)  # one placement: as before
            variables = {"params": params} if rows is None else views.variables(params)
            out = self.model.apply(variables, model_batches[placement], placement, train=True,
                                   rngs={"dropout": dropout_rng})
            return losses.total_loss(out, batches[placement], self.loss_config, self.mesh, sharding.BATCH_AXES)

        def loss_fn(params):
            if len(self.placements) == 1:
                return placement_loss(params, self.placement, 0)
            parts = [placement_loss(params, p, i) for i, p in enumerate(self.placements)]
            loss = sum(loss for loss, _ in parts) / len(parts)
            metrics = {f"{p}/{k}": v for p, (_, m) in zip(self.placements, parts) for k, v in m.items()}
            return loss, dict(metrics, loss=loss)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(view)
        new_state = dict(state, step=state["step"] + 1)
        if self.sparsecore is not None:  # optax updates all but the placed tables; the SparseCores those
            grads = views.dense_gradients(grads, params, rows)
            params, new_state["opt_state"], new_state[SPARSECORE], metrics["grad_norm"] = self._sparsecore_update(
                state, grads, inputs, rows)
        elif self.batch_rows is None:
            updates, opt_state = self.tx.update(grads, state["opt_state"], params)
            params = optax.apply_updates(params, updates)
        else:  # the large tables' gradients and updates are their batch rows'
            grads = self.batch_rows.dense_gradients(grads, params, rows)
            large_rows = self.batch_rows.large_rows(rows)
            updates, opt_state = self.tx.update(grads, state["opt_state"], params, rows=large_rows)
            params = self.batch_rows.apply_updates(params, updates, large_rows)
        if self.sparsecore is None:
            metrics["grad_norm"] = optax.global_norm(grads)
            new_state["opt_state"] = opt_state
        new_state["params"] = params
        if self.ema_decay:
            new_state["ema_params"] = optim.ema_update(state["ema_params"], params, self.ema_decay, state["step"])
        return new_state, metrics

    def _sparsecore_update(self, state: dict[str, Any], grads: Any, inputs: Any, slots: Any):
        """(params, opt_state, the SparseCore state, the gradients' global norm) after one update:
        every gradient clipped by the one global norm (the placed tables' per slot), optax on all
        but the placed tables, SparseCore's Adagrad on those."""
        sc, clip_norm = self.sparsecore, float(self.config.optim.clip_norm)
        norm = optax.global_norm(grads)
        if clip_norm > 0:  # optax's clipping, which `self.tx` leaves out here, over every gradient
            grads, _ = optax.clip_by_global_norm(clip_norm).update(grads, optax.EmptyState())
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        tables, accumulators = sc.update(state["params"], state[SPARSECORE]["accumulators"], inputs, grads, slots,
                                         state["step"])
        params = sc.apply_updates(state["params"], updates, tables)
        return params, opt_state, dict(state[SPARSECORE], accumulators=accumulators), norm

    # -- data ---------------------------------------------------------------------------------

    def dataset(self, split: str, train: bool, placement: str | None = None) -> pipeline.Pipeline:
        return pipeline.make_dataset(self.config, self.spec, self.stats, placement=placement or self.placement,
                                     split=split, train=train)

    def train_iterators(self) -> dict[str, Any]:
        """{placement: iterator over its train split}."""
        return {p: iter(self.dataset("train", train=True, placement=p)) for p in self.placements}

    def evaluate(self, params: Any, split: str, predictions_path: str | None = None,
                 calibration: Any = None, placement: str | None = None) -> dict[str, Any]:
        """Metrics per head of one placement (the primary one by default); with a
        `calibration.Calibration`, also ECE and the calibrated metrics."""
        placement = placement or self.placement
        desc = f"evaluate {split}" + (f" ({placement})" if len(self.placements) > 1 else "")
        pred = evaluate.collect(self.predict_fns[placement], params, self.dataset(split, False, placement),
                                self.mesh, desc=desc)
        calibrated = {}
        if calibration is not None:
            calibrated = calibration_evaluation.evaluation_metrics(pred, calibration, self.config)
            pred = {**pred, **calibration_evaluation.calibrated_columns(pred, calibration)}
        if predictions_path:
            evaluate.write_predictions(pred, predictions_path)
        return {**evaluate.report(pred, self.implicit, bool(self.config.loss.l2_normalize)), **calibrated}

    def evaluate_placements(self, params: Any, split: str, predictions_path: str | None = None,
                            calibration: Any = None) -> dict[str, Any]:
        """The primary placement's report; with several placements, also ``placements``: every
        placement's report, and ``mean_<metric>`` over them for the early-stopping metric (what
        early stopping watches; ``mean_ctr_auc`` by default).
        The calibration is the primary placement's, so only its report is calibrated. With
        several placements, `predictions_path` P.parquet becomes one file per placement,
        P.<placement>.parquet."""
        if len(self.placements) == 1:
            return self.evaluate(params, split, predictions_path, calibration)
        reports = {p: self.evaluate(params, split, _placement_path(predictions_path, p),
                                    calibration if p == self.placement else None, placement=p)
                   for p in self.placements}
        metric = self.stopping_metric
        return {**reports[self.placement], "placement": self.placement, "placements": reports,
                f"mean_{metric}": float(np.mean([r[metric] for r in reports.values()]))}

    # -- checkpoints --------------------------------------------------------------------------

    def checkpoint_manager(self) -> ocp.CheckpointManager:
        t = self.config.train
        directory = self.workdir / "checkpoints"
        return ocp.CheckpointManager(
            directory if workdir_lib.is_remote(directory) else directory.absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=int(t.keep_checkpoints), create=True),
        )

    def best_manager(self) -> ocp.CheckpointManager:
        """The parameters of the best validation evaluations so far (the last two kept): what the test
        split is evaluated with at the end, also after a resume."""
        directory = self.workdir / "best"
        return ocp.CheckpointManager(directory if workdir_lib.is_remote(directory) else directory.absolute(),
                                     options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))

    def restore_best(self, best: ocp.CheckpointManager, quarantine: bool = False) -> Any:
        """The newest intact best parameters (an unreadable newer one is skipped with a warning)."""
        return self.restore_best_step(best, quarantine)[0]

    def restore_best_step(self, best: ocp.CheckpointManager, quarantine: bool = False) -> tuple[Any, int]:
        return newest_intact(best, lambda s: best.restore(s, args=ocp.args.StandardRestore(
            self.abstract_state["params"])), quarantine)

    def restore_final(self, step: int | None = None) -> tuple[Any, int]:
        """The parameters a trained workdir stands for, and their step: those of the best
        validation evaluation (`W/best`, what `eval_test.json` reports); with `step`, or when the
        run never evaluated, that checkpoint's or the latest one's."""
        if step is None and (self.workdir / "best").exists():
            best = self.best_manager()
            if best.latest_step() is not None:
                try:
                    params, best_step = self.restore_best_step(best)
                    self.restored_from = "best"
                    return params, best_step
                except CheckpointError as e:  # every best/ copy unreadable: the checkpoints still stand
                    warnings.warn(f"{e}; using {self.workdir / 'checkpoints'} instead", CorruptCheckpointWarning,
                                  stacklevel=2)
        manager = self.checkpoint_manager()
        if manager.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {self.workdir / 'checkpoints'}; run `multitower train` first")
        if step is not None and step not in manager.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.workdir / 'checkpoints'}; "
                                    f"have {sorted(manager.all_steps())}")
        self.restored_from = "checkpoints"
        state = self.restore(manager, step=step)
        return self.model_params(state), int(state["step"])

    def restore_progress(self, manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
        """Early-stopping progress (best validation AUC, evaluations without a gain) as of `step`'s
        checkpoint, so it never runs ahead of the state it is resumed with; {} when the checkpoint
        predates it."""
        if not (epath.Path(manager.directory) / str(step) / "progress").exists():
            return {}
        return manager.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))["progress"]

    def _data_items(self, iterators) -> dict[str, Any]:
        """Checkpoint item name -> train iterator: ``data`` for the primary placement (as with one
        placement), ``data_<placement>`` for the others. A bare iterator is the primary's."""
        if iterators is None:
            return {}
        if not isinstance(iterators, dict):
            iterators = {self.placement: iterators}
        return {("data" if p == self.placement else f"data_{p}"): it for p, it in iterators.items()}

    def restore(self, manager: ocp.CheckpointManager, iterators=None, step: int | None = None,
                quarantine: bool = False):
        """The train state of `step` (default: the newest intact checkpoint: an unreadable newer one
        is skipped with a warning, and with `quarantine` moved out of the way); `iterators` (one, or
        {placement: it}) are moved to their saved positions."""
        args = {"state": ocp.args.StandardRestore(self.abstract_state)}
        args.update({name: DataRestore(it) for name, it in self._data_items(iterators).items()})
        if step is not None:
            state = manager.restore(step, args=ocp.args.Composite(**args))["state"]
        else:
            state, _ = newest_intact(manager, lambda s: manager.restore(s, args=ocp.args.Composite(**args))["state"],
                                     quarantine)
        if self.sparsecore is not None:
            self.sparsecore.check_restored(state)
        return self.laid_out(state)

    def save(self, manager: ocp.CheckpointManager, state, iterators, force: bool = False,
             progress: dict[str, Any] | None = None) -> None:
        step = int(state["step"])
        items = {name: DataSave(it) for name, it in self._data_items(iterators).items()}
        if progress is not None:
            items["progress"] = ocp.args.JsonSave(progress)
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), **items), force=force)


def _placement_path(path: str | None, placement: str) -> str | None:
    """P.parquet -> P.<placement>.parquet."""
    if not path:
        return None
    stem, suffix = os.path.splitext(str(path))
    return f"{stem}.{placement}{suffix}"


def early_stopping_metric(config: ml_collections.ConfigDict) -> str:
    return str(config.train.get("early_stopping_metric", "ctr_auc"))
