"""The identity of a training run, carried by every artifact built from it.

`multitower train` writes ``<workdir>/run.json`` when a workdir's first training step starts: a
random ``run_id`` and the shapes of the parameters (with their digest). A resumed run keeps it; a
workdir trained again from scratch gets a new one. Exports, indexes, portable scorers and
calibrations record ``{"run_id", "params_digest"}`` (`stamp`) and are refused (`check`) when
loaded against another run, even one whose config is the same: the config fingerprint says
what the model is (`config.fingerprint`), the run id says which weights. Imports nothing
heavy: the portable scorer checks it with jax and numpy only.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import uuid
import warnings
from collections.abc import Mapping
from typing import Any

from etils import epath

from multitower_jax import fileio

FILE = "run.json"
ALLOW_FLAG = "--allow-other-run"


class RunMismatchError(ValueError):
    """An artifact was built from another training run than the one it is used with."""


class RunMismatchWarning(UserWarning):
    """As RunMismatchError, when the check was overridden (`--allow-other-run`)."""


def param_shapes(params: Any, prefix: str = "") -> dict[str, list[int]]:
    """``{"user_tower/mlp/block_0/dense/kernel": [rows, cols], ...}`` for every parameter of a
    nested mapping of arrays (or ShapeDtypeStructs)."""
    if isinstance(params, Mapping):
        return {k: v for key in sorted(params) for k, v in param_shapes(params[key], f"{prefix}{key}/").items()}
    return {prefix.rstrip("/"): [int(d) for d in params.shape]}


def shapes_digest(shapes: Mapping[str, list[int]]) -> str:
    return hashlib.sha256(json.dumps(dict(shapes), sort_keys=True).encode()).hexdigest()[:16]


def create(workdir: str | os.PathLike, params: Any) -> dict[str, Any]:
    """A new identity for the run starting in `workdir`, written to ``<workdir>/run.json``."""
    shapes = param_shapes(params)
    identity = {"run_id": uuid.uuid4().hex, "params_digest": shapes_digest(shapes),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "param_shapes": shapes}
    fileio.write_json(epath.Path(workdir) / FILE, identity)
    return identity


def read(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The workdir's identity; None for a workdir trained before run identities existed."""
    path = epath.Path(workdir) / FILE
    if not path.is_file():
        return None
    try:
        identity = json.loads(path.read_text())
    except ValueError as e:
        raise RunMismatchError(f"{path}: not valid JSON ({e}); it identifies the run, so artifacts cannot be "
                               "checked against it") from None
    if not isinstance(identity, dict) or not identity.get("run_id"):
        raise RunMismatchError(f"{path}: no run_id in it")
    return identity


def stamp(identity: Mapping[str, Any] | None) -> dict[str, str] | None:
    """What an artifact records of the run it was built from."""
    if identity is None:
        return None
    return {"run_id": identity["run_id"], "params_digest": identity["params_digest"]}


def check(have: Mapping[str, Any] | None, want: Mapping[str, Any] | None, where: str, *,
          allow_other_run: bool = False) -> None:
    """Refuse (RunMismatchError) an artifact whose recorded run (`have`) is not `want`, the run
    it is used with; with `allow_other_run`, only warn. Either side missing (made before run
    identities existed) is not checked."""
    if not have or not want:
        return
    for key in ("run_id", "params_digest"):
        if have.get(key) != want.get(key):
            message = (f"{where} was built from run {have.get('run_id')} (parameters {have.get('params_digest')}), "
                       f"but it is used with run {want.get('run_id')} (parameters {want.get('params_digest')}); "
                       f"rebuild it from this workdir, or pass {ALLOW_FLAG} to use it anyway")
            if allow_other_run:
                warnings.warn(message, RunMismatchWarning, stacklevel=2)
                return
            raise RunMismatchError(message)
