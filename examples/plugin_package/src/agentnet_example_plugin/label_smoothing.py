"""Strategy ``bp_label_smoothing``: back-propagation of the label-smoothed cross-entropy.

Every worker's objective is the global loss, as in agentnet's ``bp``, but the target is smoothed
(Szegedy et al. 2016): ``(1 - s)`` on the true class and ``s`` spread evenly over the classes the
output may predict. Per example the loss is

``(1 - s) * CE(p, y) + s * mean_{c allowed} -log p_c``

which equals ``torch.nn.functional.cross_entropy(..., label_smoothing=s)`` when every class is
allowed; with task-incremental heads (``benchmark`` ``split_task``) only the active task's classes
share the smoothing mass. A sigmoid (binary) output uses the target ``(1 - s) * y + s / 2``.

This module shows the whole strategy interface: a ``Config`` dataclass (the one source of defaults,
validated in ``__post_init__``), a :class:`~agentnet.strategy.Strategy` subclass whose ``compute``
returns each replica's loss, and a field a population may vary per replica.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from agentnet.config import StrategyConfig, check
from agentnet.network import WorkerNetwork
from agentnet.registry import register_strategy
from agentnet.strategy import StepResult, Strategy

__all__ = ["LabelSmoothingConfig", "LabelSmoothingBP", "smoothed_loss"]


@dataclass
class LabelSmoothingConfig(StrategyConfig):
    """``bp_label_smoothing`` settings (``strategy.smoothing=0.2`` on the command line)."""

    smoothing: float = 0.1
    """Probability mass ``s`` moved from the true class to a uniform distribution; 0 is plain BP."""

    def __post_init__(self) -> None:
        check(0 <= self.smoothing < 1, "strategy.smoothing", self.smoothing, "must lie in [0, 1)")


def smoothed_loss(model: WorkerNetwork, logits: Tensor, y: Tensor, smoothing: float | Tensor) -> Tensor:
    """Each replica's mean label-smoothed loss ``(R,)`` of logits ``(R, B, C)`` against labels.

    ``smoothing`` is a float or a per-replica ``(R, 1)`` tensor.
    """
    y = model.head.labels(y)
    if model.head.activation == "sigmoid":
        target = y.to(logits.dtype) * (1 - smoothing) + 0.5 * smoothing
        return F.binary_cross_entropy_with_logits(logits[..., 0], target, reduction="none").mean(1)
    mask = model.head.logit_mask
    allowed = torch.ones_like(logits, dtype=torch.bool) if mask is None else mask.expand_as(logits)
    # Classes outside the active task get -inf: zero probability, and no gradient.
    logp = logits.masked_fill(~allowed, float("-inf")).log_softmax(-1)
    nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    uniform = -logp.masked_fill(~allowed, 0.0).sum(-1) / allowed.sum(-1)
    return ((1 - smoothing) * nll + smoothing * uniform).mean(1)


@register_strategy("bp_label_smoothing")
class LabelSmoothingBP(Strategy):
    """Plain back-propagation of the label-smoothed cross-entropy (a regularised ``bp``)."""

    Config = LabelSmoothingConfig
    #: ``vary.strategy.smoothing=[0.0,0.1,0.2]`` with ``replicas=3`` trains one value per replica.
    replica_fields = ("smoothing",)

    def compute(self, x: Tensor, y: Tensor) -> StepResult:
        logits = self.model(x)
        smoothing = self.per_replica("smoothing")
        if isinstance(smoothing, Tensor):  # (R, 1, 1) per replica -> (R, 1), against (R, B) losses
            smoothing = smoothing.view(-1, 1)
        return StepResult(loss=smoothed_loss(self.model, logits, y, smoothing), logits=logits)
