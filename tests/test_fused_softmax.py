"""The in-batch softmax by Pallas kernels (`train.fused_softmax`, in Pallas' interpreter on CPU):
the loss against a float64 NumPy softmax and, with its gradients, against the XLA loss; per shard of
8 devices. Compiled for a TPU: tests/test_compile.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from multitower_jax.train import fused_softmax, losses
from multitower_jax.train.sharding import BATCH_AXES
from tests.test_losses import np_retrieval_loss, retrieval_inputs


@pytest.mark.parametrize("temperature, logq, normalize", [(0.1, True, True), (2.0, False, False)])
def test_fused_loss_matches_a_numpy_softmax(temperature, logq, normalize):
    # 300 rows: two row blocks of 256 (the second padded), ads padded to 384.
    e_user, e_context, e_ad, batch = retrieval_inputs(size=300, dim=16)
    got = losses.retrieval_loss(e_user, e_context, e_ad, batch, temperature, logq, normalize, kernel="pallas_interpret")
    expected = np_retrieval_loss(e_user, e_context, e_ad, batch["ad_id"], batch["ad_log_q"], batch["click"],
                                 batch["weight"], temperature, logq, normalize)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def _loss_and_grads(kernel, inputs, mesh=None):
    e_user, e_context, e_ad, batch = inputs

    def loss(e_user, e_context, e_ad):
        return losses.retrieval_loss(e_user, e_context, e_ad, batch, 0.1, True, True, mesh, BATCH_AXES,
                                     "impressions", kernel)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(e_user, e_context, e_ad)


def test_fused_loss_and_gradients_equal_the_xla_loss_alone_and_on_8_devices():
    inputs = retrieval_inputs(size=64, dim=16, seed=3)
    want, want_grads = _loss_and_grads("xla", inputs)
    got, got_grads = _loss_and_grads("pallas_interpret", inputs)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(8, 1), ("data", "model"))
    rows = NamedSharding(mesh, P(BATCH_AXES))
    e_user, e_context, e_ad, batch = inputs
    sharded = (*(jax.device_put(x, rows) for x in (e_user, e_context, e_ad)),
               {k: jax.device_put(v, rows) for k, v in batch.items()})
    sharded_loss, sharded_grads = _loss_and_grads("pallas_interpret", sharded, mesh)
    for loss, grads in ((got, got_grads), (sharded_loss, sharded_grads)):
        np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
        for g, w in zip(grads, want_grads):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(w))))


def test_in_batch_nll_masks_duplicate_ads_and_padding_columns():
    """Two rows showing the same ad: each one's softmax excludes the other's column, so with
    equal scores the nll is log(number of distinct candidates)."""
    q = jnp.ones((3, 8), jnp.float32)
    ads = jnp.ones((3, 8), jnp.float32)
    nll = fused_softmax.in_batch_nll(q, ads, jnp.zeros(3), jnp.arange(3), jnp.array([7, 7, 9]), jnp.array([7, 7, 9]),
                                     1.0, interpret=True)
    # 3 ads padded to 128 columns: the padding is masked too.
    np.testing.assert_allclose(np.asarray(nll), np.log([2.0, 2.0, 3.0]), rtol=1e-6)
