"""`multitower compile`: the tiny config compiled for a TPU v5e 2x2 slice on this CPU (libtpu, the
`tpu` extra): the batch is split over every chip, tables sharded over "model" hold a quarter of
their rows per chip, an over-large config fails with a clear out-of-memory error."""

import importlib.util
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from multitower_jax import cli
from multitower_jax.models import fused_encoder
from multitower_jax.models.text_encoder import EncoderLayer, TextEncoderConfig
from multitower_jax.train import aot, losses, roofline
from multitower_jax.train.sharding import BATCH_AXES
from tests.conftest import QUICKSTART, TINY_MODEL, get_path, tiny_config

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e '.[tpu]')")
SHARDED = ["--config.mesh.data=1", "--config.mesh.model=4", "--config.model.vocab_multiple=4",
           "--config.sharding.rules=(('vocab', 'model'), ('embed', None), ('embed_in', None), "
           "('mlp', None), ('heads', None), ('kv', None), ('pos', None))"]


@pytest.fixture(scope="module")
def v5e_2x2():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu not installed (pip install -e '.[tpu]')")
    return aot.topology_devices(aot.tpu_settings(tiny_config("unused"), "v5e:2x2"))


def _train_step(config, devices):
    programs = aot.compile_programs(config, devices, programs=("train_step",))
    return programs["trainer"], programs["train_step"]


@needs_libtpu
def test_every_chip_takes_a_quarter_of_the_batch_and_of_the_sharded_tables(v5e_2x2, tmp_path):
    one_trainer, one = _train_step(tiny_config(tmp_path, *TINY_MODEL), v5e_2x2[:1])
    # mesh data=1 x model=4: the tables' rows are split over "model", and so is the batch.
    four_trainer, four = _train_step(tiny_config(tmp_path, *TINY_MODEL, *SHARDED), v5e_2x2)
    assert dict(four_trainer.mesh.shape) == {"data": 1, "model": 4}
    flops_one, flops_four = aot.cost(one)["flops"], aot.cost(four)["flops"]
    assert flops_four == pytest.approx(flops_one / 4, rel=0.10), (flops_one, flops_four)

    tables = aot.tables(four_trainer)
    assert len(tables) >= 5
    for name, t in tables.items():
        assert t["bytes_per_chip"] * 4 == t["bytes"], name
    # The compiled program's arguments per chip are the state's shards plus a quarter of the
    # batch: the tables are not replicated behind the shardings' back.
    def per_chip(tree):
        return sum(aot._per_chip_bytes(x) for x in __import__("jax").tree.leaves(tree))

    state_one, state_four = per_chip(one_trainer.abstract_state), per_chip(four_trainer.abstract_state)
    table_bytes = sum(t["bytes"] for t in tables.values())
    # Parameters and Adam's two moments: 3 copies of every table, 3/4 of each gone per chip.
    assert state_one - state_four == pytest.approx(3 * 3 / 4 * table_bytes, rel=0.02)
    args_one, args_four = aot.memory(one)["argument_bytes"], aot.memory(four)["argument_bytes"]
    assert args_four < args_one - 2 * table_bytes


@needs_libtpu
def test_compile_command_writes_the_report(v5e_2x2, tmp_path):
    out = tmp_path / "report.json"
    args = ["compile", "--config", str(QUICKSTART), "--topology", "v5e:2x2", "--json", str(out),
            "--config.data.batch_size=256", "--config.data.eval_batch_size=256", *TINY_MODEL]
    assert cli.main(args) == 0
    report = json.loads(out.read_text())
    for key in ("topology", "num_chips", "peak_hbm_bytes_per_chip", "hbm_bytes_per_chip", "flops_per_chip",
                "collective_bytes_per_step", "estimated_step_seconds", "estimated_examples_per_sec_per_chip",
                "estimated_mfu", "bound_by"):
        assert key in report, key
    assert report["topology"] == "v5e:2x2" and report["num_chips"] == 4
    assert report["hbm_bytes_per_chip"] == 16 * 2**30 and 0 < report["peak_hbm_bytes_per_chip"] < 2**30
    assert report["bound_by"] in ("compute", "hbm", "ici") and 0 < report["estimated_mfu"] <= 1
    assert report["estimated_examples_per_sec_per_chip"] == pytest.approx(
        256 / 4 / report["estimated_step_seconds"], rel=1e-9)
    # Data parallel: the gradients are all-reduced over the 4 chips.
    assert report["programs"]["train_step"]["collectives"]["all-reduce"]["bytes"] > 0
    assert set(report["programs"]) == {"train_step", "eval_step", "scorer"}
    # The compiled train step's HLO is written beside the report, and its breakdown is the report's.
    hlo = (tmp_path / "report.train_step.hlo.txt").read_text()
    assert roofline.bytes_breakdown(hlo) == report["programs"]["train_step"]["bytes_breakdown"]
    assert 0 < report["programs"]["train_step"]["bytes_breakdown"]["total"]


