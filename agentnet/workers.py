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
pre-activation under a :data:`GradientPath`, and ``workers(h)`` for the ``(R, B, W, k)`` worker view.

**Replicas.** Every layer holds ``R`` independent copies of itself (a population: seeds or
hyperparameter variants trained as one model). Every parameter and buffer is *replica-major* along
its first dimension: replica ``r`` owns rows ``[r * rows // R, (r + 1) * rows // R)``, so with
``R = 1`` the shapes are the ordinary ones. Fully connected activations are ``(R, B, n)`` and run
as one batched matmul; conv activations are channel-folded ``(B, R * C, H, W)`` and run as one
grouped convolution (``groups = R``, times ``W`` inside a block). Replicas never mix: each
replica's gradients depend only on its own parameters and data.
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
    "ReplicaLinear",
    "WorkerLinear",
    "WorkerConv2d",
    "WorkerBlock",
    "WorkerReadout",
    "WorkerPredictor",
    "ReplicaNorm",
    "LeaderSelection",
    "lerp_update",
    "replica_rows",
    "replica_randn",
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


def _init_linear_rows(weight: Tensor, bias: Tensor | None) -> None:
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
        _init_linear_rows(self.weight[rows], None if self.bias is None else self.bias[rows])

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


class WorkerLinear(ReplicaLinear):
    """A fully connected layer of ``num_workers`` workers of ``worker_size`` units each (per replica)."""

    #: Activations are ``(R, B, n)`` (conv layers fold replicas into channels instead).
    folded = False

    def __init__(self, in_features: int, num_workers: int, worker_size: int, replicas: int = 1, bias: bool = True) -> None:
        super().__init__(in_features, num_workers * worker_size, replicas, bias)
        self.num_workers = num_workers
        self.worker_size = worker_size

    @property
    def prediction_units(self) -> int:
        """Values per worker in :meth:`workers`: its ``k`` units."""
        return self.worker_size

    def workers(self, z: Tensor) -> Tensor:
        """View a ``(R, B, n)`` layer output as ``(R, B, W, k)``."""
        return z.view(*z.shape[:2], self.num_workers, self.worker_size)


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


def _pooled_workers(h: Tensor, replicas: int, num_workers: int, pool: int = 1) -> Tensor:
    """Average pool of channel-folded ``(B, R*W*k, H, W')`` maps onto a ``pool x pool`` grid, as
    ``(R, B, W, k * pool**2)`` (``pool=1``: the global average, ``(R, B, W, k)``)."""
    pooled = h.mean((2, 3)) if pool == 1 else F.adaptive_avg_pool2d(h, pool)
    return pooled.reshape(h.shape[0], replicas, num_workers, -1).transpose(0, 1)


def _reset_conv_rows(conv: nn.Conv2d, replicas: int, r: int) -> None:
    """Initialise replica ``r``'s output channels of a replica-grouped convolution."""
    n = conv.out_channels // replicas
    rows = slice(r * n, (r + 1) * n)
    _init_linear_rows(conv.weight[rows], None if conv.bias is None else conv.bias[rows])


class WorkerConv2d(nn.Conv2d):
    """A conv layer of ``num_workers`` filter-wise workers of ``worker_size`` filters each (per replica).

    Filters ``[w*k, (w+1)*k)`` belong to worker ``w``; its output maps, globally average-pooled, are
    its ``k`` prediction units (no extra parameters). Padding keeps the spatial size at stride 1.
    Replicas are convolution groups: input and output channels are folded ``(B, R*C, H, W)``.
    """

    folded = True

    def __init__(
        self, in_channels: int, num_workers: int, worker_size: int, kernel_size: int = 3, stride: int = 1, bias: bool = True,
        replicas: int = 1,
    ) -> None:
        super().__init__(replicas * in_channels, replicas * num_workers * worker_size, kernel_size, stride=stride,
                         padding=kernel_size // 2, bias=bias, groups=replicas)
        self.replicas = replicas
        self.num_workers = num_workers
        self.worker_size = worker_size

    def reset_replica(self, r: int) -> None:
        """Initialise replica ``r`` from the global torch generator (``nn.Conv2d``'s default)."""
        _reset_conv_rows(self, self.replicas, r)

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

    #: Side of the grid a worker's maps are average-pooled onto before it predicts (``model.worker_pool``).
    pool = 1

    @property
    def prediction_units(self) -> int:
        """Values per worker in :meth:`workers`: ``k * pool**2``."""
        return self.worker_size * self.pool**2

    def workers(self, h: Tensor) -> Tensor:
        """Average-pooled ``(B, R*W*k, H, W')`` maps as ``(R, B, W, k * pool**2)`` (global average: ``(R, B, W, k)``)."""
        return _pooled_workers(h, self.replicas, self.num_workers, self.pool)


class WorkerBlock(nn.Module):
    """``num_workers`` parallel blocks of ``depth`` conv layers; each block is one block-wise worker.

    The first conv reads the whole input (every block sees every input channel); the following
    convs are grouped (``groups = W``), so a block's inner maps and output channels
    ``[w*k, (w+1)*k)`` depend only on its own filters. ``residual`` adds a shortcut (identity when
    the channel counts match, else a 1x1 conv) before the network's activation, as in ResNet's
    basic block; without it the block is VGG-style. With ``W = 1`` this is the LFNN paper's
    block-wise worker (a whole block of layers acting as one worker). Replicas multiply the groups
    (``R`` for the first conv and the shortcut, ``R * W`` after).

    Gradient paths: ``local`` detaches the block's input (nothing crosses a block boundary);
    ``split`` runs the block twice, once on the input and once on its detached copy, so local
    losses reach every layer of the block but never the layers below (one extra forward/backward
    of the block; ``bp`` and ``lfnn_local`` do not pay it).
    """

    folded = True

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
        replicas: int = 1,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"block depth={depth}: must be >= 1")
        self.replicas = replicas
        self.num_workers = num_workers
        self.worker_size = worker_size
        self.act = activation
        R = replicas
        inner = (width or worker_size) * num_workers
        out = num_workers * worker_size
        pad = kernel_size // 2
        widths = [inner] * (depth - 1) + [out]
        convs = [nn.Conv2d(R * in_channels, R * widths[0], kernel_size, stride=stride, padding=pad, groups=R)]
        for i in range(1, depth):
            convs.append(nn.Conv2d(R * widths[i - 1], R * widths[i], kernel_size, padding=pad, groups=R * num_workers))
        self.convs = nn.ModuleList(convs)
        self.shortcut: nn.Module | None = None
        if residual:
            same = in_channels == out and stride == 1
            self.shortcut = nn.Identity() if same else nn.Conv2d(R * in_channels, R * out, 1, stride=stride, groups=R)

    def reset_replica(self, r: int) -> None:
        """Initialise replica ``r``'s filters (every conv in order, then the shortcut)."""
        for conv in [*self.convs, self.shortcut]:
            if isinstance(conv, nn.Conv2d):
                _reset_conv_rows(conv, self.replicas, r)

    @property
    def input_weight(self) -> Tensor:
        """The weight that reads the block's input (for worker graphs)."""
        return self.convs[0].weight

    def forward(self, x: Tensor) -> Tensor:
        """The block's pre-activation output ``(B, R*W*k, H', W')`` (the network applies the activation)."""
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

    #: Side of the grid a worker's maps are average-pooled onto before it predicts (``model.worker_pool``).
    pool = 1

    @property
    def prediction_units(self) -> int:
        """Values per worker in :meth:`workers`: ``k * pool**2``."""
        return self.worker_size * self.pool**2

    def workers(self, h: Tensor) -> Tensor:
        """Average-pooled block outputs as ``(R, B, W, k * pool**2)`` (global average: ``(R, B, W, k)``)."""
        return _pooled_workers(h, self.replicas, self.num_workers, self.pool)


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
            y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, momentum, 1e-5)
        else:
            y = F.group_norm(x, self.replicas * self.groups, self.weight, self.bias, 1e-5)
        return y.view(h.shape[1], self.replicas, -1).transpose(0, 1) if flat else y

    def extra_repr(self) -> str:
        return f"{self.kind}, channels={self.channels}, groups={self.groups}, replicas={self.replicas}"


