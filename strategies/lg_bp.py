"""``lg_bp``: local greedy back-propagation (greedy layer-wise training, Belilovsky et al. 2019;
the "LG-BP" row of the LFNN paper's Table 1).

Every hidden layer (with the plain layers in front of it: its *block*) gets a small trained head —
a linear classifier on the layer's output, globally average-pooled for conv layers — and is trained
by back-propagating that head's cross-entropy inside the block only. Each block's input is
detached, so no gradient crosses a block boundary; the output layer is trained by the task loss
on its own detached input. Blocks could therefore train in parallel, as in LFNN-l, but each block
is one learner with a head rather than a population of workers.

:class:`LocalHeads` and :func:`head_losses` are shared with the local greedy forward-gradient
strategies (``lg_fg_w``, ``lg_fg_a``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from agentnet.config import StrategyConfig
from agentnet.blocks import ForwardRecord
from agentnet.network import WorkerNetwork
from agentnet.registry import register_strategy
from agentnet.strategy import StepResult, Strategy
from agentnet.replica import ReplicaLinear

__all__ = ["LocalHeads", "local_heads", "head_inputs", "head_losses", "LocalGreedyBP"]


class LocalHeads(nn.Module):
    """One linear classifier per hidden layer of ``model``, per replica, reading the layer's
    (pooled) output ``(R, B, W*k)``; replica ``r``'s heads are drawn from ``seeds[r]``."""

    def __init__(self, model: WorkerNetwork) -> None:
        super().__init__()
        out_units = model.head.layer.out_features
        self.heads = nn.ModuleList(
            ReplicaLinear(block.layer.num_workers * block.layer.prediction_units, out_units, model.replicas) for block in model.blocks()
        )
        for i, head in enumerate(self.heads):
            bound = 1 / math.sqrt(head.in_features)
            rows = []
            for seed in model.seeds:  # own generators: building heads draws nothing from torch's global one
                gen = torch.Generator().manual_seed(seed * 1_000_003 + 104_729 + i)
                rows.append(((torch.rand(out_units, head.in_features + 1, generator=gen) * 2 - 1) * bound))
            table = torch.cat(rows)
            with torch.no_grad():
                head.weight.copy_(table[:, :-1])
                head.bias.copy_(table[:, -1])

    def forward(self, index: int, features: Tensor) -> Tensor:
        """Logits ``(R, B, C)`` of hidden layer ``index``'s head."""
        return self.heads[index](features)


def local_heads(model: WorkerNetwork) -> LocalHeads:
    """The model's local heads, added to ``model.aux`` on first use (so the optimiser trains them
    and checkpoints keep them); the same object for every strategy built on the model."""
    if "local_heads" not in model.aux:
        param = next(model.parameters())
        model.aux["local_heads"] = LocalHeads(model).to(param.device, param.dtype)
    return model.aux["local_heads"]


def head_inputs(model: WorkerNetwork, record: ForwardRecord) -> list[Tensor]:
    """Each hidden layer's output as its head reads it: ``(R, B, W*k)`` (conv maps average-pooled)."""
    return [block.layer.workers(rec.activation).flatten(2) for block, rec in zip(model.blocks(), record.layers)]


def head_losses(model: WorkerNetwork, heads: LocalHeads, features: list[Tensor], y: Tensor) -> list[Tensor]:
    """Per hidden layer, each example's head cross-entropy ``(R, B)``."""
    return [model.head.sample_losses(heads(i, f), y) for i, f in enumerate(features)]


@register_strategy("lg_bp")
class LocalGreedyBP(Strategy):
    """Each block trained by back-propagating its own head's loss, nothing crossing a block boundary."""

    Config = StrategyConfig

    def __init__(self, cfg: StrategyConfig, model: WorkerNetwork, variants: dict[str, list[float]] | None = None) -> None:
        super().__init__(cfg, model, variants)
        self.heads = local_heads(model)

    def compute(self, x: Tensor, y: Tensor) -> StepResult:
        record = self.model.forward_record(x, y, path="local")
        losses = [self.model.head.global_loss(record.logits, y)]
        losses += [loss.mean(1) for loss in head_losses(self.model, self.heads, head_inputs(self.model, record), y)]
        return StepResult(loss=torch.stack(losses).sum(0), logits=record.logits, record=record)
