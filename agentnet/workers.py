"""Workers: groups of ``k`` units of a layer, batched so a layer's ``W`` workers are one tensor op.

A fully connected layer of width ``n = W * k`` is an ordinary ``(n, in)`` weight whose rows
``[w*k, (w+1)*k)`` belong to worker ``w``. Its pre-activation ``(B, n)`` viewed as ``(B, W, k)``
gives every worker's output at once; through the output activation those ``k`` units are the
worker's prediction (no extra parameters). Leader selection ranks the workers by prediction loss.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GradientPath",
    "split_linear",
    "WorkerLinear",
    "WorkerPredictor",
    "LeaderSelection",
]

#: How a layer's gradients may travel:
#: ``global`` — ordinary autograd, everything reaches the layer's input;
#: ``split``  — two views of the pre-activation: the first carries gradient to the input (BP path),
#:              the second only to this layer's own weights (local losses);
#: ``local``  — the input is detached: nothing crosses the layer boundary (BP-free).
GradientPath = Literal["global", "split", "local"]


class _SplitLinear(torch.autograd.Function):
    """``z = x W^T + b`` returned twice: ``z_bp`` (gradient reaches ``x``) and ``z_local`` (weights only).

    One forward matmul; in backward ``grad_x = g_bp W`` and ``grad_W = (g_bp + g_local)^T x``, so a
    local loss never leaks into earlier layers without a second forward pass.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        z = F.linear(x, weight, bias)
        return z, z.clone()

    @staticmethod
    def backward(ctx, g_bp: Tensor | None, g_local: Tensor | None):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if g_bp is not None and ctx.needs_input_grad[0]:
            grad_x = g_bp @ weight
        g_total = g_bp if g_local is None else (g_local if g_bp is None else g_bp + g_local)
        if g_total is not None:
            if ctx.needs_input_grad[1]:
                grad_w = g_total.t() @ x
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = g_total.sum(0)
        return grad_x, grad_w, grad_b


