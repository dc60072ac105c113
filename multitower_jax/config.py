"""Experiment configs: load an experiment file (from any folder), apply `--config.a.b=value` overrides, validate.

An experiment file defines ``get_config() -> ml_collections.ConfigDict``. Overrides take the
type of the value they replace (so ``--config.train.batch_size=4096`` stays an int), and an
unknown key is an error that names the closest existing keys.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib.util
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
from etils import epath

from multitower_jax import calibration_settings, model_settings
from multitower_jax import features as features_lib
from multitower_jax import fileio
from multitower_jax.config_checks import ConfigError, require, require_choice, require_positive_int, require_present
from multitower_jax.data import log_splits
from multitower_jax.retrieval.settings import RetrievalSettings
from multitower_jax.serving.settings import ServingSettings

OVERRIDE_PREFIX = "--config."


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Run ``get_config()`` of the experiment file at `path`, in any folder (see `_import_config`).
    An exception raised while importing the file or running ``get_config`` becomes a ConfigError
    naming the file and line it came from."""
    given = Path(path).expanduser()
    if not given.is_file():
        raise ConfigError(f"config file {given} does not exist")
    path = given.resolve()
    try:
        module = _import_config(path)
        if not callable(getattr(module, "get_config", None)):
            raise ConfigError(f"{given}: expected a function get_config() returning a ConfigDict")
        config = module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 -- the user's code: report where, not a traceback
        raise ConfigError(f"{_where(e, path)}: {type(e).__name__}: {e}{_hint(e)}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{given}: get_config() returned {type(config).__name__}, expected ConfigDict")
    return config


def _package_dir(name: str) -> Path | None:
    """The folder of the importable package `name`; None if nothing by that name is importable
    (a module that is not a package gives a path that matches no folder)."""
    module = sys.modules.get(name)
    try:
        spec = module.__spec__ if module is not None else importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    return Path(locations[0]).resolve() if locations else Path(spec.origin or name)


def _import_config(path: Path):
    """Import an experiment file by path, from any folder:

    - in a folder that is an importable package (the project's ``experiments``, installed with
      it, or a package on ``sys.path``): as ``<package>.<name>``, the usual import;
    - in a folder with ``__init__.py`` whose name no other importable package takes: that folder
      becomes package ``<folder>``, so the file may import its siblings as ``<folder>.<sibling>``;
    - otherwise (no ``__init__.py``, a name that is no identifier, or one taken by another
      package, e.g. the user's own ``experiments`` folder): standalone, under a name of its own.
      ``from experiments import base`` then finds the project's installed ``experiments``.
    """
    folder, package = path.parent, path.parent.name
    if package.isidentifier() and path.stem.isidentifier():
        where = _package_dir(package)
        if where == folder:
            return importlib.import_module(f"{package}.{path.stem}")
        if where is None and (folder / "__init__.py").is_file():
            spec = importlib.util.spec_from_file_location(package, folder / "__init__.py",
                                                          submodule_search_locations=[str(folder)])
            _exec_registered(package, spec)
            return importlib.import_module(f"{package}.{path.stem}")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    name = f"multitower_config_{digest}_{''.join(c if c.isalnum() else '_' for c in path.stem)}"
    return _exec_registered(name, importlib.util.spec_from_file_location(name, path))


def _exec_registered(name: str, spec) -> Any:
    """Run the module of `spec` registered as sys.modules[name] (its own imports may need that);
    unregistered again when it fails."""
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _where(error: BaseException, path: Path) -> str:
    """``file:line`` of the innermost frame of `error` in the config's folder (else outside this
    package and importlib), or just the config file."""
    if isinstance(error, SyntaxError) and error.filename:
        return f"{error.filename}:{error.lineno}"
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not f.filename.startswith("<") and Path(f.filename).resolve() != Path(__file__).resolve()]
    ours = [f for f in frames if Path(f.filename).resolve().parent == path.parent]
    frame = (ours or frames or [None])[-1]
    return f"{frame.filename}:{frame.lineno}" if frame is not None else str(path)


def _hint(error: BaseException) -> str:
    if isinstance(error, ModuleNotFoundError) and error.name in ("experiments", "experiments.base"):
        return (" (the project's `experiments` package, with `experiments.base`, comes with the installed "
                "multitower_jax: `pip install -e <the repo>`)")
    return ""


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in config.items():
        keys.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(_all_keys(v, prefix + k + "."))
    return keys


def _parse_value(text: str, current: Any, key: str) -> Any:
    if text in ("None", "none", "null"):
        return None
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}: expected true or false, got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ConfigError(
            f"--config.{key}: expected a {type(current).__name__} like {current!r}, got {text!r}"
        ) from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, list | tuple):
        return tuple(value)
    if isinstance(current, tuple) and isinstance(value, str | int | float):
        return (value,)
    if current is not None and not isinstance(value, type(current)):
        raise ConfigError(
            f"--config.{key}: expected a {type(current).__name__} like {current!r}, got {text!r}"
        )
    return value


# Sections whose keys are the user's to choose: overrides may add new ones.
OPEN_SECTIONS = ("data.logs.columns",)


