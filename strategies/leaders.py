"""Leaders and followers (LFNN paper): leader selection, the local objectives of Eq. 1 and 2, and
the per-block hook through which an LFNN rule's forward pass selects leaders and (Eq. 1) lets the
global gradient reach leaders only. Shared by ``lfnn`` and ``lfnn_local``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from agentnet.blocks import Block, LayerRecord, WorkerLosses
from agentnet.distributed import batch_mean

__all__ = ["LeaderSelection", "LeaderHook", "alignment_loss", "leader_follower_loss"]


class LeaderSelection:
    """Selects each layer's leaders: the ``ceil(delta * W)`` workers with the lowest prediction loss.

    Modes: ``batch`` (mean loss over the mini-batch; the default), ``sample`` (every sample has its
    own leaders), ``epoch`` (leaders fixed for an epoch, chosen from the previous epoch's mean loss;
    the first epoch's set comes from its first batch). Keeps leadership counts per layer and
    replica: how often each worker led, in total and per epoch (the LFNN paper's Fig. 6).
    ``delta`` may be one value per replica (a population sweeping the leadership fraction).
    """

    MODES = ("batch", "sample", "epoch")

    def __init__(self, delta: float | list[float], mode: str, workers_per_layer: list[int], device: torch.device | str = "cpu",
                 replicas: int = 1):
        deltas = [float(delta)] * replicas if isinstance(delta, (int, float)) else [float(d) for d in delta]
        if len(deltas) != replicas:
            raise ValueError(f"strategy.delta: {len(deltas)} values for {replicas} replicas")
        for d in deltas:
            if not 0 < d <= 1:
                raise ValueError(f"strategy.delta={d}: must lie in (0, 1]")
        if mode not in self.MODES:
            raise ValueError(f"strategy.selection={mode!r}: choose one of {self.MODES}")
        self.delta = deltas[0] if len(set(deltas)) == 1 else deltas
        self.mode = mode
        self.replicas = replicas
        #: Leaders per layer: an int when every replica has the same count, else ``(R, 1)`` counts.
        self.num_leaders: list[int | Tensor] = []
        for w in workers_per_layer:
            counts = [math.ceil(d * w) for d in deltas]
            self.num_leaders.append(counts[0] if len(set(counts)) == 1 else torch.tensor(counts, device=device).view(-1, 1))
        self.counts = [torch.zeros(replicas, w, device=device) for w in workers_per_layer]
        self.epoch_counts: list[list[Tensor]] = [[] for _ in workers_per_layer]
        self._epoch_start = [c.clone() for c in self.counts]
        self._loss_sum = [torch.zeros(replicas, w, device=device) for w in workers_per_layer]
        self._loss_batches = 0
        self._fixed: list[Tensor | None] = [None for _ in workers_per_layer]

    def _lead_mask(self, layer: int, losses: Tensor) -> Tensor:
        """Bool mask of the ``num_leaders`` lowest ``losses`` along the last dim (per replica)."""
        n_lead = self.num_leaders[layer]
        if isinstance(n_lead, int):
            order = losses.topk(n_lead, dim=-1, largest=False).indices
            return torch.zeros_like(losses, dtype=torch.bool).scatter_(-1, order, True)
        order = losses.argsort(-1)
        ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(losses.shape[-1], device=losses.device).expand_as(order))
        return ranks < n_lead.view(-1, *([1] * (losses.dim() - 1)))

    def select(self, layer: int, losses: Tensor) -> tuple[Tensor, Tensor]:
        """Leaders of ``layer`` from per-sample losses ``(R, B, W)``.

        Returns ``(mask, best)``: ``mask`` bool ``(R, W)`` (``(R, B, W)`` in sample mode) marks
        leaders; ``best`` is the best leader's index, ``(R,)`` (``(R, B)`` in sample mode).
        """
        losses = losses.detach()
        if self.mode == "sample":
            mask = self._lead_mask(layer, losses)
            self.counts[layer] += mask.float().mean(1)
            return mask, losses.argmin(-1)
        mean = batch_mean(losses, 1)  # (R, W); over the global batch under torchrun: every rank picks the same leaders
        if self.mode == "epoch":
            self._loss_sum[layer] += mean
            if layer == 0:
                self._loss_batches += 1
            if self._fixed[layer] is None:
                self._fixed[layer] = self._lead_mask(layer, mean)
            mask = self._fixed[layer]
            best = mean.masked_fill(~mask, float("inf")).argmin(-1)
        else:
            mask = self._lead_mask(layer, mean)
            best = mean.argmin(-1)
        self.counts[layer] += mask
        return mask, best

    def end_epoch(self) -> None:
        """Close an epoch: store per-epoch counts; in epoch mode, fix next epoch's leaders."""
        for layer, count in enumerate(self.counts):
            self.epoch_counts[layer].append((count - self._epoch_start[layer]).cpu())
            self._epoch_start[layer] = count.clone()
            if self.mode == "epoch" and self._loss_batches:
                self._fixed[layer] = self._lead_mask(layer, self._loss_sum[layer] / self._loss_batches)
                self._loss_sum[layer].zero_()
        self._loss_batches = 0

    def state_dict(self) -> dict:
        """Everything needed to resume selection exactly."""
        # On the model's device, as copies: A-GEM/GEM snapshot this inside every step, and a copy
        # to the host would wait for the device (a checkpoint loads onto the CPU either way).
        return {
            "counts": [c.clone() for c in self.counts],
            "epoch_counts": self.epoch_counts,
            "epoch_start": [c.clone() for c in self._epoch_start],
            "loss_sum": [c.clone() for c in self._loss_sum],
            "loss_batches": self._loss_batches,
            "fixed": [None if f is None else f.clone() for f in self._fixed],
        }

    def load_state_dict(self, state: dict) -> None:
        device = self.counts[0].device
        self.counts = [c.to(device) for c in state["counts"]]
        self.epoch_counts = state["epoch_counts"]
        self._epoch_start = [c.to(device) for c in state["epoch_start"]]
        self._loss_sum = [c.to(device) for c in state["loss_sum"]]
        self._loss_batches = state["loss_batches"]
        self._fixed = [None if f is None else f.to(device) for f in state["fixed"]]


class LeaderHook(WorkerLosses):
    """The LFNN rules' step of :meth:`~agentnet.network.WorkerNetwork.forward_record` in every
    block: each worker's prediction loss, the block's leaders from ``selection`` and, with
    ``leaders_carry_global`` (Eq. 1), followers' units fed forward without a gradient path, so the
    gradient arriving from above reaches only the leaders' units."""

    def __init__(self, selection: LeaderSelection, leaders_carry_global: bool = False) -> None:
        self.selection = selection
        self.leaders_carry_global = leaders_carry_global

    def recorded(self, block: Block, record: LayerRecord, h: Tensor, y: Tensor | None) -> Tensor:
        h = super().recorded(block, record, h, y)
        if record.worker_loss is None:
            return h
        record.leaders, record.best = self.selection.select(block.index, record.worker_loss)
        if self.leaders_carry_global:
            h = torch.where(_unit_gate(record.leaders, block.layer, h), h, h.detach())
        return h


def _unit_gate(leaders: Tensor, layer: nn.Module, h: Tensor) -> Tensor:
    """Leader mask ``(R, W)`` or ``(R, B, W)`` expanded over each worker's units, broadcastable to
    the layer's activation ``h`` (``(R, B, n)``, or channel-folded ``(B, R*n, H, W)``)."""
    units = leaders.repeat_interleave(layer.worker_size, dim=-1)  # (R, n) or (R, B, n)
    if not layer.folded:
        return units if units.dim() == 3 else units.unsqueeze(1)
    if units.dim() == 2:
        return units.reshape(1, -1, 1, 1)
    return units.transpose(0, 1).reshape(units.shape[1], -1, 1, 1)


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
