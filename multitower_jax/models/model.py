"""MultiTowerModel: shared user and ad towers, one context tower + fusion + heads per placement.

    model = build_model(config, spec)
    variables = init_params(model, jax.random.key(0))           # every placement's params
    out = model.apply(variables, batch, "search", train=True, rngs={"dropout": rng})
    e_ad = model.apply(variables, batch["ad"], method=model.embed_ad)
    scores = model.apply(variables, e_user, e_context, e_ad, "search", method=model.score_embeddings)

The parameters are boxed with logical axis names (`flax.linen.Partitioned`);
`nn.get_partition_spec(variables)` gives their logical specs, `nn.meta.unbox` the raw arrays.
`apply` accepts either form.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from multitower_jax import features as F
from multitower_jax.model_settings import num_logits, str_or_tuple, validate_config
from multitower_jax.models import layers
from multitower_jax.models import towers as towers_lib
from multitower_jax.models.fusion import Fusion
from multitower_jax.models.heads import Heads
from multitower_jax.models.text_encoder import TextEncoder, TextEncoderConfig
from multitower_jax.models.wide import Wide

Array = jax.Array
Batch = Mapping[str, Any]

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # `model_settings.DTYPES`


@dataclasses.dataclass(frozen=True)
class TextSettings:
    """The encoder's architecture; vocabulary and length come from the feature spec."""

    dim: int = 128
    num_layers: int = 2
    num_heads: int = 8
    mlp_dim: int = 512
    positional: str = "sinusoidal"
    pooling: str = "mean"
    norm: str = "pre"
    dropout: float = 0.1
    kernel: str = "xla"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Frozen (hashable) copy of ``config.model`` plus the placements to build."""

    placements: tuple[str, ...] = ("search",)
    embed_dim: int = 128
    user_hidden: tuple[int, ...] = (256,)  # hidden widths; the tower's output is embed_dim
    context_hidden: tuple[int, ...] = ()
    ad_hidden: tuple[int, ...] = (256,)
    tower_dropout: float = 0.2
    context_dropout: float = 0.0
    fusion: str = "dot"
    fusion_hidden: tuple[int, ...] = (256, 128, 64)
    fusion_dropout: float = 0.3
    head: str = "esmm"
    share_text_encoder: bool = True
    text: TextSettings = TextSettings()
    dtype: str = "float32"
    vocab_multiple: int = 1  # embedding-table rows are padded to a multiple of this
    embed_init: str = "normal"  # embedding tables' initialization (`model_settings.EMBED_INITS`)
    tower_output: str = "relu"  # "relu": towers end Dense -> LayerNorm -> ReLU; "layernorm": at the LayerNorm
    wide: bool = False  # `Wide` logit offsets, linear in the context tower's features
    wide_pooling: str | tuple[str, ...] = ("mean",)  # how the wide part pools tokens and multi-hot items

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> ModelConfig:
        m = config.model
        return cls(
            placements=tuple(config.data.placements),
            embed_dim=int(m.embed_dim),
            user_hidden=tuple(int(w) for w in m.user_hidden),
            context_hidden=tuple(int(w) for w in m.context_hidden),
            ad_hidden=tuple(int(w) for w in m.ad_hidden),
            tower_dropout=float(m.tower_dropout),
            context_dropout=float(m.context_dropout),
            fusion=str(m.fusion),
            fusion_hidden=tuple(int(w) for w in m.fusion_hidden),
            fusion_dropout=float(m.fusion_dropout),
            head=str(m.head),
            share_text_encoder=bool(m.share_text_encoder),
            text=TextSettings(**{k: m.text.get(k, v) for k, v in dataclasses.asdict(TextSettings()).items()}),
            dtype=str(m.dtype),
            vocab_multiple=int(m.get("vocab_multiple", 1)),
            embed_init=str(m.get("embed_init", "normal")),
            tower_output=str(m.get("tower_output", "relu")),
            wide=bool(m.get("wide", False)),
            wide_pooling=str_or_tuple(m.get("wide_pooling", ("mean",))),
        )


def _text_config(settings: TextSettings, specs: list[F.TowerSpec], dtype: Any,
                 vocab_multiple: int = 1, embed_init: str = "normal", mesh: Mesh | None = None) -> TextEncoderConfig:
    """One encoder for the given towers: vocabulary and positions cover all of them."""
    return TextEncoderConfig(
        vocab_size=layers.padded_rows(max(towers_lib.text_vocab_size(s) for s in specs), vocab_multiple),
        max_len=max(towers_lib.text_length(s) for s in specs),
        dim=settings.dim,
        num_layers=settings.num_layers,
        num_heads=settings.num_heads,
        mlp_dim=settings.mlp_dim,
        positional=settings.positional,
        pooling=settings.pooling,
        norm=settings.norm,
        dropout_rate=settings.dropout,
        dtype=dtype,
        embed_init=embed_init,
        kernel=settings.kernel,
        mesh=mesh,
    )


class MultiTowerModel(nn.Module):
    """The seeds' three-tower CTR/CVR model for the placements in `config.placements`."""

    config: ModelConfig
    user_spec: F.TowerSpec
    ad_spec: F.TowerSpec
    context_specs: tuple[tuple[str, F.TowerSpec], ...]  # (placement, spec), hashable
    # The devices the batch is sharded over: the fused text-encoder kernel runs per shard.
    mesh: Mesh | None = None

    def setup(self) -> None:
        cfg = self.config
        dtype = COMPUTE_DTYPES[cfg.dtype]
        contexts = dict(self.context_specs)
        missing = [p for p in cfg.placements if p not in contexts]
        if missing:
            raise ValueError(f"no context feature spec for placements {missing}")
        all_specs = [self.user_spec, self.ad_spec, *(contexts[p] for p in cfg.placements)]
        with_text = [s for s in all_specs if s.of_type("text")]

        shared = None
        if cfg.share_text_encoder and with_text:
            # One encoder (and one token table) for query and ad text: queries and titles
            # land in one space, which is what the context.ad dot product compares.
            shared = TextEncoder(_text_config(cfg.text, with_text, dtype, cfg.vocab_multiple, cfg.embed_init, self.mesh))
        self.text_encoder = shared

        def tower(spec: F.TowerSpec, hidden: tuple[int, ...], dropout: float) -> towers_lib.Tower:
            own = (None if shared is not None or not spec.of_type("text")
                   else _text_config(cfg.text, [spec], dtype, cfg.vocab_multiple, cfg.embed_init, self.mesh))
            return towers_lib.Tower(spec, hidden + (cfg.embed_dim,), dropout, shared, own, dtype, cfg.vocab_multiple,
                                    cfg.embed_init, cfg.tower_output == "relu")

        self.user_tower = tower(self.user_spec, cfg.user_hidden, cfg.tower_dropout)
        self.ad_tower = tower(self.ad_spec, cfg.ad_hidden, cfg.tower_dropout)
        self.context_towers = {p: tower(contexts[p], cfg.context_hidden, cfg.context_dropout)
                               for p in cfg.placements}
        self.fusions = {p: Fusion(cfg.fusion, cfg.fusion_hidden, cfg.fusion_dropout, dtype)
                        for p in cfg.placements}
        self.heads = {p: Heads(cfg.head, dtype) for p in cfg.placements}
        if cfg.wide:
            k = num_logits(cfg.head)
            self.context_wides = {p: Wide(contexts[p], k, cfg.vocab_multiple, cfg.wide_pooling) for p in cfg.placements}

    def _check(self, placement: str) -> None:
        if placement not in self.config.placements:
            raise ValueError(f"placement {placement!r} is not in this model's placements {self.config.placements}")

    def embed_user(self, features: Mapping[str, Array], train: bool = False) -> Array:
        """batch["user"] -> E_user float32[B, D] (cacheable per user)."""
        return self.user_tower(features, train).astype(jnp.float32)

    def embed_context(self, features: Mapping[str, Array], placement: str, train: bool = False) -> Array:
        """batch["context"] of `placement` -> E_context float32[B, D] (per request)."""
        self._check(placement)
        return self.context_towers[placement](features, train).astype(jnp.float32)

    def embed_ad(self, features: Mapping[str, Array], train: bool = False) -> Array:
        """batch["ad"] -> E_ad float32[B, D] (precomputed per ad, exported to the ANN index)."""
        return self.ad_tower(features, train).astype(jnp.float32)

    def embed_context_wide(self, features: Mapping[str, Array], placement: str,
                           train: bool = False) -> tuple[Array, Array | None]:
        """batch["context"] -> (E_context float32[B, D], the `Wide` logit offsets float32[B, K] or
        None without `config.wide`): what a request contributes besides its user."""
        e_context_BxD = self.embed_context(features, placement, train)
        if not self.config.wide:
            return e_context_BxD, None
        return e_context_BxD, self.context_wides[placement](features)

    def score_embeddings(self, e_user_BxD: Array, e_context_BxD: Array, e_ad_BxD: Array, placement: str,
                         train: bool = False, offsets_BxK: Array | None = None) -> dict[str, Array]:
        """Fusion + heads from precomputed embeddings (+ the context's `Wide` offsets) -> logits
        and probabilities [B]."""
        self._check(placement)
        h_BxH = self.fusions[placement](e_user_BxD, e_context_BxD, e_ad_BxD, train)
        return self.heads[placement](h_BxH, offsets_BxK)

    def __call__(self, batch: Batch, placement: str, train: bool = False) -> dict[str, Array]:
        """Full forward pass: head outputs plus the three embeddings e_user, e_context, e_ad."""
        e_user_BxD = self.embed_user(batch["user"], train)
        e_context_BxD, offsets_BxK = self.embed_context_wide(batch["context"], placement, train)
        e_ad_BxD = self.embed_ad(batch["ad"], train)
        out = dict(self.score_embeddings(e_user_BxD, e_context_BxD, e_ad_BxD, placement, train, offsets_BxK))
        if offsets_BxK is not None and offsets_BxK.shape[-1] > 1:  # the wide part's own CVR logit
            out["wide_cvr_logit"] = offsets_BxK[:, 1]
        out.update(e_user=e_user_BxD, e_context=e_context_BxD, e_ad=e_ad_BxD)
        return out

    def init_all(self, batches: Mapping[str, Batch]) -> dict[str, dict[str, Array]]:
        """Run every placement once, so `init` creates all parameters."""
        return {p: self(batches[p], p) for p in self.config.placements}


