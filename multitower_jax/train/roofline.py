"""Per-chip TPU figures and a roofline estimate of a compiled step (for `multitower compile`).

The chip table is per generation, from Google Cloud's TPU pages (retrieved 2025):

* v4   https://cloud.google.com/tpu/docs/v4   275 TFLOP/s bf16, 32 GiB HBM2 at 1,200 GB/s. The
  page lists no ICI figure; 300 GB/s per chip is assumed from the v4 paper (Jouppi et al.,
  ISCA 2023: 6 ICI links per chip, ~50 GB/s each way each).
* v5e  https://cloud.google.com/tpu/docs/v5e  197 TFLOP/s bf16, 16 GiB HBM2 at 819 GB/s,
  bidirectional ICI 400 GB/s per chip.
* v5p  https://cloud.google.com/tpu/docs/v5p  459 TFLOP/s bf16, 95 GiB HBM2e at 2,765 GB/s,
  bidirectional ICI 1,200 GB/s per chip.
* v6e  https://cloud.google.com/tpu/docs/v6e  918 TFLOP/s bf16, 32 GiB HBM at 1,640 GB/s,
  bidirectional ICI 800 GB/s per chip.

Compile-only devices report no memory capacity (``device.memory_stats()`` fails), hence the
table. The estimate is a roofline: the step takes at least its FLOPs at the bf16 peak, its
HBM bytes at the HBM bandwidth, and its collectives' bytes at the ICI bandwidth; the largest
of the three is the estimate and names what bounds the step. It ignores overlap losses,
latency of small collectives and the host, so real steps are slower.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    generation: str
    hbm_bytes: int
    peak_bf16_flops: float
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # bidirectional, per chip


CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275e12, 1200e9, 300e9),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 819e9, 400e9),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2765e9, 1200e9),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1640e9, 800e9),
}
# device_kind of a topology's devices, and the prefix of a topology name, -> generation.
_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p",
          "TPU v6 lite": "v6e", "TPU v6e": "v6e"}
_PREFIXES = {"v4": "v4", "v5e": "v5e", "v5litepod": "v5e", "v5": "v5p", "v5p": "v5p", "v6e": "v6e"}


def chip_for(device_kind: str, topology: str = "") -> Chip:
    """The chip of a device kind ("TPU v5 lite") or, failing that, of a topology name ("v5e:4x4")."""
    generation = _KINDS.get(device_kind) or _PREFIXES.get(topology.split(":")[0].split("-")[0])
    if generation is None:
        raise ValueError(f"no chip figures for device kind {device_kind!r} (topology {topology!r}); "
                         f"known: {sorted(CHIPS)}")
    return CHIPS[generation]


# -- collectives in compiled HLO ----------------------------------------------------------------

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}
# "%name = <result shape> <op>(" where op is a collective or its async "-start" half.
_INSTRUCTION = re.compile(r"=\s*(?P<shape>.+?)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\(")
_CHANNEL = re.compile(r"\bchannel_id=(\d+)")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+\d*[a-z0-9]*)\[(?P<dims>[\d,]*)\]")


def _shape_bytes(shape: str) -> list[float]:
    """Bytes of each array in an HLO shape string ("f32[8,16]{1,0}" or a tuple of them)."""
    out = []
    for m in _ARRAY.finditer(shape):
        if m["dtype"] not in _DTYPE_BYTES:
            continue
        n = 1
        for d in filter(None, m["dims"].split(",")):
            n *= int(d)
        out.append(n * _DTYPE_BYTES[m["dtype"]])
    return out


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
    """{kind: {"count", "bytes"}} of the collectives in a compiled (per-device) HLO module.

    Bytes are those of the result shapes (per device). An async "-start" op's result is a
    tuple of (operands, results, [scratch]); its results are counted: the last half of the
    arrays for all-gather / collective-permute, else the arrays after the operands. Ops inside
    loops are counted once; copies of one op (the same channel id, cloned into several fused
    computations) once."""
    found: dict[str, dict[str, float]] = {}
    seen: set[tuple[str, str]] = set()
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.search(line)
        if not m:
            continue
        channel = _CHANNEL.search(line)
        if channel:
            if (m["op"], channel[1]) in seen:
                continue
            seen.add((m["op"], channel[1]))
        sizes = _shape_bytes(m["shape"])
        if m["start"] and len(sizes) > 1:
            sizes = sizes[len(sizes) // 2:] if len(sizes) % 2 == 0 else sizes[1:2]
        entry = found.setdefault(m["op"], {"count": 0, "bytes": 0.0})
        entry["count"] += 1
        entry["bytes"] += float(sum(sizes))
    return found


# Bytes a chip sends per byte of result, ring algorithms: an all-reduce is a reduce-scatter and
# an all-gather (2x); the others move their result once.
_TRAFFIC = {"all-reduce": 2.0, "all-gather": 1.0, "reduce-scatter": 1.0, "all-to-all": 1.0,
            "collective-permute": 1.0}


def estimate(flops: float, hbm_bytes: float, found: dict[str, dict[str, float]], chip: Chip,
             examples_per_chip: float) -> dict[str, Any]:
    """Roofline step time per chip, examples/s per chip, MFU and the bound."""
    seconds = {
        "compute": flops / chip.peak_bf16_flops,
        "hbm": hbm_bytes / chip.hbm_bytes_per_s,
        "ici": sum(_TRAFFIC[k] * v["bytes"] for k, v in found.items()) / chip.ici_bytes_per_s,
    }
    step = max(max(seconds.values()), 1e-12)
    return {
        "compute_seconds": seconds["compute"], "hbm_seconds": seconds["hbm"], "ici_seconds": seconds["ici"],
        "estimated_step_seconds": step,
        "estimated_examples_per_sec_per_chip": examples_per_chip / step,
        "estimated_mfu": flops / step / chip.peak_bf16_flops,
        "bound_by": max(seconds, key=seconds.get),
    }


# -- where a compiled step's HBM bytes go -------------------------------------------------------

_TILED_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+\d*[a-z0-9]*)\[(?P<dims>[\d,]*)\](?P<layout>\{[^}]*\})?")
_HLO_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%(?P<name>\S+)\s+=\s+(?P<shape>.*?)\s+(?P<op>[a-z][a-z0-9\-]*)\("
                              r"(?P<rest>.*)$")
_CALLED = re.compile(r"\b(?:calls|to_apply)=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# A component: the two scopes after a model method's name. Nested method calls give several
# ("MultiTowerModel.embed_context_wide/MultiTowerModel.embed_context/context_towers_search/..."):
# the innermost names the component. A lookahead, so overlapping matches are all found.
_MODULE = re.compile(r"(?=MultiTowerModel\.\w+/(\w+)(?:/(\w+))?)")
# Instructions that move no data of their own (their operands' bytes are counted where produced
# and consumed); the async "-done" halves are counted at their "-start".
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id", "replica-id",
         "while", "conditional", "call", "opt-barrier", "copy-done", "all-reduce-done", "all-gather-done",
         "collective-permute-done", "async-done", "send-done", "recv-done"}


def _tiled_bytes(shape: str) -> float:
    """Bytes of an HLO shape as laid out: dims padded to the layout's first tile (``T(8,128)``:
    the second-minor dim to 8, the minor dim to 128; TPU layouts pad small dims this way)."""
    total = 0.0
    for m in _TILED_ARRAY.finditer(shape):
        if m["dtype"] not in _DTYPE_BYTES:
            continue
        dims = [int(d) for d in filter(None, m["dims"].split(","))]
        layout = (m["layout"] or "{}")[1:-1]
        minor_to_major = [int(x) for x in layout.split(":")[0].split(",") if x.strip().isdigit()]
        tile = re.search(r"T\(([\d,]+)\)", layout)
        if tile and minor_to_major and dims:
            sizes = [int(x) for x in tile[1].split(",")]
            for k, dim in enumerate(minor_to_major[:len(sizes)]):
                dims[dim] = -(-dims[dim] // sizes[-1 - k]) * sizes[-1 - k]
        n = 1
        for d in dims:
            n *= d
        total += n * _DTYPE_BYTES[m["dtype"]]
    return total


def _part(op: str, op_name: str) -> tuple[str, str]:
    """(phase, component) of an instruction, from its opcode and JAX's op_name metadata."""
    base = op.removesuffix("-start")
    if base in COLLECTIVES:
        phase = "collective"
    elif base == "copy":
        phase = "copy"  # layout changes and prefetches between memory spaces
    elif "transpose(jvp(" in op_name:
        phase = "backward"
    elif "jvp(" in op_name:
        phase = "forward"
    elif op_name:
        phase = "update"  # after the gradient: the optimizer, the metrics
    else:
        phase = "unattributed"
    m = next((m for m in reversed(list(_MODULE.finditer(op_name))) if m[1] != "MultiTowerModel"), None)
    if m:
        component = m[1] + (f"/{m[2]}" if m[2] else "")
    elif "jvp()" in op_name or "jvp(jit(" in op_name:
        component = "loss"
    else:
        component = "optimizer" if phase == "update" else ""
    return phase, component


