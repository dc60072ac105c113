"""Model tests: shapes, the seeds' dimensions, embedding and padding semantics, fusion, heads,
scoring from cached embeddings, dropout, config validation.

Parameters are filled from numpy (shapes from `jax.eval_shape(init_params)`): compiling the
random initializers takes longer on a small CPU than all the checks below together, and none
of these checks depends on the initial distribution.
"""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from multitower_jax import config as config_lib
from multitower_jax import features as F
from multitower_jax.data import fake
from multitower_jax.models import layers
from multitower_jax.models import (
    FeatureEmbedding,
    TextEncoder,
    TextEncoderConfig,
    build_model,
    init_params,
    interaction_features,
    param_count,
    sinusoidal_positions,
    Wide,
    tower_input_dim,
    validate_config,
)

# These tests compile many small programs and run each once or twice: skipping LLVM's
# optimizations halves the compile time on a small CPU and changes nothing but float rounding.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit(fn, **kwargs):
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


BASE = Path(__file__).resolve().parents[1] / "experiments" / "base.py"


def base_config() -> ml_collections.ConfigDict:
    return config_lib.load_config_file(BASE)


def tiny_config(fusion: str = "dot", head: str = "esmm", share: bool = True) -> ml_collections.ConfigDict:
    config = base_config()
    config.features = ml_collections.ConfigDict({
        "user": {
            "age": dict(type="categorical", size=10, dim=4),
            "clicks": dict(type="numeric"),
            "interest": dict(type="dense", dim=8),
        },
        "ad": {
            "title": dict(type="text", max_len=6, vocab_size=50),
            "description": dict(type="text", max_len=8, vocab_size=50),
            "image": dict(type="dense", dim=8),
            "advertiser": dict(type="categorical", size=30, dim=4, encoding="hash"),
            "ctr": dict(type="numeric", log1p=False),
        },
        "context": {
            "search": {
                "query": dict(type="text", max_len=6, vocab_size=60),
                "hour": dict(type="categorical", size=24, dim=4),
            },
            "category_browse": {
                "filters": dict(type="multi_hot", size=10, max_items=4, dim=4),
                "sort": dict(type="categorical", size=5, dim=4),
            },
        },
    })
    config.data.placements = ("search", "category_browse")
    m = config.model
    m.embed_dim, m.user_hidden, m.ad_hidden, m.fusion_hidden = 16, (32,), (32,), (32, 16, 8)
    m.fusion, m.head, m.share_text_encoder = fusion, head, share
    m.text.dim, m.text.mlp_dim, m.text.num_layers = 16, 32, 1  # 2-layer encoders: see the padding test
    return config


def random_params(init_fn, seed: int = 0, scale: float = 0.5):
    """Parameters with the structure (and logical-axis boxes) of `init_fn`, values from numpy."""
    shapes = jax.eval_shape(init_fn, jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0.0, scale, s.shape), s.dtype), shapes)


def make(config):
    spec = F.parse_spec(config.features)
    model = build_model(config, spec)
    return spec, model, random_params(lambda r: init_params(model, r))


def params_of(variables) -> dict:
    return nn.meta.unbox(variables)["params"]


# --- the seeds' default architecture (shapes only: no compilation) ---------------------------


