"""Benchmarks behind `multitower bench ...`: each prints a short table and can write JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping


def _format(value) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    magnitude = abs(value)
    return f"{value:.3e}" if magnitude >= 1e7 else f"{value:,.1f}" if magnitude >= 100 else f"{value:.4g}"


def report(title: str, figures: Mapping[str, float | int | str], json_path: str | os.PathLike | None = None) -> None:
    """Print ``figures`` as a two-column table; with ``json_path`` also write them as JSON."""
    width = max(len(k) for k in figures)
    print(f"\n{title}")
    print("-" * (width + 18))
    for key, value in figures.items():
        shown = _format(value)
        print(f"{key:<{width}}  {shown:>14}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(figures), f, indent=2)
        print(f"(written to {json_path})")
