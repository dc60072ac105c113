"""Splits by per-split files (`config.data.logs.split_paths`) instead of time boundaries (issue 15)."""

import numpy as np
import pytest

from multitower_jax import config as config_lib
from multitower_jax import workdir as workdir_lib
from multitower_jax.data import log_splits, logs
from tests.test_logs import QUICKSTART, T0, make_config, make_rows, read_back, write


def _config(tmp_path, *overrides):
    config, spec = make_config([tmp_path / "unused.csv"], *overrides)
    config.data.logs.paths, config.data.logs.validation_start, config.data.logs.test_start = (), "", ""
    config.data.logs.split_paths.train = (str(tmp_path / "train-*.csv"),)
    config.data.logs.split_paths.validation = (str(tmp_path / "valid.jsonl"),)
    config.data.logs.split_paths.test = (str(tmp_path / "test.parquet"),)
    return config, spec


def test_every_row_of_a_splits_files_goes_to_that_split(tmp_path, monkeypatch):
    config, spec = _config(tmp_path)
    config_lib.validate(config)
    parts = {"train-a.csv": 9, "train-b.csv": 4, "valid.jsonl": 6, "test.parquet": 5}
    ids = {}
    for seed, (name, n) in enumerate(parts.items()):
        cols = make_rows(spec, n, seed=seed + 1)
        cols["timestamp"] = [T0 + 100] * n  # the same second everywhere: a time split could not separate them
        write(tmp_path / name, cols)
        ids[name] = cols["impression_id"]
    config.data.logs.split_paths.train = ("train-*.csv",)  # relative: ingest_command records it absolute
    monkeypatch.chdir(tmp_path)
    report = logs.ingest_command(config, tmp_path / "data")
    got = {split: np.sort(read_back(tmp_path / "data", split)["impression_id"]) for split in log_splits.SPLITS}
    saved = config_lib.from_json(tmp_path / "data" / "config.json")
    assert saved.data.logs.split_paths.train == (str(tmp_path / "train-*.csv"),)
    assert got["train"].tolist() == sorted(ids["train-a.csv"] + ids["train-b.csv"])
    assert got["validation"].tolist() == sorted(ids["valid.jsonl"])
    assert got["test"].tolist() == sorted(ids["test.parquet"])
    assert report["rows"] == {"train": 13, "validation": 6, "test": 5} and "validation_start" not in report
    assert report["split_files"]["train"] == [str(tmp_path / "train-a.csv"), str(tmp_path / "train-b.csv")]


def _load_error(*overrides) -> str:
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load(QUICKSTART, ["--config.data.source=logs", *overrides])
    return str(e.value)


def test_a_bad_choice_of_splits_is_a_config_error_naming_the_keys():
    both = _load_error("--config.data.logs.paths=('a.csv',)", "--config.data.logs.validation_start=2024-01-08",
                       "--config.data.logs.split_paths.train=('t.csv',)",
                       "--config.data.logs.split_paths.validation=('v.csv',)",
                       "--config.data.logs.split_paths.test=('x.csv',)")
    assert "both split_paths" in both and "paths, validation_start" in both
    missing = _load_error("--config.data.logs.split_paths.train=('t.csv',)")
    assert "config.data.logs.split_paths: no files for validation, test" in missing
    neither = _load_error()
    assert "config.data.logs.paths" in neither and "split_paths" in neither
    no_times = _load_error("--config.data.logs.paths=('a.csv',)")
    assert "config.data.logs.validation_start: expected both" in no_times


def test_files_that_do_not_resolve_name_the_split(tmp_path):
    config, spec = _config(tmp_path)
    write(tmp_path / "train-a.csv", make_rows(spec, 3))
    write(tmp_path / "valid.jsonl", make_rows(spec, 3))
    with pytest.raises(logs.LogError, match=r"no files match config.data.logs.split_paths.test="):
        log_splits.resolve(config.data.logs)
    config.data.logs.split_paths.test = (str(tmp_path / "train-*"),)
    with pytest.raises(logs.LogError, match=r"train-a.csv: in both data.logs.split_paths.train and .test"):
        log_splits.resolve(config.data.logs)
    config.data.logs.split_paths.test = (str(tmp_path / "empty.csv"),)
    (tmp_path / "empty.csv").write_text(",".join(make_rows(spec, 3)) + "\n")  # a header, no rows
    with pytest.raises(logs.LogError, match=r"empty.csv: no rows \(expected at least one impression\)"):
        list(logs.read_chunks(config, spec, "search", "test", {}))


def test_a_workdir_from_before_split_paths_still_resumes():
    """A saved config without the new key resumes when the key holds its default; a changed value does not."""
    base = {"data": {"logs": {"paths": [], "split_paths": {"train": [], "validation": [], "test": []}}}}
    saved = {"data": {"logs": {"paths": []}}}
    assert workdir_lib.resume_conflicts(saved, base, base) == []
    changed = {"data": {"logs": {"paths": [], "split_paths": {"train": ["t.csv"], "validation": [], "test": []}}}}
    assert workdir_lib.resume_conflicts(saved, changed, base) == ['data.logs.split_paths.train: (absent) -> ["t.csv"]']
