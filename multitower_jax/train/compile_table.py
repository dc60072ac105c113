"""The README's table of compiled pod configs, from `multitower compile --json` reports.

    python -m multitower_jax.train.compile_table v5p.json v5e.json v6e.json

prints one markdown row per report (config, topology and chips, mesh, peak HBM per chip against
the chip's, FLOPs per chip, collective bytes per step, estimated step, examples/s per chip,
estimated MFU, bound), so the README's figures are a command's output, not copied by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HEADER = ("| config | topology (chips) | mesh data x model | peak HBM per chip | FLOPs per chip | "
          "collective bytes per step | est. step | examples/s per chip | est. MFU | bound by |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def row(report: dict[str, Any], name: str) -> str:
    gib = 2**30
    peak, hbm = report["peak_hbm_bytes_per_chip"], report["hbm_bytes_per_chip"]
    mesh = report["mesh"]
    return (f"| {name} | `{report['topology']}` ({report['num_chips']}) | {mesh['data']} x {mesh['model']} | "
            f"{peak / gib:.2f} GiB of {hbm / gib:.0f} ({100 * peak / hbm:.0f} %) | "
            f"{report['flops_per_chip'] / 1e9:.1f} GFLOP | {report['collective_bytes_per_step'] / 1e6:,.1f} MB | "
            f"{1e3 * report['estimated_step_seconds']:.2f} ms | "
            f"{report['estimated_examples_per_sec_per_chip']:,.0f} | {100 * report['estimated_mfu']:.1f} % | "
            f"{report['bound_by']} |")


def table(paths: list[str]) -> str:
    """The header and a row per report; a row is named after its file (``pod_v5p.json`` -> pod_v5p)."""
    rows = [row(json.loads(Path(p).read_text()), Path(p).stem) for p in paths]
    return "\n".join([HEADER, *rows])


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print(__doc__.strip().splitlines()[2].strip())
        return 2
    print(table(paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
