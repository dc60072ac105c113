"""The TPU pod experiments: they load and validate, follow the documented scaling rules (checked
against numbers worked out by hand), size their tables as the model builds them, shard them as
documented, and the launch commands in their docstrings run (as dry runs)."""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
from pathlib import Path

import flax.linen as nn
import jax
import pytest

from experiments import pod_base
from multitower_jax import config as config_lib
from multitower_jax import features as F
from multitower_jax.models import model as model_lib

REPO = Path(__file__).resolve().parents[1]
# name -> (accelerator type, global batch, peak lr, mesh.model, train steps, quarter epoch, warm-up),
# as the docstrings state them: 2 epochs of 20M impressions, ceil(40M / batch) steps, a tenth warm-up.
PODS = {
    "pod_v5p": ("v5p-128", 65_536, 8e-4, 1, 611, 77, 61),
    "pod_v6e": ("v6e-32", 32_768, 1e-4 * math.sqrt(32), 1, 1_221, 153, 122),
    "pod_v5e": ("v5litepod-16", 16_384, 4e-4, 1, 2_442, 306, 244),
}


def chips_and_vms(accelerator: str) -> tuple[int, int]:
    """From Cloud TPU's tables: v5p-N counts TensorCores (2 per chip); 4 chips per VM on a pod slice."""
    n = int(accelerator.rsplit("-", 1)[1])
    chips = n // 2 if accelerator.startswith("v5p-") else n
    return chips, max(1, chips // 4) if chips > 8 or accelerator.startswith("v5p-") else 1


@pytest.fixture(scope="module", params=sorted(PODS))
def pod(request):
    name = request.param
    return name, config_lib.load(REPO / "experiments" / f"{name}.py")


def test_mesh_batch_and_learning_rate_follow_the_rules(pod):
    name, config = pod
    accelerator, batch, peak_lr, model, steps, quarter, warmup = PODS[name]
    chips, vms = chips_and_vms(accelerator)
    assert config.mesh.data * config.mesh.model == chips
    assert config.mesh.model == model and 4 % model == 0  # a data replica stays on one VM
    assert config.data.batch_size == batch == config.data.eval_batch_size
    assert batch // vms == 4096  # rows each process feeds per step
    assert config.data.num_shards % vms == 0 and batch % config.data.num_shards == 0
    assert config.optim.peak_lr == pytest.approx(peak_lr, rel=1e-12)
    assert config.optim.end_lr == pytest.approx(peak_lr / 10, rel=1e-12)
    assert config.train.num_steps == steps and config.synthetic.impressions.train == 20_000_000
    assert config.optim.warmup_steps == warmup  # a tenth of the run, under the 1,000-update floor
    assert config.optim.warmup_steps + config.optim.decay_steps == config.train.num_steps
    assert config.model.dtype == "bfloat16"
    assert config.train.checkpoint_every == config.train.eval_every == quarter
    # The large tables take row-wise Adagrad at the threshold that row-shards them.
    assert config.optim.large_table_optimizer == "rowwise_adagrad"
    assert config.optim.large_table_bytes == config.sharding.large_table_bytes == 64 << 20


@pytest.mark.parametrize("batch, peak_lr, warmup", [
    (1_024, 1e-4, 10_000), (4_096, 2e-4, 2_500), (10_000, 1e-4 * math.sqrt(10_000 / 1_024), 1_024),
    (262_144, 1.6e-3, 1_000)])
def test_scaling_rule(batch, peak_lr, warmup):
    assert pod_base.scaled_peak_lr(batch) == pytest.approx(peak_lr, rel=1e-12)
    assert pod_base.scaled_end_lr(batch) == pytest.approx(peak_lr / 10, rel=1e-12)
    assert pod_base.scaled_warmup_steps(batch) == warmup


@pytest.mark.parametrize("model", [3, 8])
def test_model_axis_must_divide_a_vm(model):
    with pytest.raises(ValueError, match="must divide"):
        pod_base.pod_config(chips=64, processes=16, model=model, rows_per_replica=1024)


def test_tables_as_built_and_sharded(pod):
    """table_bytes against the model's own parameter shapes, and each table's mesh axes."""
    name, config = pod
    model = model_lib.build_model(config, F.parse_spec(config.features))
    boxed = jax.eval_shape(lambda rng: model_lib.init_params(model, rng), jax.random.key(0))
    leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    tables = {jax.tree_util.keystr(path): leaf for path, leaf in leaves if "embed_" in jax.tree_util.keystr(path)}
    built = sum(leaf.value.size * 4 for leaf in tables.values())
    assert tables and pod_base.table_bytes(config) == pytest.approx(built, rel=1e-3)  # rows padded to 128
    # 16 buckets per id of the world: 50,000 advertisers, ~2 brands each, 5,000 cities.
    assert config.features.ad.advertiser_id.size == 800_000 and config.features.ad.brand_id.size == 1_600_000
    assert config.features.context.search.city.size == 80_000
    assert 0.62e9 < built < 0.63e9  # 205 MB advertiser + 410 MB brand + 10 MB city + small tables
    rules = tuple((str(n), a) for n, a in config.sharding.rules)
    expected = "model" if PODS[name][3] > 1 else None
    for leaf in tables.values():
        assert leaf.names == ("vocab", "embed")
        assert tuple(nn.logical_to_mesh_axes(leaf.names, rules)) == (expected, None)


def test_docstring_launch_commands_run_as_dry_runs(pod):
    name, config = pod
    doc = (REPO / "experiments" / f"{name}.py").read_text()
    export = re.search(r"^\s+export (.+)$", doc, re.M).group(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    env.update(kv.split("=", 1) for kv in shlex.split(export))
    commands = [shlex.split(line) for line in re.findall(r"^\s+(tpu_scripts/\S+\.sh.*)$", doc, re.M)]
    assert [c[0] for c in commands] == ["tpu_scripts/create.sh", "tpu_scripts/setup.sh", "tpu_scripts/data.sh",
                                        "tpu_scripts/launch.sh", "tpu_scripts/logs.sh", "tpu_scripts/delete.sh"]
    printed = {}
    for argv in commands:
        result = subprocess.run([str(REPO / argv[0]), *argv[1:], "--dry-run"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (argv, result.stderr)
        printed[argv[0]] = result.stdout
    assert f"--accelerator-type={PODS[name][0]} " in printed["tpu_scripts/create.sh"]
    assert f"train --config experiments/{name}.py --workdir gs://" in printed["tpu_scripts/launch.sh"]
    assert f"generate --config experiments/{name}.py " in printed["tpu_scripts/data.sh"]
    _, vms = chips_and_vms(PODS[name][0])
    assert printed["tpu_scripts/delete.sh"].count("tpu-vm scp") == vms
