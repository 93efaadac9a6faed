"""The LFNN paper's figures and tables (arXiv 2310.07885) as registered experiments.

| experiment | paper | what runs |
|---|---|---|
| ``lfnn_online_pmnist`` | Fig. 3a | one-vs-all online LFNN, widths x leadership, BP reference |
| ``lfnn_loss_ablation`` | Fig. 3b | the four loss variants, 32 workers, 30 % leadership |
| ``worker_activity`` | Fig. 5 | per-step output change of each worker, leaders vs followers |
| ``leadership_development`` | Fig. 6 | LFNN-l, 2 x 32 workers, 20 % leadership, leadership counts per epoch |
| ``lfnn_table1_mnist`` | Table 1 | every rule on mlp_275k, mlp_438k, cnn_mnist_275k and cnn_mnist_438k |
| ``lfnn_leadership_sweep`` | Table 2 | leadership 10 %-100 % for lfnn and lfnn_local on cnn_mnist_275k |
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from agentnet.config import ExperimentConfig, check  # noqa: E402
from agentnet.data import ImageData  # noqa: E402
from agentnet.experiments import EXPERIMENTS, Experiment, preset  # noqa: E402
from agentnet.experiments.one_vs_all import Setting, train_one_vs_all  # noqa: E402
from agentnet.tables import markdown_table  # noqa: E402
from agentnet.recipes import train  # noqa: E402

#: Test / train error (%) of the paper's Table 1, MNIST columns.
TABLE1 = {
    ("mlp_275k", "bp"): (2.01, 0.00),
    ("mlp_275k", "lfnn"): (1.18, 1.15),
    ("mlp_275k", "lfnn_local"): (1.49, 0.04),
    ("mlp_438k", "bp"): (1.88, 0.00),
    ("mlp_438k", "lfnn"): (2.14, 1.49),
    ("mlp_438k", "lfnn_local"): (1.20, 1.15),
    # The paper's nets "consist of FC and convolutional layers": our filter-wise-worker CNNs of each size.
    ("cnn_mnist_275k", "bp"): (2.01, 0.00),
    ("cnn_mnist_275k", "lfnn"): (1.18, 1.15),
    ("cnn_mnist_275k", "lfnn_local"): (1.49, 0.04),
    ("cnn_mnist_438k", "bp"): (1.88, 0.00),
    ("cnn_mnist_438k", "lfnn"): (2.14, 1.49),
    ("cnn_mnist_438k", "lfnn_local"): (1.20, 1.15),
}
# The other rules of Table 1 (published test / train error, %; ~275K column, ~438K column).
for _rule, (_small, _large) in {
    "lg_bp": ((2.43, 0.00), (2.81, 0.00)),
    "fa": ((2.82, 0.00), (2.90, 0.00)),
    "fg_w": ((9.25, 8.93), (8.56, 8.64)),
    "fg_a": ((3.24, 1.53), (3.76, 1.75)),
    "lg_fg_w": ((9.25, 8.93), (5.66, 4.59)),
    "lg_fg_a": ((3.24, 1.53), (2.55, 0.00)),
}.items():
    for _model in ("mlp_275k", "cnn_mnist_275k"):
        TABLE1[(_model, _rule)] = _small
    for _model in ("mlp_438k", "cnn_mnist_438k"):
        TABLE1[(_model, _rule)] = _large
#: Test error (%) of the paper's Table 2, MNIST 275K, leadership 10 %..100 %.
TABLE2 = {
    "lfnn_local": [1.96, 1.67, 1.98, 1.49, 1.49, 1.49, 1.49, 1.64, 1.69, 1.57],
    "lfnn": [1.24, 1.68, 1.50, 1.60, 1.40, 1.20, 1.18, 1.40, 1.44, 1.51],
}
LEADERSHIP = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def _permuted(data: ImageData, run, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixel-permuted MNIST (one fixed permutation), training set capped by ``data.subset``."""
    perm = torch.randperm(data.input_dim, generator=torch.Generator().manual_seed(seed)).to(data.train.x.device)
    train = data.train.subset(run.data.subset, torch.Generator().manual_seed(seed))
    test = data.test.subset(run.data.test_subset)
    return train.x[:, perm], train.y, test.x[:, perm], test.y


