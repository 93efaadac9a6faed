"""The one training loop: every run — a single run (a one-task stream), each continual-learning
task, the PettingZoo env in both action modes, the paper's experiments — steps through :class:`Trainer`.

The loop only orchestrates: it draws mini-batches from a :class:`BatchStream`, asks the strategy
for gradients, applies the update through its :class:`Update` hook (the optimiser's step, scaled per
unit, or one supplied from outside), keeps the epoch accounting, and calls the plugins' hooks
(:mod:`agentnet.training.plugins`). What the workers optimise is the strategy's; evaluation,
checkpoints, replay buffers, penalties, task-head masks and loggers are plugins. A run is built once
by :func:`agentnet.session.build_session`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from agentnet.config import ConfigError, RunConfig
from agentnet.data import Split
from agentnet.devices import to_device
from agentnet.distributed import all_reduce, shard, world
from agentnet.network import WorkerNetwork, eval_mode
from agentnet.strategy import StepResult, Strategy
from agentnet.training.checkpoint import (
    CHECKPOINT,
    FORMAT,
    check_resumable,
    load_verified,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from agentnet.training.console import HISTORY, progress_bar
from agentnet.training.plugins import TrainerPlugin
from agentnet.training.preemption import Preempted
from agentnet.population import population_of
from agentnet.replica import lerp_update, replica_rows

__all__ = ["NonFiniteLossError", "BatchStream", "CompiledCompute", "Trainer", "Update", "ScaledUpdate", "ExternalUpdate",
           "build_optimizer", "build_scheduler"]

log = logging.getLogger(__name__)


class Update:
    """How a step's gradients change the parameters: the optimiser's step (with the strategy's
    per-unit scales and the population's per-replica learning rates). The trainer calls
    :meth:`apply` once per step; assign another to ``trainer.update`` to change it (the env does)."""

    def apply(self, trainer: "Trainer", result: StepResult) -> None:
        trainer.optimizer_step(result.update_scale)


class ScaledUpdate(Update):
    """The optimiser's step with each unit's update multiplied by ``scales`` (per layer of
    ``[*model.hidden, model.output]``, per unit; ``None`` = 1), on top of any scale the strategy sets."""

    def __init__(self, scales: list[Tensor | None]) -> None:
        self.scales = scales

    def apply(self, trainer: "Trainer", result: StepResult) -> None:
        trainer.optimizer_step(_combine_scales(result.update_scale, self.scales))


class ExternalUpdate(Update):
    """An update supplied from outside in place of the optimiser's step (the env's delta mode):
    ``change(model)`` runs without autograd; the strategy's gradients stay in ``.grad`` for it to read."""

    def __init__(self, change: Callable[[WorkerNetwork], None]) -> None:
        self.change = change

    def apply(self, trainer: "Trainer", result: StepResult) -> None:
        with torch.no_grad():
            self.change(trainer.model)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is left untouched.
    ``replicas`` lists the replicas whose loss did (empty for a one-replica run)."""

    def __init__(self, message: str, replicas: list[int] | None = None) -> None:
        super().__init__(message)
        self.replicas = list(replicas or [])


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    """The optimiser named by ``trainer.optimizer``."""
    fused = cfg.fused or None  # None: torch's default (foreach on CUDA, a loop on CPU)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused)
    opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return opt(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int):
    """The learning-rate schedule over ``total_steps`` optimiser steps (``None`` for ``none``)."""
    total_steps = max(total_steps, 1)
    if kind == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    if kind == "step":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.1 ** ((s >= total_steps // 2) + (s >= 3 * total_steps // 4)))
    return None


class BatchStream:
    """Shuffled mini-batches over ``size`` examples, pass after pass, one order per replica; resumable mid-pass.

    Each pass draws one permutation per replica from that replica's generator on the host and moves
    them to the device; ``gather(indices)`` turns an ``(R, B)`` slice of them into ``(x, y)``
    ``(R, B, D)`` / ``(R, B)`` on the device (a plain index into a split, or a continual stage's
    per-task, per-replica transform). The last batch of a pass may be smaller. Under torchrun every
    rank draws the same permutations and gathers only its shard of each batch
    (:func:`agentnet.distributed.shard`).
    """

    def __init__(self, size: int, batch_size: int, generators: list[torch.Generator],
                 gather: Callable[[Tensor], tuple[Tensor, Tensor]], device: torch.device) -> None:
        if size <= 0:
            raise ConfigError(f"the training data is empty ({size} examples); check data.subset and the benchmark")
        self.size = size
        self.batch_size = batch_size
        self.generators = generators
        self.gather = gather
        self.device = device
        self.steps_per_epoch = math.ceil(size / batch_size)
        self.position = 0  # batches drawn in the current pass
        self._perm: Tensor | None = None
        self._pass_start = [g.get_state() for g in generators]

    @property
    def at_epoch_start(self) -> bool:
        """No batch of the current pass has been drawn yet."""
        return self._perm is None

    @property
    def at_epoch_end(self) -> bool:
        """The last batch of the current pass has been drawn."""
        return self._perm is not None and self.position == self.steps_per_epoch

    def _draw(self) -> None:
        self._perm = to_device(torch.stack([torch.randperm(self.size, generator=g) for g in self.generators]), self.device)

    def next(self) -> tuple[Tensor, Tensor]:
        """The next mini-batch, starting a new pass when the last one is exhausted."""
        if self._perm is None or self.position == self.steps_per_epoch:
            self._pass_start = [g.get_state() for g in self.generators]
            self._draw()
            self.position = 0
        bs = self.batch_size
        idx = self._perm[:, self.position * bs : (self.position + 1) * bs]
        self.position += 1
        return self.gather(shard(idx))

    def end_pass(self) -> None:
        """Drop the rest of the current pass (the next batch starts a new permutation)."""
        self._perm = None
        self.position = 0
        self._pass_start = [g.get_state() for g in self.generators]  # where the next pass will start

    def state_dict(self) -> dict:
        return {"pass_start": self._pass_start, "position": self.position, "in_pass": self._perm is not None}

    def load_state_dict(self, state: dict) -> None:
        """Regenerate the interrupted pass's permutations from their generator states, then skip ahead."""
        for g, s in zip(self.generators, state["pass_start"]):
            g.set_state(s)
        self._pass_start = list(state["pass_start"])
        if state["in_pass"]:
            self._draw()
            self.position = state["position"]
        else:
            self.end_pass()


