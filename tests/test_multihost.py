"""Multi-host training: 2 processes x 2 fake CPU devices (gloo on 127.0.0.1) against 1 process x 4
devices, a killed and restarted 2-process run, and a 4-device checkpoint resumed on 2 devices.

The runs go through the real command line (`python -m multitower_jax train ...`), each process
with its own fake devices; ``data.num_shards=2`` makes the global batches the same on 1 or 2
processes, so the runs must agree step for step.
"""

import json
import os
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
        lines = [line for line in log.read_text().splitlines() if not line.startswith(("W0000", "I0000"))]
        tail = "\n".join(lines[-40:])
        assert p.returncode == 0, f"process exited with {p.returncode}:\n{tail}"


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


def test_two_processes_match_one_process(experiment, runs):
    _, config = experiment
    two, one = runs
    (steps2, losses2), (steps1, losses1) = _losses(two), _losses(one)
    assert steps2 == steps1 == list(range(1, STEPS))  # one line per step, read one step late
    np.testing.assert_allclose(losses2, losses1, rtol=1e-5, atol=1e-5)
    assert losses2[-5:].mean() < losses2[:5].mean()
    _assert_same_params(_params(config, two, STEPS), _params(config, one, STEPS), tol=1e-5)
    # Only process 0 writes reports; both evaluate the same gathered test split.
    report2, report1 = (json.loads((w / "eval_test.json").read_text()) for w in (two, one))
    assert report2["num_examples"] == report1["num_examples"] == 2000
    assert report2["ctr_auc"] == pytest.approx(report1["ctr_auc"], abs=1e-5)
    data_dir = two / "checkpoints" / str(STEPS) / "data"
    grain_states = sorted(p.name for p in data_dir.iterdir() if p.name.startswith("process_"))
    assert grain_states == ["process_0-of-2.json", "process_1-of-2.json"]


def test_killed_two_process_run_resumes_to_the_same_parameters(experiment, runs, tmp_path):
    experiment_file, config = experiment
    two, _ = runs
    workdir = tmp_path / "killed"
    # A first leg that cannot finish on its own; SIGKILL both processes once a checkpoint is on disk.
    procs = _launch(experiment_file, workdir, [*RUN, "--config.train.num_steps=100000"],
                    processes=2, devices_per_process=2)
    deadline = time.monotonic() + 240
    try:
        while not (workdir / "checkpoints" / "6").is_dir():
            assert time.monotonic() < deadline and all(p.poll() is None for p, _ in procs), \
                "the first leg ended or stalled before its first checkpoint"
            time.sleep(0.02)
    finally:
        for p, _ in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < STEPS, f"killed too late (checkpoints {steps}); cannot test resuming"

    _wait(_launch(experiment_file, workdir, RUN, processes=2, devices_per_process=2))
    (steps, resumed), (straight_steps, straight) = _losses(workdir), _losses(two)
    assert steps == straight_steps  # in order, once each: what the killed leg logged late is dropped
    np.testing.assert_allclose(resumed, straight, rtol=1e-6, atol=1e-7)
    _assert_same_params(_params(config, workdir, STEPS), _params(config, two, STEPS), tol=1e-6)


def test_resume_a_four_device_checkpoint_on_two_devices(synthetic_dir, tmp_path):
    config = synthetic_config(synthetic_dir, "--config.data.batch_size=64")

    def run(trainer, state, iterator, steps):
        for _ in range(steps):
            state, _ = trainer.train_step(state, sharding.shard_batch(next(iterator), trainer.mesh))
        return state

    four = trainer_lib.Trainer(config, tmp_path / "four", devices=jax.devices()[:4])
    iterator = iter(four.dataset("train", train=True))
    state = run(four, four.init_state(), iterator, 6)
    manager = four.checkpoint_manager()
    four.save(manager, state, iterator, force=True)
    manager.wait_until_finished()
    straight = run(four, state, iterator, 6)

    two = trainer_lib.Trainer(config, tmp_path / "four", devices=jax.devices()[:2])
    iterator = iter(two.dataset("train", train=True))
    restored = two.restore(two.checkpoint_manager(), iterator)
    kernel = restored["params"]["ad_tower"]["mlp"]["block_0"]["dense"]["kernel"]
    assert kernel.sharding.mesh.devices.size == 2 and int(restored["step"]) == 6
    resumed = run(two, restored, iterator, 6)
    _assert_same_params(_named(resumed["params"]), _named(straight["params"]), tol=1e-5)


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
