"""PNG plots of a run: learning curves, leadership maps (LFNN Fig. 6), worker activity (Fig. 5).

Every function takes plain data (lists, dicts, arrays), so this module knows nothing of the
trainer, its plugins or the network that produced them.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = [
    "plot_history",
    "plot_leadership",
    "plot_activity",
    "plot_accuracy_matrix",
    "plot_task_accuracy",
    "write_run_plots",
]


def plot_history(history: list[dict], path: Path, histories: list[list[dict]] | None = None) -> None:
    """Training objective and held-out accuracy per epoch (validation accuracy when the run has a
    validation split, else test accuracy): the mean over replicas, and with several replicas each
    replica's curve (thin) and the spread (mean ± std, shaded)."""
    epochs = [h["epoch"] for h in history]
    held = "val" if "val_acc" in history[0] else "test"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, scale, color in ((ax1, "train_loss", 1, "tab:blue"), (ax2, f"{held}_acc", 100, "tab:green")):
        if key not in history[0]:
            continue
        ax.plot(epochs, [scale * h[key] for h in history], marker="o", color=color, label="mean" if histories and len(histories) > 1 else None)
        if histories and len(histories) > 1:
            values = scale * np.array([[h[key] for h in run] for run in histories])  # (R, epochs)
            for row in values:
                ax.plot(epochs, row, color=color, lw=0.6, alpha=0.35)
            mean, std = values.mean(0), values.std(0, ddof=1)
            ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2, label=f"± std ({len(histories)} replicas)")
            ax.legend(fontsize=7)
    ax1.set(xlabel="epoch", ylabel="training objective", title="objective")
    ax2.set(xlabel="epoch", ylabel=f"{'validation' if held == 'val' else 'test'} accuracy (%)",
            title="validation accuracy" if held == "val" else "test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_leadership(epoch_counts: list[list[np.ndarray]], path: Path) -> None:
    """How often each worker led, per epoch and hidden layer (rows: epochs, columns: workers).

    ``epoch_counts[layer][epoch]``: that epoch's count per worker, ``(W,)``, or per replica and worker
    ``(R, W)`` (the first replica's counts are drawn). Any array-like works (a CPU tensor too).
    """
    layers = [np.stack([np.asarray(c).reshape(-1, np.asarray(c).shape[-1])[0] for c in per_layer]) for per_layer in epoch_counts if per_layer]
    if not layers:
        return
    fig, axes = plt.subplots(len(layers), 1, figsize=(8, 1.2 + 1.4 * len(layers)), squeeze=False)
    for i, (ax, counts) in enumerate(zip(axes[:, 0], layers)):
        im = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set(title=f"hidden layer {i + 1}: times each worker led", xlabel="worker", ylabel="epoch")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_activity(changes: np.ndarray, leaders: np.ndarray | None, path: Path, layer: int = 0) -> None:
    """Per-step output change of every worker of one hidden layer; leaders red, followers blue.

    ``changes``: ``(steps, W)``, each worker's mean |output change| per step; ``leaders``: a boolean
    ``(steps, W)`` mask of the leaders, or ``None`` (no leaders); ``layer`` (0-based) names the
    layer in the title. Nothing is written for zero steps.
    """
    values = np.asarray(changes)
    if values.size == 0:
        return
    fig, ax = plt.subplots(figsize=(9, 3.5))
    steps = np.arange(len(values))
    for w in range(values.shape[1]):
        ax.plot(steps, values[:, w], color="tab:blue", lw=0.5, alpha=0.6)
    if leaders is not None:
        mask = np.asarray(leaders, dtype=bool)
        ax.plot(steps, np.nanmean(np.where(mask, values, np.nan), axis=1), color="tab:red", lw=1.2, label="leaders (mean)")
        ax.plot(steps, np.nanmean(np.where(mask, np.nan, values), axis=1), color="navy", lw=1.2, label="followers (mean)")
        ax.legend()
    ax.set(xlabel="step", ylabel="mean |output change|", title=f"worker activity, hidden layer {layer + 1}", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_run_plots(
    out: Path, history: list[dict], histories: list[list[dict]] | None = None,
    leadership: list[list[np.ndarray]] | None = None,
    activity: tuple[np.ndarray, np.ndarray | None] | None = None,
) -> None:
    """Write the plots that apply to a finished run into ``out``: the history (``histories``: per
    replica), the leadership counts (:func:`plot_leadership`'s ``epoch_counts``) and the activity
    (:func:`plot_activity`'s ``(changes, leaders)``), each where given."""
    if history:
        plot_history(history, out / "history.png", histories)
    if leadership is not None and any(leadership):
        plot_leadership(leadership, out / "leadership.png")
    if activity is not None:
        plot_activity(*activity, out / "activity.png")


def plot_accuracy_matrix(R: list[list[float]], path: Path, title: str = "") -> None:
    """Heatmap of the continual-learning accuracy matrix with values (row 0: before training)."""
    m = 100 * np.asarray(R)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * m.shape[1], 0.9 + 0.45 * m.shape[0]))
    im = ax.imshow(m, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:.0f}", ha="center", va="center", fontsize=7, color="white" if m[i, j] < 60 else "black")
    ax.set_xticks(range(m.shape[1]), [str(j + 1) for j in range(m.shape[1])])
    ax.set_yticks(range(m.shape[0]), ["init"] + [str(i) for i in range(1, m.shape[0])])
    ax.set(xlabel="evaluated task", ylabel="after training task", title=f"accuracy (%) {title}".strip())
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_task_accuracy(R: list[list[float]], path: Path, replicas: list[list[list[float]]] | None = None) -> None:
    """Each task's accuracy across the sequence, from the moment it is learned; with several
    replicas, the spread (± std over replicas) of the mean accuracy over the tasks seen."""
    m = 100 * np.asarray(R)
    T = m.shape[1]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for j in range(T):
        ax.plot(range(j + 1, T + 1), m[j + 1 :, j], marker="o", ms=3, label=f"task {j + 1}")
    ax.plot(range(1, T + 1), [m[i, :i].mean() for i in range(1, T + 1)], color="black", lw=2, label="mean (seen)")
    if replicas is not None and len(replicas) > 1:
        seen = np.array([[100 * np.mean(np.asarray(r)[i, :i]) for i in range(1, T + 1)] for r in replicas])
        mean, std = seen.mean(0), seen.std(0, ddof=1)
        ax.fill_between(range(1, T + 1), mean - std, mean + std, color="black", alpha=0.15, label=f"± std ({len(replicas)} replicas)")
    ax.set(xlabel="after training task", ylabel="test accuracy (%)", title="per-task accuracy across the sequence")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
