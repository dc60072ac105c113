"""Mixed precision: model.dtype="bfloat16" computes in bf16 while parameters, gradients,
optimizer state, logits and losses stay float32."""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

from multitower_jax.data import fake
from multitower_jax.train import losses, optim
from tests.test_models import jit, make, params_of, tiny_config


def _models():
    f32 = tiny_config()
    bf16 = tiny_config()
    bf16.model.dtype = "bfloat16"
    spec, model32, variables = make(f32)
    _, model16, _ = make(bf16)
    return spec, model32, model16, variables


def _dot_dtypes(jaxpr) -> set:
    """Operand dtypes of every matrix multiply in a jaxpr (sub-jaxprs included)."""
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.update(str(v.aval.dtype) for v in eqn.invars)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found |= _dot_dtypes(sub)
    return found


def test_bf16_computes_in_bf16_and_keeps_float32_parameters_and_outputs():
    spec, model32, model16, variables = _models()
    batch = jax.tree.map(jnp.asarray, fake.random_batch(spec, "search", 64, seed=1, click_rate=0.3))
    forward16 = lambda v, b: model16.apply(v, b, "search")  # noqa: E731
    forward32 = lambda v, b: model32.apply(v, b, "search")  # noqa: E731

    assert _dot_dtypes(jax.make_jaxpr(forward16)(variables, batch).jaxpr) == {"bfloat16"}
    assert _dot_dtypes(jax.make_jaxpr(forward32)(variables, batch).jaxpr) == {"float32"}
    assert {x.dtype for x in jax.tree.leaves(params_of(variables))} == {jnp.dtype("float32")}

    out16, out32 = jit(forward16)(variables, batch), jit(forward32)(variables, batch)
    for key in ("ctr_logit", "e_user", "e_ad"):
        if key in out32:
            assert out16[key].dtype == jnp.float32
    p16, p32 = np.asarray(out16["pctr"]), np.asarray(out32["pctr"])
    assert p16.dtype == np.float32
    np.testing.assert_allclose(p16, p32, atol=0.03)  # bf16 keeps ~3 significant digits
    assert not np.allclose(p16, p32, atol=1e-7)  # ... so it really ran in bf16
    assert np.corrcoef(p16, p32)[0, 1] > 0.99


def test_bf16_gradients_and_optimizer_state_are_float32_and_close_to_float32():
    spec, model32, model16, variables = _models()
    config = tiny_config()
    loss_config = losses.LossConfig.from_config(config)
    batch = jax.tree.map(jnp.asarray, fake.random_batch(spec, "search", 64, seed=2, click_rate=0.3))
    params = params_of(variables)

    def grads(model):
        def loss_fn(p):
            return losses.total_loss(model.apply({"params": p}, batch, "search"), batch, loss_config)[0]
        return jit(jax.grad(loss_fn))(params)

    g16, g32 = grads(model16), grads(model32)
    assert {x.dtype for x in jax.tree.leaves(g16)} == {jnp.dtype("float32")}
    flat16, flat32 = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for g in (g16, g32))
    cosine = flat16 @ flat32 / (np.linalg.norm(flat16) * np.linalg.norm(flat32))
    assert cosine > 0.95, cosine  # random weights of scale 0.5 amplify rounding; a wrong cast gives ~0
    opt_state = optim.make_optimizer(config).init(params)
    assert {x.dtype for x in jax.tree.leaves(opt_state) if jnp.issubdtype(x.dtype, jnp.floating)} == {
        jnp.dtype("float32")}
