"""A trained workdir, loaded for inference: config, feature spec, model, parameters, statistics.

    trained = load_trained("runs/quickstart")
    e_ad_BxD = trained.model.apply({"params": trained.params}, ad_features, method=trained.model.embed_ad)

Export, retrieval and serving all start here, so they agree on which checkpoint and which
preprocessing they use. ``fingerprint`` identifies the model architecture and feature spec
(not the weights): artifacts built from one model refuse to load against another. ``identity``
names the training run and its parameter shapes (`run_identity`): artifacts built from another
run of the same model are refused too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import ml_collections
from etils import epath

from multitower_jax import config as config_lib
from multitower_jax import features as F
from multitower_jax import run_identity
from multitower_jax import workdir as workdir_lib
from multitower_jax.data.preprocess import FeatureStats, Preprocessor
from multitower_jax.models import model as model_lib
from multitower_jax.train import trainer as trainer_lib

FINGERPRINT_SECTIONS = config_lib.FINGERPRINT_SECTIONS
fingerprint = config_lib.fingerprint


@dataclasses.dataclass
class Trained:
    config: ml_collections.ConfigDict
    spec: F.FeatureSpec
    model: model_lib.MultiTowerModel
    params: Any  # unboxed parameter pytree (replicated jax.Arrays)
    stats: FeatureStats
    step: int
    workdir: epath.Path
    run: dict[str, Any] | None = None  # <workdir>/run.json; None for workdirs trained before it existed

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.config)

    @property
    def identity(self) -> dict[str, str] | None:
        """What artifacts built from these parameters record (`run_identity.stamp`): the run id,
        and the digest of the parameter shapes actually restored."""
        if self.run is None:
            return None
        return {"run_id": self.run["run_id"],
                "params_digest": run_identity.shapes_digest(run_identity.param_shapes(self.params))}

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
    workdir = epath.Path(workdir_lib.absolute(workdir))  # a local folder or gs://... (pathlib would make gs:// local)
    if not (workdir / "config.json").is_file():
        raise FileNotFoundError(f"{workdir / 'config.json'} not found: is {workdir} a `multitower train` workdir?")
    config = config_lib.apply_overrides(config_lib.from_json(workdir / "config.json"), overrides)
    config_lib.validate(config)
    trainer = trainer_lib.Trainer(config, workdir)
    params, step = trainer.restore_final(step)
    return Trained(config=config, spec=trainer.spec, model=trainer.model, params=params,
                   stats=trainer.stats, step=step, workdir=workdir, run=run_identity.read(workdir))