class CompiledCompute:
    """``strategy.compute`` through ``torch.compile`` (``trainer.compile=true``), never silently.

    On CUDA the mode is ``reduce-overhead`` (CUDA graphs replay the step's kernels in one launch),
    elsewhere the default. After the first call the graph breaks dynamo met are logged with their
    reasons (those parts run eagerly between the compiled graphs); if compilation fails, a warning
    names the strategy and the error and every later step runs the eager ``compute``.
    """

    def __init__(self, strategy: Strategy, device: torch.device) -> None:
        self.strategy = strategy
        self.mode = "reduce-overhead" if device.type == "cuda" else "default"
        self.compiled: Callable[[Tensor, Tensor], StepResult] | None = torch.compile(strategy.compute, mode=self.mode)
        self.calls = 0
        self.breaks: list[str] = []
        """The graph breaks of the first compiled call (reasons, deduplicated)."""

    def __call__(self, x: Tensor, y: Tensor) -> StepResult:
        if self.compiled is None:
            return self.strategy.compute(x, y)
        if self.calls:
            self.calls += 1
            return self.compiled(x, y)
        from torch._dynamo.utils import counters

        before = dict(counters["graph_break"])
        start = time.perf_counter()
        try:
            result = self.compiled(x, y)
        except Exception as error:  # any failure to trace or compile: run the step as written
            log.warning("trainer.compile: the %s step could not be compiled (%s: %s); running it eagerly",
                        self.strategy.name, type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            self.compiled = None
            return self.strategy.compute(x, y)
        self.calls = 1
        self.breaks = [reason for reason, n in counters["graph_break"].items() if n > before.get(reason, 0)]
        log.info("trainer.compile: the %s step compiled in %.1f s (mode %s)", self.strategy.name, time.perf_counter() - start, self.mode)
        if self.breaks:
            log.warning("trainer.compile: the %s step has %d graph break(s), run eagerly between compiled graphs: %s",
                        self.strategy.name, len(self.breaks), "; ".join(self.breaks))
        return result


class Trainer:
    """Runs a strategy: draw a batch, step, account — calling plugin hooks.

    The caller makes batch streams with :meth:`make_stream` and trains on them with :meth:`train`;
    ``total_steps`` (the run's optimiser steps) sizes the learning-rate schedule.

    All of it is per replica when the model holds a population (:mod:`agentnet.population`): each
    replica draws its own batch order, its accounting and history are its own (``histories``;
    ``history`` is their mean), and a per-replica learning rate scales its update.
    """

    def __init__(
        self,
        cfg: RunConfig,
        model: WorkerNetwork,
        strategy: Strategy,
        output_dir: Path | None,
        plugins: list[TrainerPlugin] | None,
        total_steps: int,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.strategy = strategy
        strategy.logits_wanted = cfg.trainer.train_accuracy
        self.output_dir = output_dir
        self.plugins = list(plugins or [])
        keys = [p.state_key for p in self.plugins]
        if len(set(keys)) != len(keys):
            raise ValueError(f"plugins need distinct state keys, got {keys}")
        self.device = next(model.parameters()).device
        self.population = population_of(cfg)
        if self.population.replicas != model.replicas:
            raise ConfigError(f"replicas={self.population.replicas}: the model holds {model.replicas} replicas")
        self.replicas = model.replicas
        tcfg = cfg.trainer
        if tcfg.channels_last:
            # Conv weights (and, in the model, conv inputs) in NHWC: the fast layout for cuDNN/tensor cores.
            model.to(memory_format=torch.channels_last)
            model.channels_last = True
        # A fresh autocast context per use for trainer.amp=bf16; no context at all in full precision.
        self._autocast = (
            functools.partial(torch.autocast, self.device.type, torch.bfloat16) if tcfg.amp == "bf16" else contextlib.nullcontext
        )
        self.compiled: CompiledCompute | None = CompiledCompute(strategy, self.device) if tcfg.compile else None
        """``strategy.compute`` compiled (``trainer.compile``); ``None``: a step calls it as it is."""
        self.shuffles = [torch.Generator().manual_seed(seed) for seed in self.population.seeds]
        self.stream: BatchStream | None = None
        """The batch stream being trained on (``None`` between continual tasks)."""
        self.total_steps = min(total_steps, tcfg.max_steps) if tcfg.max_steps else total_steps
        self.update: Update = Update()
        """How each step's gradients are applied (see :class:`Update`)."""
        self.optimizer = build_optimizer(model.parameters(), tcfg)
        self.scheduler = build_scheduler(self.optimizer, tcfg.lr_schedule, self.total_steps)
        lrs = self.population.of("trainer").get("lr")
        # Every optimiser's update is linear in the learning rate, so replica r's own rate is the
        # shared step scaled by lr_r / lr (exactly; see optimizer_step).
        self.lr_scale = None if lrs is None else torch.tensor([v / tcfg.lr for v in lrs], device=self.device, dtype=torch.float64)
        self.epoch = 0  # epochs completed
        self.step = 0  # optimiser steps taken
        self.history: list[dict] = []
        """Per epoch, the mean over replicas of their history entries."""
        self.histories: list[list[dict]] = [[] for _ in range(self.replicas)]
        """Per replica, its own history entries."""
        self.train_seconds = 0.0
        self.samples_seen = 0
        self.resumed_from: str | None = None
        self._saved_step: int | None = None  # the step of the newest checkpoint written or loaded
        self.stop_requested: str | None = None
        """Set (to a signal's name) to stop at the next step boundary with a checkpoint
        (:func:`agentnet.training.preemption.preemption_signals`)."""
        self.stop_agreed: str | None = None
        """Under torchrun: a stop every rank has learnt of (set by
        :class:`~agentnet.training.parallel.GradientAveraging` with a step's gradients), so that all
        ranks stop after the same step; a one-process run stops on :attr:`stop_requested`."""
        self._reset_running()

    # -- the step ------------------------------------------------------------------------------
    def train_step(self, x: Tensor, y: Tensor) -> StepResult:
        """One step of the strategy on one mini-batch, with every plugin hook: forward and backward,
        the update (:attr:`update`), the schedule, and the epoch's running loss and accuracy.

        ``x`` ``(R, B, D)`` and ``y`` ``(R, B)`` hold one batch per replica (``(B, D)`` and ``(B,)``:
        one batch for all).
        """
        if x.dim() == 2:  # one batch shared by every replica
            x = x.unsqueeze(0).expand(self.replicas, *x.shape)
        y = self.model.head.labels(y)
        fresh = y.shape[1]
        for plugin in self.plugins:
            x, y = plugin.adapt_batch(self, x, y)
        for plugin in self.plugins:
            plugin.before_step(self, x, y)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():  # forward (and the strategy's losses) in bf16 when trainer.amp=bf16
            result = self.compiled(x, y) if self.compiled is not None else self.strategy.compute(x, y)
        self.strategy.backward(result)
        result.fresh = fresh
        for plugin in self.plugins:
            plugin.after_backward(self, result)
        self.update.apply(self, result)
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        self._loss_sum += result.loss.detach() * fresh
        if self.cfg.trainer.train_accuracy:
            with self.model.head.logit_mask_as(None):  # the fresh examples' accuracy over every class, as evaluation counts it
                self._correct += (self.model.head.predict(result.logits.detach()[:, :fresh]) == y[:, :fresh]).sum(1)
            self._scored += fresh
        self._seen += fresh
        for plugin in self.plugins:
            plugin.after_step(self, x, y, result)
        return result

    def optimizer_step(self, scales: list[Tensor | None] | None) -> None:
        """Optimiser step; then each unit's update scaled (see :func:`agentnet.replica.lerp_update`)
        and each replica's update scaled by its own learning rate's ratio to ``trainer.lr``."""
        if scales is None and self.lr_scale is None:
            self.optimizer.step()
            return
        layers = [] if scales is None else [(l, s) for l, s in zip([*(b.layer for b in self.model.blocks()), self.model.head.layer], scales) if s is not None]
        params = list(self.model.parameters()) if self.lr_scale is not None else [p for l, _ in layers for p in l.parameters()]
        before = {p: p.detach().clone() for p in params}
        self.optimizer.step()
        for layer, scale in layers:
            lerp_update(layer, [before[p] for p in layer.parameters()], scale)
        if self.lr_scale is not None:
            with torch.no_grad():
                for p in params:
                    p.copy_(torch.lerp(before[p], p, replica_rows(self.lr_scale, p)))

    # -- the loop ------------------------------------------------------------------------------
    def make_stream(self, size: int, gather: Callable[[Tensor], tuple[Tensor, Tensor]]) -> BatchStream:
        """A batch stream over ``size`` examples on this trainer's seeded shuffle generators."""
        return BatchStream(size, self.cfg.trainer.batch_size, self.shuffles, gather, self.device)

    def train(self, stream: BatchStream, steps: int, label: str = "") -> StepResult | None:
        """``steps`` training steps on ``stream``: the loop every kind of run uses.

        Opens and closes epochs as the stream's passes start and end (``before_epoch`` /
        ``after_epoch``) and checks the loss every ``trainer.log_every`` steps. Returns the last
        step's result.
        """
        tcfg = self.cfg.trainer
        self.stream = stream
        bar = progress_bar(steps, label or self.strategy.name, True) if tcfg.progress and steps > 1 else None
        result = None
        start = time.perf_counter()
        for _ in range(steps):
            if self.stop_agreed if world().active else self.stop_requested:
                if bar is not None:
                    bar.close()
                self._stop()
            if stream.at_epoch_start or stream.at_epoch_end:
                self._begin_epoch()
            result = self.train_step(*stream.next())
            if self.step % tcfg.log_every == 0:
                self.check_finite(f"at step {self.step}")
                if bar is not None:
                    accuracy = {"acc": f"{self._correct.mean().item() / self._scored:.4f}"} if self._scored else {}
                    bar.set_postfix(loss=f"{self._loss_sum.mean().item() / self._seen:.4f}", **accuracy)
            if bar is not None:
                bar.update(1)
            if stream.at_epoch_end:
                self._epoch_seconds += time.perf_counter() - start
                start = time.perf_counter()
                self.end_epoch()
        self._epoch_seconds += time.perf_counter() - start
        if bar is not None:
            bar.close()
        return result

    def _stop(self) -> None:
        """Checkpoint where the loop stands and raise :class:`Preempted` (a stop was requested)."""
        self.save_checkpoint()
        path = self.checkpoint_path if self.cfg.trainer.checkpoint and self.output_dir is not None else None
        reason = self.stop_requested or self.stop_agreed or "a stop request"
        log.warning("%s: stopping after step %d with a checkpoint", reason, self.step)
        raise Preempted(reason, self.step, self.epoch, path)

    def close_epoch(self) -> None:
        """End a pass cut short (``max_steps``, a continual task's step budget) as an epoch."""
        if self.stream is not None and not (self.stream.at_epoch_start or self.stream.at_epoch_end):
            self.stream.end_pass()
            self.end_epoch()

    def begin_run(self) -> None:
        """Fire ``before_run`` (once per run, also after a resume)."""
        for plugin in self.plugins:
            plugin.before_run(self)

    def end_run(self) -> None:
        """Fire ``after_run``."""
        for plugin in self.plugins:
            plugin.after_run(self)

    def _reset_running(self) -> None:
        self._loss_sum = torch.zeros(self.replicas, device=self.device)
        self._correct = torch.zeros(self.replicas, device=self.device)
        self._seen = 0
        self._scored = 0  # examples whose accuracy was measured (trainer.train_accuracy; may switch on resume)
        self._epoch_seconds = 0.0

    def _begin_epoch(self) -> None:
        self._reset_running()
        for plugin in self.plugins:
            plugin.before_epoch(self)

    def end_epoch(self) -> dict:
        """Close an epoch: strategy hook, the plugins' epoch metrics (an evaluation), history entry,
        ``after_epoch``."""
        if world().active:  # the epoch's running loss and accuracy over every rank's shards
            counts = self._loss_sum.new_tensor([float(self._seen), float(self._scored)])
            packed = all_reduce(torch.cat([self._loss_sum, self._correct, counts]), "the epoch's running loss")
            r = self.replicas
            self._loss_sum, self._correct, self._seen, self._scored = packed[:r], packed[r : 2 * r], int(packed[-2]), int(packed[-1])
        self.check_finite(f"in epoch {self.epoch + 1}")
        seen = max(self._seen, 1)
        self.train_seconds += self._epoch_seconds
        self.samples_seen += self._seen * self.replicas
        self.strategy.on_epoch_end()
        self.epoch += 1
        lr = self.optimizer.param_groups[0]["lr"]
        per_replica: dict[str, list[float]] = {"train_loss": (self._loss_sum / seen).tolist()}
        if self._scored:
            per_replica["train_acc_running"] = (self._correct / self._scored).tolist()
        for plugin in self.plugins:
            per_replica.update(plugin.epoch_metrics(self))
        lr_scale = self.lr_scale.tolist() if self.lr_scale is not None else [1.0] * self.replicas
        for r, history in enumerate(self.histories):
            history.append({"epoch": self.epoch, "step": self.step, **{k: v[r] for k, v in per_replica.items()},
                            "lr": lr * lr_scale[r], "epoch_s": self._epoch_seconds})
        entry = {"epoch": self.epoch, "step": self.step, **{k: sum(v) / len(v) for k, v in per_replica.items()},
                 "lr": lr, "epoch_s": self._epoch_seconds}
        self.history.append(entry)
        self._reset_running()
        HISTORY.info("epoch %d: %s", self.epoch, json.dumps({k: round(v, 5) for k, v in entry.items()}))
        for plugin in self.plugins:
            plugin.after_epoch(self, entry)
        return entry

    def check_finite(self, where: str) -> None:
        """Stop with :class:`NonFiniteLossError` if this epoch's running loss is NaN or infinite
        (in any replica: replicas share one checkpoint)."""
        finite = torch.isfinite(self._loss_sum)
        if not bool(finite.all()):
            path = self.checkpoint_path
            kept = (
                f"last good checkpoint: {path} (epoch {self.epoch})" if path is not None and path.exists() else "no checkpoint was written yet"
            )
            bad = (~finite).nonzero().view(-1).tolist()
            which = "" if self.replicas == 1 else f" in replica(s) {bad}"
            raise NonFiniteLossError(f"training loss became non-finite{which} {where}; stopped. {kept}", bad)

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: Split, transform: Callable[[Tensor], Tensor] | None = None) -> dict[str, list[float]]:
        """Accuracy and global loss of every replica on ``split``: ``{"acc": [R], "loss": [R]}``, from
        the logits the strategy predicts with (:meth:`Strategy.predict_logits`, ``model(x)`` by default).

        ``transform`` maps a shared batch ``(B, D)`` to each replica's view of it ``(R, B, D)``
        (a continual task's per-replica permutation); without it every replica sees the batch as is.
        Under torchrun each rank evaluates its share of the split and the counts are summed.
        """
        correct = torch.zeros(self.replicas, device=self.device)
        loss = torch.zeros(self.replicas, device=self.device)
        bs = self.cfg.trainer.eval_batch_size
        w = world()
        first, last = (w.rank * len(split) // w.size, (w.rank + 1) * len(split) // w.size) if w.active else (0, len(split))
        with eval_mode(self.model):  # running statistics of batch norms, no dropout
            for start in range(first, last, bs):
                x, y = split.x[start : min(start + bs, last)], split.y[start : min(start + bs, last)]
                if transform is not None:
                    x = transform(x)
                with self._autocast():
                    logits = self.strategy.predict_logits(x)
                loss += self.model.head.global_loss(logits, y) * len(y)
                correct += (self.model.head.predict(logits) == y).sum(1)
        if w.active:
            packed = all_reduce(torch.cat([correct, loss]), "an evaluation")
            correct, loss = packed[: self.replicas], packed[self.replicas :]
        n = max(len(split), 1)
        return {"acc": (correct / n).tolist(), "loss": (loss / n).tolist()}

    # -- checkpoints ---------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.output_dir is None else self.output_dir / CHECKPOINT

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly: tensors and plain containers only."""
        return {
            "format": FORMAT,
            "config": dataclasses.asdict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "strategy": self.strategy.state_dict(),
            "plugins": {p.state_key: p.state_dict() for p in self.plugins},
            "shuffle": [g.get_state() for g in self.shuffles],
            "rng": rng_state(),
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "histories": self.histories,
            "train_seconds": self.train_seconds,
            "samples_seen": self.samples_seen,
            "running": {"loss_sum": self._loss_sum, "correct": self._correct, "seen": self._seen, "scored": self._scored,
                        "seconds": self._epoch_seconds},
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.strategy.load_state_dict(state["strategy"])
        saved_plugins = state["plugins"]
        for plugin in self.plugins:
            if plugin.state_key in saved_plugins:
                plugin.load_state_dict(saved_plugins[plugin.state_key])
        for g, s in zip(self.shuffles, state["shuffle"]):
            g.set_state(s)
        set_rng_state(state["rng"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.history, self.histories = state["history"], state["histories"]
        self.train_seconds, self.samples_seen = state["train_seconds"], state["samples_seen"]
        running = state["running"]
        self._loss_sum = running["loss_sum"].to(self.device)
        self._correct = running["correct"].to(self.device)
        self._seen, self._epoch_seconds = running["seen"], running["seconds"]
        self._scored = running.get("scored", running["seen"])  # checkpoints before trainer.train_accuracy scored every example

    def save_checkpoint(self) -> None:
        """Write ``checkpoint.pt`` atomically (when checkpointing is on and there is an output
        directory); a non-finite running loss stops the run first, keeping the last good one."""
        if not self.cfg.trainer.checkpoint or self.output_dir is None:
            return
        self.check_finite(f"before the checkpoint at step {self.step}")
        # The same step saved again (an epoch's end, then its task's) replaces the newest generation
        # instead of pushing out the previous one.
        save_checkpoint(self.state_dict(), self.output_dir, rotate=self._saved_step != self.step)
        self._saved_step = self.step

    def resume(self, directory: Path) -> bool:
        """Continue from ``<directory>/checkpoint.pt`` if it exists; ``False`` (and a warning) if not.

        The checkpoint is loaded without executing code and refused if its config differs from this
        run's in a key that changes training (growing ``trainer.epochs`` / ``max_steps`` is fine).
        """
        found = load_verified(Path(directory))
        if found is None:
            log.warning("resume=true but there is no checkpoint at %s; starting from scratch", Path(directory) / CHECKPOINT)
            return False
        state, path = found
        check_resumable(state["config"], dataclasses.asdict(self.cfg), path)
        newest = Path(directory) / CHECKPOINT
        if path.name != CHECKPOINT and newest.exists() and world().main:
            # Kept for inspection, out of the rotation: the next checkpoint must not push the good
            # previous generation out in favour of the damaged one.
            newest.replace(newest.with_name(CHECKPOINT + ".damaged"))
            log.warning("the damaged %s was renamed %s.damaged", newest, CHECKPOINT)
        self.load_state_dict(state)
        self._saved_step = self.step
        self.resumed_from = str(path)
        log.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.step)
        return True


def _combine_scales(a: list | None, b: list | None) -> list | None:
    """Multiply two optional per-layer scale lists (``None`` entries mean 1)."""
    if a is None or b is None:
        return a if b is None else b
    return [y if x is None else x if y is None else x * y for x, y in zip(a, b)]
