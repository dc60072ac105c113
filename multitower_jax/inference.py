"""A trained workdir, loaded for inference: config, feature spec, model, parameters, statistics.

    trained = load_trained("runs/quickstart")
    e_ad_BxD = trained.model.apply({"params": trained.params}, ad_features, method=trained.model.embed_ad)

Export, retrieval and serving all start here, so they agree on which checkpoint and which
preprocessing they use. ``fingerprint`` identifies the model architecture and feature spec
(not the weights): artifacts built from one model refuse to load against another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import ml_collections
from etils import epath

from multitower_jax import config as config_lib
from multitower_jax import features as F
from multitower_jax.data.preprocess import FeatureStats, Preprocessor
from multitower_jax.models import model as model_lib

# The config sections that decide what an embedding means; training knobs do not.
FINGERPRINT_SECTIONS = ("features", "model", "loss")


def fingerprint(config: ml_collections.ConfigDict) -> str:
    """A short stable hash of the sections that define the model's inputs and outputs."""
    resolved = json.loads(config_lib.to_json(config))
    part = {k: resolved.get(k) for k in FINGERPRINT_SECTIONS}
    part["placements"] = resolved["data"]["placements"]
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass
class Trained:
    config: ml_collections.ConfigDict
    spec: F.FeatureSpec
    model: model_lib.MultiTowerModel
    params: Any  # unboxed parameter pytree (replicated jax.Arrays)
    stats: FeatureStats
    step: int
    workdir: epath.Path

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.config)

    @property
    def embed_dim(self) -> int:
        return int(self.config.model.embed_dim)

    def preprocessor(self, placement: str | None = None) -> Preprocessor:
        """The training-time feature transforms (ids, hashing, tokenizer, normalization)."""
        return Preprocessor(self.spec, placement or self.config.data.placements[0], self.stats)


def load_trained(workdir: str | Path, step: int | None = None,
                 overrides: tuple[str, ...] = ()) -> Trained:
    """Restore the parameters of a `multitower train` workdir: by default those of its best
    validation evaluation (what `eval_test.json` reports), else its latest checkpoint's; with
    `step`, that checkpoint's."""
    from multitower_jax.train import trainer as trainer_lib  # heavy: optimizer, mesh, orbax

    workdir = epath.Path(workdir)  # a local folder or gs://... (pathlib would make gs:// local)
    if not (workdir / "config.json").is_file():
        raise FileNotFoundError(f"{workdir / 'config.json'} not found: is {workdir} a `multitower train` workdir?")
    config = config_lib.apply_overrides(config_lib.from_json(workdir / "config.json"), overrides)
    config_lib.validate(config)
    trainer = trainer_lib.Trainer(config, workdir)
    params, step = trainer.restore_final(step)
    return Trained(config=config, spec=trainer.spec, model=trainer.model, params=params,
                   stats=trainer.stats, step=step, workdir=workdir)