def test_default_search_model_has_the_seeds_dimensions():
    config = base_config()
    spec = F.parse_spec(config.features)
    model = build_model(config, spec)
    variables = jax.eval_shape(lambda r: init_params(model, r), jax.random.key(0))
    batch = jax.tree_util.tree_map(jnp.asarray, fake.random_batch(spec, "search", 4, seed=0))
    out = jax.eval_shape(lambda v, b: model.apply(v, b, "search"), variables, batch)
    for name in ("e_user", "e_context", "e_ad"):
        assert out[name].shape == (4, 128), name
    for name in ("ctr_logit", "pctr", "cvr_logit", "pcvr", "pctcvr"):
        assert out[name].shape == (4,), name

    assert tower_input_dim(spec.user, 128) == 400 and tower_input_dim(spec.ad, 128) == 412
    p = params_of(variables)
    assert p["user_tower"]["mlp"]["block_0"]["dense"]["kernel"].shape == (400, 256)
    assert p["user_tower"]["mlp"]["block_1"]["dense"]["kernel"].shape == (256, 128)
    assert p["ad_tower"]["mlp"]["block_0"]["dense"]["kernel"].shape == (412, 256)  # 128 text + 128 image + ...
    assert p["context_towers_search"]["mlp"]["block_0"]["dense"]["kernel"].shape[1] == 128
    fusion = p["fusions_search"]["mlp"]
    assert [fusion[f"block_{i}"]["dense"]["kernel"].shape for i in range(3)] == [(387, 256), (256, 128), (128, 64)]
    encoder = p["text_encoder"]  # shared by query and ad text by default
    assert sum(k.startswith("layer_") for k in encoder) == 2
    assert encoder["layer_0"]["attention"]["query"]["kernel"].shape == (128, 8, 16)
    assert param_count(variables) > 1_000_000


