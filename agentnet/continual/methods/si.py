"""``si``: synaptic intelligence (Zenke et al. 2017).

Each parameter's importance accumulates ``omega += -g * delta_theta`` over a task's steps (``g`` the
gradient of the worker's own objective, before any penalty); at the task's end
``Omega += omega / (delta_task^2 + xi)``. Penalty ``c * sum_p Omega_p (theta_p - theta*_p)^2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agentnet.config import CLConfig, check
from agentnet.continual.methods import CL_METHODS, CLMethod


@dataclass
class SIConfig(CLConfig):
    """SI settings."""

    si_c: float = 10.0
    """Penalty strength ``c`` (10: van de Ven et al.'s value for domain-IL permuted MNIST)."""
    xi: float = 0.1
    """Damping ``xi`` of the importance normalisation."""

    def __post_init__(self) -> None:
        check(self.si_c >= 0, "cl.si_c", self.si_c, "must be >= 0")
        check(self.xi > 0, "cl.xi", self.xi, "must be > 0")


@CL_METHODS.register("si")
class SynapticIntelligence(CLMethod):
    """Path-integral importance per parameter, quadratic penalty toward the previous task's end."""

    Config = SIConfig
    replica_fields = ("si_c",)
    search_space = {"si_c": {"log": [1e-2, 1e2]}}

    def __init__(self, cfg: SIConfig, model: torch.nn.Module, variants: dict[str, list[float]] | None = None) -> None:
        super().__init__(cfg, model, variants)
        self.params = dict(model.named_parameters())
        self.omega = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.importance = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.anchor = {k: p.detach().clone() for k, p in self.params.items()}
        self.task_start = {k: p.detach().clone() for k, p in self.params.items()}
        self._grad: dict[str, torch.Tensor] = {}
        self._before: dict[str, torch.Tensor] = {}

    def before_task(self, trainer, stream, task) -> None:
        self.task_start = {k: p.detach().clone() for k, p in self.params.items()}

    def after_backward(self, trainer, result) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                self._grad[k] = torch.zeros_like(p) if p.grad is None else p.grad.clone()
                self._before[k] = p.detach().clone()
                g = 2 * self.per_replica("si_c", p) * self.importance[k] * (p - self.anchor[k])
                p.grad = g if p.grad is None else p.grad.add_(g)

    def after_step(self, trainer, x, y, result) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                self.omega[k] -= self._grad[k] * (p - self._before[k])

    def after_task(self, trainer, stream, task) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                delta = p - self.task_start[k]
                self.importance[k] += self.omega[k].clamp_min(0) / (delta.pow(2) + self.cfg.xi)
                self.omega[k].zero_()
                self.anchor[k] = p.detach().clone()

    def state_dict(self) -> dict:
        return {"omega": self.omega, "importance": self.importance, "anchor": self.anchor, "task_start": self.task_start}

    def load_state_dict(self, state: dict) -> None:
        device = next(iter(self.params.values())).device
        for key in ("omega", "importance", "anchor", "task_start"):
            setattr(self, key, {k: v.to(device) for k, v in state[key].items()})

    def penalty(self) -> torch.Tensor:
        return sum(
            (self.per_replica("si_c", p) * self.importance[k] * (p.detach() - self.anchor[k]).pow(2)).sum() for k, p in self.params.items()
        )
