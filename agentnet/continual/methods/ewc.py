"""``ewc`` and ``online_ewc``: elastic weight consolidation (Kirkpatrick et al. 2017; Schwarz et al. 2018).

Penalty ``lambda/2 * sum_t sum_p F_t,p (theta_p - theta*_t,p)^2`` with ``F_t`` the diagonal Fisher at
the end of task ``t``. Online EWC keeps one running ``F = gamma F + F_t`` anchored at the latest
``theta*``. The Fisher uses per-sample gradients (``torch.func``) of the log-likelihood of the
model's own predicted label on ``fisher_samples`` training examples of the task.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, vmap

from agentnet.config import CLConfig, check
from agentnet.continual.methods import CL_METHODS, CLMethod
from agentnet.network import eval_mode


@dataclass
class EWCConfig(CLConfig):
    """EWC settings."""

    ewc_lambda: float = 100.0
    """Penalty strength (100: van de Ven et al.'s grid-searched value for domain-IL permuted MNIST)."""
    gamma: float = 1.0
    """Online EWC: decay of the running Fisher (1 keeps everything)."""
    online: bool = False
    """One running Fisher and anchor instead of one per task."""
    fisher_samples: int = 1000
    """Training examples of the finished task used to estimate its Fisher."""

    def __post_init__(self) -> None:
        check(self.ewc_lambda >= 0, "cl.ewc_lambda", self.ewc_lambda, "must be >= 0")
        check(0 < self.gamma <= 1, "cl.gamma", self.gamma, "must lie in (0, 1]")
        check(self.fisher_samples > 0, "cl.fisher_samples", self.fisher_samples, "must be positive")


def diagonal_fisher(model: torch.nn.Module, x: torch.Tensor, chunk: int = 64) -> dict[str, torch.Tensor]:
    """Mean squared per-sample gradient of ``log p(y_hat | x)`` for every parameter.

    ``x`` is ``(R, N, D)``: sample ``n`` of every replica in one call; the summed loss's gradient
    on replica ``r``'s rows is replica ``r``'s own per-sample gradient.
    """
    params = {k: v.detach() for k, v in model.named_parameters()}

    def nll(p, xi):  # xi: (R, D), one sample per replica
        logits = functional_call(model, p, (xi.unsqueeze(1),))
        label = model.predict(logits).detach()
        return model.global_loss(logits, label).sum()

    per_sample = vmap(grad(nll), in_dims=(None, 1))
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    n = x.shape[1]
    with eval_mode(model):  # one sample per call: batch norms use their running statistics
        for start in range(0, n, chunk):
            for k, g in per_sample(params, x[:, start : start + chunk]).items():
                total[k] += g.pow(2).sum(0)
    return {k: v / n for k, v in total.items()}


@CL_METHODS.register("ewc")
class EWC(CLMethod):
    """Quadratic pull of every parameter toward its value after earlier tasks, weighted by Fisher."""

    Config = EWCConfig
    replica_fields = ("ewc_lambda",)

    def __init__(self, cfg: EWCConfig, model: torch.nn.Module, variants: dict[str, list[float]] | None = None) -> None:
        super().__init__(cfg, model, variants)
        self.anchors: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []  # (fisher, theta*)

    def after_task(self, trainer, stream, task) -> None:
        gen = torch.Generator().manual_seed(1000 + task.index)
        n = min(self.cfg.fisher_samples, task.train_size)
        pick = torch.randperm(task.train_size, generator=gen)[:n].to(task.train_idx.device)
        x, _ = stream.batch(task, pick)
        with self.model.logit_mask_as(stream.logit_mask(task)):
            fisher = diagonal_fisher(self.model, x)
        theta = {k: v.detach().clone() for k, v in self.model.named_parameters()}
        if self.cfg.online and self.anchors:
            old, _ = self.anchors[0]
            fisher = {k: self.cfg.gamma * old[k] + fisher[k] for k in fisher}
            self.anchors = []
        self.anchors.append((fisher, theta))

    def after_backward(self, trainer, result) -> None:
        if not self.anchors:
            return
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                g = sum(f[name] * (p - theta[name]) for f, theta in self.anchors) * self.per_replica("ewc_lambda", p)
                p.grad = g if p.grad is None else p.grad.add_(g)

    def state_dict(self) -> dict:
        return {"anchors": [{"fisher": f, "theta": t} for f, t in self.anchors]}

    def load_state_dict(self, state: dict) -> None:
        device = next(self.model.parameters()).device
        self.anchors = [
            ({k: v.to(device) for k, v in a["fisher"].items()}, {k: v.to(device) for k, v in a["theta"].items()})
            for a in state["anchors"]
        ]

    def penalty(self) -> torch.Tensor:
        value = torch.zeros(())
        for fisher, theta in self.anchors:
            for name, p in self.model.named_parameters():
                value = value + 0.5 * (self.per_replica("ewc_lambda", p) * fisher[name] * (p.detach() - theta[name]).pow(2)).sum()
        return value


@dataclass
class OnlineEWCConfig(EWCConfig):
    """Online EWC: one running Fisher with decay ``gamma``."""

    online: bool = True


@CL_METHODS.register("online_ewc")
class OnlineEWC(EWC):
    """EWC with a single decayed running Fisher (Schwarz et al. 2018)."""

    Config = OnlineEWCConfig
