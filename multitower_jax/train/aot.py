"""`multitower compile`: compile a config's programs for a TPU topology on this (CPU) machine.

With the `tpu` extra (libtpu), `jax.experimental.topologies.get_topology_desc` gives the devices
of a TPU slice without the slice; the mesh is built from them exactly as `train` builds it
(`sharding.make_mesh`), and `jit(...).lower(ShapeDtypeStructs).compile()` compiles:

* ``train_step``: `Trainer.train_step` itself (same function, shardings, donation), on a global
  batch of ``config.data.batch_size`` rows per placement;
* ``eval_step``: the primary placement's predict function on ``config.data.eval_batch_size`` rows;
* ``scorer``: the serving scorer (`serving.scorer.score_batch`, uncalibrated) on one chip, for
  ``serving.max_batch_size`` requests x the candidate bucket of ``serving.num_candidates``.

No data is read: batches are ShapeDtypeStructs of the feature spec's shapes. Per chip it reports
HBM (argument, output, temp, peak) against the chip's capacity, FLOPs and bytes accessed
(`cost_analysis`) and where they go (`roofline.bytes_breakdown`: by phase and model component),
the collectives of the compiled HLO, and a roofline estimate (`roofline`).
Out of memory is a `CompileError` that names the largest parameters and the rule that splits them.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from multitower_jax.data import fake
from multitower_jax.models.model import ModelConfig
from multitower_jax.serving import scorer as scorer_lib
from multitower_jax.serving.settings import ServingSettings, bucket_for
from multitower_jax.train import roofline, sharding
from multitower_jax.train.sparsecore import SPARSECORE
from multitower_jax.train.trainer import Trainer

INSTALL_HINT = (f"`multitower compile` needs libtpu: pip install -e '.[tpu]' "
                f"(or pip install 'jax[tpu]=={jax.__version__}')")
DEFAULT_HOST_BOUNDS = (2, 2, 1)  # 4 chips per TPU VM (v4, v5p, and multi-host v5e / v6e slices)


class CompileError(Exception):
    """A config that cannot be compiled for the topology (no libtpu, bad mesh, out of HBM)."""


# -- the topology -------------------------------------------------------------------------------

def tpu_settings(config: ml_collections.ConfigDict, topology: str | None = None,
                 num_slices: int | None = None) -> dict[str, Any]:
    """``config.tpu`` with the command line's topology / slice count taking precedence."""
    tpu = dict(config.get("tpu") or {})
    topology = topology or tpu.get("topology")
    if not topology:
        raise CompileError("no TPU topology: pass --topology (e.g. v5e:2x2, v5:4x4x4, v6e:4x8) "
                           "or set config.tpu.topology")
    return {"topology": str(topology), "chip_config_name": str(tpu.get("chip_config_name", "default")),
            "chips_per_host_bounds": tuple(int(b) for b in tpu.get("chips_per_host_bounds", DEFAULT_HOST_BOUNDS)),
            "num_slices": int(num_slices or tpu.get("num_slices", 1))}


def topology_devices(settings: dict[str, Any]) -> list:
    """The compile-only devices of the slice(s) (process indices as on the real slice)."""
    if importlib.util.find_spec("libtpu") is None:
        raise CompileError(INSTALL_HINT)
    # Compile-only use never touches a TPU, so it need not hold libtpu's machine-wide lock file
    # (a second process, or a test next to a CPU run, could not load libtpu otherwise).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies  # noqa: PLC0415

    try:
        topology = topologies.get_topology_desc(
            platform="tpu", topology_name=settings["topology"], chip_config_name=settings["chip_config_name"],
            chips_per_host_bounds=settings["chips_per_host_bounds"], num_slices=settings["num_slices"])
    except Exception as e:  # noqa: BLE001  (libtpu raises several kinds for a bad name)
        raise CompileError(f"TPU topology {settings['topology']!r} ({settings}): {e}") from e
    return list(topology.devices)


# -- abstract inputs ----------------------------------------------------------------------------

def abstract_batch(spec, placement: str, rows: int, batch_sharding) -> dict[str, Any]:
    """ShapeDtypeStructs of a model batch of `rows` rows (the pipeline's keys, dtypes and shapes)."""
    example = fake.random_batch(spec, placement, 2, seed=0)
    example.setdefault("valid", np.ones(2, np.float32))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((rows, *x.shape[1:]), x.dtype, sharding=batch_sharding),
                        example)


