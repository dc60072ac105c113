"""`multitower train`: the sharded training loop with evaluation, early stopping and orbax checkpoints.

One jitted train step with explicit shardings and donated state, compiled once; metrics are
read from the device one step late so dispatch stays asynchronous; the step RNG is
``fold_in(rng, step)``. Checkpoints hold the train state (params, optimizer, step, rng) and
the grain iterator state of every data shard, so a resumed run sees exactly the batches an
uninterrupted one would, on the same or a different number of processes (same ``data.num_shards``).
"""

from __future__ import annotations

import json
import os
import signal
import time
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
from jax.experimental import multihost_utils
from tqdm import tqdm

from multitower_jax import calibration as calibration_lib
from multitower_jax import config as config_lib
from multitower_jax import features as F
from multitower_jax import fileio, run_identity
from multitower_jax import workdir as workdir_lib
from multitower_jax.calibration import evaluation as calibration_evaluation
from multitower_jax.data import builders, pipeline
from multitower_jax.data.generate import generate
from multitower_jax.models import model as model_lib
from multitower_jax.train import evaluate, losses, optim, sharding, text_init, wide_init
from multitower_jax.train.checkpoint_fallback import CheckpointError, CorruptCheckpointWarning, newest_intact
from multitower_jax.train.data_checkpoint import DataRestore, DataSave


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
        self.model = model_lib.build_model(config, self.spec)
        self.tx = optim.make_optimizer(config)
        self.ema_decay = float(config.optim.get("ema_decay", 0.0))
        self.loss_config = losses.LossConfig.from_config(config)
        self.mesh = sharding.make_mesh(config, devices)
        self.rules = sharding.logical_rules(config)
        self.stats = None if workdir is None else pipeline.load_or_compute_stats(config, self.spec, self.workdir)

        boxed = jax.eval_shape(self._init_boxed_state, self._key(0))
        self.state_shardings = sharding.state_shardings(boxed, self.mesh, self.rules,
                                                        int(config.sharding.get("large_table_bytes", 0) or 0))
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
        state = {"step": jnp.zeros((), jnp.int32), "params": params,
                 "opt_state": self.tx.init(params), "rng": jax.random.key_data(state_rng)}
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
        return state

    @staticmethod
    def model_params(state: dict[str, Any]) -> Any:
        """The parameters a train state stands for: the moving average when the run keeps one
        (``optim.ema_decay``), else the last step's."""
        return state.get("ema_params", state["params"])

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
        batches = self.placement_batches(batch)
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"], impl=self.config.train.rng_impl), state["step"])

        def placement_loss(params, placement: str, i: int):
            dropout_rng = rng if i == 0 else jax.random.fold_in(rng, i)  # one placement: as before
            out = self.model.apply({"params": params}, batches[placement], placement, train=True,
                                   rngs={"dropout": dropout_rng})
            return losses.total_loss(out, batches[placement], self.loss_config, self.mesh, sharding.BATCH_AXES)

        def loss_fn(params):
            if len(self.placements) == 1:
                return placement_loss(params, self.placement, 0)
            parts = [placement_loss(params, p, i) for i, p in enumerate(self.placements)]
            loss = sum(loss for loss, _ in parts) / len(parts)
            metrics = {f"{p}/{k}": v for p, (_, m) in zip(self.placements, parts) for k, v in m.items()}
            return loss, dict(metrics, loss=loss)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
        if self.ema_decay:
            new_state["ema_params"] = optim.ema_update(state["ema_params"], params, self.ema_decay, state["step"])
        return new_state, metrics

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
            directory if _is_remote(directory) else directory.absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=int(t.keep_checkpoints), create=True),
        )

    def best_manager(self) -> ocp.CheckpointManager:
        """The parameters of the best validation evaluations so far (the last two kept): what the test
        split is evaluated with at the end, also after a resume."""
        directory = self.workdir / "best"
        return ocp.CheckpointManager(directory if _is_remote(directory) else directory.absolute(),
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
            return manager.restore(step, args=ocp.args.Composite(**args))["state"]
        state, _ = newest_intact(manager, lambda s: manager.restore(s, args=ocp.args.Composite(**args))["state"],
                                  quarantine)
        return state

    def save(self, manager: ocp.CheckpointManager, state, iterators, force: bool = False,
             progress: dict[str, Any] | None = None) -> None:
        step = int(state["step"])
        items = {name: DataSave(it) for name, it in self._data_items(iterators).items()}
        if progress is not None:
            items["progress"] = ocp.args.JsonSave(progress)
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), **items), force=force)


