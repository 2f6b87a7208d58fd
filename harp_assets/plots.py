"""Small PNG plots for asset metadata (the UI shows them inline), where a picture reads faster than numbers."""

import base64
import io
from typing import Any

import numpy as np


def pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are a nicety: metadata without them is still complete
        return None
    return plt


def png_markdown(fig: Any, alt: str) -> str:
    """The figure as an inline markdown image; closes the figure."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return f"![{alt}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"


def gain_curve(running: np.ndarray, cut: int, leaf_sizes: np.ndarray, budget: int) -> str | None:
    """Cumulative predicted gain over the greedy's ranked leaves, with the best-prefix cut and the budget."""
    plt = pyplot()
    if plt is None or running.size == 0:
        return None
    fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
    x = np.arange(1, running.size + 1)
    ax.plot(x, running, lw=1.5, label="cumulative gain of the first k leaves")
    ax.axvline(cut, color="tab:red", ls="--", label=f"cut: {cut} leaves kept")
    points = np.cumsum(leaf_sizes)
    over = np.flatnonzero(points >= budget)
    if over.size:
        ax.axvline(int(over[0]) + 1, color="tab:gray", ls=":", label=f"budget: {budget} examples")
    ax.axhline(0.0, color="black", lw=0.5)
    ax.set_xlabel("leaves in greedy order")
    ax.set_ylabel("predicted objective gain")
    ax.legend(fontsize=7)
    return png_markdown(fig, "greedy gain curve")


def sd_by_source(sd: np.ndarray, measured: np.ndarray) -> str | None:
    """Posterior sd of measured against inferred leaves: how much HARP knows about what it did not train."""
    plt = pyplot()
    if plt is None or sd.size == 0:
        return None
    fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
    per_leaf = sd.mean(axis=1)
    bins = np.linspace(0.0, float(per_leaf.max()) * 1.05 or 1.0, 30)
    for mask, label in ((measured, "measured"), (~measured, "inferred")):
        if mask.any():
            ax.hist(per_leaf[mask], bins=bins, alpha=0.6, label=f"{label} ({int(mask.sum())} leaves)")
    ax.set_xlabel("posterior sd of phi, mean over domains")
    ax.set_ylabel("leaves")
    ax.legend(fontsize=7)
    return png_markdown(fig, "posterior sd, measured and inferred")