def _nbytes(x) -> int:
    return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def _per_chip_bytes(x) -> int:
    return int(np.prod(x.sharding.shard_shape(x.shape), dtype=np.int64)) * np.dtype(x.dtype).itemsize


# -- compiling ----------------------------------------------------------------------------------

def _compile(lowered, what: str, trainer) -> Any:
    try:
        return lowered.compile()
    except Exception as e:  # noqa: BLE001  (XlaRuntimeError / JaxRuntimeError)
        text = str(e)
        if "RESOURCE_EXHAUSTED" in text or "exceeds available" in text or "Ran out of memory" in text:
            raise CompileError(out_of_memory_message(what, text, trainer)) from e
        raise


def out_of_memory_message(what: str, xla_text: str, trainer) -> str:
    """The XLA error's first lines, the largest parameters per chip with their logical axes, and
    the sharding rule that would split them."""
    import flax.linen as nn  # noqa: PLC0415

    boxed = jax.eval_shape(trainer._init_boxed_state, trainer._key(0))
    logical = nn.get_partition_spec(boxed)["params"]
    params = trainer.abstract_state["params"]
    rows = []
    for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(
            logical, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
        rows.append((_per_chip_bytes(leaf), _nbytes(leaf), jax.tree_util.keystr(path), leaf.shape, tuple(spec)))
    rows.sort(reverse=True)
    chips = trainer.mesh.devices.size
    rules = dict(sharding.logical_rules(trainer.config))
    lines = [f"{what} does not fit in a chip's HBM on this topology ({chips} chips, mesh "
             f"data={trainer.mesh.shape['data']} x model={trainer.mesh.shape['model']}).",
             "XLA: " + " ".join(xla_text.strip().splitlines()[:3])[:600],
             "Largest parameters per chip (the optimizer holds ~2 more copies of each, the gradient one):"]
    for per_chip, whole, name, shape, axes in rows[:6]:
        lines.append(f"  {name} {tuple(shape)} axes {axes}: {per_chip / 2**20:,.1f} MiB per chip "
                     f"({whole / 2**20:,.1f} MiB whole)")
    vocab_rule = rules.get("vocab")
    table_share = sum(r[0] for r in rows if r[4] and r[4][0] == "vocab")
    if table_share:
        model = 2 if vocab_rule != "model" else 2 * int(trainer.mesh.shape["model"])
        lines.append(f"Embedding tables ('vocab' rows, now {vocab_rule!r}) take {table_share / 2**30:.2f} GiB of "
                     f"parameters per chip: shard their rows with the rule ('vocab', 'model') in "
                     f"config.sharding.rules and --config.mesh.model={model} (model.vocab_multiple a multiple of it), "
                     f"or shrink the hashed tables (features.*.size), or use a chip with more HBM.")
    return "\n".join(lines)


PROGRAMS = ("train_step", "eval_step", "scorer")


def compile_programs(config: ml_collections.ConfigDict, devices: list,
                     programs: tuple[str, ...] = PROGRAMS) -> dict[str, Any]:
    """{"trainer": the Trainer, and each of `programs`: its compiled executable}."""
    try:
        trainer = Trainer(config, None, devices=devices)
    except ValueError as e:  # the mesh does not fit the topology
        raise CompileError(str(e)) from e
    batch_sharding = sharding.batch_sharding(trainer.mesh)
    train_batch = {p: abstract_batch(trainer.spec, p, int(config.data.batch_size), batch_sharding)
                   for p in trainer.placements}
    if trainer.sparsecore is not None and trainer.sparsecore.kernel == "tpu":  # their preprocessed inputs
        train_batch[SPARSECORE] = trainer.sparsecore.abstract_inputs()
    out = {"trainer": trainer}
    if "train_step" in programs:
        out["train_step"] = _compile(trainer.train_step.lower(trainer.abstract_state, train_batch),
                                     "the train step", trainer)
    if "eval_step" in programs:
        eval_batch = abstract_batch(trainer.spec, trainer.placement, int(config.data.eval_batch_size), batch_sharding)
        out["eval_step"] = _compile(trainer.predict.lower(trainer.abstract_state["params"], eval_batch),
                                    "the eval step", trainer)
    if "scorer" in programs:
        out["scorer"] = _compile_scorer(config, trainer, devices[0])
    return out


def _compile_scorer(config, trainer, device) -> Any:
    """The serving scorer of the primary placement on one chip (uncalibrated)."""
    settings = ServingSettings.from_config(config)
    m = ModelConfig.from_config(config)
    spec = scorer_lib.ScorerSpec.from_model(m, settings)
    one = jax.sharding.SingleDeviceSharding(device)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                          scorer_lib.placement_params(trainer.abstract_state["params"], trainer.placement))
    b = max(settings.batch_buckets)
    n = bucket_for(settings.num_candidates, settings.buckets)
    d, h = m.embed_dim, spec.fusion_hidden[0]
    f32 = np.float32
    shapes = [((b, d), f32), ((b, d), f32), ((b, n, d), f32), ((b, n, h), f32), ((b, n), f32), ((b, n), f32),
              ((b, n), np.bool_), ((b, spec.num_logits), f32)]
    arrays = [jax.ShapeDtypeStruct(s, t, sharding=one) for s, t in shapes]
    fn = jax.jit(lambda p, *xs: scorer_lib.score_batch(p, None, spec, *xs))
    return _compile(fn.lower(params, *arrays), "the scorer", trainer)


