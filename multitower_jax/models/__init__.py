"""The multi-tower CTR/CVR model: towers, text encoder, fusion and heads (Flax linen)."""

from multitower_jax.model_settings import validate_config
from multitower_jax.models.fusion import FUSIONS, Fusion, interaction_features, pairwise_dots
from multitower_jax.models.heads import HEADS, Heads, head_outputs
from multitower_jax.models.layers import LOGICAL_AXES, MLP, Block, FeatureEmbedding
from multitower_jax.models.model import (
    ModelConfig,
    MultiTowerModel,
    TextSettings,
    build_model,
    dummy_features,
    init_params,
    param_count,
)
from multitower_jax.models.text_encoder import TextEncoder, TextEncoderConfig, sinusoidal_positions
from multitower_jax.models.towers import Tower, tower_input_dim
from multitower_jax.models.wide import Wide

__all__ = [
    "FUSIONS", "HEADS", "LOGICAL_AXES",
    "Block", "FeatureEmbedding", "Fusion", "Heads", "MLP", "ModelConfig", "MultiTowerModel",
    "TextEncoder", "TextEncoderConfig", "TextSettings", "Tower", "Wide",
    "build_model", "dummy_features", "head_outputs", "init_params", "interaction_features",
    "pairwise_dots", "param_count", "sinusoidal_positions", "tower_input_dim", "validate_config",
]
