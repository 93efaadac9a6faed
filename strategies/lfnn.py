"""``lfnn``: Leader-Follower network with BP and local losses (LFNN paper, Eq. 1).

``L = L_g + lambda1 * sum_{w in D} e_w + lambda2 * sum_{w not in D} MSE(y_w, sg(y_w*))``

The global loss ``L_g`` back-propagates only into leaders (and the output layer): followers'
activations are stop-gradient on the path to the output. Leader and follower terms are local to
their layer (their gradient reaches only that layer's weights, via :func:`agentnet.replica.split_linear`). Leader selection and the
local terms live in :mod:`strategies.leaders`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from agentnet.config import StrategyConfig, check
from agentnet.network import WorkerNetwork
from agentnet.registry import register_strategy
from agentnet.replica import GradientPath
from agentnet.strategy import StepResult, Strategy
from strategies.leaders import LeaderHook, LeaderSelection, leader_follower_loss


@dataclass
class LeaderFollowerConfig(StrategyConfig):
    """Settings shared by ``lfnn`` and ``lfnn_local`` (each has its own defaults for the weights)."""

    delta: float = 0.7
    """Leadership fraction: the ``ceil(delta * W)`` lowest-loss workers of a layer lead."""
    lambda1: float = 1.0
    """Weight of the leaders' own prediction loss (1: in LFNN-l it is a leader's whole objective)."""
    lambda2: float = 1.0
    """Weight of the followers' alignment (MSE to the best leader)."""
    selection: str = "batch"
    """When leaders are chosen: batch (default), sample or epoch."""

    def __post_init__(self) -> None:
        check(0 < self.delta <= 1, "strategy.delta", self.delta, "leadership fraction must lie in (0, 1]")
        check(self.lambda1 >= 0, "strategy.lambda1", self.lambda1, "must be >= 0")
        check(self.lambda2 >= 0, "strategy.lambda2", self.lambda2, "must be >= 0")
        check(self.selection in LeaderSelection.MODES, "strategy.selection", self.selection, f"choose one of {LeaderSelection.MODES}")


class LeaderFollower(Strategy):
    """Shared machinery: one forward record with leader selection, global plus local terms."""

    Config = LeaderFollowerConfig
    replica_fields = ("delta", "lambda1", "lambda2")
    search_space = {"delta": {"uniform": [0.1, 1.0]}}
    path: GradientPath = "split"
    #: Eq. 1: the global loss's gradient reaches only the leaders' units (followers' are stop-gradient).
    leaders_carry_global = True
    worker_predictions = True  # leaders are the workers whose predictions have the lowest loss

    def __init__(self, cfg: LeaderFollowerConfig, model: WorkerNetwork, variants: dict[str, list[float]] | None = None) -> None:
        super().__init__(cfg, model, variants)
        device = next(model.parameters()).device
        delta = self.variants.get("delta", cfg.delta)
        self._selection = LeaderSelection(delta, cfg.selection, model.workers_per_layer, device, model.replicas)
        self._hook = LeaderHook(self._selection, self.leaders_carry_global)
        self._lambda1, self._lambda2 = self.per_replica("lambda1"), self.per_replica("lambda2")

    @property
    def selection(self) -> LeaderSelection:
        return self._selection

    def compute(self, x: Tensor, y: Tensor) -> StepResult:
        record = self.model.forward_record(x, y, path=self.path, hook=self._hook)
        loss = self.model.head.global_loss(record.logits, y)
        per_worker = []
        for layer in record.layers:
            local, mine = leader_follower_loss(layer, self._lambda1, self._lambda2)
            loss = loss + local
            per_worker.append(mine.detach())
        return StepResult(loss=loss, logits=record.logits, record=record, worker_objectives=per_worker)


@dataclass
class LFNNConfig(LeaderFollowerConfig):
    """``lfnn`` settings: the local terms are weighted down beside the back-propagated global loss."""

    lambda1: float = 0.1
    """Weight of the leaders' own prediction loss (0.1: about 2 points less test error than 1 on
    mlp_275k, docs/strategies/leader_follower.md)."""
    lambda2: float = 0.1
    """Weight of the followers' alignment (MSE to the best leader)."""


@register_strategy("lfnn")
class LFNN(LeaderFollower):
    """LFNN (Eq. 1): BP of the global loss through leaders, plus local leader/follower losses."""

    Config = LFNNConfig
