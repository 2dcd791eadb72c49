"""PNG plots for people who would rather look than read (loss curves, accuracy bars)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    from malt_ops.storage import reporting_disk_full

    fig.tight_layout()
    try:
        with reporting_disk_full(path):
            fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def loss_curves(histories: dict[str, list[dict[str, Any]]], title: str, path: Path) -> Path:
    """One line per phase (sft, dpo): training loss against optimizer step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for phase, history in histories.items():
        points = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
        if points:
            steps, losses = zip(*points, strict=True)
            ax.plot(steps, losses, marker="o", markersize=3, label=phase)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    return _save(plt, fig, path)


def accuracy_bars(settings: list[tuple[str, float, float]], title: str, path: Path) -> Path:
    """Mean accuracy per setting with std error bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    names = [name for name, _, _ in settings]
    ax.bar(
        range(len(settings)),
        [m * 100 for _, m, _ in settings],
        yerr=[s * 100 for _, _, s in settings],
        capsize=3,
        color="#4c72b0",
    )
    ax.set_xticks(range(len(settings)), names, rotation=35, ha="right")
    ax.set_ylabel("accuracy %")
    ax.set_title(title)
    return _save(plt, fig, path)


def turnwise_lines(series: dict[str, list[float]], title: str, path: Path) -> Path:
    """Accuracy after each turn (G, V, R) per system."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, values in series.items():
        ax.plot(
            ["after G", "after V", "after R"], [v * 100 for v in values], marker="o", label=name
        )
    ax.set_ylabel("accuracy %")
    ax.set_title(title)
    ax.legend()
    return _save(plt, fig, path)


def value_histograms(histograms: dict[str, list[int]], threshold: float, path: Path) -> Path:
    """Per role: how many outputs got each value (10 right-closed bins over [0, 1], the first
    holding 0 too, so a value equal to the threshold sits left of its line), with the
    threshold marked."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(histograms), figsize=(4 * len(histograms), 3.2), squeeze=False)
    for ax, (role, counts) in zip(axes[0], histograms.items(), strict=True):
        edges = [i / len(counts) for i in range(len(counts))]
        ax.bar(
            edges, counts, width=1 / len(counts), align="edge", color="#55a868", edgecolor="white"
        )
        ax.axvline(threshold, color="#c44e52", linestyle="--", label=f"threshold {threshold}")
        ax.set_title(role)
        ax.set_xlabel("value V")
        ax.set_xlim(0, 1)
    axes[0][0].set_ylabel("outputs")
    axes[0][0].legend()
    return _save(plt, fig, path)
