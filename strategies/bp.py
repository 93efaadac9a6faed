"""``bp``: every worker's objective is the global loss; gradients flow through all layers."""

from __future__ import annotations

from torch import Tensor

from agentnet.registry import register_strategy
from agentnet.strategy import StepResult, Strategy


@register_strategy("bp")
class Backprop(Strategy):
    """Plain error back-propagation of the task loss (the baseline)."""

    def compute(self, x: Tensor, y: Tensor) -> StepResult:
        logits = self.model(x)
        return StepResult(loss=self.model.head.global_loss(logits, y), logits=logits)
