"""Multi-host training: 2 processes x 2 fake CPU devices (gloo on 127.0.0.1) against 1 process x 4
devices, a run stopped (SIGTERM), killed and resumed four times on 1 or 2 processes, and a 4-device
checkpoint resumed on 2 devices.

The runs go through the real command line (`python -m multitower_jax train ...`), each process
with its own fake devices; ``data.num_shards=2`` makes the global batches the same on 1 or 2
processes, so the runs must agree step for step.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from multitower_jax import config as config_lib
from multitower_jax import distributed
from multitower_jax.train import sharding
from multitower_jax.train import trainer as trainer_lib
from tests.conftest import REPO, synthetic_config

STEPS = 24
RUN = [f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=6", "--config.train.log_every=1",
       "--config.train.keep_checkpoints=10"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def experiment(synthetic_dir, tmp_path_factory):
    """An experiment file holding the tiny synthetic config: two data shards, downsampled negatives."""
    folder = tmp_path_factory.mktemp("multihost") / "mhexp"
    config = synthetic_config(synthetic_dir, "--config.data.num_shards=2", "--config.data.negative_downsample_rate=0.5",
                              "--config.data.batch_size=64")
    config_lib.write_resolved(config, folder)
    (folder / "__init__.py").write_text("")
    (folder / "tiny.py").write_text(
        "from multitower_jax import config as config_lib\n\n\n"
        f"def get_config():\n    return config_lib.from_json({str(folder / 'config.json')!r})\n")
    return folder / "tiny.py", config


def _launch(experiment_file, workdir: Path, overrides, *, processes: int, devices_per_process: int) -> list:
    """Start `multitower train` as ``processes`` processes; each one's output goes to a log file
    (a pipe nobody reads would fill up and stall that process, and with it the collectives)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
               PYTHONPATH=str(REPO), PYTHONFAULTHANDLER="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "multitower_jax", "train", "--config", str(experiment_file),
           "--workdir", str(workdir), *overrides]
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    for i in range(processes):
        if processes > 1:
            env = dict(env, **{distributed.ENV_COORDINATOR: address, distributed.ENV_NUM_PROCESSES: str(processes),
                               distributed.ENV_PROCESS_ID: str(i)})
        log = workdir.parent / f"{workdir.name}.process{i}.{time.monotonic_ns()}.log"
        with log.open("w") as out:
            procs.append((subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT), log))
    return procs


def _wait(procs: list, timeout: float = 480) -> None:
    try:
        for p, _ in procs:
            p.wait(timeout=timeout)
    finally:
        for p, _ in procs:  # never leave a stalled process behind; SIGABRT first: its stacks go to the log
            if p.poll() is None:
                p.send_signal(signal.SIGABRT)
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    for p, log in procs:
        assert p.returncode == 0, f"process exited with {p.returncode}:\n{_tail(log)}"


def _tail(log: Path, lines: int = 40) -> str:
    """The last lines of a process's log, without absl's start-up chatter."""
    kept = [line for line in log.read_text().splitlines() if not line.startswith(("W0000", "I0000"))]
    return "\n".join(kept[-lines:])


@pytest.fixture(scope="module")
def runs(experiment, tmp_path_factory):
    """The same 24 steps on 2 processes x 2 devices and on 1 process x 4 devices (run side by side)."""
    experiment_file, _ = experiment
    root = tmp_path_factory.mktemp("runs")
    two = _launch(experiment_file, root / "two_hosts", RUN, processes=2, devices_per_process=2)
    one = _launch(experiment_file, root / "one_host", RUN, processes=1, devices_per_process=4)
    _wait(two + one)
    return root / "two_hosts", root / "one_host"


def _losses(workdir: Path) -> tuple[list[int], np.ndarray]:
    """(steps, training losses) in the order metrics.jsonl has them."""
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in lines if "loss" in r], np.array([r["loss"] for r in lines if "loss" in r])


def _params(config, workdir: Path, step: int) -> dict[str, np.ndarray]:
    trainer = trainer_lib.Trainer(config, workdir, devices=jax.devices()[:4])
    state = trainer.restore(trainer.checkpoint_manager(), step=step)
    assert int(state["step"]) == step
    return _named(state["params"])


