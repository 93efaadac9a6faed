"""``gem``: gradient episodic memory (Lopez-Paz & Ranzato 2017).

Every finished task ``k`` leaves ``memory_per_task`` of its training examples in an episodic
memory. At each step, after the strategy's backward has put the update ``g`` into ``.grad``, the
strategy's gradient ``g_k`` on each earlier task's whole memory is taken. If any constraint
``g . g_k >= 0`` is violated, ``g`` is replaced by the closest update satisfying all of them, via
the dual quadratic programme (``G`` the ``K x P`` matrix of the ``g_k``):

    min_v  1/2 v^T (G G^T) v + g^T G^T v   s.t.  v >= memory_strength,       g~ = G^T v + g

solved with ``quadprog`` (Goldfarb-Idnani dual active set) on the ``K x K`` problem. As in the
authors' code, ``memory_strength`` is a lower bound on ``v`` (it pushes the update towards the
memory gradients beyond mere non-interference) and ``qp_eps`` regularises ``G G^T`` for the solver;
here ``qp_eps`` is relative to the mean squared norm of the ``g_k``, so it does not depend on the
gradients' scale. Per replica; with ``projection=layer`` per layer too (one QP per layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from agentnet.config import check
from agentnet.continual.methods import CL_METHODS
from agentnet.continual.methods._episodic import EpisodicConfig, EpisodicProjection


@dataclass
class GEMConfig(EpisodicConfig):
    """GEM settings."""

    memory_strength: float = 0.5
    """Margin: lower bound of the dual variables ``v`` (the authors' default 0.5; 0 gives the
    exact projection onto ``{g~ : G g~ >= 0}``)."""
    qp_eps: float = 1e-3
    """Ridge added to ``G G^T / mean_k |g_k|^2`` so the QP is strictly convex."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.memory_strength >= 0, "cl.memory_strength", self.memory_strength, "must be >= 0")
        check(self.qp_eps > 0, "cl.qp_eps", self.qp_eps, "must be > 0 (quadprog needs a positive definite matrix)")


def project_to_cone(g: Tensor, G: Tensor, margin: float, eps: float) -> Tensor:
    """GEM's projection of one replica's update ``g`` ``(P,)`` against memory gradients ``G`` ``(K, P)``."""
    import quadprog  # a dependency of agentnet (pyproject), imported where it is used

    Gd, gd = G.double(), g.double()
    scale = (Gd * Gd).sum(1).mean().clamp_min(torch.finfo(torch.float64).tiny)
    P = (Gd @ Gd.T / scale).cpu().numpy()
    P = 0.5 * (P + P.T) + eps * np.eye(len(P))
    q = (Gd @ gd / scale).cpu().numpy()
    K = len(P)
    # quadprog: min 1/2 x^T P x - a^T x  s.t.  C^T x >= b
    v = quadprog.solve_qp(P, -q, np.eye(K), np.full(K, margin))[0]
    return (torch.from_numpy(v).to(Gd) @ Gd + gd).to(g.dtype)


@CL_METHODS.register("gem")
class GEM(EpisodicProjection):
    """Projects each update so that no earlier task's memory gradient conflicts with it."""

    Config = GEMConfig

    def reference_batches(self):
        return [self.memory.task_batch(t) for t in range(len(self.memory))]

    def project(self, g: Tensor, G: Tensor, dots: Tensor) -> tuple[Tensor, Tensor]:
        violated = (dots < 0).any(1)
        new = g.clone()
        for r in torch.nonzero(violated).view(-1).tolist():
            new[r] = project_to_cone(g[r], G[r], self.cfg.memory_strength, self.cfg.qp_eps)
        return new, violated
