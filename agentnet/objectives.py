"""Local objectives shared by the leader-follower strategies (LFNN paper, Eq. 1 and 2)."""

from __future__ import annotations

import torch
from torch import Tensor

from agentnet.network import LayerRecord

__all__ = ["alignment_loss", "leader_follower_loss"]


def alignment_loss(record: LayerRecord) -> Tensor:
    """Per-sample MSE of every worker's output (:attr:`LayerRecord.aligned` when the model sets one)
    to the stop-gradient output of its best leader, ``(R, B, W)``."""
    workers = record.workers if record.aligned is None else record.aligned  # (R, B, W, k)
    best = record.best  # (R,) or (R, B)
    R, B, _, k = workers.shape
    index = best.view(R, -1, 1, 1).expand(R, B, 1, k)
    target = workers.detach().gather(2, index)  # (R, B, 1, k)
    return (workers - target).pow(2).mean(-1)


def leader_follower_loss(record: LayerRecord, lambda1: float | Tensor, lambda2: float | Tensor) -> tuple[Tensor, Tensor]:
    """``lambda1 * sum_{leaders} e_w + lambda2 * sum_{followers} MSE(y_w, sg(y_w*))`` for one layer.

    ``lambda1`` / ``lambda2`` are numbers or one value per replica ``(R, 1, 1)``. Returns
    ``(total, per_worker)``: each replica's scalar to minimise ``(R,)`` (sums over workers, means
    over the batch) and each worker's own weighted local loss ``(R, W)``, its objective.
    """
    leaders = record.leaders if record.leaders.dim() == 3 else record.leaders.unsqueeze(1)
    # (R, B, W): each worker's own term, its prediction loss if it leads, its alignment if it follows.
    per_sample = torch.where(leaders, lambda1 * record.worker_loss, lambda2 * alignment_loss(record))
    per_worker = per_sample.mean(1)
    return per_worker.sum(1), per_worker