def test_parameters_carry_logical_axis_names():
    config = base_config()
    model = build_model(config, F.parse_spec(config.features))
    specs = nn.get_partition_spec(jax.eval_shape(lambda r: init_params(model, r), jax.random.key(0)))["params"]
    assert specs["user_tower"]["features"]["embed_country"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
    assert specs["ad_tower"]["mlp"]["block_0"]["dense"]["kernel"] == jax.sharding.PartitionSpec("embed_in", "mlp")
    assert specs["text_encoder"]["token_embed"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
    rules = (("vocab", "model"),)
    sharding = nn.logical_to_mesh_axes(specs["text_encoder"]["token_embed"]["embedding"], rules)
    assert sharding == jax.sharding.PartitionSpec("model", None)


@pytest.mark.parametrize("share, expected", [(True, {"text_encoder"}), (False, set())])
def test_text_encoder_shared_or_separate(share, expected):
    config = tiny_config(share=share)
    model = build_model(config, F.parse_spec(config.features))
    p = params_of(jax.eval_shape(lambda r: init_params(model, r), jax.random.key(0)))
    assert {k for k in p if k == "text_encoder"} == expected
    assert ("text_encoder" in p["ad_tower"]) == (not share)
    assert ("text_encoder" in p["context_towers_search"]) == (not share)
    assert "text_encoder" not in p["context_towers_category_browse"]  # no text there


def test_fusion_input_widths_for_concat_dot_and_product():
    for fusion, width in (("concat", 48), ("dot", 51), ("product", 96)):
        config = tiny_config(fusion=fusion)
        model = build_model(config, F.parse_spec(config.features))
        p = params_of(jax.eval_shape(lambda r, m=model: init_params(m, r), jax.random.key(0)))
        assert p["fusions_search"]["mlp"]["block_0"]["dense"]["kernel"].shape == (width, 32)


def test_pattern_b_appends_the_three_pairwise_dot_products():
    rng = np.random.default_rng(0)
    u, c, a = (rng.normal(size=(5, 4)).astype(np.float32) for _ in range(3))
    x = np.asarray(interaction_features(u, c, a, "dot"))
    assert x.shape == (5, 15)
    np.testing.assert_allclose(x[:, :12], np.concatenate([u, c, a], axis=1))
    np.testing.assert_allclose(x[:, 12], np.einsum("bd,bd->b", u, a), rtol=1e-6)
    np.testing.assert_allclose(x[:, 13], np.einsum("bd,bd->b", u, c), rtol=1e-6)
    np.testing.assert_allclose(x[:, 14], np.einsum("bd,bd->b", c, a), rtol=1e-6)
    assert np.asarray(interaction_features(u, c, a, "concat")).shape == (5, 12)


def test_product_fusion_appends_the_three_elementwise_products():
    rng = np.random.default_rng(1)
    u, c, a = (rng.normal(size=(5, 4)).astype(np.float32) for _ in range(3))
    x = np.asarray(interaction_features(u, c, a, "product"))
    np.testing.assert_allclose(x, np.concatenate([u, c, a, u * a, u * c, c * a], axis=1), rtol=1e-6)


# --- layers -------------------------------------------------------------------------------


def test_feature_embedding_matches_a_numpy_reference():
    spec = F.TowerSpec("t", (
        F.Categorical("cat", size=3, dim=2),
        F.Dense("dense", dim=3),
        F.MultiHot("tags", size=4, max_items=3, dim=2),
        F.Numeric("num"),
    ))
    module = FeatureEmbedding(spec)
    features = {
        "cat": np.array([0, 3], np.int32),
        "dense": np.arange(6, dtype=np.float32).reshape(2, 3),
        "tags": np.array([[2, 4, 0], [0, 0, 0]], np.int32),  # row 1: no tags at all
        "num": np.array([0.5, -1.0], np.float32),
    }
    variables = random_params(lambda r: module.init(r, features))
    out = np.asarray(jit(module.apply)(variables, features))
    p = params_of(variables)
    cat_table = np.asarray(p["embed_cat"]["embedding"])
    tag_table = np.asarray(p["embed_tags"]["embedding"])
    assert cat_table.shape == (4, 2) and tag_table.shape == (5, 2)  # size + 1 rows
    expected = np.stack([
        np.concatenate([cat_table[0], features["dense"][0], (tag_table[2] + tag_table[4]) / 2, [0.5]]),
        np.concatenate([cat_table[3], features["dense"][1], np.zeros(2), [-1.0]]),
    ])
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_oov_rate_sends_that_fraction_of_training_rows_to_row_zero_and_none_in_eval():
    spec = F.TowerSpec("t", (F.Categorical("user_id", size=50, dim=4, oov_rate=0.25),))
    module = FeatureEmbedding(spec)
    ids = {"user_id": np.arange(1, 4001, dtype=np.int32) % 50 + 1}  # never 0 itself
    variables = random_params(lambda r: module.init(r, ids))
    table = np.asarray(params_of(variables)["embed_user_id"]["embedding"])
    eval_out = np.asarray(module.apply(variables, ids))
    np.testing.assert_allclose(eval_out, table[ids["user_id"]], rtol=1e-6)  # eval: every row its own id
    out = np.asarray(module.apply(variables, ids, train=True, rngs={"dropout": jax.random.key(3)}))
    cold = np.all(out == table[0], axis=1)
    np.testing.assert_allclose(out[~cold], table[ids["user_id"][~cold]], rtol=1e-6)
    assert abs(cold.mean() - 0.25) < 0.03  # 4,000 rows: s.d. of the fraction ~0.007
    with pytest.raises(F.SpecError, match=r"features.user.user_id.oov_rate: expected a fraction in \[0, 1\)"):
        F._parse_feature("features.user.user_id", "user_id", dict(type="categorical", size=5, dim=2, oov_rate=1.5))


def test_sinusoidal_positions_match_the_seeds_worked_example():
    table = sinusoidal_positions(4, 4)
    np.testing.assert_allclose(table[1], [0.841, 0.540, 0.010, 1.000], atol=1e-3)
    np.testing.assert_allclose(table[2], [0.909, -0.416, 0.020, 1.000], atol=1e-3)
    np.testing.assert_allclose(table[3], [0.141, -0.990, 0.030, 1.000], atol=1e-3)


# --- text encoder ---------------------------------------------------------------------------


@pytest.mark.parametrize("positional, pooling, norm", [("sinusoidal", "mean", "pre"), ("learned", "cls", "post")])
def test_text_encoder_ignores_padding(positional, pooling, norm):
    cfg = TextEncoderConfig(vocab_size=40, max_len=10, dim=16, num_layers=2, num_heads=8, mlp_dim=32,
                            positional=positional, pooling=pooling, norm=norm, dropout_rate=0.1)
    encoder = TextEncoder(cfg)
    tokens = np.array([[5, 9, 13, 0, 0, 0], [7, 2, 3, 4, 8, 11], [0, 0, 0, 0, 0, 0]], np.int32)
    variables = random_params(lambda r: encoder.init(r, tokens))
    encode = jit(lambda t, m: encoder.apply(variables, t, m))

    out = np.asarray(encode(tokens, tokens != 0))
    assert out.shape == (3, 16) and np.isfinite(out).all()
    # More pad positions: same output.
    longer = np.concatenate([tokens, np.zeros((3, 4), np.int32)], axis=1)
    np.testing.assert_allclose(np.asarray(encode(longer, longer != 0)), out, atol=1e-5)
    # Anything under the mask: same output.
    garbage = np.where(tokens == 0, np.random.default_rng(1).integers(2, 40, tokens.shape), tokens).astype(np.int32)
    np.testing.assert_allclose(np.asarray(encode(garbage, tokens != 0)), out, atol=1e-5)
    # ...while a real token does matter (the check above could fail).
    changed = tokens.copy()
    changed[0, 1] = 21
    assert np.abs(np.asarray(encode(changed, changed != 0))[0] - out[0]).max() > 1e-3
    # Word order matters too (positional embeddings).
    swapped = tokens.copy()
    swapped[0, :2] = tokens[0, 1::-1]
    assert np.abs(np.asarray(encode(swapped, swapped != 0))[0] - out[0]).max() > 1e-3
    if pooling == "mean":
        np.testing.assert_array_equal(out[2], 0.0)  # an empty text pools to zeros


# --- the full model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config()
    spec, model, variables = make(config)
    batch = fake.random_batch(spec, "search", 8, seed=3, click_rate=0.5)
    run = jit(lambda v, b, rng, train: model.apply(v, b, "search", train=train, rngs={"dropout": rng}),
                  static_argnums=3)
    return spec, model, variables, batch, run


def test_score_embeddings_equals_the_full_forward_pass(tiny):
    _, model, variables, batch, run = tiny

    @jit
    def cached_embeddings(v, b):
        e_user = model.apply(v, b["user"], method=model.embed_user)
        e_context = model.apply(v, b["context"], "search", method=model.embed_context)
        e_ad = model.apply(v, b["ad"], method=model.embed_ad)
        return model.apply(v, e_user, e_context, e_ad, "search", method=model.score_embeddings)

    full = run(variables, batch, jax.random.key(0, impl="unsafe_rbg"), False)
    cached = cached_embeddings(variables, batch)
    assert set(cached) == {"ctr_logit", "pctr", "cvr_logit", "pcvr", "pctcvr"}
    for key, value in cached.items():
        np.testing.assert_allclose(np.asarray(value), np.asarray(full[key]), atol=1e-5, err_msg=key)
    # ESMM: pCTCVR is the product of the two heads, each a sigmoid of its logit.
    np.testing.assert_allclose(np.asarray(full["pctr"]), 1 / (1 + np.exp(-np.asarray(full["ctr_logit"]))), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(full["pctcvr"]), np.asarray(full["pctr"] * full["pcvr"]), rtol=1e-5)


def test_dropout_only_when_training(tiny):
    _, model, variables, batch, run = tiny
    # "unsafe_rbg" keys: threefry's dropout masks and key derivations compile slowly on a small CPU.
    key1, key2 = jax.random.key(1, impl="unsafe_rbg"), jax.random.key(2, impl="unsafe_rbg")
    eval_a = run(variables, batch, key1, False)
    eval_b = run(variables, batch, key2, False)
    train_a = run(variables, batch, key1, True)
    train_a2 = run(variables, batch, key1, True)
    train_b = run(variables, batch, key2, True)
    np.testing.assert_array_equal(np.asarray(eval_a["ctr_logit"]), np.asarray(eval_b["ctr_logit"]))
    np.testing.assert_array_equal(np.asarray(train_a["ctr_logit"]), np.asarray(train_a2["ctr_logit"]))
    assert np.abs(np.asarray(train_a["ctr_logit"] - train_b["ctr_logit"])).max() > 1e-4
    assert np.abs(np.asarray(train_a["e_user"] - eval_a["e_user"])).max() > 1e-4
    # Evaluation needs no dropout RNG at all.
    out = model.apply(variables, batch["user"], method=model.embed_user)
    np.testing.assert_allclose(np.asarray(out), np.asarray(eval_a["e_user"]), atol=1e-5)


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5])
def test_dropout_drops_the_rate_and_keeps_the_expectation(rate):
    x = jnp.full((400, 1001), 2.0)
    drop = layers.Dropout(rate)
    y = np.asarray(drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)}))
    dropped = y == 0
    assert abs(dropped.mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / x.size)  # binomial, 4 sigma
    np.testing.assert_allclose(y[~dropped], 2.0 / (1 - rate), rtol=1e-6)  # exact inverse keep probability
    assert abs(y.mean() - 2.0) < 0.01
    other = np.asarray(drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)}))
    assert (dropped != (other == 0)).mean() > 0.1  # another key, another mask
    # The hash of (row, column) leaves neighbours, rows and columns uncorrelated.
    for a, b in ((dropped[:, :-1], dropped[:, 1:]), (dropped[:-1], dropped[1:])):
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.01
    for axis in (0, 1):  # every row and every column drops about the rate, none is all kept
        frac = dropped.mean(axis)
        assert abs(frac - rate).max() < 6 * np.sqrt(rate * (1 - rate) / x.shape[axis])
    np.testing.assert_array_equal(np.asarray(drop.apply({}, x, deterministic=True)), np.asarray(x))
    # Higher-rank inputs hash their flattened leading dims as rows: same mask as the 2-D view.
    y3 = drop.apply({}, x.reshape(8, 50, 1001), deterministic=False, rngs={"dropout": jax.random.key(0)})
    np.testing.assert_array_equal(np.asarray(y3).reshape(400, 1001), y)


