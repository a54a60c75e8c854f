"""PNG plots: expert-load heatmaps and metric curves (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def heatmap(matrix: list[list[float]], layers: list[int], path: Path, title: str) -> Path:
    """Layer x expert load shares as a heatmap; 1/E (perfect balance) sits mid-scale."""
    path.parent.mkdir(parents=True, exist_ok=True)
    experts = len(matrix[0])
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * experts + 2), max(2.5, 0.5 * len(layers) + 1.5)))
    im = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0, vmax=max(2.0 / experts, max(map(max, matrix))))
    ax.set_yticks(range(len(layers)), [f"L{l}" for l in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="share of routed tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def share_matrix(snapshot: dict) -> tuple[list[int], list[list[float]]]:
    """{layer: per-expert token counts} (int or str keys) -> (layers, per-layer load shares)."""
    layers = sorted(snapshot, key=int)
    return [int(l) for l in layers], [[c / max(1, sum(snapshot[l])) for c in snapshot[l]] for l in layers]


def expert_heatmap(monitor, path: Path, title: str) -> Path:
    """Heatmap of the load summed over everything the monitor recorded."""
    first = monitor.history[0]
    totals = {l: [sum(h[l][e] for h in monitor.history) for e in range(len(first[l]))] for l in first}
    layers, matrix = share_matrix(totals)
    return heatmap(matrix, layers, path, title)


def curves(series: dict[str, list[tuple[float, float]]], path: Path, title: str, ylabel: str = "") -> Path:
    """One line per named series of (step, value) points."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, pts in series.items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=name, marker="." if len(pts) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
