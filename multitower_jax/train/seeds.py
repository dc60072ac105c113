"""`multitower train --seeds 0,1,2`: one run per seed on the same data, and the spread of their results.

Each run ``<workdir>/seed_<s>`` is `loop.train` with ``config.seed = s`` (parameter init,
dropout) and ``config.data.shuffle_seed = s`` (the order of the train blocks and which negatives
are downsampled), so the spread measures all of a run's training noise. The data is the same for
every seed: with an empty ``config.data.dir`` the synthetic world is generated once into
``<workdir>/data`` and shared. Then ``<workdir>/seeds_summary.json`` holds every seed's
``eval_test.json`` and, per numeric metric, the mean, std (sample, ddof=1), min, max and spread
(max - min) over the seeds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from multitower_jax import fileio
from multitower_jax.config import ConfigError
from multitower_jax.train import loop

SUMMARY_FILE = "seeds_summary.json"
TABLE_KEYS = ("ctr_auc", "ctcvr_auc", "cvr_auc", "cvr_entire_space_auc", "ctr_logloss")


def parse_seeds(text: str) -> list[int]:
    """"0,1,2" -> [0, 1, 2]; distinct integers."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers like 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: expected one or more distinct integers like 0,1,2")
    return seeds


def seed_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    """The config of one seed's run: the model / init / dropout seed and the shuffle seed set."""
    config = ml_collections.ConfigDict(config.to_dict())  # a copy
    config.seed = int(seed)
    config.data.shuffle_seed = int(seed)
    return config


def flat_numbers(report: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Every int / float of a report (not booleans); nested reports as ``<key>/<metric>``."""
    out: dict[str, float] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            out.update(flat_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def summarize(reports: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """{"seeds", "per_seed": {seed: report}, "metrics": {key: {mean, std, min, max, spread, values}}}
    over the keys every seed's report has; NaNs (an AUC without positives) are kept, and make
    that key's statistics NaN."""
    flats = {seed: flat_numbers(r) for seed, r in reports.items()}
    common = [k for k in next(iter(flats.values()))] if flats else []
    common = [k for k in common if all(k in f for f in flats.values())]
    stats = {}
    for key in common:
        values = np.array([flats[seed][key] for seed in reports], np.float64)
        stats[key] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                      "min": float(values.min()), "max": float(values.max()),
                      "spread": float(values.max() - values.min()), "values": values.tolist()}
    return {"seeds": list(reports), "per_seed": {str(s): r for s, r in reports.items()}, "metrics": stats}


def _done(run_dir: epath.Path, num_steps: int) -> dict[str, Any] | None:
    """A finished run's eval_test.json (trained to num_steps or stopped early), else None."""
    path = run_dir / "eval_test.json"
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    finished = report.get("stopped_early") or int(report.get("step", -1)) >= num_steps
    return report if finished else None


def train_seeds(config: ml_collections.ConfigDict, workdir: str | Path, seeds: Sequence[int]) -> dict[str, Any]:
    """Train one run per seed into ``<workdir>/seed_<s>`` (a finished run is not trained again;
    an interrupted one resumes), then write and return the summary. A run stopped by a signal
    ends the loop: ``{"interrupted": True, "seed", "step"}`` and no summary."""
    workdir = epath.Path(workdir)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
    config = ml_collections.ConfigDict(config.to_dict())
    loop.ensure_data(config, workdir)  # one generated world for every seed
    reports: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        run_dir = workdir / f"seed_{seed}"
        report = _done(run_dir, int(config.train.num_steps))
        if report is None:
            print(f"seed {seed}: training into {run_dir}")
            report = loop.train(seed_config(config, seed), run_dir)
            if report.get("interrupted"):  # by a signal: stop here; the same command resumes this seed
                return {"interrupted": True, "seed": seed, "step": report.get("step")}
        else:
            print(f"seed {seed}: {run_dir} is already trained (its eval_test.json), not trained again")
        reports[seed] = report
    summary = summarize(reports)
    summary["config"] = {"data_dir": str(config.data.dir), "shuffle_seed": "= seed", "num_steps": int(config.train.num_steps)}
    if jax.process_index() == 0:
        fileio.write_json(workdir / SUMMARY_FILE, summary)
    return summary


def table(summary: dict[str, Any], keys: Sequence[str] = TABLE_KEYS) -> str:
    """Per seed and mean +- std, spread, for the main metrics present."""
    keys = [k for k in keys if k in summary["metrics"]]
    fmt = lambda v: f"{v:>14.4f}" if not math.isnan(v) else f"{'nan':>14}"  # noqa: E731
    rows = [f"{'seed':<14}" + "".join(f"{k:>14}" for k in keys)]
    for i, seed in enumerate(summary["seeds"]):
        rows.append(f"{seed!s:<14}" + "".join(fmt(summary["metrics"][k]["values"][i]) for k in keys))
    for stat in ("mean", "std", "spread"):
        rows.append(f"{stat:<14}" + "".join(fmt(summary["metrics"][k][stat]) for k in keys))
    return "\n".join(rows)
