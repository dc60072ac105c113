"""Experiment configs: overrides keep types, validation names the bad key, the resolved config round-trips."""

import subprocess
import sys

import pytest

from multitower_jax import config as config_lib
from multitower_jax import features as F
from tests.conftest import QUICKSTART, REPO


def load(*overrides):
    return config_lib.load(QUICKSTART, list(overrides))


def test_overrides_keep_types():
    config = load("--config.data.batch_size=4096", "--config.data.negative_downsample_rate=1",
                  "--config.data.placements=('search','cart')", "--config.data.importance_weights=false")
    assert config.data.batch_size == 4096
    assert isinstance(config.data.negative_downsample_rate, float)
    assert config.data.placements == ("search", "cart")
    assert config.data.importance_weights is False


def test_feature_can_be_resized_and_dropped():
    config = load("--config.features.user.country.dim=16", "--config.features.user.gender=None")
    spec = F.parse_spec(config.features)
    assert spec.user["country"].dim == 16
    assert "gender" not in spec.user.names


@pytest.mark.parametrize("override, message", [
    ("--config.data.bach_size=5", "unknown config key 'data.bach_size'; did you mean data.batch_size"),
    ("--config.data.batch_size=abc", "--config.data.batch_size: expected a int"),
    ("--config.data.batch_size=0", "config.data.batch_size: expected a positive integer, got 0"),
    ("--config.data.negative_downsample_rate=1.5", "config.data.negative_downsample_rate: expected a fraction"),
    ("--config.data.source=hive", "config.data.source: expected 'synthetic' or 'logs'"),
    ("--config.data.placements=('mars',)", "config.data.placements: expected placements with a context spec"),
    ("--config.features.user.country.type=embedding", "config.features.user.country.type: expected one of"),
    ("--config.features.user.country.size=-3", "config.features.user.country.size: expected a positive integer"),
    ("--config.data", "expected --config.key=value"),
])
def test_validation_errors_name_the_key(override, message):
    with pytest.raises(config_lib.ConfigError) as e:
        load(override)
    assert message in str(e.value)


def test_unknown_feature_key_is_named():
    with pytest.raises(config_lib.ConfigError, match=r"config.features.user.country: unknown keys \['dimm'\]"):
        config = config_lib.apply_overrides(config_lib.load_config_file(QUICKSTART), [])
        config.features.user.country.dimm = 3
        config_lib.validate(config)


def test_missing_config_file():
    with pytest.raises(config_lib.ConfigError, match="does not exist"):
        config_lib.load(REPO / "experiments" / "nope.py")


def test_resolved_config_round_trips(tmp_path):
    config = load("--config.data.batch_size=512")
    path = config_lib.write_resolved(config, tmp_path)
    again = config_lib.from_json(path)
    assert again.to_dict() == config.to_dict()


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "multitower_jax", "--help"], capture_output=True, text=True, check=True)
    for command in ("generate", "ingest", "bench"):
        assert command in out.stdout


def test_cli_reports_config_errors():
    out = subprocess.run([sys.executable, "-m", "multitower_jax", "bench", "input", "--config", str(QUICKSTART),
                          "--config.data.batch_sise=3"], capture_output=True, text=True)
    assert out.returncode == 2 and "did you mean data.batch_size" in out.stderr


@pytest.mark.parametrize("override, message", [
    ("--config.model.fusion=cross", "config.model.fusion: expected"),
    ("--config.model.head=ctcvr", "config.model.head: expected"),
    ("--config.train.num_steps=0", "config.train.num_steps: expected a positive integer"),
])
def test_model_and_train_validation(override, message):
    with pytest.raises(config_lib.ConfigError, match=message.replace(".", r"\.")):
        load(override)


@pytest.mark.parametrize("override, message", [
    # every section is checked when the config loads, not when a later command first reads it
    ("--config.serving.top_n=0", "config.serving.top_n: expected a positive integer, got 0"),
    ("--config.retrieval.overfetch=0.5", "config.retrieval.overfetch: expected a number >= 1, got 0.5"),
    ("--config.retrieval.leaves_fraction=0", "config.retrieval.leaves_fraction: expected a fraction in (0, 1]"),
    ("--config.calibration.ece_bins=1", "config.calibration.ece_bins: expected an integer in [2, 1000], got 1"),
    ("--config.optim.large_table_optimizer=sgd",
     "config.optim.large_table_optimizer: expected 'adamw' or 'rowwise_adagrad' or 'adagrad', got 'sgd'"),
    ("--config.model.wide_pooling=('max',)", "config.model.wide_pooling: expected a tuple of 'mean' / 'sum'"),
    ("--config.optim.ema_decay=1.0", "config.optim.ema_decay: expected a decay in [0, 1)"),
])
def test_every_section_is_checked_at_load_in_one_style(override, message):
    with pytest.raises(config_lib.ConfigError) as e:
        load(override)
    assert str(e.value).startswith(message)


def test_unknown_keys_read_the_same_in_every_section():
    for section in ("serving", "retrieval", "calibration"):
        config = config_lib.load_config_file(QUICKSTART)
        config[section].typo = 1
        with pytest.raises(config_lib.ConfigError, match=rf"^config\.{section}: unknown keys \['typo'\]; known: "):
            config_lib.validate(config)


def test_loading_and_checking_a_config_does_not_import_jax():
    code = ("import sys; from multitower_jax import config; config.load(sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))")
    out = subprocess.run([sys.executable, "-c", code, str(QUICKSTART)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_log_column_mapping_can_be_added_from_the_command_line():
    config = load("--config.data.logs.columns.user.age_bucket=age", "--config.data.logs.columns.click=clicked")
    assert config.data.logs.columns.user.age_bucket == "age" and config.data.logs.columns.click == "clicked"


def test_cli_reports_bad_logs_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    out = subprocess.run([sys.executable, "-m", "multitower_jax", "ingest", "--config", str(QUICKSTART),
                          "--out", str(tmp_path / "out"), "--config.data.source=logs",
                          f"--config.data.logs.paths=('{bad}',)", "--config.data.logs.validation_start=2024-01-01",
                          "--config.data.logs.test_start=2024-02-01"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "bad.csv: missing column 'user_id'" in out.stderr and "Traceback" not in out.stderr
