"""The trainer: orchestration only. ``train(cfg) -> metrics`` is the pure task behind the CLI.

The trainer owns the loop (shuffle, step, evaluate, checkpoint, report) and calls plugins at named
hooks; what the workers optimise is the strategy's (:mod:`agentnet.strategy`), extra per-step
bookkeeping is a :class:`TrainerPlugin`'s.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from agentnet.config import ConfigError, RunConfig, check
from agentnet.data import ImageData, Split, load_dataset
from agentnet.network import WorkerNetwork, build_model
from agentnet.registry import build_strategy
from agentnet.strategy import StepResult, Strategy

__all__ = [
    "NonFiniteLossError",
    "TrainerPlugin",
    "WorkerActivity",
    "TensorBoardLogger",
    "Trainer",
    "resolve_device",
    "seed_everything",
    "progress_bar",
    "to_run_config",
    "prepare_run",
    "build_optimizer",
    "atomic_write_json",
    "train",
]

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is left untouched."""


class TrainerPlugin:
    """Named hooks the trainer calls; override the ones you need."""

    def before_training(self, trainer: "Trainer") -> None: ...

    def adapt_batch(self, trainer: "Trainer", x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Change the mini-batch before the step (e.g. add replayed examples)."""
        return x, y

    def before_step(self, trainer: "Trainer", x: torch.Tensor, y: torch.Tensor) -> None: ...

    def after_backward(self, trainer: "Trainer", result: StepResult) -> None: ...

    def after_step(self, trainer: "Trainer", x: torch.Tensor, y: torch.Tensor, result: StepResult) -> None: ...

    def after_epoch(self, trainer: "Trainer", epoch: int) -> None: ...

    def after_training(self, trainer: "Trainer") -> None: ...


class WorkerActivity(TrainerPlugin):
    """Per-step worker activity: mean |change| of each worker's output on the batch caused by the update.

    The LFNN paper's Fig. 5. Costs two extra no-grad forwards per step, so it is off by default.
    ``steps[i]`` is a list over hidden layers of ``(W,)`` tensors; ``leaders[i]`` the leader masks
    of that step (``None`` for strategies without leaders).
    """

    def __init__(self) -> None:
        self.steps: list[list[torch.Tensor]] = []
        self.leaders: list[list[torch.Tensor | None]] = []
        self._before = None

    @torch.no_grad()
    def before_step(self, trainer: "Trainer", x: torch.Tensor, y: torch.Tensor) -> None:
        self._before = trainer.model.forward_record(x)

    @torch.no_grad()
    def after_step(self, trainer: "Trainer", x: torch.Tensor, y: torch.Tensor, result: StepResult) -> None:
        after = trainer.model.forward_record(x)
        self.steps.append([(a.workers - b.workers).abs().mean((0, 2)).cpu() for a, b in zip(after.layers, self._before.layers)])
        layers = result.record.layers if result.record is not None else [None] * len(after.layers)
        self.leaders.append([None if r is None or r.leaders is None else r.leaders.cpu() for r in layers])


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    """The progress bar of a run. In a parallel Hydra sweep each job gets its own terminal line."""
    position = None
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            position = int(hydra_cfg.job.num) % max(os.cpu_count() or 1, 1)
    except (ImportError, ValueError):
        pass
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, position=position)


def _combine_scales(a: list | None, b: list | None) -> list | None:
    """Multiply two optional per-layer scale lists (``None`` entries mean 1)."""
    if a is None or b is None:
        return a if b is None else b
    return [y if x is None else x if y is None else x * y for x, y in zip(a, b)]


class TensorBoardLogger(TrainerPlugin):
    """Writes each epoch's history entry as scalars to ``<output>/tensorboard`` (needs ``tensorboard``)."""

    def __init__(self, directory: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(directory))

    @staticmethod
    def available() -> bool:
        """Whether the ``tensorboard`` package is installed."""
        import importlib.util

        return importlib.util.find_spec("tensorboard") is not None

    def after_epoch(self, trainer: "Trainer", epoch: int) -> None:
        for key, value in trainer.history[-1].items():
            if key != "epoch":
                self.writer.add_scalar(key, value, epoch)
        self.writer.flush()

    def after_training(self, trainer: "Trainer") -> None:
        self.writer.close()


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r}: CUDA is not available on this machine; use device=cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_run_config(cfg: DictConfig | RunConfig | dict) -> RunConfig:
    """Validate a composed config into a :class:`RunConfig` (strategy checked by its registered class)."""
    if isinstance(cfg, RunConfig):
        return cfg
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    strategy_node = plain.pop("strategy", None)
    cl_node = plain.pop("cl", None)
    experiment_node = plain.pop("experiment", None)
    plain.pop("hydra", None)
    try:
        base = OmegaConf.merge(OmegaConf.structured(RunConfig), plain)
        base.strategy = {}
        run: RunConfig = OmegaConf.to_object(base)
    except Exception as exc:  # omegaconf validation errors carry the full key
        if isinstance(exc, ConfigError):
            raise
        key = getattr(exc, "full_key", "")
        raise ConfigError(f"{key}: {getattr(exc, 'msg', exc)}") from None
    from agentnet.registry import strategy_config

    run.strategy = strategy_config(strategy_node if strategy_node is not None else {})
    if cl_node is not None:
        from agentnet.continual.methods import CL_METHODS

        run.cl = CL_METHODS.config(cl_node)
    if experiment_node is not None:
        from agentnet.experiments import EXPERIMENTS

        run.experiment = EXPERIMENTS.config(experiment_node)
    return run


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    """The optimiser named by ``trainer.optimizer``."""
    fused = cfg.fused or None  # None: torch's default (foreach on CUDA, a loop on CPU)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused)
    opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return opt(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=fused)