@needs_libtpu
def test_an_over_large_config_fails_with_a_clear_out_of_memory_error(v5e_2x2, tmp_path):
    # 100M advertiser rows x 16 x 4 bytes = 6.4 GB of parameters, 4x that with Adam and the
    # gradient: more than a v5e chip's 16 GiB when replicated.
    config = tiny_config(tmp_path, *TINY_MODEL, "--config.features.ad.advertiser_id.size=100000000")
    with pytest.raises(aot.CompileError) as e:
        aot.compile_programs(config, v5e_2x2, programs=("train_step",))
    message = str(e.value)
    assert "does not fit in a chip's HBM" in message and "embed_advertiser_id" in message
    assert "('vocab', 'model')" in message and "--config.mesh.model=" in message


def test_without_libtpu_the_command_says_how_to_get_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(aot.CompileError, match=r"pip install -e '\.\[tpu\]'"):
        aot.topology_devices({"topology": "v5e:2x2"})


def test_collectives_are_read_from_hlo_text():
    hlo = "\n".join([
        "%all-reduce.1 = f32[256,16]{0,1:T(8,128)} all-reduce(%fusion.2), channel_id=5, replica_groups={}",
        "%all-reduce.2 = (f32[10]{0}, bf16[4,8]{1,0}) all-reduce(%a, %b), channel_id=6",
        "%all-gather.9 = bf16[4,64,16]{1,2,0} all-gather(%p), channel_id=2, dimensions={0}",
        "%all-gather.11 = bf16[4,64,16]{1,2,0} all-gather(%q), channel_id=2, dimensions={0}",  # a clone
        "%ags = (f32[2,8]{1,0}, f32[8,8]{1,0}) all-gather-start(%r), channel_id=9",
        "%agd = f32[8,8]{1,0} all-gather-done(%ags)",
        "%fusion.3 = f32[4] fusion(%all-reduce.1), kind=kLoop",
    ])
    found = roofline.collectives(hlo)
    assert found["all-reduce"] == {"count": 2, "bytes": 256 * 16 * 4 + 40 + 64}
    assert found["all-gather"] == {"count": 2, "bytes": 4 * 64 * 16 * 2 + 8 * 8 * 4}
    est = roofline.estimate(197e12, 0.0, {}, roofline.CHIPS["v5e"], 1000)
    assert est["bound_by"] == "compute" and est["estimated_step_seconds"] == pytest.approx(1.0)
    assert est["estimated_mfu"] == pytest.approx(1.0) and np.isclose(est["estimated_examples_per_sec_per_chip"], 1000)


