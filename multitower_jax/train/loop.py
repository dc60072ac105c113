"""`multitower train` and `multitower evaluate` on a workdir: the training loop with evaluation,
early stopping and orbax checkpoints, and the evaluation of a trained workdir with the loop's keys.

The loop drives a `trainer.Trainer` (the jitted step, the datasets, the checkpoints); metrics are
read from the device one step late so dispatch stays asynchronous, and process 0 logs them to
``metrics.jsonl`` (`metrics_log.JsonLines`) and TensorBoard. SIGTERM / SIGINT checkpoint and stop
at the next step boundary; rerunning the same command resumes.
"""

from __future__ import annotations

import json
import os
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from tqdm import tqdm

from multitower_jax import calibration as calibration_lib
from multitower_jax import config as config_lib
from multitower_jax import fileio, run_identity
from multitower_jax import workdir as workdir_lib
from multitower_jax.data import builders
from multitower_jax.data.generate import generate
from multitower_jax.train import multiprocess
from multitower_jax.train.checkpoint_fallback import CheckpointError, CorruptCheckpointWarning
from multitower_jax.train.metrics_log import JsonLines
from multitower_jax.train.trainer import Trainer, early_stopping_metric


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


def _flat_floats(report: dict[str, Any]) -> dict[str, float]:
    """The float metrics of an evaluation report; a placement's as ``<placement>/<metric>``."""
    out = {k: v for k, v in report.items() if isinstance(v, float)}
    for placement, sub_report in report.get("placements", {}).items():
        out.update({f"{placement}/{k}": v for k, v in sub_report.items() if isinstance(v, float)})
    return out


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
    metrics_file = JsonLines(workdir / "metrics.jsonl", int(state["step"])) if is_main else None

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
    train_step = trainer.train_step if jax.process_count() == 1 else None
    with _StopFlag() as stop:
        while step < int(t.num_steps) and not stopping:
            batches = trainer.shard_batches({p: next(it) for p, it in iterators.items()})
            train_step = train_step or multiprocess.compiled_together(trainer.train_step, state, batches)
            state, metrics = train_step(state, batches)
            step += 1
            if pending is not None and (pending[0] % int(t.log_every) == 0):
                values = _scalars(pending[1])
                if not np.isfinite(values["loss"]):
                    raise FloatingPointError(
                        f"loss is {values['loss']} at step {pending[0]}; the last good checkpoint is in "
                        f"{workdir / 'checkpoints'} (lower config.optim.peak_lr or check the data)")
                rate = (step - start_step) * batch_size / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{values['loss']:.4f}", ex_per_s=f"{rate:,.0f}")
                log(pending[0], dict(values, examples_per_sec=rate, **trainer.host_metrics()))
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