def _build_scheduler(optimizer, kind: str, total_steps: int):
    if kind == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    if kind == "step":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.1 ** ((s >= total_steps // 2) + (s >= 3 * total_steps // 4)))
    return None


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_json(obj: Any, path: Path) -> None:
    """Write JSON via a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


class Trainer:
    """Runs a strategy over a data split: shuffle, step, evaluate, checkpoint."""

    def __init__(
        self,
        cfg: RunConfig,
        model: WorkerNetwork,
        strategy: Strategy,
        data: ImageData | None,
        output_dir: Path | None,
        plugins: list[TrainerPlugin] | None = None,
        total_steps: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.strategy = strategy
        self.data = data
        self.output_dir = output_dir
        self.plugins = list(plugins or [])
        self.device = next(model.parameters()).device
        tcfg = cfg.trainer
        # Without ``data`` (a caller that drives ``train_step`` itself), ``total_steps`` sizes the schedule.
        self.steps_per_epoch = math.ceil(len(data.train) / tcfg.batch_size) if data is not None else 0
        total = total_steps if total_steps is not None else tcfg.epochs * self.steps_per_epoch
        self.total_steps = min(total, tcfg.max_steps) if tcfg.max_steps else total
        if tcfg.channels_last:
            # Conv weights (and, in the model, conv inputs) in NHWC: the fast layout for cuDNN/tensor cores.
            model.to(memory_format=torch.channels_last)
        # A fresh autocast context per use for trainer.amp=bf16; no context at all in full precision.
        self._autocast = (
            functools.partial(torch.autocast, self.device.type, torch.bfloat16) if tcfg.amp == "bf16" else contextlib.nullcontext
        )
        self.optimizer = build_optimizer(model.parameters(), tcfg)
        self.scheduler = _build_scheduler(self.optimizer, tcfg.lr_schedule, self.total_steps)
        self.shuffle = torch.Generator().manual_seed(cfg.seed)
        self.epoch = 0  # epochs completed
        self.step = 0  # optimiser steps taken
        self.history: list[dict] = []
        self.train_seconds = 0.0
        self.samples_seen = 0

    # -- the hot path --------------------------------------------------------------------------
    def train_step(
        self, x: torch.Tensor, y: torch.Tensor, update_scale: list[torch.Tensor | None] | None = None
    ) -> StepResult:
        """One optimiser step of the strategy on one mini-batch.

        ``update_scale`` (per layer of ``[*model.hidden, model.output]``, per unit) multiplies the
        update each unit's incoming weights receive, on top of any scale the strategy itself sets
        (see :meth:`_scaled_step`).
        """
        for plugin in self.plugins:
            x, y = plugin.adapt_batch(self, x, y)
        for plugin in self.plugins:
            plugin.before_step(self, x, y)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():  # forward (and the strategy's losses) in bf16 when trainer.amp=bf16
            result = self.strategy.compute(x, y)
        self.strategy.backward(result)
        for plugin in self.plugins:
            plugin.after_backward(self, result)
        scales = _combine_scales(result.update_scale, update_scale)
        if scales is None:
            self.optimizer.step()
        else:
            self._scaled_step(scales)
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        for plugin in self.plugins:
            plugin.after_step(self, x, y, result)
        return result

    def _scaled_step(self, scales: list[torch.Tensor | None]) -> None:
        """Optimiser step, then ``w <- lerp(w_old, w_new, scale)`` per unit (exact at 0 and 1).

        ``scales`` follows ``[*model.hidden, model.output]``; a shorter list leaves the rest unscaled.
        A layer's scale ``(n,)`` applies to the rows of every parameter with ``n`` rows; parameters
        whose rows are not units (a block's inner convs) take the scale of their worker's first unit.
        """
        layers = [(layer, s) for layer, s in zip([*self.model.hidden, self.model.output], scales) if s is not None]
        before = [[p.detach().clone() for p in layer.parameters()] for layer, _ in layers]
        self.optimizer.step()
        with torch.no_grad():
            for (layer, scale), olds in zip(layers, before):
                workers = getattr(layer, "num_workers", 1)
                for p, old in zip(layer.parameters(), olds):
                    rows = p.shape[0]
                    s = scale if rows == scale.numel() else scale.view(workers, -1)[:, 0].repeat_interleave(rows // workers)
                    p.copy_(torch.lerp(old, p, s.view(-1, *([1] * (p.dim() - 1))).to(old.dtype)))

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: Split) -> dict[str, float]:
        """Accuracy and global loss of the model on ``split``."""
        correct = torch.zeros((), device=self.device)
        loss = torch.zeros((), device=self.device)
        bs = self.cfg.trainer.eval_batch_size
        for start in range(0, len(split), bs):
            x, y = split.x[start : start + bs], split.y[start : start + bs]
            with self._autocast():
                logits = self.model(x)
            loss += self.model.global_loss(logits, y) * len(y)
            correct += (self.model.predict(logits) == y).sum()
        n = max(len(split), 1)
        return {"acc": correct.item() / n, "loss": loss.item() / n}

    # -- checkpoints ---------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / CHECKPOINT

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "strategy": self.strategy.state_dict(),
            "shuffle": self.shuffle.get_state(),
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "train_seconds": self.train_seconds,
            "samples_seen": self.samples_seen,
            "config": OmegaConf.to_container(OmegaConf.structured(self.cfg)),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.strategy.load_state_dict(state["strategy"])
        self.shuffle.set_state(state["shuffle"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.history = state["history"]
        self.train_seconds, self.samples_seen = state["train_seconds"], state["samples_seen"]

    def save_checkpoint(self, extra: dict | None = None) -> None:
        """Write ``checkpoint.pt`` atomically (a crash mid-write leaves the previous one intact).

        ``extra`` adds caller state (e.g. the continual runner's accuracy matrix so far)."""
        _atomic_save({**self.state_dict(), **(extra or {})}, self.checkpoint_path)

    def resume(self, directory: Path) -> None:
        """Continue from ``<directory>/checkpoint.pt``."""
        path = directory / CHECKPOINT
        if not path.is_file():
            raise FileNotFoundError(f"resume=true but there is no checkpoint at {path}")
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=False))
        log.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.step)

    # -- the loop ------------------------------------------------------------------------------
    def check_finite(self, loss_sum: torch.Tensor, where: str) -> None:
        if not torch.isfinite(loss_sum).item():
            kept = f"last good checkpoint: {self.checkpoint_path} (epoch {self.epoch})" if self.checkpoint_path.exists() else "no checkpoint was written yet"
            raise NonFiniteLossError(f"training loss became non-finite {where}; stopped. {kept}")

    def epoch_batches(self, steps: int | None = None):
        """One epoch's mini-batches ``(x, y)`` of the training split, shuffled by the seeded generator.

        The trainer's loop and the PettingZoo environment both draw from here, so they see the
        same batches for the same seed.
        """
        train = self.data.train
        bs = self.cfg.trainer.batch_size
        perm = torch.randperm(len(train), generator=self.shuffle).to(self.device)
        for i in range(self.steps_per_epoch if steps is None else steps):
            idx = perm[i * bs : (i + 1) * bs]
            yield train.x[idx], train.y[idx]

    def end_epoch(self, seconds: float, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> dict:
        """Close an epoch: strategy hook, test evaluation, history entry, plugins, checkpoint."""
        self.train_seconds += seconds
        self.samples_seen += seen
        self.strategy.on_epoch_end()
        self.epoch += 1
        test = self.evaluate(self.data.test)
        entry = {
            "epoch": self.epoch,
            "step": self.step,
            "train_loss": loss_sum.item() / max(seen, 1),
            "train_acc_running": correct.item() / max(seen, 1),
            "test_acc": test["acc"],
            "test_loss": test["loss"],
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_s": seconds,
        }
        self.history.append(entry)
        log.info("epoch %d: %s", self.epoch, json.dumps({k: round(v, 5) for k, v in entry.items()}))
        for plugin in self.plugins:
            plugin.after_epoch(self, self.epoch)
        if self.cfg.trainer.checkpoint and self.output_dir is not None:
            self.save_checkpoint()
        return entry

    def fit(self) -> list[dict]:
        """Train for the configured epochs/steps; returns the per-epoch history."""
        tcfg = self.cfg.trainer
        for plugin in self.plugins:
            plugin.before_training(self)
        while self.epoch < tcfg.epochs and self.step < self.total_steps:
            epoch_start = time.perf_counter()
            loss_sum = torch.zeros((), device=self.device)
            correct = torch.zeros((), device=self.device)
            seen = 0
            steps_left = min(self.steps_per_epoch, self.total_steps - self.step)
            bar = progress_bar(steps_left, f"{self.strategy.name} epoch {self.epoch + 1}/{tcfg.epochs}", tcfg.progress)
            for i, (x, y) in enumerate(self.epoch_batches(steps_left)):
                result = self.train_step(x, y)
                loss_sum += result.loss.detach() * len(y)
                correct += (self.model.predict(result.logits.detach()[: len(y)]) == y).sum()
                seen += len(y)
                if (i + 1) % tcfg.log_every == 0 or i + 1 == steps_left:
                    self.check_finite(loss_sum, f"in epoch {self.epoch + 1} before step {self.step}")
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}")
                bar.update(1)
            bar.close()
            self.end_epoch(time.perf_counter() - epoch_start, loss_sum, correct, seen)
        for plugin in self.plugins:
            plugin.after_training(self)
        return self.history


def output_dir_of(cfg: RunConfig) -> Path:
    """The run's output directory: ``output_dir``, else Hydra's run directory, else the cwd."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return Path.cwd()


def prepare_run(cfg: DictConfig | RunConfig | dict, data: ImageData | None = None) -> tuple[RunConfig, torch.device, Path, ImageData]:
    """What every task starts with: the validated config, its device and output directory (created),
    and the dataset on that device (loaded unless ``data`` is given) cut to ``data.subset`` / ``data.test_subset``."""
    run = to_run_config(cfg)
    device = resolve_device(run.device)
    out = output_dir_of(run)
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = load_dataset(run.data.name, run.data.root, device, verify=run.data.verify, normalize=run.data.normalize)
    if run.model.conv:
        check(
            run.model.in_channels == data.channels,
            "model.in_channels",
            run.model.in_channels,
            f"data.name={run.data.name} has {data.channels}-channel images",
        )
    gen = torch.Generator().manual_seed(run.seed)
    data = ImageData(
        train=data.train.subset(run.data.subset, gen),
        test=data.test.subset(run.data.test_subset),
        num_classes=data.num_classes,
        channels=data.channels,
    )
    return run, device, out, data


def train(cfg: DictConfig | RunConfig | dict, data: ImageData | None = None) -> dict[str, Any]:
    """Train and evaluate one configuration; write ``metrics.json`` (and plots) to the output directory.

    ``data`` lets callers that run several configurations share one loaded dataset.
    Returns the metrics dictionary that was written.
    """
    wall_start = time.perf_counter()
    run, device, out, data = prepare_run(cfg, data)
    seed_everything(run.seed)
    model = build_model(run.model, data.input_dim, data.num_classes, run.seed).to(device)
    strategy = build_strategy(run.strategy, model)
    plugins: list[TrainerPlugin] = []
    activity = WorkerActivity() if run.trainer.record_activity else None
    if activity is not None:
        plugins.append(activity)
    if run.trainer.tensorboard and TensorBoardLogger.available():
        plugins.append(TensorBoardLogger(out / "tensorboard"))
    trainer = Trainer(run, model, strategy, data, out, plugins)
    if run.resume:
        trainer.resume(Path(run.resume_from) if run.resume_from else out)
    trainer.fit()

    test = trainer.evaluate(data.test)
    train_eval = trainer.evaluate(data.train)
    metrics: dict[str, Any] = {
        "strategy": strategy.name,
        "model": run.model.name,
        "seed": run.seed,
        "device": str(device),
        "test_acc": test["acc"],
        "test_error": 100.0 * (1.0 - test["acc"]),
        "test_loss": test["loss"],
        "train_acc": train_eval["acc"],
        "train_error": 100.0 * (1.0 - train_eval["acc"]),
        "train_loss": train_eval["loss"],
        "final_train_loss": trainer.history[-1]["train_loss"] if trainer.history else float("nan"),
        "num_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "epochs": trainer.epoch,
        "steps": trainer.step,
        "samples_per_s": trainer.samples_seen / trainer.train_seconds if trainer.train_seconds else 0.0,
        "wall_s": time.perf_counter() - wall_start,
        "history": trainer.history,
        "config": {"strategy": asdict(run.strategy), "model": asdict(run.model), "trainer": asdict(run.trainer)},
    }
    selection = strategy.selection
    if selection is not None:
        metrics["leadership_counts"] = [c.cpu().tolist() for c in selection.counts]
        metrics["leadership_epoch_counts"] = [[c.tolist() for c in layer] for layer in selection.epoch_counts]
    atomic_write_json(metrics, out / "metrics.json")
    from agentnet import reports

    reports.write_run_plots(out, trainer.history, selection, activity)
    return metrics