@dataclass
class OnlineConfig(ExperimentConfig):
    """Shared settings of the online one-vs-all experiments (paper Sec. 3.1)."""

    widths: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    """Hidden widths (single-neuron workers per classifier)."""
    leadership: list[float] = field(default_factory=lambda: list(LEADERSHIP))
    """Leadership fractions."""
    lr: float = 5e-3
    """Adam learning rate (paper: 5e-3)."""
    batch_size: int = 10
    """Examples per online update."""
    lambda1: float = 1.0
    lambda2: float = 1.0
    curve_every: int = 100
    """Steps per point of the prequential accuracy curves."""
    seed: int = 0

    def __post_init__(self) -> None:
        check(all(w > 0 for w in self.widths), "experiment.widths", self.widths, "must be positive")
        check(all(0 < d <= 1 for d in self.leadership), "experiment.leadership", self.leadership, "fractions in (0, 1]")
        check(self.batch_size > 0, "experiment.batch_size", self.batch_size, "must be positive")


class OnlineExperiment(Experiment):
    """Base of Fig. 3a / 3b / 5: each trains its one-vs-all classifiers as one population of the
    engine's ``lfnn`` (:func:`agentnet.experiments.one_vs_all.train_one_vs_all`)."""

    Config = OnlineConfig

    def _train(self, data: ImageData, settings: list[Setting], width: int, label: str, **kw):
        cfg, run = self.cfg, self.run_cfg
        x, y, xt, yt = _permuted(data, run, cfg.seed)
        return train_one_vs_all(run, x, y, xt, yt, settings, width, num_classes=data.num_classes, lr=cfg.lr,
                                batch_size=cfg.batch_size, seed=cfg.seed, curve_every=cfg.curve_every, label=label, **kw)


@EXPERIMENTS.register("lfnn_online_pmnist")
class OnlinePMNIST(OnlineExperiment):
    """Fig. 3a: test accuracy after one online pass vs leadership fraction, per width, with BP."""

    def run(self, out: Path, data: ImageData) -> dict[str, float]:
        cfg = self.cfg
        settings = [Setting(f"{d:.0%}", delta=d, lambda1=cfg.lambda1, lambda2=cfg.lambda2) for d in cfg.leadership]
        settings.append(Setting("BP", bp=True))
        results = {w: self._train(data, settings, w, f"width {w}").test_acc for w in cfg.widths}
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, (width, accs) in enumerate(results.items()):
            colour = f"C{i}"
            ax.plot([100 * d for d in cfg.leadership], [100 * a for a in accs[:-1]], marker="o", color=colour, label=f"{width} workers")
            ax.axhline(100 * accs[-1], color=colour, ls="--", lw=0.8)
        ax.set(xlabel="leadership (%)", ylabel="test accuracy (%)", title="Online one-vs-all LFNN on permuted MNIST (dashed: BP)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "online_pmnist.png", dpi=110)
        plt.close(fig)
        header = ["workers", *[s.label for s in settings]]
        rows = [[str(w), *[f"{100 * a:.2f}" for a in accs]] for w, accs in results.items()]
        (out / "online_pmnist.md").write_text(
            "Test accuracy (%) after one online pass (paper Fig. 3a gives curves, no numbers).\n\n" + markdown_table(header, rows) + "\n"
        )
        return {f"acc_w{w}_{s.label}": a for w, accs in results.items() for s, a in zip(settings, accs)}


@dataclass
class LossAblationConfig(OnlineConfig):
    """Fig. 3b settings: one 32-worker network at 30 % leadership."""

    widths: list[int] = field(default_factory=lambda: [32])
    leadership: list[float] = field(default_factory=lambda: [0.3])
    curve_every: int = 50


@EXPERIMENTS.register("lfnn_loss_ablation")
class LossAblation(OnlineExperiment):
    """Fig. 3b: the four loss variants on the 32-worker, 30 %-leadership network."""

    Config = LossAblationConfig

    def run(self, out: Path, data: ImageData) -> dict[str, float]:
        cfg = self.cfg
        delta = cfg.leadership[0] if len(cfg.leadership) == 1 else 0.3
        settings = [
            Setting("L_g + L_l + L_f", delta, 1.0, 1.0),
            Setting("L_g + L_l", delta, 1.0, 0.0),
            Setting("L_g + L_f", delta, 0.0, 1.0),
            Setting("L_g", delta, 0.0, 0.0),
        ]
        width = cfg.widths[0]
        result = self._train(data, settings, width, "loss ablation")
        fig, ax = plt.subplots(figsize=(7, 4))
        for s, curve in zip(settings, result.curves):
            ax.plot(result.curve_steps, [100 * c for c in curve], label=s.label)
        ax.set(xlabel="training step", ylabel="online accuracy (%)", title=f"Loss ablation: {width} workers, {delta:.0%} leadership")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "loss_ablation.png", dpi=110)
        plt.close(fig)
        rows = [[s.label, f"{100 * a:.2f}", f"{100 * c[-1]:.2f}"] for s, a, c in zip(settings, result.test_acc, result.curves)]
        (out / "loss_ablation.md").write_text(
            "Paper (Fig. 3b): all losses best, then global + leader; global + follower and global alone lowest.\n\n"
            + markdown_table(["variant", "test acc %", "final online acc %"], rows) + "\n"
        )
        return {f"acc_{s.label.replace(' ', '')}": a for s, a in zip(settings, result.test_acc)}