class WorkerReadout(nn.Module):
    """Maps a layer's worker outputs ``(R, B, W, k)`` to prediction logits ``(R, B, W, C)``.

    ``k = C``: the units are the logits (no parameters). Otherwise either a fixed random ``k -> C``
    projection (a buffer, no trained parameters) or, with ``head=True``, a small trained linear head
    per worker (``W * (k * C + C)`` extra parameters per replica, trained only by that worker's
    local loss). Replica ``r``'s projection or head is drawn from ``seeds[r]``.
    """

    def __init__(self, num_workers: int, worker_size: int, out_units: int, *, projection: bool, head: bool,
                 seeds: list[int] | tuple[int, ...] = (0,)):
        super().__init__()
        self.replicas = len(seeds)
        self.weight: nn.Parameter | None = None
        self.register_buffer("projection", None)
        if head:
            bound = 1 / math.sqrt(worker_size)
            heads = [
                (torch.rand(num_workers, worker_size, out_units, generator=torch.Generator().manual_seed(s + 104729)) * 2 - 1) * bound
                for s in seeds
            ]
            self.weight = nn.Parameter(torch.cat(heads))  # (R*W, k, C)
            self.bias = nn.Parameter(torch.zeros(self.replicas * num_workers, out_units))
        elif worker_size != out_units:
            if not projection:
                raise ValueError(
                    f"workers of {worker_size} units: worker predictions need k = {out_units} output units "
                    "(or set model.worker_projection=true for a fixed random projection, or "
                    "model.worker_head=true for a trained head per worker)"
                )
            self.register_buffer("projection", torch.stack([
                torch.randn(worker_size, out_units, generator=torch.Generator().manual_seed(s + 7919)) / math.sqrt(worker_size)
                for s in seeds
            ]))  # (R, k, C)

    def forward(self, workers: Tensor) -> Tensor:
        R, _, W, k = workers.shape
        if self.weight is not None:
            weight = self.weight.view(R, W, k, -1)
            return torch.einsum("rbwk,rwkc->rbwc", workers, weight) + self.bias.view(R, 1, W, -1)
        return workers if self.projection is None else workers @ self.projection.unsqueeze(1)


