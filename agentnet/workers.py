"""Workers: groups of ``k`` units of a layer, batched so a layer's ``W`` workers are one tensor op.

A fully connected layer of width ``n = W * k`` is an ordinary ``(n, in)`` weight whose rows
``[w*k, (w+1)*k)`` belong to worker ``w``. Its pre-activation ``(B, n)`` viewed as ``(B, W, k)``
gives every worker's output at once; through the output activation those ``k`` units are the
worker's prediction (no extra parameters). Leader selection ranks the workers by prediction loss.

Conv layers follow the same rule along channels: a :class:`WorkerConv2d` of ``W * k`` filters is one
convolution whose output ``(B, W*k, H, W')`` is globally average-pooled to ``(B, W, k)`` (filter-wise
workers). A :class:`WorkerBlock` is ``W`` parallel blocks of conv layers (VGG-style or residual), run
as grouped convolutions, each block one worker (block-wise workers; ``W = 1`` is the paper's block).

Every worker layer offers the same two methods the network uses: ``forward_path(x, path)`` for the
pre-activation under a :data:`GradientPath`, and ``workers(h)`` for the ``(B, W, k)`` worker view.
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
    "split_conv2d",
    "WorkerLinear",
    "WorkerConv2d",
    "WorkerBlock",
    "WorkerReadout",
    "WorkerPredictor",
    "LeaderSelection",
    "lerp_update",
]

#: How a layer's gradients may travel:
#: ``global`` — ordinary autograd, everything reaches the layer's input;
#: ``split``  — two views of the pre-activation: the first carries gradient to the input (BP path),
#:              the second only to this layer's own weights (local losses);
#: ``local``  — the input is detached: nothing crosses the layer boundary (BP-free).
GradientPath = Literal["global", "split", "local"]


def _total(g_bp: Tensor | None, g_local: Tensor | None) -> Tensor | None:
    """Sum of the two incoming gradients, either of which may be absent."""
    if g_bp is None:
        return g_local
    return g_bp if g_local is None else g_bp + g_local


def _as_grad_dtype(x: Tensor, weight: Tensor, *grads: Tensor | None) -> tuple[Tensor, Tensor]:
    """``x`` and ``weight`` in the incoming gradient's dtype: under autocast the forward ran in
    bf16/fp16 while the saved tensors are the fp32 originals; the backward runs in the forward's dtype."""
    dtype = next((g.dtype for g in grads if g is not None), x.dtype)
    return x.to(dtype), weight.to(dtype)


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
        x_c, w_c = _as_grad_dtype(x, weight, g_bp, g_local)
        grad_x = grad_w = grad_b = None
        if g_bp is not None and ctx.needs_input_grad[0]:
            grad_x = (g_bp @ w_c).to(x.dtype)
        g_total = _total(g_bp, g_local)
        if g_total is not None:
            if ctx.needs_input_grad[1]:
                grad_w = (g_total.t() @ x_c).to(weight.dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = g_total.sum(0).to(weight.dtype)
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

    @property
    def input_weight(self) -> Tensor:
        """The weight that reads the layer's input (for worker graphs)."""
        return self.weight

    def workers(self, z: Tensor) -> Tensor:
        """View a ``(B, n)`` layer output as ``(B, W, k)``."""
        return z.view(z.shape[0], self.num_workers, self.worker_size)


class _SplitConv2d(torch.autograd.Function):
    """:class:`_SplitLinear` for convolutions: one forward conv, ``grad_x`` from ``g_bp`` only."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        return z, z.clone()

    @staticmethod
    def backward(ctx, g_bp: Tensor | None, g_local: Tensor | None):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        x_c, w_c = _as_grad_dtype(x, weight, g_bp, g_local)
        stride, padding, dilation, groups = ctx.conv
        bias_sizes = [weight.shape[0]] if ctx.has_bias else None
        grad_x = grad_w = grad_b = None

        def conv_backward(g: Tensor, mask: list[bool]):
            return torch.ops.aten.convolution_backward(
                g, x_c, w_c, bias_sizes, stride, padding, dilation, False, [0, 0], groups, mask
            )

        if g_bp is not None and ctx.needs_input_grad[0]:
            grad_x = conv_backward(g_bp, [True, False, False])[0].to(x.dtype)
        g_total = _total(g_bp, g_local)
        want_w, want_b = ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        if g_total is not None and (want_w or want_b):
            _, gw, gb = conv_backward(g_total, [False, bool(want_w), bool(want_b)])
            grad_w = None if gw is None else gw.to(weight.dtype)
            grad_b = None if gb is None else gb.to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


def split_conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1, groups: int = 1
) -> tuple[Tensor, Tensor]:
    """``(z_bp, z_local)`` of a convolution: equal values, gradient of ``z_local`` reaches only the filters."""
    pair = nn.modules.utils._pair
    return _SplitConv2d.apply(x, weight, bias, pair(stride), pair(padding), pair(dilation), groups)


def _pooled_workers(h: Tensor, num_workers: int) -> Tensor:
    """Global average pool of ``(B, W*k, H, W')`` maps, viewed as ``(B, W, k)``."""
    return h.mean((2, 3)).view(h.shape[0], num_workers, -1)


class WorkerConv2d(nn.Conv2d):
    """A conv layer of ``num_workers`` filter-wise workers of ``worker_size`` filters each.

    Filters ``[w*k, (w+1)*k)`` belong to worker ``w``; its output maps, globally average-pooled, are
    its ``k`` prediction units (no extra parameters). Padding keeps the spatial size at stride 1.
    """

    def __init__(
        self, in_channels: int, num_workers: int, worker_size: int, kernel_size: int = 3, stride: int = 1, bias: bool = True
    ) -> None:
        super().__init__(in_channels, num_workers * worker_size, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias)
        self.num_workers = num_workers
        self.worker_size = worker_size

    def forward_path(self, x: Tensor, path: GradientPath) -> tuple[Tensor, Tensor]:
        """Pre-activation maps as ``(z, z_local)`` for the given :data:`GradientPath`."""
        if path == "split":
            return split_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        z = self(x.detach() if path == "local" else x)
        return z, z

    @property
    def input_weight(self) -> Tensor:
        """The weight that reads the layer's input (for worker graphs)."""
        return self.weight

    def workers(self, h: Tensor) -> Tensor:
        """Globally average-pooled ``(B, W*k, H, W')`` maps as ``(B, W, k)``."""
        return _pooled_workers(h, self.num_workers)


class WorkerBlock(nn.Module):
    """``num_workers`` parallel blocks of ``depth`` conv layers; each block is one block-wise worker.

    The first conv reads the whole input (every block sees every input channel); the following
    convs are grouped (``groups = W``), so a block's inner maps and output channels
    ``[w*k, (w+1)*k)`` depend only on its own filters. ``residual`` adds a shortcut (identity when
    the channel counts match, else a 1x1 conv) before the network's activation, as in ResNet's
    basic block; without it the block is VGG-style. With ``W = 1`` this is the LFNN paper's
    block-wise worker (a whole block of layers acting as one worker).

    Gradient paths: ``local`` detaches the block's input (nothing crosses a block boundary);
    ``split`` runs the block twice, once on the input and once on its detached copy, so local
    losses reach every layer of the block but never the layers below (one extra forward/backward
    of the block; ``bp`` and ``lfnn_local`` do not pay it).
    """

    def __init__(
        self,
        in_channels: int,
        num_workers: int,
        worker_size: int,
        *,
        width: int | None = None,
        depth: int = 2,
        residual: bool = True,
        kernel_size: int = 3,
        stride: int = 1,
        activation=torch.relu,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"block depth={depth}: must be >= 1")
        self.num_workers = num_workers
        self.worker_size = worker_size
        self.act = activation
        inner = (width or worker_size) * num_workers
        out = num_workers * worker_size
        pad = kernel_size // 2
        widths = [inner] * (depth - 1) + [out]
        convs = [nn.Conv2d(in_channels, widths[0], kernel_size, stride=stride, padding=pad)]
        for i in range(1, depth):
            convs.append(nn.Conv2d(widths[i - 1], widths[i], kernel_size, padding=pad, groups=num_workers))
        self.convs = nn.ModuleList(convs)
        self.shortcut: nn.Module | None = None
        if residual:
            same = in_channels == out and stride == 1
            self.shortcut = nn.Identity() if same else nn.Conv2d(in_channels, out, 1, stride=stride)

    @property
    def input_weight(self) -> Tensor:
        """The weight that reads the block's input (for worker graphs)."""
        return self.convs[0].weight

    def forward(self, x: Tensor) -> Tensor:
        """The block's pre-activation output ``(B, W*k, H', W')`` (the network applies the activation)."""
        h = x
        for i, conv in enumerate(self.convs):
            h = conv(h)
            if i < len(self.convs) - 1:
                h = self.act(h)
        return h if self.shortcut is None else h + self.shortcut(x)

    def forward_path(self, x: Tensor, path: GradientPath) -> tuple[Tensor, Tensor]:
        """Pre-activation as ``(z, z_local)``; see the class docstring for ``split``."""
        if path == "global":
            z = self(x)
            return z, z
        if path == "local":
            z = self(x.detach())
            return z, z
        return self(x), self(x.detach())

    def workers(self, h: Tensor) -> Tensor:
        """Globally average-pooled block outputs as ``(B, W, k)``."""
        return _pooled_workers(h, self.num_workers)


class WorkerReadout(nn.Module):
    """Maps a layer's worker outputs ``(B, W, k)`` to prediction logits ``(B, W, C)``.

    ``k = C``: the units are the logits (no parameters). Otherwise either a fixed random ``k -> C``
    projection (a buffer, no trained parameters) or, with ``head=True``, a small trained linear head
    per worker (``W * (k * C + C)`` extra parameters, trained only by that worker's local loss).
    """

    def __init__(self, num_workers: int, worker_size: int, out_units: int, *, projection: bool, head: bool, seed: int = 0):
        super().__init__()
        self.weight: nn.Parameter | None = None
        self.register_buffer("projection", None)
        if head:
            gen = torch.Generator().manual_seed(seed + 104729)
            bound = 1 / math.sqrt(worker_size)
            self.weight = nn.Parameter((torch.rand(num_workers, worker_size, out_units, generator=gen) * 2 - 1) * bound)
            self.bias = nn.Parameter(torch.zeros(num_workers, out_units))
        elif worker_size != out_units:
            if not projection:
                raise ValueError(
                    f"workers of {worker_size} units: worker predictions need k = {out_units} output units "
                    "(or set model.worker_projection=true for a fixed random projection, or "
                    "model.worker_head=true for a trained head per worker)"
                )
            gen = torch.Generator().manual_seed(seed + 7919)
            self.register_buffer("projection", torch.randn(worker_size, out_units, generator=gen) / math.sqrt(worker_size))

    def forward(self, workers: Tensor) -> Tensor:
        if self.weight is not None:
            return torch.einsum("bwk,wkc->bwc", workers, self.weight) + self.bias
        return workers if self.projection is None else workers @ self.projection


class WorkerPredictor(nn.Module):
    """Per-sample, per-worker prediction losses ``e`` ``(B, W)`` from worker logits ``(B, W, C)``.

    Softmax output: cross-entropy over the ``C`` logits; sigmoid output (binary): BCE of the one
    logit. Parameter-free; the ``k -> C`` step is the layer's :class:`WorkerReadout`.
    """

    def __init__(self, output_activation: str):
        super().__init__()
        self.output_activation = output_activation

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """Per-sample, per-worker prediction loss ``(B, W)``."""
        if self.output_activation == "softmax":
            # Classes on dim 1: CPU softmax over a short innermost dim is several times slower.
            return F.cross_entropy(logits.transpose(1, 2), y.view(-1, 1).expand(-1, logits.shape[1]), reduction="none")
        target = y.to(logits.dtype).view(-1, 1).expand_as(logits[..., 0])
        return F.binary_cross_entropy_with_logits(logits[..., 0], target, reduction="none")


def lerp_update(layer: nn.Module, olds: list[Tensor], scale: Tensor) -> None:
    """After an optimiser step, ``p <- lerp(p_old, p_new, s)`` per unit of ``layer`` (exact at 0 and 1).

    ``scale`` holds one value per unit (row of the layer's output). Parameters whose rows are not
    units — a block worker's inner convs — take the scale of their worker's first unit, so a 0
    freezes a whole block bit-exactly. ``olds`` are the parameters before the step, in
    ``layer.parameters()`` order.
    """
    workers = getattr(layer, "num_workers", 1)
    with torch.no_grad():
        for p, old in zip(layer.parameters(), olds):
            rows = p.shape[0]
            s = scale if rows == scale.numel() else scale.view(workers, -1)[:, 0].repeat_interleave(rows // workers)
            p.copy_(torch.lerp(old, p, s.view(-1, *([1] * (p.dim() - 1))).to(old.dtype)))


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