def split_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(z_bp, z_local)``: equal values, gradient of ``z_local`` reaches only ``weight`` and ``bias``."""
    return _SplitLinear.apply(x, weight, bias)


class WorkerLinear(nn.Linear):
    """A fully connected layer of ``num_workers`` workers of ``worker_size`` units each."""

    def __init__(self, in_features: int, num_workers: int, worker_size: int, bias: bool = True, **kw) -> None:
        super().__init__(in_features, num_workers * worker_size, bias=bias, **kw)
        self.num_workers = num_workers
        self.worker_size = worker_size

    def forward_path(self, x: Tensor, path: GradientPath) -> tuple[Tensor, Tensor]:
        """Pre-activation as ``(z, z_local)`` for the given :data:`GradientPath`."""
        if path == "global":
            z = F.linear(x, self.weight, self.bias)
            return z, z
        if path == "local":
            z = F.linear(x.detach(), self.weight, self.bias)
            return z, z
        return split_linear(x, self.weight, self.bias)

    def workers(self, z: Tensor) -> Tensor:
        """View a ``(B, n)`` layer output as ``(B, W, k)``."""
        return z.view(z.shape[0], self.num_workers, self.worker_size)


class WorkerPredictor(nn.Module):
    """Turns worker outputs ``(B, W, k)`` into per-sample prediction losses ``e`` of shape ``(B, W)``.

    With ``k = C`` the worker's units are its logits (softmax); with ``k = 1`` and a sigmoid output
    the unit is a binary logit. Other ``k`` need ``projection=True``: a fixed (non-trained) random
    ``k -> C`` matrix, stored as a buffer.
    """

    def __init__(self, worker_size: int, num_classes: int, output_activation: str, projection: bool, seed: int = 0):
        super().__init__()
        self.output_activation = output_activation
        out_units = 1 if output_activation == "sigmoid" and num_classes == 2 else num_classes
        self.out_units = out_units
        if worker_size == out_units:
            self.register_buffer("projection", None)
        elif projection:
            gen = torch.Generator().manual_seed(seed + 7919)
            self.register_buffer("projection", torch.randn(worker_size, out_units, generator=gen) / math.sqrt(worker_size))
        else:
            raise ValueError(
                f"model.worker_size={worker_size}: worker predictions need k = {out_units} output units "
                "(or set model.worker_projection=true for a fixed random projection)"
            )

    def logits(self, workers: Tensor) -> Tensor:
        """Worker prediction logits ``(B, W, out_units)``."""
        return workers if self.projection is None else workers @ self.projection

    def loss(self, workers: Tensor, y: Tensor) -> Tensor:
        """Per-sample, per-worker prediction loss ``(B, W)``."""
        logits = self.logits(workers)
        if self.output_activation == "softmax":
            # Classes on dim 1: CPU softmax over a short innermost dim is several times slower.
            return F.cross_entropy(logits.transpose(1, 2), y.view(-1, 1).expand(-1, logits.shape[1]), reduction="none")
        target = y.to(logits.dtype).view(-1, 1).expand_as(logits[..., 0])
        return F.binary_cross_entropy_with_logits(logits[..., 0], target, reduction="none")


class LeaderSelection:
    """Selects each layer's leaders: the ``ceil(delta * W)`` workers with the lowest prediction loss.

    Modes: ``batch`` (mean loss over the mini-batch; the default), ``sample`` (every sample has its
    own leaders), ``epoch`` (leaders fixed for an epoch, chosen from the previous epoch's mean loss;
    the first epoch's set comes from its first batch). Keeps leadership counts per layer: how often
    each worker led, in total and per epoch (the LFNN paper's Fig. 6).
    """

    MODES = ("batch", "sample", "epoch")

    def __init__(self, delta: float, mode: str, workers_per_layer: list[int], device: torch.device | str = "cpu"):
        if not 0 < delta <= 1:
            raise ValueError(f"strategy.delta={delta}: must lie in (0, 1]")
        if mode not in self.MODES:
            raise ValueError(f"strategy.selection={mode!r}: choose one of {self.MODES}")
        self.delta = delta
        self.mode = mode
        self.num_leaders = [math.ceil(delta * w) for w in workers_per_layer]
        self.counts = [torch.zeros(w, device=device) for w in workers_per_layer]
        self._ones = [torch.ones(n, device=device) for n in self.num_leaders]
        self.epoch_counts: list[list[Tensor]] = [[] for _ in workers_per_layer]
        self._epoch_start = [c.clone() for c in self.counts]
        self._loss_sum = [torch.zeros(w, device=device) for w in workers_per_layer]
        self._loss_batches = 0
        self._fixed: list[Tensor | None] = [None for _ in workers_per_layer]

    def select(self, layer: int, losses: Tensor) -> tuple[Tensor, Tensor]:
        """Leaders of ``layer`` from per-sample losses ``(B, W)``.

        Returns ``(mask, best)``: ``mask`` bool ``(W,)`` (``(B, W)`` in sample mode) marks leaders;
        ``best`` is the best leader's index, a 0-d tensor (``(B,)`` in sample mode).
        """
        losses = losses.detach()
        n_lead = self.num_leaders[layer]
        if self.mode == "sample":
            order = losses.topk(n_lead, dim=1, largest=False).indices
            mask = torch.zeros_like(losses, dtype=torch.bool).scatter_(1, order, True)
            self.counts[layer] += mask.float().mean(0)
            return mask, order[:, 0]
        mean = losses.mean(0)
        if self.mode == "epoch":
            self._loss_sum[layer] += mean
            if layer == 0:
                self._loss_batches += 1
            if self._fixed[layer] is None:
                self._fixed[layer] = mean.topk(n_lead, largest=False).indices
            order = self._fixed[layer]
            best = order[mean[order].argmin()]
        else:
            order = mean.topk(n_lead, largest=False).indices
            best = order[0]
        mask = torch.zeros_like(mean, dtype=torch.bool).scatter_(0, order, True)
        self.counts[layer].index_add_(0, order, self._ones[layer])
        return mask, best

    def end_epoch(self) -> None:
        """Close an epoch: store per-epoch counts; in epoch mode, fix next epoch's leaders."""
        for layer, count in enumerate(self.counts):
            self.epoch_counts[layer].append((count - self._epoch_start[layer]).cpu())
            self._epoch_start[layer] = count.clone()
            if self.mode == "epoch" and self._loss_batches:
                mean = self._loss_sum[layer] / self._loss_batches
                self._fixed[layer] = mean.topk(self.num_leaders[layer], largest=False).indices
                self._loss_sum[layer].zero_()
        self._loss_batches = 0

    def state_dict(self) -> dict:
        """Everything needed to resume selection exactly."""
        return {
            "counts": [c.cpu() for c in self.counts],
            "epoch_counts": self.epoch_counts,
            "epoch_start": [c.cpu() for c in self._epoch_start],
            "loss_sum": [c.cpu() for c in self._loss_sum],
            "loss_batches": self._loss_batches,
            "fixed": [None if f is None else f.cpu() for f in self._fixed],
        }

    def load_state_dict(self, state: dict) -> None:
        device = self.counts[0].device
        self.counts = [c.to(device) for c in state["counts"]]
        self._ones = [o.to(device) for o in self._ones]
        self.epoch_counts = state["epoch_counts"]
        self._epoch_start = [c.to(device) for c in state["epoch_start"]]
        self._loss_sum = [c.to(device) for c in state["loss_sum"]]
        self._loss_batches = state["loss_batches"]
        self._fixed = [None if f is None else f.to(device) for f in state["fixed"]]
