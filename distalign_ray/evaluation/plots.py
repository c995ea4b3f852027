"""Target vs estimated distribution per context, one panel per class (one for two classes)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_distributions(
    contexts: list[str],
    categories: list[str],
    targets: np.ndarray,
    series: dict[str, np.ndarray],
    title: str,
    path: str | Path,
) -> Path:
    shown = categories[:1] if len(categories) == 2 else categories
    fig, axes = plt.subplots(len(shown), 1, figsize=(max(8, 0.45 * len(contexts) + 3), 3.2 * len(shown)), squeeze=False)
    x = np.arange(len(contexts))
    width = 0.8 / (len(series) + 1)
    for k, (ax, category) in enumerate(zip(axes[:, 0], shown)):
        ax.bar(x - 0.4 + width / 2, targets[:, k], width, label="target", color="black", alpha=0.7)
        for i, (name, values) in enumerate(series.items(), start=1):
            ax.bar(x - 0.4 + width / 2 + i * width, values[:, k], width, label=name)
        ax.set_ylabel(f"P({category})")
        ax.set_ylim(0, 1)
        ax.set_xticks(x)
        ax.set_xticklabels([c[:28] for c in contexts], rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=7, loc="upper right")
    axes[0, 0].set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heatmap(values: np.ndarray, rows: list[str], columns: list[str], title: str, path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(1.6 * len(columns) + 3, 0.5 * len(rows) + 1.8))
    image = ax.imshow(values, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(columns, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=8)
    for i in range(len(rows)):
        for j in range(len(columns)):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.3f}", ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(image, ax=ax, label="MAE")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
