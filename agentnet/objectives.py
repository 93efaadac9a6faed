"""Local objectives shared by the leader-follower strategies (LFNN paper, Eq. 1 and 2)."""

from __future__ import annotations

import torch
from torch import Tensor

from agentnet.network import LayerRecord

__all__ = ["alignment_loss", "leader_follower_loss"]


def alignment_loss(record: LayerRecord) -> Tensor:
    """Per-sample MSE of every worker's output to the stop-gradient output of its best leader, ``(B, W)``."""
    workers, best = record.workers, record.best
    reference = workers.detach()
    if best.dim() == 0:
        target = reference.index_select(1, best.view(1))  # (B, 1, k)
    else:
        target = reference[torch.arange(workers.shape[0], device=workers.device), best].unsqueeze(1)
    return (workers - target).pow(2).mean(-1)


def leader_follower_loss(record: LayerRecord, lambda1: float, lambda2: float) -> tuple[Tensor, Tensor]:
    """``lambda1 * sum_{leaders} e_w + lambda2 * sum_{followers} MSE(y_w, sg(y_w*))`` for one layer.

    Returns ``(total, per_worker)``: the scalar to minimise (sums over workers, means over the batch)
    and each worker's own weighted local loss ``(W,)``, which is that worker's objective.
    """
    # (B, W): each worker's own term, its prediction loss if it leads, its alignment if it follows.
    per_sample = torch.where(record.leaders, lambda1 * record.worker_loss, lambda2 * alignment_loss(record))
    per_worker = per_sample.mean(0)
    return per_worker.sum(), per_worker