_SLICING = ("slice", "dynamic-slice", "gather")


def _fusion_operand_bytes(body: list, index: int, shape: str) -> float:
    """Bytes a fusion reads of its `index`-th operand: the slices it takes when the fused
    computation only slices that parameter (as XLA's cost analysis counts it), else all of it."""
    param = next((m for m in body if m["op"] == "parameter" and m["rest"].split(")", 1)[0].strip() == str(index)),
                 None)
    if param is None:
        return _tiled_bytes(shape)
    pattern = re.compile(r"%" + re.escape(param["name"]) + r"(?![\w.\-])")
    users = [m for m in body if m is not param and pattern.search(m["rest"].split(")", 1)[0])]
    if users and all(m["op"] in _SLICING for m in users):
        return sum(_tiled_bytes(m["shape"]) for m in users)
    return _tiled_bytes(shape)


def bytes_breakdown(hlo_text: str) -> dict[str, Any]:
    """Bytes each instruction of a compiled (per-device) HLO module reads and writes, summed by
    phase (forward, backward, update, collective, copy) and by model component (from JAX's
    op_name metadata: "ad_tower/text_encoder", "loss", "optimizer", ...).

    Each instruction outside fused computations counts its operands' and its result's bytes,
    padded to the layout's tiles, as XLA's cost analysis counts "bytes accessed" (a fusion that
    only slices an operand reads the slices); the sum is near `cost_analysis()`'s, not equal to
    it (XLA looks further into fusions). Instructions in loop bodies are counted once. It tells
    where the bytes go, not how many there are."""
    computations: dict[str, list] = {}
    current = None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            current = re.match(r"^(?:ENTRY\s+)?%?(\S+)", line)[1]
            computations[current] = []
            continue
        m = _HLO_INSTRUCTION.match(line)
        if m and current is not None:
            computations[current].append(m)
    nested = {called for body in computations.values() for m in body for called in _CALLED.findall(m["rest"])
              if m["op"] not in ("while", "conditional", "call")}
    shapes = {m["name"]: m["shape"] for body in computations.values() for m in body}
    producers = {m["name"]: m for body in computations.values() for m in body}
    names: dict[str, str] = {}

    def op_name_of(name: str, depth: int = 0) -> str:
        """The instruction's op_name, or (copies and other compiler-made instructions carry
        none) the nearest one up its first-operand chain."""
        if name not in names:
            m = producers.get(name)
            found = _OP_NAME.search(m["rest"]) if m else None
            if found or m is None or depth > 20:
                names[name] = found[1] if found else ""
            else:
                first = re.search(r"%([\w.\-]+)", m["rest"].split(")", 1)[0])
                names[name] = op_name_of(first[1], depth + 1) if first else ""
        return names[name]

    by_phase: dict[str, float] = {}
    by_component: dict[str, float] = {}
    by_both: dict[str, float] = {}
    for name, body in computations.items():
        if name in nested:
            continue
        for m in body:
            if m["op"] in _FREE or m["op"].endswith("-done"):
                continue
            operands = re.findall(r"%([\w.\-]+)", m["rest"].split(")", 1)[0])
            called = _CALLED.search(m["rest"]) if m["op"] == "fusion" else None
            if called and called[1] in computations:
                read = sum(_fusion_operand_bytes(computations[called[1]], i, shapes.get(o, ""))
                           for i, o in enumerate(operands))
            else:
                read = sum(_tiled_bytes(shapes.get(o, "")) for o in operands)
            written = _tiled_bytes(m["shape"])
            if m["op"].endswith("-start") and m["op"].removesuffix("-start") not in COLLECTIVES:
                # An async copy / slice: its result tuple echoes the operands, then holds what it
                # moves (and a context scalar); it reads and writes that much.
                context = sum(_tiled_bytes(a[0]) for a in _TILED_ARRAY.finditer(m["shape"])
                              if a["dims"] == "" and a["dtype"] in ("u32", "s32"))
                read = written = max(written - context - read, 0.0)
            phase, component = _part(m["op"], op_name_of(m["name"]))
            for table, key in ((by_phase, phase), (by_component, component or phase), (by_both, f"{phase}: {component}")):
                table[key] = table.get(key, 0.0) + read + written
    order = lambda d: dict(sorted(d.items(), key=lambda kv: -kv[1]))  # noqa: E731
    return {"total": sum(by_phase.values()), "by_phase": order(by_phase), "by_component": order(by_component),
            "by_phase_and_component": order(by_both)}
