"""PNG plots: expert-load heatmaps and metric curves (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def heatmap(matrix: list[list[float]], layers: list[int], path: Path, title: str, vmax: float | None = None) -> Path:
    """Layer x expert load shares as a heatmap; 1/E (perfect balance) sits mid-scale unless ``vmax`` fixes the
    scale (pass the same one to heatmaps that are compared, e.g. start and end of a run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    experts = len(matrix[0])
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * experts + 2), max(2.5, 0.5 * len(layers) + 1.5)))
    vmax = vmax if vmax is not None else max(2.0 / experts, max(map(max, matrix)))
    im = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
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
    return curves_by_run({"": series}, path, title, ylabel)


def curves_by_run(runs: dict[str, dict[str, list[tuple[float, float]]]], path: Path, title: str,
                  ylabel: str = "") -> Path:
    """One panel per run (each with its own step axis: an SFT run of 1,200 steps does not squash a GRPO run of
    100), one line per named series."""
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = {k: v for k, v in runs.items() if any(v.values())}
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 3.6), squeeze=False)
    for ax, (run, series) in zip(axes[0], runs.items()):
        for name, pts in series.items():
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=name, marker="." if len(pts) < 30 else None)
        ax.set_xlabel(f"{run} step" if run else "step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {run}" if run else title)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
