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


def composition(counts: dict[str, dict[str, int]], max_regions: int = 30) -> str | None:
    """Selected examples per region, stacked by the domain their leaf helps most: where the data comes from and
    what it is for. Regions beyond `max_regions` (the smallest) are summed into one bar."""
    plt = pyplot()
    if plt is None or not counts:
        return None
    regions = sorted(counts, key=lambda r: (-sum(counts[r].values()), r))
    if len(regions) > max_regions:
        rest: dict[str, int] = {}
        for r in regions[max_regions - 1:]:
            for d, n in counts[r].items():
                rest[d] = rest.get(d, 0) + n
        counts = {**{r: counts[r] for r in regions[:max_regions - 1]}, f"{len(regions) - max_regions + 1} more": rest}
        regions = list(counts)
    domains = sorted({d for row in counts.values() for d in row})
    fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
    x = np.arange(len(regions))
    bottom = np.zeros(len(regions))
    for d in domains:
        h = np.array([counts[r].get(d, 0) for r in regions], dtype=np.float64)
        ax.bar(x, h, bottom=bottom, label=d)
        bottom += h
    ax.set_xticks(x, regions, rotation=60, ha="right", fontsize=6)
    ax.set_ylabel("selected examples")
    ax.set_xlabel("region")
    ax.legend(fontsize=6, title="leaf helps most", title_fontsize=6)
    return png_markdown(fig, "selection composition by region and domain")


def predicted_band(predictions: dict[str, dict[str, Any]], base: dict[str, float] | None = None) -> str | None:
    """Predicted utility per domain with its credible band; saturated domains (the clip at 1) drawn hatched."""
    plt = pyplot()
    if plt is None or not predictions:
        return None
    names = list(predictions)
    y = np.array([predictions[d]["predicted"] for d in names])
    lo = np.array([predictions[d]["low"] for d in names])
    hi = np.array([predictions[d]["high"] for d in names])
    sat = [bool(predictions[d]["saturated"]) for d in names]
    fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
    x = np.arange(len(names))
    bars = ax.bar(x, y, yerr=np.vstack([y - lo, hi - y]), capsize=3, color="tab:blue", alpha=0.7)
    for bar, s in zip(bars, sat, strict=True):
        if s:
            bar.set_hatch("//")
            bar.set_color("tab:orange")
    if base:
        ax.scatter(x, [base.get(d, np.nan) for d in names], marker="_", s=300, color="black", label="base model")
        ax.legend(fontsize=7)
    ax.set_xticks(x, [f"{d}\n(saturated)" if s else d for d, s in zip(names, sat, strict=True)], fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("predicted utility")
    return png_markdown(fig, "predicted utility per domain with its band")