def test_attention_dropout_is_one_mask_over_query_key_positions():
    from multitower_jax.models.text_encoder import dot_product_attention

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(3, 5, 2, 4)), jnp.float32) for _ in range(3))
    exact = dot_product_attention(q, k, v)
    weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0)  # independent reference
    np.testing.assert_allclose(np.asarray(exact), np.asarray(jnp.einsum("bhqk,bkhd->bqhd", weights, v)), atol=1e-5)
    key = jax.random.key(3)
    dropped = dot_product_attention(q, k, v, dropout_rng=key, dropout_rate=0.4, deterministic=False)
    keep = layers.keep_mask(key, (5, 5), 0.4)
    expected = jnp.einsum("bhqk,bkhd->bqhd", jnp.where(keep, weights / 0.6, 0.0), v)
    np.testing.assert_allclose(np.asarray(dropped), np.asarray(expected), atol=1e-5)
    assert 0 < int((~keep).sum()) < 25


def test_every_placement_has_its_own_context_tower(tiny):
    spec, model, variables, _, _ = tiny
    batch = fake.random_batch(spec, "category_browse", 8, seed=4)
    out = jit(lambda v, b: model.apply(v, b, "category_browse"))(variables, batch)
    assert out["e_context"].shape == (8, 16) and np.isfinite(np.asarray(out["pctcvr"])).all()
    with pytest.raises(ValueError, match="placement 'cart'"):
        model.apply(variables, batch["context"], "cart", method=model.embed_context)


