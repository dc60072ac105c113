"""The fused Pallas encoder layer (run in Pallas' interpreter on CPU) against flax's layer; on 8
devices inside the train step: tests/test_trainer.py; compiled for a TPU: tests/test_compile.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multitower_jax import config as config_lib
from multitower_jax.models import fused_encoder
from multitower_jax.models.text_encoder import EncoderLayer, TextEncoderConfig

from conftest import QUICKSTART


def _perturbed(params, seed):
    """Parameters off their init (LayerNorm scale 1, biases 0), so every term of the math counts."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _inputs(batch, length, dim, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, length, dim)), jnp.float32)
    mask = rng.random((batch, length)) < 0.6
    mask[:, 0] = True  # every text has a token...
    mask[1] = False  # ...but one, an empty text: its output is finite, and pooled over no tokens
    cotangent = rng.normal(size=(batch, length, dim))
    cotangent[1] = 0.0  # (nothing reads it)
    return x, jnp.asarray(mask), jnp.asarray(cotangent, jnp.float32)


def _max_rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(a)), 1e-6))


@pytest.mark.parametrize("num_heads", [1, 2])
def test_fused_layer_and_its_gradients_match_flax_layer(num_heads):
    # 5 rows and 11 positions: both are padded inside (rows to 16, positions to 16).
    cfg = TextEncoderConfig(vocab_size=50, max_len=11, dim=32, num_heads=num_heads, mlp_dim=64,
                            dropout_rate=0.0, dtype=jnp.float32)
    x, mask, cotangent = _inputs(5, 11, cfg.dim)
    layer = EncoderLayer(cfg)
    params = _perturbed(nn.meta.unbox(layer.init(jax.random.PRNGKey(0), x, mask, False)["params"]), 1)

    def flax_loss(x, p):
        return jnp.sum(layer.apply({"params": p}, x, mask, False) * cotangent)

    def fused_loss(x, p):
        y = fused_encoder.encoder_layer(x, mask, fused_encoder.flatten_params(p, cfg.dim), num_heads, jnp.float32,
                                        interpret=True)
        return jnp.sum(y * cotangent)

    y_flax = layer.apply({"params": params}, x, mask, False)
    y_fused = fused_encoder.encoder_layer(x, mask, fused_encoder.flatten_params(params, cfg.dim), num_heads,
                                          jnp.float32, interpret=True)
    assert y_fused.shape == y_flax.shape and bool(jnp.all(jnp.isfinite(y_fused)))
    texts = np.array([0, 2, 3, 4])
    assert _max_rel_err(y_flax[texts], y_fused[texts]) < 1e-5
    grads_flax = jax.grad(flax_loss, argnums=(0, 1))(x, params)
    grads_fused = jax.grad(fused_loss, argnums=(0, 1))(x, params)
    assert _max_rel_err(grads_flax[0], grads_fused[0]) < 1e-5
    flat_flax = dict(jax.tree_util.tree_leaves_with_path(grads_flax[1]))
    flat_fused = dict(jax.tree_util.tree_leaves_with_path(grads_fused[1]))
    assert flat_flax.keys() == flat_fused.keys()
    scale = max(float(jnp.max(jnp.abs(g))) for g in flat_flax.values())
    for path, g in flat_flax.items():
        # The key bias has no gradient (softmax is shift invariant): compare on the common scale.
        err = float(jnp.max(jnp.abs(g - flat_fused[path])))
        assert err < 1e-5 * scale, (jax.tree_util.keystr(path), err, scale)


def test_the_kernel_is_used_only_on_tpu_devices_and_needs_pre_norm_without_dropout():
    cfg = TextEncoderConfig(vocab_size=10, max_len=4, kernel="pallas")
    assert not cfg.fused()  # CPU here: the XLA ops
    assert TextEncoderConfig(vocab_size=10, max_len=4, kernel="pallas_interpret").fused()
    config = config_lib.load(QUICKSTART)
    config.model.text.kernel = "pallas"
    config_lib.validate(config)  # the quickstart: pre-norm, text dropout 0
    config.model.text.dropout = 0.1
    with pytest.raises(ValueError, match=r"model\.text\.dropout.*0\.0 with model\.text\.kernel='pallas'"):
        config_lib.validate(config)
    config.model.text.dropout = 0.0
    config.model.text.norm = "post"
    with pytest.raises(ValueError, match=r"model\.text\.norm"):
        config_lib.validate(config)
