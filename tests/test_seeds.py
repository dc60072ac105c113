"""`multitower train --seeds`: one run per seed on shared data, and a summary that equals numpy's."""

import json

import numpy as np
import pytest

from multitower_jax import cli
from multitower_jax.config import ConfigError
from multitower_jax.train import loop, seeds
from tests.conftest import QUICKSTART, synthetic_config


def test_parse_seeds():
    assert seeds.parse_seeds("0,1,2") == [0, 1, 2]
    assert seeds.parse_seeds("7") == [7]
    for bad in ("", "a,b", "1,1"):
        with pytest.raises(ConfigError):
            seeds.parse_seeds(bad)


def test_summary_statistics_equal_numpys():
    reports = {0: {"ctr_auc": 0.71, "step": 10, "stopped_early": False, "placements": {"cart": {"ctr_auc": 0.6}}},
               1: {"ctr_auc": 0.74, "step": 10, "stopped_early": True, "placements": {"cart": {"ctr_auc": 0.65}}},
               5: {"ctr_auc": 0.72, "step": 8, "stopped_early": False, "placements": {"cart": {"ctr_auc": 0.61}},
                   "only_here": 1.0}}
    summary = seeds.summarize(reports)
    assert summary["seeds"] == [0, 1, 5]
    assert set(summary["metrics"]) == {"ctr_auc", "step", "placements/cart/ctr_auc"}  # no booleans, only common keys
    for key, values in (("ctr_auc", [0.71, 0.74, 0.72]), ("placements/cart/ctr_auc", [0.6, 0.65, 0.61])):
        stats, values = summary["metrics"][key], np.array(values)
        assert stats["mean"] == pytest.approx(values.mean())
        assert stats["std"] == pytest.approx(values.std(ddof=1))
        assert stats["spread"] == pytest.approx(values.max() - values.min())
        assert (stats["min"], stats["max"]) == (values.min(), values.max())


def test_one_run_per_seed_on_data_generated_once(tmp_path, monkeypatch, capsys):
    """The orchestration with the training stubbed: seeds, shuffle seeds, one shared data folder."""
    calls, generated = [], []
    monkeypatch.setattr(loop, "generate", lambda config, out: generated.append(str(out)))

    def fake_train(config, workdir):
        calls.append((int(config.seed), int(config.data.shuffle_seed), config.data.dir, str(workdir)))
        report = {"ctr_auc": 0.7 + 0.01 * config.seed, "ctcvr_auc": 0.8 - 0.02 * config.seed,
                  "step": int(config.train.num_steps), "stopped_early": False}
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "eval_test.json").write_text(json.dumps(report))
        return report

    monkeypatch.setattr(loop, "train", fake_train)
    config = synthetic_config("", "--config.train.num_steps=3")
    assert cli.main(["train", "--config", str(QUICKSTART), "--workdir", str(tmp_path), "--seeds", "0,1,2",
                     "--config.train.num_steps=3"]) == 0
    data_dir = str(tmp_path / "data")
    assert generated == [data_dir]  # once, for every seed
    assert calls == [(s, s, data_dir, str(tmp_path / f"seed_{s}")) for s in (0, 1, 2)]
    out = capsys.readouterr().out
    assert "spread" in out and "seeds_summary.json" in out

    summary = json.loads((tmp_path / seeds.SUMMARY_FILE).read_text())
    per_seed = [json.loads((tmp_path / f"seed_{s}" / "eval_test.json").read_text()) for s in (0, 1, 2)]
    for key in ("ctr_auc", "ctcvr_auc"):
        values = np.array([r[key] for r in per_seed])
        assert summary["metrics"][key]["mean"] == pytest.approx(values.mean())
        assert summary["metrics"][key]["std"] == pytest.approx(values.std(ddof=1))
        assert summary["metrics"][key]["spread"] == pytest.approx(np.ptp(values))

    # A rerun trains nothing again: every seed's run has finished.
    calls.clear()
    summary_again = seeds.train_seeds(config, tmp_path, [0, 1, 2])
    assert calls == [] and summary_again["metrics"] == summary["metrics"]


def test_a_real_seed_run(synthetic_dir, tmp_path):
    """One real (tiny) run through `train_seeds`: its config carries the seed, its report is the summary's."""
    config = synthetic_config(synthetic_dir, "--config.train.num_steps=2", "--config.train.eval_every=2")
    summary = seeds.train_seeds(config, tmp_path, [3])
    saved = json.loads((tmp_path / "seed_3" / "config.json").read_text())
    assert (saved["seed"], saved["data"]["shuffle_seed"], saved["data"]["dir"]) == (3, 3, str(synthetic_dir))
    report = json.loads((tmp_path / "seed_3" / "eval_test.json").read_text())
    assert summary["metrics"]["ctr_auc"]["values"] == [report["ctr_auc"]]
    assert summary["metrics"]["ctr_auc"]["spread"] == 0.0
