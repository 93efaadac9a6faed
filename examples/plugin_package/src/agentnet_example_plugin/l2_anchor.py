"""Continual-learning method ``l2_anchor``: an L2 pull toward the weights at the end of the last task.

After each task the method stores the parameters ``theta*``; while training later tasks it adds the
gradient of ``strength / 2 * ||theta - theta*||^2`` to every parameter's gradient. It is EWC with
every parameter equally important (the "L2" baseline of Kirkpatrick et al. 2017): cheap, but it
protects unimportant weights as much as important ones, so it trades plasticity for stability
more bluntly than ``ewc`` or ``si``.

It shows the whole CL-method interface: a ``Config`` dataclass, task-boundary and after-backward
hooks of :class:`~agentnet.continual.methods.CLMethod`, and ``state_dict`` so a continual run
resumes exactly. This module registers itself with ``@CL_METHODS.register``; the package's entry
point names the module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from agentnet.config import CLConfig, check
from agentnet.continual.methods import CL_METHODS, CLMethod

__all__ = ["L2AnchorConfig", "L2Anchor"]


@dataclass
class L2AnchorConfig(CLConfig):
    """``l2_anchor`` settings (``cl.strength=10`` on the command line)."""

    strength: float = 1.0
    """Penalty strength ``lambda`` of ``lambda / 2 * ||theta - theta*||^2`` (0: plain fine-tuning).
    1 is a starting point, not a tuned value: larger keeps earlier tasks better and learns later
    ones worse (with 40 Adam steps per permuted-MNIST task, 5 already leaves task 2 barely learned)."""

    def __post_init__(self) -> None:
        check(self.strength >= 0, "cl.strength", self.strength, "must be >= 0")


@CL_METHODS.register("l2_anchor")
class L2Anchor(CLMethod):
    """Quadratic pull of every parameter toward its value at the end of the previous task."""

    Config = L2AnchorConfig
    replica_fields = ("strength",)

    def __init__(self, cfg: L2AnchorConfig, model: torch.nn.Module, variants: dict[str, list[float]] | None = None) -> None:
        super().__init__(cfg, model, variants)
        self.anchor: dict[str, torch.Tensor] = {}  # empty during the first task: no penalty yet

    def after_task(self, trainer: Any, stream: Any, task: Any) -> None:
        self.anchor = {k: p.detach().clone() for k, p in self.model.named_parameters()}

    def after_backward(self, trainer: Any, result: Any) -> None:
        # Added to whatever gradient the strategy wrote: each worker's weights get their own pull.
        if not self.anchor:
            return
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                g = self.per_replica("strength", p) * (p - self.anchor[name])
                p.grad = g if p.grad is None else p.grad.add_(g)

    def penalty(self) -> torch.Tensor:
        value = torch.zeros(())
        for name, p in self.model.named_parameters():
            if name in self.anchor:
                value = value + 0.5 * (self.per_replica("strength", p) * (p.detach() - self.anchor[name]).pow(2)).sum()
        return value

    def state_dict(self) -> dict:
        return {"anchor": self.anchor}

    def load_state_dict(self, state: dict) -> None:
        device = next(self.model.parameters()).device
        self.anchor = {k: v.to(device) for k, v in state["anchor"].items()}
