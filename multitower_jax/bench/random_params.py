"""Random model parameters drawn on the host, for benchmarks and tests: the whole model's
(`bench serve`) or any tree of shapes, such as the scorer's share (`bench score`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from multitower_jax.models import model as model_lib


def random_params(model: model_lib.MultiTowerModel, seed: int = 0) -> dict:
    """Random parameters of the model's shapes, drawn on the host: compiling the model's own
    initializers takes ~30 s on 2 CPU cores, and benchmarks and tests only need random values.
    Dense kernels ~ N(0, 1 / fan_in), embeddings ~ N(0, 1), LayerNorm scales 1, biases small."""
    shapes = nn.meta.unbox(jax.eval_shape(lambda key: model_lib.init_params(model, key), jax.random.key(seed)))
    return random_like(shapes, seed)["params"]


def random_like(shapes, seed: int = 0):
    """Host-drawn random arrays of a tree of shapes (the distributions of `random_params`)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf) -> np.ndarray:
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return np.ones(leaf.shape, leaf.dtype)
        if name == "bias" or leaf.ndim < 2:
            return (0.01 * rng.normal(size=leaf.shape)).astype(leaf.dtype)
        std = 1.0 if name == "embedding" else 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
        return (std * rng.normal(size=leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)