# -- reporting ----------------------------------------------------------------------------------

def memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    peak = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
    if not peak:
        peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
            "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
            "generated_code_bytes": int(m.generated_code_size_in_bytes), "peak_bytes": peak}


def cost(compiled) -> dict[str, float]:
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, list) else c
    return {"flops": float(c.get("flops", 0.0)), "bytes_accessed": float(c.get("bytes accessed", 0.0))}


def analyze(compiled, chip: roofline.Chip, examples_per_chip: float) -> dict[str, Any]:
    mem, cst = memory(compiled), cost(compiled)
    text = compiled.as_text()
    found = roofline.collectives(text)
    return {"memory": mem, **cst, "collectives": found, "bytes_breakdown": roofline.bytes_breakdown(text),
            "collective_bytes": float(sum(v["bytes"] for v in found.values())),
            **roofline.estimate(cst["flops"], cst["bytes_accessed"], found, chip, examples_per_chip)}


def tables(trainer) -> dict[str, dict[str, int]]:
    """Every embedding table's bytes, whole and per chip (as its sharding lays it out)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(trainer.abstract_state["params"]):
        name = jax.tree_util.keystr(path)
        if name.endswith("['embedding']"):
            out[name] = {"bytes": _nbytes(leaf), "bytes_per_chip": _per_chip_bytes(leaf)}
    return out


def run(config: ml_collections.ConfigDict, topology: str | None = None, num_slices: int | None = None,
        json_path: str | None = None, devices: list | None = None, quiet: bool = False) -> dict[str, Any]:
    """Compile the config's programs for the topology and report per chip (see the module doc)."""
    settings = tpu_settings(config, topology, num_slices)
    devices = topology_devices(settings) if devices is None else devices
    chip = roofline.chip_for(devices[0].device_kind, settings["topology"])
    programs = compile_programs(config, devices)
    trainer = programs.pop("trainer")
    chips = len(devices)
    rows_per_step = int(config.data.batch_size) * len(trainer.placements)
    train = analyze(programs["train_step"], chip, rows_per_step / chips)
    report = {
        "topology": settings["topology"], "num_slices": settings["num_slices"], "num_chips": chips,
        "num_processes": len({d.process_index for d in devices}), "device_kind": devices[0].device_kind,
        "mesh": {"data": int(trainer.mesh.shape["data"]), "model": int(trainer.mesh.shape["model"])},
        "global_batch": rows_per_step, "compute_dtype": str(config.model.dtype),
        "chip": {"generation": chip.generation, "hbm_bytes": chip.hbm_bytes, "peak_bf16_flops": chip.peak_bf16_flops,
                 "hbm_bytes_per_s": chip.hbm_bytes_per_s, "ici_bytes_per_s": chip.ici_bytes_per_s},
        "hbm_bytes_per_chip": chip.hbm_bytes,
        "peak_hbm_bytes_per_chip": train["memory"]["peak_bytes"],
        "peak_hbm_fraction": train["memory"]["peak_bytes"] / chip.hbm_bytes,
        "flops_per_chip": train["flops"],
        "bytes_accessed_per_chip": train["bytes_accessed"],
        "collective_bytes_per_step": train["collective_bytes"],
        **{k: train[k] for k in ("estimated_step_seconds", "estimated_examples_per_sec_per_chip", "estimated_mfu",
                                 "bound_by", "compute_seconds", "hbm_seconds", "ici_seconds")},
        "tables": tables(trainer),
        "programs": {"train_step": train},
    }
    eval_rows = int(config.data.eval_batch_size) / chips
    report["programs"]["eval_step"] = analyze(programs["eval_step"], chip, eval_rows)
    report["programs"]["scorer"] = analyze(programs["scorer"], chip, 1.0)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
        # The compiled train step beside it (P.json -> P.train_step.hlo.txt), to look into further,
        # e.g. roofline.bytes_breakdown(text).
        with open(hlo_path(json_path), "w") as f:
            f.write(programs["train_step"].as_text())
    if not quiet:
        print(summary(report))
    return report