def dummy_features(spec: F.TowerSpec, batch_size: int) -> dict[str, np.ndarray]:
    """All-zero inputs of the right dtypes and shapes (0 is a valid id: OOV / pad)."""
    out = {}
    for f in spec.features:
        if isinstance(f, F.Categorical):
            out[f.name] = np.zeros((batch_size,), np.int32)
        elif isinstance(f, F.Numeric):
            out[f.name] = np.zeros((batch_size,), np.float32)
        elif isinstance(f, F.Text):
            out[f.name] = np.zeros((batch_size, f.max_len), np.int32)
        elif isinstance(f, F.Dense):
            out[f.name] = np.zeros((batch_size, f.dim), np.float16)  # as the pipeline ships them
        elif isinstance(f, F.MultiHot):
            out[f.name] = np.zeros((batch_size, f.max_items), np.int32)
    return out


def init_params(model: MultiTowerModel, rng: Array, batch_size: int = 1) -> dict[str, Any]:
    """Variables (``{"params": ...}``, boxed with logical names) for every placement.

    Pure in `rng`, so it can run under ``jax.eval_shape`` or ``jax.jit(out_shardings=...)``.
    """
    contexts = dict(model.context_specs)
    batches = {
        p: {"user": dummy_features(model.user_spec, batch_size),
            "context": dummy_features(contexts[p], batch_size),
            "ad": dummy_features(model.ad_spec, batch_size)}
        for p in model.config.placements
    }
    return model.init({"params": rng}, batches, method=MultiTowerModel.init_all)


def build_model(config: ml_collections.ConfigDict, spec: F.FeatureSpec, mesh: Mesh | None = None) -> MultiTowerModel:
    """The model for ``config.model`` and ``config.data.placements`` over `spec`; `mesh`, the
    devices its batches are sharded over (the fused text-encoder kernel runs per shard)."""
    validate_config(config)
    model_cfg = ModelConfig.from_config(config)
    return MultiTowerModel(
        config=model_cfg,
        user_spec=spec.user,
        ad_spec=spec.ad,
        context_specs=tuple((p, spec.context(p)) for p in model_cfg.placements),
        mesh=mesh,
    )


def param_count(variables: Mapping[str, Any]) -> int:
    """Number of scalars in the parameters (boxed or not)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.meta.unbox(variables)))