@dataclass
class WorkerActivityConfig(OnlineConfig):
    """Fig. 5 settings: one 32-worker network at 30 % leadership."""

    widths: list[int] = field(default_factory=lambda: [32])
    leadership: list[float] = field(default_factory=lambda: [0.3])


@EXPERIMENTS.register("worker_activity")
class WorkerActivityFigure(OnlineExperiment):
    """Fig. 5: per-step change of every worker's output, leaders vs followers (class-0 classifier)."""

    Config = WorkerActivityConfig

    def run(self, out: Path, data: ImageData) -> dict[str, float]:
        cfg = self.cfg
        delta = cfg.leadership[0] if len(cfg.leadership) == 1 else 0.3
        width = cfg.widths[0]
        result = self._train(data, [Setting("LFNN", delta, cfg.lambda1, cfg.lambda2)], width, "worker activity", record_activity=True)
        act, lead = result.activity.numpy(), result.activity_leaders.numpy()
        np.savez_compressed(out / "worker_activity.npz", activity=act, leaders=lead)
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5))
        first = min(300, len(act))
        steps = np.arange(first)
        for w in range(width):  # each worker's trace, coloured by its role at each step (Fig. 5a)
            top.plot(steps, act[:first, w], color="tab:blue", lw=0.4, alpha=0.5)
            top.scatter(steps[lead[:first, w]], act[:first, w][lead[:first, w]], s=2, color="tab:red")
        top.set(xlabel="step", ylabel="|output change|", title=f"Worker activity, first {first} steps (red: leading at that step)")
        window = max(1, len(act) // 100)
        kernel = np.ones(window) / window
        for mask, colour, label in ((lead, "tab:red", "leaders"), (~lead, "tab:blue", "followers")):
            mean = np.where(mask, act, 0).sum(1) / np.maximum(mask.sum(1), 1)
            bottom.plot(np.convolve(mean, kernel, mode="valid"), color=colour, label=label)
        bottom.set(xlabel="step", ylabel="mean |output change|", yscale="log",
                   title=f"Whole pass ({width} workers, {delta:.0%} leadership, class-0 classifier; moving mean over {window} steps)")
        bottom.legend()
        fig.tight_layout()
        fig.savefig(out / "worker_activity.png", dpi=110)
        plt.close(fig)
        early, late = act[: len(act) // 10], act[-len(act) // 10 :]
        summary = {
            "leader_activity": float(act[lead].mean()),
            "follower_activity": float(act[~lead].mean()),
            "early_over_late": float(early.mean() / max(late.mean(), 1e-12)),
            "test_acc": result.test_acc[0],
        }
        (out / "worker_activity.md").write_text(
            "Paper (Fig. 5): followers move in unison toward the leaders; large steps early, small once learned.\n\n"
            + markdown_table(["quantity", "value"], [[k, f"{v:.5g}"] for k, v in summary.items()]) + "\n"
        )
        return summary


@dataclass
class LeadershipDevelopmentConfig(ExperimentConfig):
    """Fig. 6 settings: LFNN-l with two hidden layers of 32 workers of 10, 20 % leadership."""

    workers: int = 32
    delta: float = 0.2
    epochs: int = 5
    steps_per_epoch: int = 300
    """Mini-batch size is chosen so one epoch is this many steps (paper: 300)."""


@EXPERIMENTS.register("leadership_development")
class LeadershipDevelopment(Experiment):
    """Fig. 6: how often each worker leads, per epoch, under LFNN-l."""

    Config = LeadershipDevelopmentConfig

    def run(self, out: Path, data: ImageData) -> dict[str, float]:
        cfg, base = self.cfg, self.run_cfg
        n_train = len(data.train) if base.data.subset is None else min(base.data.subset, len(data.train))
        run = dataclasses.replace(
            base,
            strategy=dataclasses.replace(preset("strategy", "lfnn_local"), delta=cfg.delta),
            model=dataclasses.replace(base.model, name="lfnn_2x32", hidden=[10 * cfg.workers] * 2, worker_size=10),
            trainer=dataclasses.replace(base.trainer, epochs=cfg.epochs, batch_size=max(1, n_train // cfg.steps_per_epoch)),
            experiment=None,
            output_dir=str(out / "run"),
        )
        metrics = train(run, data=data)
        counts = metrics["leadership_epoch_counts"]
        fig, axes = plt.subplots(1, len(counts), figsize=(5 * len(counts), 3.2), squeeze=False)
        summary = {"test_acc": metrics["test_acc"]}
        for li, (ax, per_epoch) in enumerate(zip(axes[0], counts)):
            m = np.asarray(per_epoch)  # (epochs, workers)
            ys, xs = np.nonzero(m >= 0)
            ax.scatter(xs, ys, s=2 + 60 * m[ys, xs] / max(m.max(), 1), c=m[ys, xs], cmap="viridis")
            ax.set(xlabel="worker", ylabel="epoch", title=f"hidden layer {li + 1}: times selected as leader")
            ax.invert_yaxis()
            n_lead = int(np.ceil(cfg.delta * cfg.workers))
            top = np.sort(m[-1])[::-1][:n_lead].sum() / max(m[-1].sum(), 1)
            summary[f"layer{li + 1}_top{n_lead}_share_last_epoch"] = float(top)
        fig.tight_layout()
        fig.savefig(out / "leadership_development.png", dpi=110)
        plt.close(fig)
        (out / "leadership_development.md").write_text(
            "Paper (Fig. 6): by epoch 5 exactly ~6 workers per layer lead nearly always (share of the top-6 -> 1).\n\n"
            + markdown_table(["quantity", "value"], [[k, f"{v:.4f}"] for k, v in summary.items()]) + "\n"
        )
        return summary


@dataclass
class GridConfig(ExperimentConfig):
    """A grid of MNIST training runs (Tables 1 and 2)."""

    models: list[str] = field(default_factory=lambda: ["mlp_275k", "mlp_438k"])
    strategies: list[str] = field(default_factory=lambda: ["bp", "lfnn", "lfnn_local"])
    leadership: list[float] = field(default_factory=list)
    """Leadership fractions to sweep (empty: each strategy's own default)."""
    seeds: list[int] = field(default_factory=lambda: [0])


def _grid_run(base, model: str, strategy: str, seed: int, out: Path, data: ImageData, delta: float | None = None) -> dict:
    strat = preset("strategy", strategy)
    if delta is not None:
        strat = dataclasses.replace(strat, delta=delta)
    run = dataclasses.replace(base, strategy=strat, model=preset("model", model), seed=seed, experiment=None,
                              output_dir=str(out / f"{model}_{strategy}_{'' if delta is None else f'd{delta:g}_'}s{seed}"))
    return train(run, data=data)


def _networks(metrics: dict) -> list[dict]:
    """Each trained network's own metrics: a population's replicas, or the one run."""
    return metrics.get("replicas") or [metrics]


@dataclass
class Table1Config(GridConfig):
    """Table 1 settings: both MLP sizes and the conv networks of the paper's ~275K and 429K-438K columns."""

    models: list[str] = field(default_factory=lambda: ["mlp_275k", "mlp_438k", "cnn_mnist_275k", "cnn_mnist_438k"])


@EXPERIMENTS.register("lfnn_table1_mnist")
class Table1(Experiment):
    """Table 1 (MNIST columns): test / train error of bp, lfnn, lfnn_local beside the paper's."""

    Config = Table1Config

    def run(self, out: Path, data: ImageData) -> dict[str, float]:
        rows, summary, spread = [], {}, {}
        for model in self.cfg.models:
            for strategy in self.cfg.strategies:
                # Every network counts: a run with replicas=N contributes its N replicas (seeds).
                runs = [rep for s in self.cfg.seeds for rep in _networks(_grid_run(self.run_cfg, model, strategy, s, out, data))]
                test = [r["test_error"] for r in runs]
                train_err = statistics.mean(r["train_error"] for r in runs)
                paper = TABLE1.get((model, strategy))
                std = statistics.stdev(test) if len(test) > 1 else 0.0  # sample std over seeds
                rows.append([model, f"{runs[0]['num_params']:,}", strategy, f"{statistics.mean(test):.2f} ± {std:.2f}",
                             f"{train_err:.2f}", "-" if paper is None else f"{paper[0]:.2f} / {paper[1]:.2f}", str(len(runs))])
                summary[f"test_error_{model}_{strategy}"] = statistics.mean(test)
                spread[(model, strategy)] = std
        labels = [f"{m}\n{st}" for m in self.cfg.models for st in self.cfg.strategies]
        ours = [summary[f"test_error_{m}_{st}"] for m in self.cfg.models for st in self.cfg.strategies]
        paper = [TABLE1.get((m, st), (np.nan,))[0] for m in self.cfg.models for st in self.cfg.strategies]
        fig, ax = plt.subplots(figsize=(1.4 * len(labels) + 2, 3.8))
        errors = [spread[(m, st)] for m in self.cfg.models for st in self.cfg.strategies]
        ax.bar(np.arange(len(labels)) - 0.2, ours, 0.4, yerr=errors, capsize=3, label="agentnet (mean ± std over seeds)")
        ax.bar(np.arange(len(labels)) + 0.2, paper, 0.4, label="paper (Table 1)")
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set(ylabel="test error (%)", title="MNIST test error")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "table1.png", dpi=110)
        plt.close(fig)
        (out / "table1.md").write_text(
            "MNIST test / train error (%), mean ± std over seeds, beside the LFNN paper's Table 1.\n\n"
            + markdown_table(["model", "params", "strategy", "test err", "train err", "paper test / train", "seeds"], rows) + "\n"
        )
        print((out / "table1.md").read_text())
        return summary


@dataclass
class LeadershipSweepConfig(GridConfig):
    """Table 2 settings: the ~275K conv network, the two LFNN variants, leadership 10 %-100 %."""

    models: list[str] = field(default_factory=lambda: ["cnn_mnist_275k"])
    strategies: list[str] = field(default_factory=lambda: ["lfnn", "lfnn_local"])
    leadership: list[float] = field(default_factory=lambda: list(LEADERSHIP))


@EXPERIMENTS.register("lfnn_leadership_sweep")
class LeadershipSweep(Experiment):
    """Table 2 (MNIST 275K): test error for leadership 10 %-100 %, lfnn and lfnn_local, mean ± std
    over every network (seeds, and each run's replicas with ``replicas=N``)."""

    Config = LeadershipSweepConfig

    def run(self, out: Path, data: ImageData) -> dict[str, float]:
        deltas = self.cfg.leadership or LEADERSHIP
        model = self.cfg.models[0]
        errors: dict[str, list[list[float]]] = {}  # strategy -> per delta, every network's test error
        for strategy in self.cfg.strategies:
            errors[strategy] = [
                [net["test_error"] for s in self.cfg.seeds for net in _networks(_grid_run(self.run_cfg, model, strategy, s, out, data, d))]
                for d in deltas
            ]
        means = {st: [statistics.mean(e) for e in per_delta] for st, per_delta in errors.items()}
        stds = {st: [statistics.stdev(e) if len(e) > 1 else 0.0 for e in per_delta] for st, per_delta in errors.items()}
        percent = [100 * d for d in deltas]
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, strategy in enumerate(errors):
            ax.errorbar(percent, means[strategy], yerr=stds[strategy], marker="o", capsize=3, color=f"C{i}", label=f"{strategy} (agentnet)")
            if strategy in TABLE2 and len(deltas) == len(LEADERSHIP):
                ax.plot(percent, TABLE2[strategy], ls="--", color=f"C{i}", label=f"{strategy} (paper)")
        networks = len(next(iter(errors.values()))[0])
        ax.set(xlabel="leadership (%)", ylabel="test error (%)", title=f"Leadership sweep on MNIST, {model} ({networks} networks per point)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "leadership_sweep.png", dpi=110)
        plt.close(fig)
        header = ["strategy", *[f"{d:.0%}" for d in deltas]]
        rows = []
        for strategy in errors:
            rows.append([f"{strategy} (agentnet)", *[f"{m:.2f} ± {sd:.2f}" for m, sd in zip(means[strategy], stds[strategy])]])
            if strategy in TABLE2 and len(deltas) == len(LEADERSHIP):
                rows.append([f"{strategy} (paper)", *[f"{e:.2f}" for e in TABLE2[strategy]]])
        (out / "leadership_sweep.md").write_text(
            f"Test error (%) on MNIST ({model}) by leadership, mean ± std over {networks} networks per cell.\n\n"
            + markdown_table(header, rows) + "\n")
        print((out / "leadership_sweep.md").read_text())
        return {f"test_error_{st}_d{d:g}": m for st, per_delta in means.items() for d, m in zip(deltas, per_delta)}