class _StopFlag:
    """SIGTERM / SIGINT ask the loop to checkpoint and stop at the next step boundary."""

    def __init__(self):
        self.raised = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _placement_path(path: str | None, placement: str) -> str | None:
    """P.parquet -> P.<placement>.parquet."""
    if not path:
        return None
    stem, suffix = os.path.splitext(str(path))
    return f"{stem}.{placement}{suffix}"


def _flat_floats(report: dict[str, Any]) -> dict[str, float]:
    """The float metrics of an evaluation report; a placement's as ``<placement>/<metric>``."""
    out = {k: v for k, v in report.items() if isinstance(v, float)}
    for placement, sub_report in report.get("placements", {}).items():
        out.update({f"{placement}/{k}": v for k, v in sub_report.items() if isinstance(v, float)})
    return out


def _is_remote(path: epath.Path) -> bool:
    return "://" in str(path)


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinite for a line cut short by a kill (so it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class _JsonLines:
    """metrics.jsonl, written by process 0: appended to locally; object stores (gs://) cannot
    append, so there the whole file is rewritten on each write (a few KB per log line).

    Lines past ``resume_step`` were logged by a run killed after its last checkpoint; the
    resumed run logs those steps again, so they are dropped first.
    """

    def __init__(self, path: epath.Path, resume_step: int):
        self.path = path
        old = path.read_text().splitlines(keepends=True) if path.exists() else []
        self.lines = [line for line in old if _logged_step(line) <= resume_step]
        if len(self.lines) != len(old):
            fileio.write_text(path, "".join(self.lines))
        self.file = None if _is_remote(path) else path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        if self.file is None:
            self.lines.append(line)
            fileio.write_text(self.path, "".join(self.lines))
        else:
            self.file.write(line)
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def resolve_data_dir(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
    """``config.data.dir`` as an absolute path; with none, ``<workdir>/data``."""
    config.data.dir = workdir_lib.absolute(config.data.dir or epath.Path(workdir) / "data")


def ensure_data(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    """With no ``config.data.dir`` (or that default, ``<workdir>/data``, already filled in), use
    ``<workdir>/data``, generating the synthetic world there once."""
    resolve_data_dir(config, workdir)
    if config.data.dir != workdir_lib.absolute(epath.Path(workdir) / "data"):
        return
    missing = [p for p in config.data.placements
               if not builders.dataset_dir(config.data.dir, config.data.source, p).exists()]
    if missing and config.data.source == "synthetic":
        if jax.process_index() == 0:
            print(f"generating the synthetic world into {config.data.dir}")
            generate(config, config.data.dir)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("synthetic data generated")


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Train (resuming from the workdir's latest checkpoint), evaluate, write eval_test.json.

    Every process runs this (multi-host: after `distributed.initialize`); all of them save and
    restore checkpoints, only process 0 writes config, metrics, summaries and reports.
    """
    workdir = epath.Path(workdir_lib.absolute(workdir))
    is_main = jax.process_index() == 0
    # Before anything is written: a resume must not change what the checkpoints depend on.
    if not config.data.dir:
        resolve_data_dir(config, workdir)
    workdir_lib.check_resume(config, workdir)
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
    ensure_data(config, workdir)
    if is_main:
        config_lib.write_resolved(config, workdir)
    t = config.train
    trainer = Trainer(config, workdir)
    manager = trainer.checkpoint_manager()
    iterators = trainer.train_iterators()
    best = trainer.best_manager()
    progress: dict[str, Any] = {}
    if manager.latest_step() is not None:
        state = trainer.restore(manager, iterators, quarantine=True)
        progress = trainer.restore_progress(manager, int(state["step"]))
        for later in [s for s in best.all_steps() if s > int(state["step"])]:
            best.delete(later)  # found after the checkpoint we resume from: the replay finds it again
        print(f"resumed from {workdir / 'checkpoints'} at step {int(state['step'])}")
        if is_main and run_identity.read(workdir) is None:  # a workdir trained before run identities
            run_identity.create(workdir, trainer.abstract_state["params"])
    else:
        state = trainer.init_state()
        if is_main:  # a new run: artifacts of any earlier one in this workdir no longer match it
            run_identity.create(workdir, trainer.abstract_state["params"])
    best_auc, bad_evals = progress.get("best_auc", -1.0), progress.get("bad_evals", 0)

    writer = None
    if is_main:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(workdir / "tensorboard"))
    metrics_file = _JsonLines(workdir / "metrics.jsonl", int(state["step"])) if is_main else None

    def log(step: int, values: dict[str, float]) -> None:
        if not is_main:
            return
        metrics_file.write({"step": step, **values})
        for k, v in values.items():
            if np.isfinite(v):  # an AUC without positives (tiny splits) is NaN; TensorBoard has no use for it
                writer.add_scalar(k, v, step)

    batch_size = int(config.data.batch_size) * len(trainer.placements)  # rows per step
    step = int(state["step"])
    pending = None  # (step, metrics on device): read one step late
    bar = tqdm(total=int(t.num_steps), initial=step, desc="train", unit="step", disable=not is_main)
    start, start_step = time.perf_counter(), step
    stopped_early = stopping = False
    with _StopFlag() as stop:
        while step < int(t.num_steps) and not stopping:
            batches = {p: sharding.shard_batch(next(it), trainer.mesh) for p, it in iterators.items()}
            state, metrics = trainer.train_step(state, batches)
            step += 1
            if pending is not None and (pending[0] % int(t.log_every) == 0):
                values = _scalars(pending[1])
                if not np.isfinite(values["loss"]):
                    raise FloatingPointError(
                        f"loss is {values['loss']} at step {pending[0]}; the last good checkpoint is in "
                        f"{workdir / 'checkpoints'} (lower config.optim.peak_lr or check the data)")
                rate = (step - start_step) * batch_size / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{values['loss']:.4f}", ex_per_s=f"{rate:,.0f}")
                log(pending[0], dict(values, examples_per_sec=rate))
            pending = (step, metrics)
            bar.update(1)
            if jax.process_count() == 1:
                stopping = stop.raised
            elif step % int(t.log_every) == 0:  # all processes must stop at the same step
                stopping = bool(multihost_utils.process_allgather(np.int32(stop.raised)).any())
            if step % int(t.eval_every) == 0 or step == int(t.num_steps):
                result = trainer.evaluate_placements(trainer.model_params(state), "validation")
                log(step, {f"validation/{k}": v for k, v in _flat_floats(result).items()})
                value = result.get(f"mean_{trainer.stopping_metric}", result[trainer.stopping_metric])
                if value is not None and value > best_auc + float(t.min_delta):  # NaN / None: no gain
                    best_auc, bad_evals = value, 0
                    # A copy: the next step donates the state's buffers while the save may still run.
                    best.save(step, args=ocp.args.StandardSave(jax.tree.map(jnp.copy, trainer.model_params(state))))
                else:
                    bad_evals += 1
                if bad_evals >= int(t.patience):
                    stopped_early = True
                    break
            if step % int(t.checkpoint_every) == 0:
                trainer.save(manager, state, iterators, progress={"best_auc": best_auc, "bad_evals": bad_evals})
        if stopping and pending is not None and pending[0] % int(t.log_every) == 0:
            # The resumed run starts after this step and cannot log it (it reads metrics one step late).
            rate = (step - start_step) * batch_size / (time.perf_counter() - start)
            log(pending[0], dict(_scalars(pending[1]), examples_per_sec=rate))
        if manager.latest_step() != step:
            trainer.save(manager, state, iterators, force=True,
                         progress={"best_auc": best_auc, "bad_evals": bad_evals})
        manager.wait_until_finished()
        best.wait_until_finished()
    bar.close()
    if stopping:
        print(f"stopped by a signal at step {step}; checkpoint saved, rerun the same command to resume")
        return {"step": step, "interrupted": True}
    # The best parameters, found by this run or by the one it resumed: both are in `best`.
    params, params_step, params_from = trainer.model_params(state), step, "last step"
    if best.latest_step() is not None:
        try:
            (params, params_step), params_from = trainer.restore_best_step(best, quarantine=True), "best"
        except CheckpointError as e:
            warnings.warn(f"{e}; testing the last step's parameters", CorruptCheckpointWarning, stacklevel=2)
    result = trainer.evaluate_placements(params, "test")
    result.update(step=step, params_step=params_step, params_from=params_from, stopped_early=stopped_early,
                  **{best_key(config): best_auc})
    if is_main:
        fileio.write_json(workdir / "eval_test.json", result)
        metrics_file.close()
        writer.close()
    return result


def early_stopping_metric(config: ml_collections.ConfigDict) -> str:
    return str(config.train.get("early_stopping_metric", "ctr_auc"))


def best_key(config: ml_collections.ConfigDict) -> str:
    """eval_test.json's key for the best validation value of the early-stopping metric."""
    return f"best_validation_{early_stopping_metric(config)}"


def training_summary(trainer: Trainer) -> dict[str, Any]:
    """`train`'s own keys of eval_test.json, read back from the workdir: ``step`` (steps trained,
    the latest checkpoint's), ``best_validation_<metric>`` (`best_key`) and ``stopped_early`` (its
    early-stopping progress; from eval_test.json for checkpoints that predate it)."""
    manager = trainer.checkpoint_manager()
    latest = manager.latest_step()
    if latest is None:
        return {}
    out: dict[str, Any] = {"step": int(latest)}
    try:
        progress = trainer.restore_progress(manager, int(latest))
    except Exception as e:  # noqa: BLE001 -- an unreadable progress item: fall back to eval_test.json
        warnings.warn(f"{trainer.workdir / 'checkpoints' / str(latest)}: early-stopping progress unreadable ({e})",
                      CorruptCheckpointWarning, stacklevel=2)
        progress = {}
    if progress:
        out[best_key(trainer.config)] = progress["best_auc"]
        out["stopped_early"] = bool(progress["bad_evals"] >= int(trainer.config.train.patience))
    else:
        previous = trainer.workdir / "eval_test.json"
        if previous.is_file():
            saved = json.loads(previous.read_text())
            out.update({k: saved[k] for k in (best_key(trainer.config), "stopped_early") if k in saved})
    return out


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str | Path, split: str,
                     predictions_path: str | None = None, allow_other_run: bool = False) -> dict[str, Any]:
    """Evaluate a workdir's parameters (`Trainer.restore_final`: the best validation evaluation's,
    as `train` tests them) and write ``<workdir>/eval_<split>.json`` with `train`'s keys (``step``
    trained, ``stopped_early``, ``best_validation_<metric>``) and where the parameters come from
    (``params_step``, ``params_from``)."""
    workdir = epath.Path(workdir)
    trainer = Trainer(config, workdir)
    params, step = trainer.restore_final()
    # Written by `multitower calibrate`; then the report also has ECE and the calibrated metrics.
    fitted = (calibration_lib.load(str(workdir), allow_other_run=allow_other_run)
              if calibration_lib.exists(str(workdir)) else None)
    result = trainer.evaluate_placements(params, split, predictions_path, calibration=fitted)
    result.update(training_summary(trainer))
    result.update(params_step=step, params_from="best" if trainer.restored_from == "best" else "latest checkpoint")
    result.setdefault("step", step)
    if jax.process_index() == 0:
        fileio.write_json(workdir / f"eval_{split}.json", result)
    return result