@pytest.mark.parametrize("head, keys", [("ctr", {"ctr_logit", "pctr"}),
                                        ("ctr_cvr", {"ctr_logit", "pctr", "cvr_logit", "pcvr", "pctcvr"})])
def test_head_outputs(head, keys):
    config = tiny_config(head=head, fusion="concat")
    config.data.placements = ("search",)
    spec = F.parse_spec(config.features)
    model = build_model(config, spec)
    variables = jax.eval_shape(lambda r: init_params(model, r), jax.random.key(0))
    batch = jax.tree_util.tree_map(jnp.asarray, fake.random_batch(spec, "search", 2, seed=0))
    out = jax.eval_shape(lambda v, b: model.apply(v, b, "search"), variables, batch)
    assert set(out) == keys | {"e_user", "e_context", "e_ad"}
    assert all(out[k].dtype == jnp.float32 for k in keys)


def test_random_batch_follows_the_batch_contract():
    config = tiny_config()
    spec = F.parse_spec(config.features)
    batch = fake.random_batch(spec, "search", 64, seed=0, click_rate=0.2)
    assert batch["context"]["query"].shape == (64, 6) and batch["context"]["query"].dtype == np.int32
    assert batch["ad"]["advertiser"].max() <= 30 and batch["ad"]["advertiser"].min() >= 0
    assert set(np.unique(batch["ad"]["title"])) - {0} <= set(range(2, 50))  # 0 pad, 1 [CLS] reserved
    assert (batch["conversion"] <= batch["click"]).all()
    assert len(np.unique(batch["ad_id"])) < 64  # duplicates, for the retrieval mask
    ads, first = np.unique(batch["ad_id"], return_index=True)
    assert np.all(np.diff(batch["ad_log_q"][first][np.argsort(ads)]) < 0)  # lower ids are more frequent