def _named(params) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _assert_same_params(a: dict[str, np.ndarray], b: dict[str, np.ndarray], tol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        # Softmax ignores a shift shared by all of a query's logits, so the attention key bias has
        # a gradient of exactly zero; Adam scales the rounding noise of its computed gradient
        # (which depends on the reduction order, i.e. on the process layout) up to a full
        # step. Its value does not change what the model computes.
        if "['key']['bias']" in name:
            continue
        np.testing.assert_allclose(a[name], b[name], rtol=tol, atol=tol, err_msg=name)


# Across process layouts, after several steps. The same Adam effect, milder, reaches the rows of
# rarely seen ids: a near-zero gradient's rounding noise becomes a visible share of its update
# (seen: one element of the 8,224 of a city table off by 3.3e-5, on parameters of ~0.1 with
# unit-norm embeddings). A wrong batch, shard or restored state moves parameters by O(lr) = 3e-3
# per step and the AUC by far more than one pair of tied-close predictions (~1e-5).
LAYOUT_TOL, LAYOUT_AUC_TOL = 1e-4, 1e-4


def test_two_processes_match_one_process(experiment, runs):
    _, config = experiment
    two, one = runs
    (steps2, losses2), (steps1, losses1) = _losses(two), _losses(one)
    assert steps2 == steps1 == list(range(1, STEPS))  # one line per step, read one step late
    np.testing.assert_allclose(losses2, losses1, rtol=1e-5, atol=1e-5)
    assert losses2[-5:].mean() < losses2[:5].mean()
    _assert_same_params(_params(config, two, STEPS), _params(config, one, STEPS), tol=LAYOUT_TOL)
    # Only process 0 writes reports; both evaluate the same gathered test split.
    report2, report1 = (json.loads((w / "eval_test.json").read_text()) for w in (two, one))
    assert report2["num_examples"] == report1["num_examples"] == 2000
    assert report2["ctr_auc"] == pytest.approx(report1["ctr_auc"], abs=LAYOUT_AUC_TOL)
    # The iterator position is saved per data shard, whichever process read the shard.
    for workdir in (two, one):
        data_dir = workdir / "checkpoints" / str(STEPS) / "data"
        assert sorted(p.name for p in data_dir.iterdir() if p.suffix == ".json") == \
            ["shard_0-of-2.json", "shard_1-of-2.json"]
    for shard in ("shard_0-of-2.json", "shard_1-of-2.json"):
        assert json.loads((two / "checkpoints" / str(STEPS) / "data" / shard).read_text()) == \
            json.loads((one / "checkpoints" / str(STEPS) / "data" / shard).read_text())


def _output(procs: list) -> list[str]:
    return [log.read_text() for _, log in procs]


def _resumed_at(text: str) -> int | None:
    match = re.search(r"^resumed from \S+ at step (\d+)$", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def _truncated_copy(workdir: Path, dest: Path, step: int) -> Path:
    """A copy of a finished workdir as it was when checkpoint ``step`` was its latest."""
    shutil.copytree(workdir, dest, ignore=shutil.ignore_patterns("eval_test.json"))
    for ckpt in (dest / "checkpoints").iterdir():
        if ckpt.name.isdigit() and int(ckpt.name) > step:
            shutil.rmtree(ckpt)
    return dest


def test_changed_num_shards_is_a_clear_error(experiment, runs, tmp_path):
    _, config = experiment
    two, _ = runs
    workdir = _truncated_copy(two, tmp_path / "reshard", 12)
    config = config_lib.apply_overrides(config, ["--config.data.num_shards=4"])
    trainer = trainer_lib.Trainer(config, workdir, devices=jax.devices()[:4])
    iterator = iter(trainer.dataset("train", train=True))
    with pytest.raises(config_lib.ConfigError, match=r"config.data.num_shards=2, this run has 4"):
        trainer.restore(trainer.checkpoint_manager(), iterator)


def _wait_until(procs: list, done, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline or any(p.poll() is not None for p, _ in procs):
            logs = "\n".join(f"--- process {i} (exit code {p.poll()}):\n{_tail(log)}" for i, (p, log) in enumerate(procs))
            raise AssertionError(f"the run ended or stalled before {what}:\n{logs}")
        time.sleep(0.02)


def _checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _stop(procs: list, sig: signal.Signals, which: list) -> None:
    try:
        for i in which:
            procs[i][0].send_signal(sig)
    finally:
        if sig == signal.SIGKILL:
            for p, _ in procs:
                p.send_signal(signal.SIGKILL)
                p.wait()
        else:
            _wait(procs, timeout=240)  # asserts that every process exits with 0


def _stopped_at(procs: list) -> int:
    """The step a SIGTERMed run stopped at: the same on every process, with its checkpoint."""
    out = _output(procs)
    stopped = [re.findall(r"^stopped by a signal at step (\d+);", text, re.MULTILINE) for text in out]
    assert all(len(s) == 1 for s in stopped) and len({s[0] for s in stopped}) == 1, stopped
    assert all('"interrupted": true' in text for text in out)  # train()'s result, printed by the CLI
    return int(stopped[0][0])


def test_stopped_and_killed_runs_resume_on_any_number_of_processes(experiment, runs, tmp_path):
    """One run of 24 steps in four legs, each resuming the last one's checkpoint:

    1. 1 process x 2 devices, SIGTERMed once it logs: checkpoints and exits with 0;
    2. 2 processes x 2 devices (resumes a 1-process checkpoint), SIGKILLed after a checkpoint;
    3. 2 processes, SIGTERM to process 0 only: both processes agree on the step to stop at;
    4. 1 process x 2 devices (resumes a 2-process checkpoint) to the end.

    Every leg must say where it resumed, and the whole must match the uninterrupted 2-process
    run (losses and parameters to 1e-5: the device count changes the reduction order).
    """
    experiment_file, config = experiment
    two, _ = runs
    workdir = tmp_path / "legs"
    endless = [*RUN, "--config.train.num_steps=100000"]  # legs that cannot finish on their own
    metrics = workdir / "metrics.jsonl"

    procs = _launch(experiment_file, workdir, endless, processes=1, devices_per_process=2)
    # A logged line: the loop (and its signal handler) is running.
    _wait_until(procs, lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, "its first log line")
    _stop(procs, signal.SIGTERM, [0])
    first = _stopped_at(procs)
    assert _checkpoint_steps(workdir) == [first] and first < 6 and _resumed_at(_output(procs)[0]) is None
    assert not (workdir / "eval_test.json").exists()

    procs = _launch(experiment_file, workdir, endless, processes=2, devices_per_process=2)
    try:
        _wait_until(procs, lambda: (workdir / "checkpoints" / "6").is_dir(), "checkpoint 6")
    finally:
        _stop(procs, signal.SIGKILL, [0, 1])
    assert [_resumed_at(text) for text in _output(procs)] == [first, first]
    killed = _checkpoint_steps(workdir)[-1]
    assert killed < 12, f"killed too late (checkpoint {killed}); cannot test resuming"

    procs = _launch(experiment_file, workdir, endless, processes=2, devices_per_process=2)
    try:
        # The next checkpoint on disk: both processes are inside the loop, their signal handlers set.
        _wait_until(procs, lambda: (workdir / "checkpoints" / str(killed + 6)).is_dir(), f"checkpoint {killed + 6}")
    finally:
        _stop(procs, signal.SIGTERM, [0])
    assert [_resumed_at(text) for text in _output(procs)] == [killed, killed]
    third = _stopped_at(procs)
    assert killed + 6 <= third < STEPS, f"stopped at step {third}; cannot test resuming from it"
    assert _checkpoint_steps(workdir)[-1] == third
    data_dir = workdir / "checkpoints" / str(third) / "data"  # each process wrote its shard's position
    assert sorted(p.name for p in data_dir.iterdir() if p.suffix == ".json") == \
        ["shard_0-of-2.json", "shard_1-of-2.json"]

    procs = _launch(experiment_file, workdir, RUN, processes=1, devices_per_process=2)
    _wait(procs)
    assert _resumed_at(_output(procs)[0]) == third
    (steps, resumed), (straight_steps, straight) = _losses(workdir), _losses(two)
    assert steps == straight_steps  # in order, once each: what the killed leg logged late is dropped
    np.testing.assert_allclose(resumed, straight, rtol=1e-5, atol=1e-5)
    _assert_same_params(_params(config, workdir, STEPS), _params(config, two, STEPS), tol=LAYOUT_TOL)
    report, straight_report = (json.loads((w / "eval_test.json").read_text()) for w in (workdir, two))
    assert report["ctr_auc"] == pytest.approx(straight_report["ctr_auc"], abs=LAYOUT_AUC_TOL)


def test_resume_a_four_device_checkpoint_on_two_devices(experiment, runs, tmp_path):
    """The uninterrupted 1 process x 4 devices run's checkpoint at step 6, resumed in this
    process on 2 devices: 6 more steps give that run's parameters at step 12. (The run's own
    checkpoints stand in for a 4-device run here: no second 4-device train step to compile.)"""
    _, config = experiment
    _, four = runs

    def run(trainer, state, iterator, steps):
        for _ in range(steps):
            state, _ = trainer.train_step(state, sharding.shard_batch(next(iterator), trainer.mesh))
        return state

    workdir = _truncated_copy(four, tmp_path / "four", 6)
    two = trainer_lib.Trainer(config, workdir, devices=jax.devices()[:2])
    iterator = iter(two.dataset("train", train=True))
    restored = two.restore(two.checkpoint_manager(), iterator)
    kernel = restored["params"]["ad_tower"]["mlp"]["block_0"]["dense"]["kernel"]
    assert kernel.sharding.mesh.devices.size == 2 and int(restored["step"]) == 6
    resumed = run(two, restored, iterator, 6)
    _assert_same_params(_named(resumed["params"]), _params(config, four, 12), tol=1e-5)


class _FakeDevice:
    def __init__(self, id: int, process_index: int):  # noqa: A002
        self.id, self.process_index = id, process_index


def test_mesh_replicas_must_not_span_processes():
    config = config_lib.load(REPO / "experiments" / "quickstart.py")
    # 2 processes x 4 devices: model=2 or 4 keeps every replica on one process.
    devices = [_FakeDevice(i, i // 4) for i in range(8)]
    for model in (1, 2, 4):
        sharding.check_replicas_within_processes(np.asarray(devices, dtype=object).reshape(-1, model))
    config.mesh.model = 8  # one replica over both processes
    with pytest.raises(ValueError, match=r"data replica 0 .* spans processes \[0, 1\].*4 devices of each process"):
        sharding.make_mesh(config, devices)
    config.mesh.model = 2  # 3 devices per process: replica 1 is devices 2 (process 0) and 3 (process 1)
    with pytest.raises(ValueError, match=r"data replica 1 \(mesh.model=2 devices \[2, 3\]\) spans processes \[0, 1\]"):
        sharding.make_mesh(config, [_FakeDevice(i, i // 3) for i in range(6)])
    config.mesh.model = 4  # real (single-process) devices still make a mesh
    assert sharding.make_mesh(config, jax.devices()[:8]).devices.shape == (2, 4)


def test_settings_from_flags_and_environment(tmp_path, capsys):
    from argparse import Namespace

    from multitower_jax import cli

    env = {distributed.ENV_COORDINATOR: "10.0.0.2:8476", distributed.ENV_NUM_PROCESSES: "4",
           distributed.ENV_PROCESS_ID: "3"}
    assert distributed.settings_from(None, env) == distributed.Settings(False, "10.0.0.2:8476", 4, 3)
    flags = Namespace(distributed=False, coordinator_address=None, num_processes=None, process_id=1)
    assert distributed.settings_from(flags, env).process_id == 1  # flags win over the environment
    assert not distributed.settings_from(None, {}).enabled
    assert distributed.settings_from(Namespace(distributed=True), {}) == distributed.Settings(auto=True)
    bad = [({distributed.ENV_NUM_PROCESSES: "2"}, "--coordinator-address, --process-id missing"),
           (dict(env, **{distributed.ENV_COORDINATOR: "10.0.0.2"}), "expected HOST:PORT"),
           (dict(env, **{distributed.ENV_PROCESS_ID: "4"}), "expected 0 <= id < number of processes"),
           (dict(env, **{distributed.ENV_NUM_PROCESSES: "four"}), "MULTITOWER_NUM_PROCESSES='four'")]
    for bad_env, message in bad:
        with pytest.raises(distributed.DistributedError, match=message):
            distributed.settings_from(None, bad_env)
    # The CLI stops before touching JAX, with the message and exit code 2.
    code = cli.main(["train", "--config", str(REPO / "experiments" / "quickstart.py"), "--workdir", str(tmp_path),
                     "--num-processes", "2", "--process-id", "0"])
    assert code == 2 and "--coordinator-address missing" in capsys.readouterr().err