def test_large_tables_are_row_sharded_over_every_device_and_the_step_is_unchanged(tmp_path):
    """On the 8 fake CPU devices (no libtpu): tables of at least `sharding.large_table_bytes` and
    their Adam moments hold 1/8 of their rows per device, smaller ones stay replicated, and one
    train step (dropout on) gives the single-device step's parameters."""
    import jax

    from multitower_jax.data import fake
    from multitower_jax.train import sharding
    from multitower_jax.train.trainer import Trainer

    dropout = ["--config.model.tower_dropout=0.2", "--config.model.fusion_dropout=0.3", "--config.model.text.dropout=0.1"]
    config = tiny_config(tmp_path, *TINY_MODEL, *dropout, "--config.model.vocab_multiple=8")
    config.sharding.large_table_bytes = 100_000  # the advertiser and brand tables: 520 x 64 x 4 bytes
    one, eight = Trainer(config, None, devices=jax.devices()[:1]), Trainer(config, None, devices=jax.devices()[:8])
    table = ("ad_tower", "features", "embed_advertiser_id", "embedding")
    small = ("context_towers_search", "features", "embed_city", "embedding")

    state1, state8 = one.init_state(), eight.init_state()
    big = get_path(state8["params"], table)
    assert big.shape == (520, 64) and {s.data.shape for s in big.addressable_shards} == {(65, 64)}
    small_table = get_path(state8["params"], small)
    assert {s.data.shape for s in small_table.addressable_shards} == {small_table.shape}
    moments = [x for x in jax.tree.leaves(state8["opt_state"]) if getattr(x, "shape", None) == (520, 64)]
    assert len(moments) >= 4 and all({s.data.shape for s in m.addressable_shards} == {(65, 64)} for m in moments)

    batch = fake.random_batch(one.spec, "search", 256, seed=3)
    new1, m1 = one.train_step(state1, {"search": sharding.shard_batch(batch, one.mesh)})
    new8, m8 = eight.train_step(state8, {"search": sharding.shard_batch(batch, eight.mesh)})
    np.testing.assert_allclose(float(m1["loss"]), float(m8["loss"]), rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(new1["params"]), jax.tree.leaves(new8["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_bytes_breakdown_counts_tile_padded_operands_and_results_by_phase_and_part():
    """`roofline.bytes_breakdown` on a hand-written compiled module: fused and reducer computations
    are not counted on their own, async "-done" halves and tuples are free, T(8,128) tiles pad
    the two minor dims, a copy inherits its producer's component, a fusion that only slices an
    operand reads the slice; the sums are worked by hand."""
    enc = "jit(_train_step)/{}(MultiTowerModel){}/MultiTowerModel.embed_ad/ad_tower/text_encoder/layer_0/mul"
    hlo = "\n".join([
        "%fused_computation.1 (p0: f32[4,8]) -> f32[4,8] {",
        "  %p0 = f32[4,8]{1,0} parameter(0)",
        "  ROOT %neg.1 = f32[4,8]{1,0} negate(%p0)",
        "}",
        "%fused_slice (p0.2: f32[64,8]) -> f32[4,8] {",
        "  %p0.2 = f32[64,8]{1,0} parameter(0)",
        "  ROOT %slice.1 = f32[4,8]{1,0} slice(%p0.2), slice={[0:4], [0:8]}",
        "}",
        "%add (a: bf16[], b: bf16[]) -> bf16[] {",
        "  %a = bf16[] parameter(0)",
        "  %b = bf16[] parameter(1)",
        "  ROOT %add.0 = bf16[] add(%a, %b)",
        "}",
        "ENTRY %main (param.1: f32[4,8], param.2: bf16[16,48]) -> (f32[4,8], bf16[16,48]) {",
        "  %param.1 = f32[4,8]{1,0:T(8,128)} parameter(0)",
        "  %param.2 = bf16[16,48]{1,0} parameter(1)",
        "  %param.3 = f32[64,8]{1,0} parameter(2)",
        '  %fusion.3 = f32[4,8]{1,0} fusion(%param.3), kind=kLoop, calls=%fused_slice, '
        'metadata={op_name="jit(_train_step)/mul"}',  # reads 4 of the 64 rows
        f'  %fusion.1 = f32[4,8]{{1,0:T(8,128)}} fusion(%param.1), kind=kLoop, calls=%fused_computation.1, '
        f'metadata={{op_name="{enc.format("jvp", "")}"}}',
        f'  %fusion.2 = f32[4,8]{{1,0}} fusion(%fusion.1), kind=kLoop, calls=%fused_computation.1, '
        f'metadata={{op_name="{enc.format("transpose(jvp", ")")}"}}',
        "  %copy-start.1 = (f32[4,8]{1,0}, f32[4,8]{1,0:S(1)}, u32[]{:S(2)}) copy-start(%fusion.2)",
        "  %copy-done.1 = f32[4,8]{1,0:S(1)} copy-done(%copy-start.1)",
        "  %all-reduce.1 = bf16[16,48]{1,0} all-reduce(%param.2), channel_id=1, to_apply=%add",
        '  %add.5 = f32[4,8]{1,0} add(%copy-done.1, %fusion.2), metadata={op_name="jit(_train_step)/add"}',
        "  ROOT %tuple.1 = (f32[4,8]{1,0}, bf16[16,48]{1,0}) tuple(%add.5, %all-reduce.1)",
        "}",
    ])
    b = roofline.bytes_breakdown(hlo)
    padded = 8 * 128 * 4  # f32[4,8] in T(8,128) tiles
    plain = 4 * 8 * 4
    assert b["by_phase"] == {"forward": 2 * padded, "backward": padded + plain, "copy": 2 * plain,
                             "collective": 2 * 16 * 48 * 2, "update": 5 * plain}
    assert b["by_component"] == {"ad_tower/text_encoder": 3 * padded + 3 * plain, "collective": 2 * 16 * 48 * 2,
                                 "optimizer": 5 * plain}
    assert b["total"] == 3 * padded + 8 * plain + 2 * 16 * 48 * 2


def test_bytes_breakdown_names_the_innermost_component_of_nested_model_methods():
    """An op_name with one model method called inside another (the context tower inside the
    wide part's method) is charged to the inner call's component, not to "MultiTowerModel"."""
    nested = ("jit(_train_step)/jvp(MultiTowerModel)/MultiTowerModel.embed_context_wide/MultiTowerModel.embed_context/"
              "context_towers_search/text_encoder/layer_0/mul")
    hlo = "\n".join([
        "ENTRY %main (param.1: f32[4,8]) -> f32[4,8] {",
        "  %param.1 = f32[4,8]{1,0} parameter(0)",
        f'  ROOT %negate.1 = f32[4,8]{{1,0}} negate(%param.1), metadata={{op_name="{nested}"}}',
        "}",
    ])
    assert roofline.bytes_breakdown(hlo)["by_component"] == {"context_towers_search/text_encoder": 2 * 4 * 8 * 4}


def test_rowwise_adagrad_on_8_devices_moves_only_the_batch_rows(tmp_path):
    """The trainer with `optim.large_table_optimizer = "rowwise_adagrad"` on 8 fake CPU devices:
    the large tables' accumulators ([rows]) are row-sharded with them, AdamW keeps no moments for
    them, and one train step moves exactly the rows of the batch's advertiser ids (the others, and
    their accumulators, are bit for bit unchanged)."""
    import jax

    from multitower_jax.data import fake
    from multitower_jax.train import sharding
    from multitower_jax.train.trainer import Trainer

    config = tiny_config(tmp_path, *TINY_MODEL, "--config.model.vocab_multiple=8")
    config.sharding.large_table_bytes = 100_000  # the advertiser and brand tables: 520 x 64 x 4 bytes
    config.optim.large_table_optimizer = "rowwise_adagrad"
    config.optim.large_table_bytes = 100_000
    eight = Trainer(config, None, devices=jax.devices()[:8])
    state = eight.init_state()
    accumulators = [x for x in jax.tree.leaves(state["opt_state"]) if getattr(x, "shape", None) == (520,)]
    assert len(accumulators) == 2 and all({s.data.shape for s in a.addressable_shards} == {(65,)} for a in accumulators)
    assert not [x for x in jax.tree.leaves(state["opt_state"]) if getattr(x, "shape", None) == (520, 64)]

    table = lambda s: s["params"]["ad_tower"]["features"]["embed_advertiser_id"]["embedding"]  # noqa: E731
    before = np.asarray(table(state))
    batch = fake.random_batch(eight.spec, "search", 256, seed=3)
    new, _ = eight.train_step(state, {"search": sharding.shard_batch(batch, eight.mesh)})
    after = np.asarray(table(new))
    touched = np.unique(batch["ad"]["advertiser_id"])
    untouched = np.setdiff1d(np.arange(520), touched)
    assert 50 < len(touched) < 256
    np.testing.assert_array_equal(after[untouched], before[untouched])
    assert (np.abs(after[touched] - before[touched]).max(axis=1) > 0).all()
    sums = [np.asarray(x) for x in jax.tree.leaves(new["opt_state"]) if getattr(x, "shape", None) == (520,)]
    # The advertiser table's accumulator (the brand table's has other touched rows): untouched rows
    # keep the initial 0.1 exactly (a touched row's increase, mean g^2, can round away in float32).
    assert any((s[untouched] == np.float32(0.1)).all() and (s[touched] >= np.float32(0.1)).all() for s in sums)


def test_compile_table_rows_from_json_reports(tmp_path):
    """`python -m multitower_jax.train.compile_table R.json`: one README row per report, worked by hand."""
    from multitower_jax.train import compile_table

    report = {"topology": "v5e:4x4", "num_chips": 16, "mesh": {"data": 16, "model": 1},
              "peak_hbm_bytes_per_chip": 1.5 * 2**30, "hbm_bytes_per_chip": 16 * 2**30, "flops_per_chip": 2.345e11,
              "collective_bytes_per_step": 96_453_276.0, "estimated_step_seconds": 0.02345,
              "estimated_examples_per_sec_per_chip": 43_667.4, "estimated_mfu": 0.0508, "bound_by": "hbm"}
    path = tmp_path / "pod_v5e.json"
    path.write_text(json.dumps(report))
    lines = compile_table.table([str(path)]).splitlines()
    assert lines[0].startswith("| config | topology (chips) |") and len(lines) == 3
    assert lines[2] == ("| pod_v5e | `v5e:4x4` (16) | 16 x 1 | 1.50 GiB of 16 (9 %) | 234.5 GFLOP | 96.5 MB | "
                        "23.45 ms | 43,667 | 5.1 % | hbm |")


def test_the_fused_encoder_layer_compiles_for_a_tpu_and_moves_a_fraction_of_xla_bytes(v5e_2x2):
    """One encoder layer's gradient on one v5e chip: Mosaic compiles the kernels, the cost is the
    kernels' (model FLOPs; HBM bytes = their inputs and outputs), a fraction of XLA's layer's."""
    rows, length, dim, mlp = 64, 48, 128, 512
    cfg = TextEncoderConfig(vocab_size=8, max_len=length, dim=dim, num_heads=1, mlp_dim=mlp, dropout_rate=0.0,
                            dtype=jnp.bfloat16)
    one = jax.sharding.SingleDeviceSharding(v5e_2x2[0])
    x = jax.ShapeDtypeStruct((rows, length, dim), jnp.bfloat16, sharding=one)
    mask = jax.ShapeDtypeStruct((rows, length), jnp.bool_, sharding=one)
    layer = EncoderLayer(cfg)
    params = jax.eval_shape(lambda: nn.meta.unbox(layer.init(jax.random.PRNGKey(0), jnp.zeros(x.shape, x.dtype),
                                                              jnp.ones(mask.shape, bool), False)["params"]))
    params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=one), params)

    def xla_loss(x, m, p):
        return jnp.sum(layer.apply({"params": p}, x, m, False).astype(jnp.float32))

    def fused_loss(x, m, p):
        y = fused_encoder.encoder_layer(x, m, fused_encoder.flatten_params(p, dim), 1, jnp.bfloat16, interpret=False)
        return jnp.sum(y.astype(jnp.float32))

    costs = {}
    for name, loss in (("xla", xla_loss), ("fused", fused_loss)):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 2))).lower(x, mask, params).compile()
        costs[name] = aot.cost(compiled)
        if name == "fused":
            assert "tpu_custom_call" in compiled.as_text()
    flops, _ = fused_encoder.layer_cost(rows, length, dim, mlp)
    # A sum's gradient needs no forward output: only the backward kernel runs, twice the forward's
    # model FLOPs (the forward it recomputes in VMEM is not counted).
    assert costs["fused"]["flops"] == pytest.approx(2 * flops, rel=0.02)
    assert costs["fused"]["bytes_accessed"] < costs["xla"]["bytes_accessed"] / 5


