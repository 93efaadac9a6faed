"""The strategy plugin interface: what every worker of a network optimises.

A strategy turns a mini-batch into gradients on the model's parameters. The trainer only calls
``compute`` then ``backward`` then the optimiser, ``on_epoch_end``, and in continual runs
``on_task_start`` / ``on_task_end`` (forwarded by the
:class:`agentnet.training.plugins.StrategyTaskHooks` plugin); everything else — which
gradient path each layer uses, leader selection, local losses — is the strategy's business.
Register a new one with :func:`agentnet.registry.register_strategy`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from agentnet.config import StrategyConfig
from agentnet.blocks import ForwardRecord
from agentnet.network import WorkerNetwork

__all__ = ["Leadership", "StepResult", "Strategy"]


class Leadership(Protocol):
    """What the trainer, results and plots read of a rule's leader selection (the LFNN rules'
    :class:`strategies.leaders.LeaderSelection`): per layer, how often each worker led ``(R, W)``,
    in total and per epoch; closed per epoch and checkpointed."""

    counts: list[Tensor]
    epoch_counts: list[list[Tensor]]

    def end_epoch(self) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class StepResult:
    """What one strategy step produced."""

    loss: Tensor
    """Each replica's objective this step ``(R,)`` (for logging; ``backward`` decides how it is used)."""
    logits: Tensor | None
    """Output logits ``(R, B, C)`` for the batch (the running training accuracy, the env's rewards);
    ``None`` when nobody reads them (:attr:`Strategy.logits_wanted` false) and the rule's prediction
    costs extra passes it skipped."""
    record: ForwardRecord | None = None
    """The forward record, when the strategy made one."""
    worker_objectives: list[Tensor] = field(default_factory=list)
    """Per hidden layer, each worker's own local loss ``(R, W)`` (lower is better for the worker)."""
    signals: dict[str, list[Tensor]] = field(default_factory=dict)
    """Other named per-layer, per-unit ``(R, n)`` signals (e.g. ``attention_received``), for logging and envs."""
    update_scale: list[Tensor | None] | None = None
    """Per hidden layer, a per-unit multiplier ``(R, n)`` on this step's update (0 freezes a unit's
    incoming weights bit-exactly); ``None`` everywhere means a plain optimiser step."""
    cache: dict = field(default_factory=dict)
    """Whatever ``compute`` hands to ``backward`` (strategy-private)."""
    fresh: int | None = None
    """How many leading rows of the batch came from the data stream (set by the trainer; plugins
    such as replay append their own examples after them)."""


class Strategy:
    """Base class of all strategies. Subclasses set ``Config`` and implement :meth:`compute`.

    Every tensor carries the model's replica dimension first (see :mod:`agentnet.replica`);
    a strategy that reads a config field through :meth:`per_replica` and lists it in
    ``replica_fields`` lets a population give each replica its own value of it.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    #: Numeric config fields that may differ per replica (``vary.strategy.<field>``).
    replica_fields: ClassVar[tuple[str, ...]] = ()
    #: What ``agentnet-tune`` searches of this strategy when ``tune.space`` is not given (besides the
    #: learning rate): ``field -> distribution`` as in ``tune.space``.
    search_space: ClassVar[dict[str, dict]] = {}
    #: The key in :attr:`StepResult.signals` of this strategy's own per-unit measure of how well a
    #: worker does (higher is better), if it has one beyond ``worker_objectives``. Consumers (the
    #: PettingZoo env) observe it summed over a worker's units and reward workers with it.
    worker_signal: ClassVar[str | None] = None
    #: Whether the rule reads its workers' predictions (each worker's ``k`` outputs as class logits):
    #: then every worker layer must split into workers of ``model.worker_size`` units with a way to
    #: predict (``k = C``, ``worker_head`` or ``worker_projection``). A rule that reads none (BP, FA,
    #: the forward-gradient rules) builds any widths: a layer ``worker_size`` does not divide is one
    #: worker (:meth:`agentnet.config.ModelConfig.units_per_worker`).
    worker_predictions: ClassVar[bool] = False
    #: Whether the rule predicts with the network's own output, ``model(x)``. A rule that predicts
    #: otherwise (Forward-Forward: the label of highest goodness) sets ``False`` and overrides
    #: :meth:`predict_logits`; CL methods that read ``model(x)`` as the model's output distribution
    #: (EWC's Fisher, LwF's distillation: ``CLMethod.reads_model_outputs``) are then refused.
    predicts_with_model: ClassVar[bool] = True

    def __init__(self, cfg: StrategyConfig, model: WorkerNetwork, variants: dict[str, list[float]] | None = None) -> None:
        self.cfg = cfg
        self.model = model
        self.variants = dict(variants or {})
        #: Whether the caller reads :attr:`StepResult.logits` (``trainer.train_accuracy``, the env's
        #: rewards); when false, a rule whose prediction costs extra passes may skip them (``logits=None``).
        self.logits_wanted = True
        unknown = set(self.variants) - set(self.replica_fields)
        if unknown:
            raise ValueError(f"strategy={self.name}: {sorted(unknown)} cannot vary per replica (only {list(self.replica_fields)})")

    def per_replica(self, field: str) -> float | Tensor:
        """``cfg.<field>``, or its per-replica values as an ``(R, 1, 1)`` tensor when a population varies it."""
        if field not in self.variants:
            return getattr(self.cfg, field)
        param = next(self.model.parameters())
        return torch.tensor(self.variants[field], device=param.device, dtype=param.dtype).view(-1, 1, 1)

    @property
    def selection(self) -> Leadership | None:
        """The leader selection this strategy keeps, if any (for leadership counts and plots)."""
        return None

    def compute(self, x: Tensor, y: Tensor) -> StepResult:
        """Forward pass and objective for one mini-batch."""
        raise NotImplementedError

    def predict_logits(self, x: Tensor) -> Tensor:
        """What the rule predicts from, as output logits ``(R, B, C)`` (``(R, B, 1)`` for a sigmoid
        output) of inputs ``x`` ``(B, D)`` or ``(R, B, D)``; the trainer's evaluation (every test,
        validation and continual-learning accuracy) reads them through ``model.head`` (``predict``,
        ``global_loss``, the logit mask). The default is the network's inference pass ``model(x)``."""
        return self.model(x)

    def backward(self, result: StepResult) -> None:
        """Put this step's gradients into ``.grad``; the default back-propagates the sum of the
        replicas' losses (each replica's parameters get exactly their own gradient)."""
        result.loss.sum().backward()

    def on_epoch_end(self) -> None:
        """Called by the trainer after every epoch."""
        if self.selection is not None:
            self.selection.end_epoch()

    def on_task_start(self) -> None:
        """Called before training on each task of a continual run (not re-fired on a mid-task resume)."""

    def on_task_end(self) -> None:
        """Called after training on each task of a continual run, before that task's evaluation
        (consolidate what the task taught, as CL methods do in ``after_task``)."""

    def state_dict(self) -> dict:
        """Strategy state to checkpoint (leader selection and counts)."""
        return {} if self.selection is None else {"selection": self.selection.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.selection is not None and "selection" in state:
            self.selection.load_state_dict(state["selection"])
