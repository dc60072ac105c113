"""Guards that keep a trained workdir intact: what may write where, and what a resume may change.

A workdir is recognized by what only `multitower train` writes into it (checkpoints, the run
identity, best parameters, metrics). Commands that write datasets (`generate`, `ingest`) refuse
such a folder as their ``--out``; `train` refuses to resume a workdir with a config that changes
the model, the data or the optimizer state's layout, before it writes anything.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import ml_collections
from etils import epath

from experiments import base
from multitower_jax import config as config_lib
from multitower_jax import run_identity

TRAIN_MARKERS = ("checkpoints", "best", run_identity.FILE, "metrics.jsonl")

# What a resumed run may not change: the checkpoints' parameters, optimizer state and data
# iterator positions are only meaningful under these.
RESUME_FIXED = ("seed", "features", "model", "data", "synthetic",
                "optim.clip_norm", "optim.embedding_weight_decay", "optim.accumulation_steps", "optim.ema_decay")
# ... except these, which only change how the data is read or evaluated.
RESUME_FREE = ("data.eval_batch_size", "data.reader_threads")


class WorkdirError(ValueError):
    """A command would break a workdir (or was pointed at the wrong kind of folder)."""


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def absolute(path: str | os.PathLike) -> str:
    """`path` as an absolute local path (gs://... and "" unchanged), so a recorded path means the
    same from any working directory."""
    text = str(path)
    if not text or is_remote(text):
        return text
    return os.path.abspath(os.path.expanduser(text))


def train_markers(folder: str | os.PathLike) -> list[str]:
    """The entries of `folder` that only `multitower train` writes."""
    folder = epath.Path(folder)
    return [name for name in TRAIN_MARKERS if (folder / name).exists()]


def refuse_training_workdir(out: str | os.PathLike, command: str) -> None:
    """WorkdirError when `out` holds a trained workdir (``generate`` / ``ingest`` would replace its
    config.json and mix a dataset into it)."""
    found = train_markers(out)
    if found:
        raise WorkdirError(f"--out {out} holds a training workdir ({', '.join(found)}); `multitower {command}` "
                           "would replace its config.json. Write the data to another folder (e.g. "
                           f"{os.path.join(str(out), 'data')} or a sibling) and train with --config.data.dir=<it>")


def has_checkpoints(workdir: str | os.PathLike) -> bool:
    folder = epath.Path(workdir) / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def _leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), tree


def _fixed(key: str) -> bool:
    def under(k: str, section: str) -> bool:
        return k == section or k.startswith(section + ".")
    return any(under(key, s) for s in RESUME_FIXED) and not any(under(key, s) for s in RESUME_FREE)


def resume_conflicts(saved: dict[str, Any], config: dict[str, Any], defaults: dict[str, Any] | None = None) -> list[str]:
    """``"model.embed_dim: 16 -> 64"`` for every key a resume may not change (plain dicts, as in
    config.json). A key the saved config lacks is no conflict when the new value is its value in
    `defaults` (the base config): the run was written before the key existed, and ran as its default does."""
    old, new, base = dict(_leaves(saved)), dict(_leaves(config)), dict(_leaves(defaults or {}))
    missing = object()
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a is missing and key in base and b == base[key]:
            continue
        if _fixed(key) and a != b:
            show = lambda v: "(absent)" if v is missing else json.dumps(v)  # noqa: E731
            out.append(f"{key}: {show(a)} -> {show(b)}")
    return out


def _paths_absolute(resolved: dict[str, Any]) -> dict[str, Any]:
    """data.dir as an absolute path (older workdirs recorded it as given)."""
    data = resolved.get("data")
    if isinstance(data, dict) and isinstance(data.get("dir"), str):
        resolved = {**resolved, "data": {**data, "dir": absolute(data["dir"])}}
    return resolved


def check_resume(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
    """WorkdirError listing the differing keys when `workdir` has checkpoints and `config` changes
    what they depend on."""
    workdir = epath.Path(workdir)
    saved_path = workdir / "config.json"
    if not has_checkpoints(workdir) or not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    conflicts = resume_conflicts(_paths_absolute(saved), _paths_absolute(json.loads(config_lib.to_json(config))),
                                 json.loads(config_lib.to_json(base.get_config())))
    if conflicts:
        listed = "\n  ".join(conflicts)
        raise WorkdirError(
            f"{workdir} holds checkpoints of a run whose config differs in keys a resume cannot change:\n  {listed}\n"
            "Nothing was written. Train into another --workdir, or drop these overrides to resume this run.")