def test_the_fused_in_batch_softmax_compiles_for_a_tpu_and_never_writes_the_logits(v5e_2x2):
    """The retrieval loss's gradient on one v5e chip, 4,096 rows against their 4,096 ads: Mosaic
    compiles the kernels, and the bytes are a fraction of the XLA loss's (whose 4,096 x 4,096
    float32 logits alone are 67 MB, written and read back)."""
    ads, dim = 4096, 128
    mesh = Mesh(np.array(v5e_2x2[:1]).reshape(1, 1), ("data", "model"))  # TPU devices: "pallas" runs the kernels
    one = NamedSharding(mesh, P())
    shape = lambda *s, dtype=jnp.float32: jax.ShapeDtypeStruct(s, dtype, sharding=one)  # noqa: E731
    embeddings = (shape(ads, dim), shape(ads, dim), shape(ads, dim))
    batch = {"ad_id": shape(ads, dtype=jnp.int32), "ad_log_q": shape(ads), "weight": shape(ads)}
    costs = {}
    for kernel in ("xla", "pallas"):
        def loss(e_user, e_context, e_ad, batch):
            return losses.retrieval_loss(e_user, e_context, e_ad, batch, 0.05, mesh=mesh, data_axis=BATCH_AXES,
                                         positives="impressions", kernel=kernel, matmul_dtype=jnp.bfloat16)
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*embeddings, batch).compile()
        costs[kernel] = aot.cost(compiled)
    logits_bytes = ads * ads * 4
    assert costs["pallas"]["bytes_accessed"] < costs["xla"]["bytes_accessed"] - 2 * logits_bytes
    # forward + the two backward kernels: 3 x (2 x ads x ads x dim), the recomputed logits not counted
    assert costs["pallas"]["flops"] == pytest.approx(3 * 2 * ads * ads * dim, rel=0.05)
