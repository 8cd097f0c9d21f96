"""PNG figures (matplotlib, Agg backend): the search trajectory (the paper's Fig. 3 for one run)."""

from __future__ import annotations

import io
from pathlib import Path

from flexslim.system.distributed import is_main
from flexslim.system.files import atomic_write_bytes


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path) -> Path:
    """Write a figure as PNG (110 dpi) atomically and close it."""
    plt = pyplot()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_search(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Per stage: mu over epochs, the allocated band [mu - k sigma, allocated] and the final width; below,
    the expected latency against the budget and the controller's multiplier. Rank 0 only under torchrun."""
    if not is_main():
        return Path(path)
    plt = pyplot()
    stages = list(history[0]["mu"])
    epochs = [h["epoch"] for h in history]
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    for i, s in enumerate(stages):
        color = f"C{i % 10}"
        mu = [h["mu"][s] for h in history]
        alloc = [h["allocated"][s] for h in history]
        low = [max(0.0, m - (a - m)) for m, a in zip(mu, alloc)]
        ax.fill_between(epochs, low, alloc, color=color, alpha=0.15, step=None)
        ax.plot(epochs, mu, color=color, lw=2, label=f"{s} mu")
        ax.plot(epochs, [h["final_widths"][s] for h in history], color=color, lw=1, ls="--", drawstyle="steps-mid")
    ax.set_ylabel("channels")
    ax.set_title(title or "FlexCHarts search: mu (line), final width (dashed), allocated band (shaded)")
    ax.legend(loc="upper left", fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    bx.plot(epochs, [h["expected_latency_ms"] for h in history], color="k", lw=2, label="E[latency]")
    bx.axhline(history[0]["budget_ms"], color="r", ls="--", label="budget")
    bx.set_ylabel("ms / sample")
    bx.set_xlabel("epoch")
    bx.grid(alpha=0.3)
    twin = bx.twinx()
    twin.plot(epochs, [h["multiplier"] for h in history], color="C9", lw=1, label="multiplier")
    twin.set_ylabel("multiplier", color="C9")
    bx.legend(loc="upper right", fontsize=8)
    return save_png(fig, path)