def _is_open(parents: list[str]) -> bool:
    path = ".".join(parents)
    return any(path == s or path.startswith(s + ".") for s in OPEN_SECTIONS)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Apply ``--config.a.b=value`` (or ``a.b=value``) strings in order."""
    config = ml_collections.ConfigDict(config.to_dict())  # a copy, unlocked
    for item in overrides:
        body = item[len(OVERRIDE_PREFIX):] if item.startswith(OVERRIDE_PREFIX) else item
        if "=" not in body:
            raise ConfigError(f"override {item!r}: expected --config.key=value")
        key, text = body.split("=", 1)
        parent = config
        parts = key.split(".")
        for i, part in enumerate(parts):
            node_key = ".".join(parts[: i + 1])
            is_last = i == len(parts) - 1
            if isinstance(parent, ml_collections.ConfigDict) and part not in parent and _is_open(parts[:i]):
                parent[part] = ml_collections.ConfigDict() if not is_last else None
            if not isinstance(parent, ml_collections.ConfigDict) or part not in parent:
                candidates = difflib.get_close_matches(node_key, _all_keys(config), n=3)
                hint = f"; did you mean {', '.join(candidates)}?" if candidates else ""
                raise ConfigError(f"--config.{key}: unknown config key {node_key!r}{hint}")
            if is_last:
                current = parent[part]
                if isinstance(current, ml_collections.ConfigDict):
                    if text not in ("None", "none", "null"):
                        raise ConfigError(f"--config.{key}: is a section; set one of its keys, or None to drop it")
                    del parent[part]  # e.g. drop a feature: --config.features.user.gender=None
                else:
                    parent[part] = _parse_value(text, current, key)
            else:
                parent = parent[part]
    return config


def load(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load an experiment file, apply overrides, validate; the one entry point the CLI uses."""
    config = apply_overrides(load_config_file(path), overrides)
    validate(config)
    return config


def validate(config: ml_collections.ConfigDict) -> None:
    """Check every value the library reads; raise ConfigError naming the first bad key.

    The one entry point for config checks: this module checks data, features, train, mesh and
    synthetic, and calls each other section's own check (`model_settings`: model, loss, optim;
    `calibration_settings`; `retrieval.settings`; `serving.settings`), all in `config_checks`'s style."""
    require_present(config, ("data", "features"))
    try:
        spec = features_lib.parse_spec(config.features)
    except features_lib.SpecError as e:
        raise ConfigError(str(e)) from None
    data = config.data
    require(data.source in ("synthetic", "logs"), "data.source", "'synthetic' or 'logs'", data.source)
    placements = tuple(data.placements)
    require(len(placements) > 0, "data.placements", "at least one placement", data.placements)
    for p in placements:
        require(p in spec.contexts, "data.placements",
                 f"placements with a context spec {sorted(spec.contexts)}", data.placements)
    for key in ("batch_size", "eval_batch_size", "block_size"):
        require(isinstance(data[key], int) and data[key] > 0, f"data.{key}", "a positive integer", data[key])
    rate = data.negative_downsample_rate
    require(isinstance(rate, float | int) and 0 < rate <= 1, "data.negative_downsample_rate",
             "a fraction in (0, 1] of negatives to keep", rate)
    if data.source == "logs":
        require(data.logs.format in ("auto", "parquet", "csv", "jsonl"), "data.logs.format",
                 "'auto', 'parquet', 'csv' or 'jsonl'", data.logs.format)
        if problem := log_splits.validate(data.logs):  # by time (paths + boundaries) or by file (split_paths)
            raise ConfigError(problem)
    if "model" in config:
        model_settings.validate_config(config)
    if "train" in config:
        for key in ("num_steps", "log_every", "eval_every", "checkpoint_every", "patience", "keep_checkpoints"):
            require(isinstance(config.train[key], int) and config.train[key] > 0, f"train.{key}",
                     "a positive integer", config.train[key])
        _validate_feedback(config)
    if "mesh" in config:
        _validate_mesh(config)
    if "calibration" in config:
        calibration_settings.validate_config(config)
    if "retrieval" in config:
        RetrievalSettings.from_config(config)
    if "serving" in config:
        ServingSettings.from_config(config)
    if "synthetic" in config:
        syn = config.synthetic
        for key in ("num_users", "num_ads", "num_advertisers"):
            require(isinstance(syn[key], int) and syn[key] > 0, f"synthetic.{key}", "a positive integer", syn[key])
        for split in ("train", "validation", "test"):
            n = syn.impressions[split]
            require(isinstance(n, int) and n > 0, f"synthetic.impressions.{split}", "a positive integer", n)


# What early stopping can watch on the validation split: a head's AUC, or the towers' in-split
# retrieval hit rate (`train.evaluate.retrieval_report`; the only choice under implicit feedback).
HIT_RATE_KS = (10, 100)
RETRIEVAL_METRICS = tuple(f"hit_rate_at_{k}" for k in HIT_RATE_KS)
EARLY_STOPPING_METRICS = ("ctr_auc", "ctcvr_auc", *RETRIEVAL_METRICS)
# "explicit": rows are impressions, clicked or not; "implicit": every row is an interaction (a
# positive), the usual retrieval data: the model trains its towers by the retrieval loss alone.
FEEDBACKS = ("explicit", "implicit")


