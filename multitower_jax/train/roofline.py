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