# --- config validation -------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, message", [
    ("fusion", "x", "config.model.fusion: expected 'concat' or 'dot' or 'product', got 'x'"),
    ("head", "cvr", "config.model.head"),
    ("tower_dropout", 1.5, "config.model.tower_dropout"),
    ("user_hidden", (256, -1), "config.model.user_hidden"),
    ("dtype", "float16", "config.model.dtype"),
])
def test_validate_config_names_the_bad_key(key, value, message):
    config = base_config()
    config.model[key] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(config)


def test_validate_config_checks_text_loss_and_optim():
    config = base_config()
    validate_config(config)
    config.model.text.num_heads = 5
    with pytest.raises(ValueError, match="config.model.text.num_heads"):
        validate_config(config)
    config = base_config()
    config.loss.temperature = 0.0
    with pytest.raises(ValueError, match="config.loss.temperature"):
        validate_config(config)
    config = base_config()
    config.optim.accumulation_steps = 0
    with pytest.raises(ValueError, match="config.optim.accumulation_steps"):
        validate_config(config)


@pytest.mark.parametrize("dim", [4, 64])
def test_unit_embedding_init_gives_rows_of_norm_one_whatever_the_width(dim):
    table = layers.embed(2000, dim, init="unit").init(jax.random.key(0), jnp.zeros(1, jnp.int32))
    rows = np.asarray(nn.meta.unbox(table)["params"]["embedding"])
    np.testing.assert_allclose(np.mean(np.sum(rows**2, axis=1)), 1.0, rtol=0.05)  # E|row|^2 = dim * (1/dim)
    legacy = layers.embed(2000, dim).init(jax.random.key(0), jnp.zeros(1, jnp.int32))
    legacy_rows = np.asarray(nn.meta.unbox(legacy)["params"]["embedding"])
    np.testing.assert_allclose(np.mean(np.sum(legacy_rows**2, axis=1)), dim, rtol=0.05)


def test_layernorm_tower_output_keeps_both_signs_and_relu_output_does_not():
    outputs = {}
    for mode in ("relu", "layernorm"):
        config = tiny_config()
        config.model.tower_output = mode
        spec, model, _ = make(config)
        variables = init_params(model, jax.random.key(0))
        batch = fake.random_batch(spec, "search", 64, seed=1)
        outputs[mode] = np.asarray(model.apply(variables, batch["ad"], method=model.embed_ad))
    assert outputs["relu"].min() >= 0.0
    e = outputs["layernorm"]
    assert (e < 0).mean() > 0.3
    # At init (LayerNorm scale 1, bias 0) every row is standardized: mean 0, variance 1.
    np.testing.assert_allclose(e.mean(axis=1), 0.0, atol=1e-4)
    np.testing.assert_allclose(e.var(axis=1), 1.0, rtol=1e-2)