class WorkerPredictor(nn.Module):
    """Per-sample, per-worker prediction losses ``e`` ``(R, B, W)`` from worker logits ``(R, B, W, C)``.

    Softmax output: cross-entropy over the ``C`` logits; sigmoid output (binary): BCE of the one
    logit. Parameter-free; the ``k -> C`` step is the layer's :class:`WorkerReadout`.
    """

    def __init__(self, output_activation: str):
        super().__init__()
        self.output_activation = output_activation

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """Per-sample, per-worker prediction loss ``(R, B, W)`` for labels ``y`` ``(R, B)``."""
        R, B, W, C = logits.shape
        if self.output_activation == "softmax":
            # Classes on dim 1: CPU softmax over a short innermost dim is several times slower.
            flat = logits.reshape(R * B, W, C).transpose(1, 2)
            return F.cross_entropy(flat, y.reshape(-1, 1).expand(-1, W), reduction="none").view(R, B, W)
        target = y.to(logits.dtype).view(R, B, 1).expand(R, B, W)
        return F.binary_cross_entropy_with_logits(logits[..., 0], target, reduction="none")


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
    groups = getattr(layer, "num_workers", 1) * getattr(layer, "replicas", 1)
    scale = scale.reshape(-1)
    with torch.no_grad():
        for p, old in zip(layer.parameters(), olds):
            rows = p.shape[0]
            s = scale if rows == scale.numel() else scale.view(groups, -1)[:, 0].repeat_interleave(rows // groups)
            p.copy_(torch.lerp(old, p, s.view(-1, *([1] * (p.dim() - 1))).to(old.dtype)))


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
        mean = losses.mean(1)  # (R, W)
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
        self.epoch_counts = state["epoch_counts"]
        self._epoch_start = [c.to(device) for c in state["epoch_start"]]
        self._loss_sum = [c.to(device) for c in state["loss_sum"]]
        self._loss_batches = state["loss_batches"]
        self._fixed = [None if f is None else f.to(device) for f in state["fixed"]]