def hlo_path(json_path: str) -> str:
    """Where `run` writes the compiled train step's HLO text next to its --json report."""
    stem = json_path[:-5] if json_path.endswith(".json") else json_path
    return stem + ".train_step.hlo.txt"


def summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    gib = 2**30
    lines = [f"{report['topology']} ({report['device_kind']}): {report['num_chips']} chips on "
             f"{report['num_processes']} hosts, mesh data={report['mesh']['data']} x model={report['mesh']['model']}, "
             f"global batch {report['global_batch']:,}, HBM {report['hbm_bytes_per_chip'] / gib:.1f} GiB per chip"]
    header = f"{'program':<11} {'peak GiB':>9} {'args GiB':>9} {'temp GiB':>9} {'GFLOP':>10} {'GB accessed':>12} " \
             f"{'collective MB':>14} {'est. ms':>9} {'bound':>8}"
    lines.append(header)
    for name, p in report["programs"].items():
        m = p["memory"]
        lines.append(f"{name:<11} {m['peak_bytes'] / gib:>9.2f} {m['argument_bytes'] / gib:>9.2f} "
                     f"{m['temp_bytes'] / gib:>9.2f} {p['flops'] / 1e9:>10.2f} {p['bytes_accessed'] / 1e9:>12.2f} "
                     f"{p['collective_bytes'] / 1e6:>14.1f} {1e3 * p['estimated_step_seconds']:>9.3f} "
                     f"{p['bound_by']:>8}")
    t = report["programs"]["train_step"]
    kinds = ", ".join(f"{k} x{int(v['count'])} {v['bytes'] / 1e6:,.1f} MB" for k, v in t["collectives"].items())
    lines.append(f"train step collectives (per chip, result bytes): {kinds or 'none'}")
    b = t["bytes_breakdown"]
    if b["total"]:
        parts = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in list(b["by_component"].items())[:5])
        phases = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in b["by_phase"].items())
        lines.append(f"train step bytes accessed per chip, GB, from the HLO ({b['total'] / 1e9:.2f} GB found of "
                     f"{t['bytes_accessed'] / 1e9:.2f}): by part {parts}; by phase {phases}")
    lines.append(f"train step: peak HBM {100 * report['peak_hbm_fraction']:.1f}% of the chip, estimated "
                 f"{1e3 * report['estimated_step_seconds']:.3f} ms (compute {1e3 * report['compute_seconds']:.3f}, "
                 f"HBM {1e3 * report['hbm_seconds']:.3f}, ICI {1e3 * report['ici_seconds']:.3f}), "
                 f"{report['estimated_examples_per_sec_per_chip']:,.0f} examples/s per chip, "
                 f"MFU {100 * report['estimated_mfu']:.1f}%, bound by {report['bound_by']}")
    if not math.isfinite(report["estimated_mfu"]):
        lines.append("(no FLOPs reported)")
    return "\n".join(lines)