def _validate_feedback(config: ml_collections.ConfigDict) -> None:
    metric = config.train.get("early_stopping_metric", "ctr_auc")
    require(metric in EARLY_STOPPING_METRICS, "train.early_stopping_metric", f"one of {EARLY_STOPPING_METRICS}",
             metric)
    if metric == "ctcvr_auc" and "model" in config:
        require(config.model.head != "ctr", "train.early_stopping_metric",
                 "'ctr_auc' or a hit rate with model.head='ctr' (no CTCVR)", metric)
    feedback = config.data.get("feedback", "explicit")
    require(feedback in FEEDBACKS, "data.feedback", f"one of {FEEDBACKS}", feedback)
    if feedback != "implicit" or "loss" not in config:
        return
    why = "under data.feedback='implicit' (every row a positive: no non-clicks for the heads to learn from)"
    require(config.loss.alpha == 0, "loss.alpha", f"0 {why}", config.loss.alpha)
    require(config.loss.beta > 0, "loss.beta", f"> 0 {why}: the retrieval loss is all there is", config.loss.beta)
    require(config.loss.get("retrieval_positives", "clicks") == "impressions", "loss.retrieval_positives",
             f"'impressions' {why}", config.loss.get("retrieval_positives"))
    require(metric in RETRIEVAL_METRICS, "train.early_stopping_metric", f"one of {RETRIEVAL_METRICS} {why}", metric)


MESH_AXES = ("data", "model")
# `sharding.large_table_layout`: the large tables' memory layout (`train.sharding.pin_large_tables`).
LARGE_TABLE_LAYOUTS = ("default", "row_major", "column_major")


def _validate_mesh(config: ml_collections.ConfigDict) -> None:
    mesh = config.mesh
    require(isinstance(mesh.data, int) and (mesh.data == -1 or mesh.data > 0), "mesh.data",
             "a positive device count, or -1 for every device not used by mesh.model", mesh.data)
    require(isinstance(mesh.model, int) and mesh.model > 0, "mesh.model", "a positive device count", mesh.model)
    rules = tuple(config.sharding.rules) if "sharding" in config else ()
    for rule in rules:
        ok = (isinstance(rule, tuple | list) and len(rule) == 2 and isinstance(rule[0], str)
              and (rule[1] is None or rule[1] in MESH_AXES))
        require(ok, "sharding.rules", f"(logical_axis, mesh_axis) pairs with mesh_axis in {MESH_AXES} or None", rule)
    if "sharding" in config:
        require_choice(config.sharding.get("large_table_layout", "default"), "sharding.large_table_layout",
                       LARGE_TABLE_LAYOUTS)
        require_choice(config.sharding.get("large_table_placement", "tensorcore"), "sharding.large_table_placement",
                       model_settings.LARGE_TABLE_PLACEMENTS)
        require_choice(config.sharding.get("sparsecore_kernel", "tpu"), "sharding.sparsecore_kernel",
                       model_settings.SPARSECORE_KERNELS)
        require_positive_int(config.sharding.get("sparsecores_per_chip", 1), "sharding.sparsecores_per_chip")
        limit = config.sharding.get("sparsecore_max_ids_per_partition", 0)
        require(isinstance(limit, int) and limit >= 0 and limit % 8 == 0, "sharding.sparsecore_max_ids_per_partition",
                "a multiple of 8, or 0 (every id a SparseCore holds)", limit)
    multiple = config.model.get("vocab_multiple", 1) if "model" in config else 1
    if mesh.model > 1 and ("vocab", "model") in [tuple(r) for r in rules]:
        require(multiple % mesh.model == 0, "model.vocab_multiple",
                 f"a multiple of mesh.model={mesh.model} when embedding tables are sharded over \"model\" "
                 "(rows are padded to it so each device holds an equal slice; e.g. 128)", multiple)


# The config sections that decide what an embedding means; training knobs do not.
FINGERPRINT_SECTIONS = ("features", "model", "loss")


def fingerprint(config: ml_collections.ConfigDict) -> str:
    """A short stable hash of the config sections that define the model's inputs and outputs
    (the architecture, not the weights: that is `run_identity`'s job)."""
    resolved = json.loads(to_json(config))
    part = {k: resolved.get(k) for k in FINGERPRINT_SECTIONS}
    part["placements"] = resolved["data"]["placements"]
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def write_resolved(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> epath.Path:
    """Write the resolved config as ``<workdir>/config.json`` (atomically; a local folder or gs://...)."""
    workdir = epath.Path(workdir)  # pathlib.Path would turn gs://bucket/run into the local gs:/bucket/run
    workdir.mkdir(parents=True, exist_ok=True)
    return fileio.write_text(workdir / "config.json", to_json(config))


def from_json(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Read back a config written by `write_resolved` (lists become tuples again)."""

    def tuples(x):
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        if isinstance(x, list):
            return tuple(tuples(v) for v in x)
        return x

    return ml_collections.ConfigDict(tuples(json.loads(epath.Path(path).read_text())))
