"""Replica primitives: ``R`` independent copies of a layer held as one tensor op.

Every parameter and buffer is *replica-major* along its first dimension: replica ``r`` owns rows
``[r * rows // R, (r + 1) * rows // R)``, so with ``R = 1`` the shapes are the ordinary ones. Fully
connected activations are ``(R, B, n)`` and run as one batched matmul; conv activations are
channel-folded ``(B, R * C, H, W)`` and run as one grouped convolution (``groups = R``). Replicas
never mix: each replica's gradients depend only on its own parameters and data.

Here: the :data:`GradientPath` a layer's gradients may take and the split (two-view) linear and
conv ops behind it, :class:`ReplicaLinear`, :class:`ReplicaNorm`, and helpers over replica-major
rows (:func:`replica_rows`, :func:`replica_randn`, :func:`lerp_update`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agentnet.distributed import sync_batch_norm, world

__all__ = [
    "GradientPath",
    "replica_linear",
    "split_linear",
    "split_conv2d",
    "init_linear_rows",
    "reset_conv_rows",
    "ReplicaLinear",
    "ReplicaNorm",
    "replica_rows",
    "replica_randn",
    "lerp_update",
    "lerp_rows",
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


def replica_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``R`` linear maps at once: ``x`` ``(R, B, in)``, replica-major ``weight`` ``(R * out, in)`` -> ``(R, B, out)``."""
    R = x.shape[0]
    if R == 1:
        return F.linear(x, weight, bias)
    w = weight.view(R, -1, weight.shape[1])
    if bias is None:
        return torch.bmm(x, w.transpose(1, 2))
    return torch.baddbmm(bias.view(R, 1, -1), x, w.transpose(1, 2))


class _SplitLinear(torch.autograd.Function):
    """``z = x W^T + b`` returned twice: ``z_bp`` (gradient reaches ``x``) and ``z_local`` (weights only).

    One forward matmul; in backward ``grad_x = g_bp W`` and ``grad_W = (g_bp + g_local)^T x``, so a
    local loss never leaks into earlier layers without a second forward pass. Batched over replicas.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        z = replica_linear(x, weight, bias)
        return z, z.clone()

    @staticmethod
    def backward(ctx, g_bp: Tensor | None, g_local: Tensor | None):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        x_c, w_c = _as_grad_dtype(x, weight, g_bp, g_local)
        w3 = w_c.view(x.shape[0], -1, w_c.shape[1])  # (R, out, in)
        grad_x = grad_w = grad_b = None
        if g_bp is not None and ctx.needs_input_grad[0]:
            grad_x = torch.bmm(g_bp, w3).to(x.dtype)
        g_total = _total(g_bp, g_local)
        if g_total is not None:
            if ctx.needs_input_grad[1]:
                grad_w = torch.bmm(g_total.transpose(1, 2), x_c).reshape(weight.shape).to(weight.dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = g_total.sum(1).reshape(-1).to(weight.dtype)
        return grad_x, grad_w, grad_b


def split_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(z_bp, z_local)``: equal values, gradient of ``z_local`` reaches only ``weight`` and ``bias``."""
    return _SplitLinear.apply(x, weight, bias)


def init_linear_rows(weight: Tensor, bias: Tensor | None) -> None:
    """``nn.Linear``'s / ``nn.Conv2d``'s default initialisation (uniform in ``±1/sqrt(fan_in)``) of
    one replica's rows of a weight (and its bias)."""
    fan_in = weight[0].numel()
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    with torch.no_grad():
        weight.uniform_(-bound, bound)
        if bias is not None:
            bias.uniform_(-bound, bound)


