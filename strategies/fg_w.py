"""``fg_w`` and ``lg_fg_w``: weight-perturbed forward gradient (Baydin et al. 2022, "Gradients
without Backpropagation"; the local greedy version of Ren et al. 2023, "Scaling Forward Gradient
with Local Losses").

No backward pass at all. Each step draws a random direction ``v ~ N(0, I)`` over the parameters,
computes the directional derivative ``d = grad L . v`` in the same forward pass with forward-mode
AD (``torch.func.jvp``), and uses ``g = d v`` as the gradient. Since ``E[v v^T] = I``, ``E[g]`` is
the true gradient: unbiased, with a variance that grows with the number of parameters — why the
method needs many more steps than BP. ``strategy.directions`` averages several directions.

``lg_fg_w`` splits the network into blocks (each hidden layer with the plain layers in front of it,
and the output layer) with detached inputs, each with its own loss (a local head's cross-entropy,
as in ``lg_bp``; the task loss for the output block). One ``jvp`` gives every block its own
directional derivative, and each block's parameters are moved along their own part of ``v`` only:
the estimate's variance now grows with a block's size, not the network's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from agentnet.config import StrategyConfig, check
from agentnet.network import WorkerNetwork
from agentnet.registry import register_strategy
from agentnet.strategy import StepResult, Strategy
from agentnet.replica import replica_randn, replica_rows
from strategies.lg_bp import head_inputs, head_losses, local_heads


@dataclass
class ForwardGradientConfig(StrategyConfig):
    """Settings of the forward-gradient strategies (``fg_w``, ``fg_a`` and their local greedy versions)."""

    directions: int = 1
    """Random directions per step, averaged (1: the papers' single-sample estimate)."""

    def __post_init__(self) -> None:
        check(self.directions >= 1, "strategy.directions", self.directions, "must be >= 1")


def block_modules(model: WorkerNetwork, local: bool) -> list[list[nn.Module]]:
    """The modules each block's loss trains: one block for the whole network, or (``local``) one per
    hidden layer (plain layers in front, the layer, its normalisation and head) plus the output block."""
    blocks = [[block.stem, block.layer, block.norm] for block in model.blocks()]
    output = [model.head.stem, model.head.layer]
    if not local:
        return [[module for block in blocks for module in block] + output]
    heads = local_heads(model)
    return [*(block + [head] for block, head in zip(blocks, heads.heads)), output]


class _BlockObjective(nn.Module):
    """The network's per-block losses as a module, so ``functional_call`` can swap its parameters."""

    def __init__(self, model: WorkerNetwork, local: bool) -> None:
        super().__init__()
        self.model = model
        self.local = local

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(losses (R, blocks), logits)``: the task loss last (the only one when not ``local``)."""
        model = self.model
        record = model.forward_record(x, y, path="local" if self.local else "global")
        losses = []
        if self.local:
            losses = [loss.mean(1) for loss in head_losses(model, model.aux["local_heads"], head_inputs(model, record), y)]
        losses.append(model.head.global_loss(record.logits, y))
        return torch.stack(losses, 1), record.logits


class ForwardGradientStrategy(Strategy):
    """What the forward-gradient strategies share: their random streams (one per replica, so replica
    ``r`` draws what a one-replica run with seed ``r`` draws; checkpointed, so a resumed run draws
    what the uninterrupted one would) and whether they train block by block (``local``)."""

    Config = ForwardGradientConfig
    local = False
    #: Offset of this strategy's random stream from the run's seed.
    stream = 0

    def __init__(self, cfg: ForwardGradientConfig, model: WorkerNetwork, variants: dict[str, list[float]] | None = None) -> None:
        super().__init__(cfg, model, variants)
        device = next(model.parameters()).device
        self.generators = [torch.Generator(device).manual_seed(seed * 1_000_003 + self.stream) for seed in model.seeds]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "generators": [g.get_state() for g in self.generators]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for g, saved in zip(self.generators, state.get("generators", [])):
            g.set_state(saved)


@register_strategy("fg_w")
class WeightForwardGradient(ForwardGradientStrategy):
    """Forward gradient with weight perturbation: ``g = (grad L . v) v``, one forward-mode pass, no backward."""

    stream = 31

    def __init__(self, cfg: ForwardGradientConfig, model: WorkerNetwork, variants: dict[str, list[float]] | None = None) -> None:
        super().__init__(cfg, model, variants)
        self.blocks = block_modules(model, self.local)
        self.objective = _BlockObjective(model, self.local)
        names = {id(p): f"model.{name}" for name, p in model.named_parameters()}
        # Parameter name -> its block's index; parameters no block's loss reads (e.g. worker heads) get no gradient.
        self.block_of = {names[id(p)]: b for b, modules in enumerate(self.blocks) for m in modules for p in m.parameters()}

    def compute(self, x: Tensor, y: Tensor) -> StepResult:
        params = {name: p for name, p in self.objective.named_parameters() if name in self.block_of}
        primals = {name: p.detach() for name, p in params.items()}
        grads = {name: torch.zeros_like(p) for name, p in primals.items()}
        for _ in range(self.cfg.directions):
            tangents = {name: replica_randn(p, self.generators) for name, p in primals.items()}
            (losses, logits), (slopes, _) = jvp(lambda p: functional_call(self.objective, p, (x, y)), (primals,), (tangents,))
            for name, v in tangents.items():  # slopes (R, blocks): each replica's, each block's own derivative
                grads[name] += replica_rows(slopes[:, self.block_of[name]], v) * v / self.cfg.directions
        return StepResult(loss=losses.sum(1), logits=logits, cache={"grads": grads, "params": params})

    def backward(self, result: StepResult) -> None:
        for name, p in result.cache["params"].items():
            p.grad = result.cache["grads"][name]


@register_strategy("lg_fg_w")
class LocalWeightForwardGradient(WeightForwardGradient):
    """``fg_w`` per block: each block's parameters follow their own local loss's directional derivative."""

    local = True