# --- the wide part -------------------------------------------------------------------------


def test_wide_offsets_match_a_numpy_reference_and_start_at_zero():
    spec = F.TowerSpec("context", (
        F.Categorical("hour", size=5, dim=2),
        F.Text("query", max_len=4, vocab_size=9),
        F.MultiHot("tags", size=4, max_items=3, dim=2),
        F.Numeric("pages"),
        F.Dense("vec", dim=2),
    ))
    module = Wide(spec, num_logits=2)
    features = {
        "hour": np.array([0, 5], np.int32),
        "query": np.array([[3, 7, 7, 0], [0, 0, 0, 0]], np.int32),  # row 1: an empty query
        "tags": np.array([[1, 4, 0], [2, 0, 0]], np.int32),
        "pages": np.array([0.5, -2.0], np.float32),
        "vec": np.array([[1.0, 2.0], [0.0, -1.0]], np.float32),
    }
    at_init = module.apply(module.init(jax.random.key(0), features), features)
    np.testing.assert_array_equal(np.asarray(at_init), np.zeros((2, 2)))  # training starts from the deep model
    variables = random_params(lambda r: module.init(r, features))
    out = np.asarray(jit(module.apply)(variables, features))
    p = params_of(variables)
    hour, query, tags = (np.asarray(p[f"wide_{n}"]["embedding"]) for n in ("hour", "query", "tags"))
    w = np.asarray(p["wide_numeric"]["kernel"])  # rows: pages, vec[0], vec[1]
    assert hour.shape == (6, 2) and query.shape == (9, 2) and tags.shape == (5, 2) and w.shape == (3, 2)
    expected = np.stack([
        hour[0] + (query[3] + 2 * query[7]) / 3 + (tags[1] + tags[4]) / 2 + np.array([0.5, 1.0, 2.0]) @ w,
        hour[5] + 0.0 + tags[2] + np.array([-2.0, 0.0, -1.0]) @ w,
    ]) + np.asarray(p["wide_bias"])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", ["ctr", "esmm"])
def test_wide_model_adds_the_context_offsets_to_each_head_logit(head):
    config = tiny_config(head=head)
    config.model.wide = True
    spec, model, variables = make(config)
    batch = fake.random_batch(spec, "search", 8, seed=5, click_rate=0.5)

    @jit
    def parts(v, b):
        full = model.apply(v, b, "search")
        e_user = model.apply(v, b["user"], method=model.embed_user)
        e_context, offsets = model.apply(v, b["context"], "search", method=model.embed_context_wide)
        e_ad = model.apply(v, b["ad"], method=model.embed_ad)
        deep = model.apply(v, e_user, e_context, e_ad, "search", method=model.score_embeddings)
        wide = model.apply(v, e_user, e_context, e_ad, "search", False, offsets, method=model.score_embeddings)
        return full, deep, wide, offsets

    full, deep, wide, offsets = parts(variables, batch)
    offsets = np.asarray(offsets)
    assert offsets.shape == (8, 1 if head == "ctr" else 2) and np.abs(offsets).min() > 0
    assert "wide_hour" in params_of(variables)["context_wides_search"]
    for key in wide:
        np.testing.assert_allclose(np.asarray(full[key]), np.asarray(wide[key]), rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(np.asarray(wide["ctr_logit"]), np.asarray(deep["ctr_logit"]) + offsets[:, 0], rtol=1e-5)
    if head == "esmm":
        np.testing.assert_allclose(np.asarray(wide["cvr_logit"]), np.asarray(deep["cvr_logit"]) + offsets[:, 1],
                                   rtol=1e-5)
    # The user and ad towers have no wide part; without config.model.wide there is none at all.
    assert not any("wide" in k for k in params_of(variables) if not k.startswith("context_wides"))
    plain = tiny_config(head=head)
    _, plain_model, plain_vars = make(plain)
    assert not any("wide" in k for k in params_of(plain_vars))
    assert plain_model.apply(plain_vars, batch["context"], "search", method=plain_model.embed_context_wide)[1] is None