class ReplicaLinear(nn.Module):
    """``replicas`` independent fully connected layers run as one batched matmul.

    ``weight`` is ``(R * out, in)`` and ``bias`` ``(R * out,)``, replica-major; the input is
    ``(R, B, in)``, the output ``(R, B, out)``.
    """

    def __init__(self, in_features: int, out_features: int, replicas: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.replicas = in_features, out_features, replicas
        self.weight = nn.Parameter(torch.empty(replicas * out_features, in_features))
        self.bias = nn.Parameter(torch.empty(replicas * out_features)) if bias else None
        for r in range(replicas):
            self.reset_replica(r)

    def reset_replica(self, r: int) -> None:
        """Initialise replica ``r`` (from the global torch generator, as ``nn.Linear`` does)."""
        rows = slice(r * self.out_features, (r + 1) * self.out_features)
        init_linear_rows(self.weight[rows], None if self.bias is None else self.bias[rows])

    def forward(self, x: Tensor) -> Tensor:
        return replica_linear(x, self.weight, self.bias)

    def forward_path(self, x: Tensor, path: GradientPath) -> tuple[Tensor, Tensor]:
        """Pre-activation as ``(z, z_local)`` for the given :data:`GradientPath`."""
        if path == "split":
            return split_linear(x, self.weight, self.bias)
        z = replica_linear(x.detach() if path == "local" else x, self.weight, self.bias)
        return z, z

    @property
    def input_weight(self) -> Tensor:
        """The weight that reads the layer's input (for worker graphs)."""
        return self.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, replicas={self.replicas}"


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


def reset_conv_rows(conv: nn.Conv2d, replicas: int, r: int) -> None:
    """Initialise replica ``r``'s output channels of a replica-grouped convolution."""
    n = conv.out_channels // replicas
    rows = slice(r * n, (r + 1) * n)
    init_linear_rows(conv.weight[rows], None if conv.bias is None else conv.bias[rows])


class ReplicaNorm(nn.Module):
    """A normalisation layer for ``R`` replicas of a layer of ``channels`` units (or conv channels).

    ``kind``: ``batch`` (each unit over the batch, and the maps' pixels; running statistics for
    evaluation), ``group`` (each sample over a group of ``channels // groups`` consecutive units,
    and the pixels: with one group per worker, a worker's normalisation never reads another
    worker's units), or ``layer`` (each sample over all the layer's units: one group). Each
    replica normalises over its own units only, and every statistic is per unit or per group, so
    replicas never mix and a worker's gradient stays within its group (``batch``, ``group``).
    Affine (weight 1, bias 0 at start). Inputs ``(R, B, n)`` or channel-folded ``(B, R*C, H, W)``.
    """

    KINDS = ("batch", "group", "layer")

    def __init__(self, kind: str, channels: int, groups: int = 1, replicas: int = 1, momentum: float = 0.1) -> None:
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"normalisation {kind!r}: choose one of {self.KINDS}")
        if kind == "group" and channels % groups:
            raise ValueError(f"group normalisation: {groups} groups do not divide {channels} channels")
        self.kind, self.channels, self.replicas, self.momentum = kind, channels, replicas, momentum
        self.groups = 1 if kind == "layer" else groups
        self.weight = nn.Parameter(torch.ones(replicas * channels))
        self.bias = nn.Parameter(torch.zeros(replicas * channels))
        if kind == "batch":
            self.register_buffer("running_mean", torch.zeros(replicas * channels))
            self.register_buffer("running_var", torch.ones(replicas * channels))

    def reset_replica(self, r: int) -> None:
        """Replica ``r`` back to the identity (and fresh running statistics); uses no random numbers."""
        rows = slice(r * self.channels, (r + 1) * self.channels)
        with torch.no_grad():
            self.weight[rows] = 1.0
            self.bias[rows] = 0.0
            if self.kind == "batch":
                self.running_mean[rows] = 0.0
                self.running_var[rows] = 1.0

    def forward(self, h: Tensor, update_stats: bool = True) -> Tensor:
        """Normalise ``h``; ``update_stats=False`` leaves batch statistics' running averages untouched
        (a second view of the same batch, e.g. the local path of a split layer)."""
        flat = h.dim() == 3  # (R, B, n) -> (B, R*n): units as channels
        x = h.transpose(0, 1).reshape(h.shape[1], -1) if flat else h
        if self.kind == "batch":
            momentum = self.momentum if update_stats else 0.0
            if self.training and world().active:  # the global batch's statistics, as one process would compute them
                y = sync_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, momentum, 1e-5)
            else:
                y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, momentum, 1e-5)
        else:
            y = F.group_norm(x, self.replicas * self.groups, self.weight, self.bias, 1e-5)
        return y.view(h.shape[1], self.replicas, -1).transpose(0, 1) if flat else y

    def extra_repr(self) -> str:
        return f"{self.kind}, channels={self.channels}, groups={self.groups}, replicas={self.replicas}"


def replica_rows(values: Tensor, p: Tensor) -> Tensor:
    """Per-replica ``values`` ``(R,)`` spread over the replica-major rows of ``p``, broadcastable to it."""
    return values.to(p.dtype).repeat_interleave(p.shape[0] // values.numel()).view(-1, *([1] * (p.dim() - 1)))


def replica_randn(like: Tensor, generators: list[torch.Generator], dim: int = 0) -> Tensor:
    """Standard normal noise shaped like ``like``, whose replica-major ``dim`` splits into one chunk
    per replica drawn from that replica's generator (so replica ``r`` of a population draws exactly
    what a one-replica run with ``generators[r]``'s seed draws)."""
    chunks = list(like.shape)
    chunks[dim] //= len(generators)
    return torch.cat([torch.randn(chunks, generator=g, device=like.device, dtype=like.dtype) for g in generators], dim)


def lerp_update(layer: nn.Module, olds: list[Tensor], scale: Tensor) -> None:
    """After an optimiser step, ``p <- lerp(p_old, p_new, s)`` per unit of ``layer`` (exact at 0 and 1).

    ``scale`` holds one value per unit (row of the layer's output, all replicas: ``R * n``).
    Parameters whose rows are not units — a block worker's inner convs — take the scale of their
    worker's first unit, so a 0 freezes a whole block bit-exactly. ``olds`` are the parameters
    before the step, in ``layer.parameters()`` order.
    """
    lerp_rows(layer.parameters(), olds, scale, getattr(layer, "num_workers", 1) * getattr(layer, "replicas", 1))


def lerp_rows(params, olds: list[Tensor], scale: Tensor, groups: int) -> None:
    """``p <- lerp(p_old, p_new, s)`` row by row for parameters whose rows (dim 0) fall into
    ``groups`` equal groups (workers, agents): a parameter with one row per entry of ``scale`` takes
    it as is, any other each group's first value."""
    scale = scale.reshape(-1)
    with torch.no_grad():
        for p, old in zip(params, olds):
            rows = p.shape[0]
            s = scale if rows == scale.numel() else scale.view(groups, -1)[:, 0].repeat_interleave(rows // groups)
            p.copy_(torch.lerp(old, p, s.view(-1, *([1] * (p.dim() - 1))).to(old.dtype)))
