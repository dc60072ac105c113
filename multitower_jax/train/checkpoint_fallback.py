"""Restoring the newest checkpoint that can be read: an unreadable newer one is skipped with a
warning and, for a run that will save again, moved aside into ``<workdir>/corrupt/``."""

from __future__ import annotations

import shutil
import time
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from multitower_jax import config as config_lib


class CheckpointError(RuntimeError):
    """No checkpoint of a folder could be restored (each one is unreadable or does not fit the model)."""


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint could not be restored; an older one is used instead."""


CORRUPT_DIR = "corrupt"


def newest_intact(manager: ocp.CheckpointManager, restore, quarantine: bool) -> tuple[Any, int]:
    """`restore(step)` of the newest step that restores. Each newer step that fails is reported
    with a CorruptCheckpointWarning and, with `quarantine` (a run that will save again) once an
    intact step is found, moved to ``<folder>/../corrupt/<folder name>-<step>-<time>`` so that a
    later save can reuse its step number. CheckpointError when no step restores; a ConfigError
    (the run's settings do not fit the checkpoint, e.g. another data.num_shards) is raised as is,
    since every older step would fail the same way and none of them is damaged."""
    directory = epath.Path(manager.directory)
    errors, failed = [], []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = restore(step)
        except config_lib.ConfigError:  # the run's settings do not fit the checkpoint: not corruption
            raise
        except Exception as e:  # noqa: BLE001 -- any failure to read a step means: try the one before
            reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]
            errors.append(f"step {step} ({reason})")
            failed.append(step)
            warnings.warn(f"{directory / str(step)} cannot be restored ({reason}); trying the checkpoint before it",
                          CorruptCheckpointWarning, stacklevel=3)
            continue
        if quarantine and failed:
            _move_aside(directory, failed)
            manager.reload()
        return restored, int(step)
    raise CheckpointError(f"no checkpoint in {directory} can be restored: {'; '.join(errors) or 'none found'}")


def _move_aside(directory: epath.Path, steps: list[int]) -> None:
    if jax.process_index() == 0:
        for step in steps:
            target = directory.parent / CORRUPT_DIR / f"{directory.name}-{step}-{int(time.time())}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(directory / str(step)), str(target))
            print(f"moved the unreadable {directory / str(step)} to {target}")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("unreadable checkpoints moved aside")
