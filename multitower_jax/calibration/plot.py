"""Reliability diagrams: observed rate against mean prediction per equal-mass bin, before and after
calibration on one plot, with the distribution of the predictions underneath."""

from __future__ import annotations

import io
import os
from etils import epath

import numpy as np

from multitower_jax import fileio
from multitower_jax.calibration import metrics


def reliability_diagram(path: str | os.PathLike, head: str, y: np.ndarray, before: np.ndarray,
                        after: np.ndarray, num_bins: int, title: str = "") -> epath.Path:
    """Write a PNG (atomically) comparing the two prediction sets against the labels ``y``."""
    import matplotlib  # noqa: PLC0415 (only this command draws)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    curves = {"before": before, "after": after}
    bins = {name: metrics.equal_mass_bins(p, y, num_bins) for name, p in curves.items()}
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(6, 7), height_ratios=(3, 1), constrained_layout=True)
    top = 1.05 * max(max(b.mean_pred.max(), b.observed.max()) for b in bins.values())
    ax.plot([0, top], [0, top], color="0.6", linestyle="--", linewidth=1, label="perfectly calibrated")
    for (name, b), color in zip(bins.items(), ("tab:red", "tab:blue"), strict=True):
        # A bin's standard error, so a reader can tell noise from miscalibration.
        se = np.sqrt(np.clip(b.observed * (1 - b.observed), 1e-12, None) / b.count)
        ax.errorbar(b.mean_pred, b.observed, yerr=se, marker="o", markersize=4, capsize=2, color=color,
                    label=f"{name}: ECE {b.ece():.4f}")
    ax.set(xlim=(0, top), ylim=(0, top), xlabel="mean predicted probability (per bin)",
           ylabel="observed rate", title=title or f"{head}: reliability ({num_bins} equal-mass bins)")
    ax.legend(loc="upper left")
    edges = np.linspace(0, min(1.0, max(np.quantile(p, 0.999) for p in curves.values()) * 1.05), 60)
    for (name, p), color in zip(curves.items(), ("tab:red", "tab:blue"), strict=True):
        hist.hist(np.clip(p, 0, edges[-1]), bins=edges, histtype="step", color=color, label=name)
    hist.set(yscale="log", xlabel="predicted probability", ylabel="count")
    buffer = io.BytesIO()  # matplotlib writes local files only; the workdir may be gs://
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return fileio.write_bytes(path, buffer.getvalue())
