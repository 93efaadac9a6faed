"""Workers: groups of ``k`` units of a layer, batched so a layer's ``W`` workers are one tensor op.

A fully connected layer of width ``n = W * k`` is an ordinary ``(n, in)`` weight whose rows
``[w*k, (w+1)*k)`` belong to worker ``w``. Its pre-activation ``(B, n)`` viewed as ``(B, W, k)``
gives every worker's output at once; through the output activation those ``k`` units are the
worker's prediction (no extra parameters).

Conv layers follow the same rule along channels: a :class:`WorkerConv2d` of ``W * k`` filters is one
convolution whose output ``(B, W*k, H, W')`` is globally average-pooled to ``(B, W, k)`` (filter-wise
workers). A :class:`WorkerBlock` is ``W`` parallel blocks of conv layers (VGG-style, residual, or
ResNet's basic block with a norm after every conv), run as grouped convolutions, each block one
worker (block-wise workers; ``W = 1`` is the paper's block).

Every worker layer offers the same two methods the network uses: ``forward_path(x, path)`` for the
pre-activation under a :data:`GradientPath`, and ``workers(h)`` for the ``(R, B, W, k)`` worker view.

**Replicas.** Every layer holds ``R`` independent copies of itself (a population: seeds or
hyperparameter variants trained as one model), replica-major as :mod:`agentnet.replica` describes;
inside a block the grouped convolutions have ``R * W`` groups. Each layer's :class:`WorkerReadout`
turns its workers' outputs into predictions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agentnet.replica import GradientPath, ReplicaLinear, ReplicaNorm, reset_conv_rows, split_conv2d

__all__ = ["WorkerLinear", "WorkerConv2d", "WorkerBlock", "WorkerReadout"]


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


class _PooledWorkers:
    """The worker view of a conv layer (filter-wise or block-wise): each worker's output maps,
    average-pooled onto a ``pool x pool`` grid, are its prediction units."""

    replicas: int
    num_workers: int
    worker_size: int
    #: Activations are channel-folded ``(B, R*C, H, W)``.
    folded = True
    #: Side of the grid a worker's maps are average-pooled onto before it predicts (``model.worker_pool``).
    pool = 1

    @property
    def prediction_units(self) -> int:
        """Values per worker in :meth:`workers`: ``k * pool**2``."""
        return self.worker_size * self.pool**2

    def workers(self, h: Tensor) -> Tensor:
        """Average-pooled ``(B, R*W*k, H, W')`` maps as ``(R, B, W, k * pool**2)`` (``pool=1``: the
        global average, ``(R, B, W, k)``)."""
        pooled = h.mean((2, 3)) if self.pool == 1 else F.adaptive_avg_pool2d(h, self.pool)
        return pooled.reshape(h.shape[0], self.replicas, self.num_workers, -1).transpose(0, 1)


class WorkerConv2d(_PooledWorkers, nn.Conv2d):
    """A conv layer of ``num_workers`` filter-wise workers of ``worker_size`` filters each (per replica).

    Filters ``[w*k, (w+1)*k)`` belong to worker ``w``; its output maps, globally average-pooled, are
    its ``k`` prediction units (no extra parameters). Padding keeps the spatial size at stride 1.
    Replicas are convolution groups: input and output channels are folded ``(B, R*C, H, W)``.
    """

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
        reset_conv_rows(self, self.replicas, r)

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


class WorkerBlock(_PooledWorkers, nn.Module):
    """``num_workers`` parallel blocks of ``depth`` conv layers; each block is one block-wise worker.

    The first conv reads the whole input (every block sees every input channel); the following
    convs are grouped (``groups = W``), so a block's inner maps and output channels
    ``[w*k, (w+1)*k)`` depend only on its own filters. ``residual`` adds a shortcut (identity when
    the channel counts match and the stride is 1, else a 1x1 conv with the block's stride) before
    the network's activation; without it the block is VGG-style. With ``W = 1`` this is the LFNN
    paper's block-wise worker (a whole block of layers acting as one worker). Replicas multiply the
    groups (``R`` for the first conv and the shortcut, ``R * W`` after).

    ``norm`` (``batch`` or ``group``; ``none``: no norm inside the block) puts a normalisation after
    every conv and after a projection shortcut, as ResNet's basic block does (conv-norm-act-conv-norm,
    plus the normalised projection): with ``residual`` and ``depth=2`` that is He et al.'s
    ``BasicBlock`` split into ``W`` workers. Every statistic is per channel (``batch``) or per worker
    (``group``: one group per block), so a worker's normalisation never reads another worker's maps.
    ``bias=False`` drops the convs' biases (a norm right after a conv cancels them).

    Gradient paths: ``local`` detaches the block's input (nothing crosses a block boundary);
    ``split`` runs the block twice, once on the input and once on its detached copy, so local
    losses reach every layer of the block but never the layers below (one extra forward/backward
    of the block; ``bp`` and ``lfnn_local`` do not pay it). The second run leaves the batch norms'
    running statistics alone: the batch is the same, and counting it twice would shorten their
    averaging window.
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
        replicas: int = 1,
        norm: str = "none",
        bias: bool = True,
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
        convs = [nn.Conv2d(R * in_channels, R * widths[0], kernel_size, stride=stride, padding=pad, groups=R, bias=bias)]
        for i in range(1, depth):
            convs.append(nn.Conv2d(R * widths[i - 1], R * widths[i], kernel_size, padding=pad, groups=R * num_workers, bias=bias))
        self.convs = nn.ModuleList(convs)
        self.shortcut: nn.Module | None = None
        if residual:
            same = in_channels == out and stride == 1
            self.shortcut = nn.Identity() if same else nn.Conv2d(R * in_channels, R * out, 1, stride=stride, groups=R, bias=bias)
        # Registered after the convs and the shortcut (and absent without a norm), so blocks without
        # inner norms keep their parameter order and state-dict keys.
        self.norms = nn.ModuleList(
            ReplicaNorm(norm, w, num_workers, R) for w in (widths if norm != "none" else [])
        )
        """One normalisation after each conv (empty for ``norm="none"``)."""
        self.shortcut_norm: ReplicaNorm | None = (
            ReplicaNorm(norm, out, num_workers, R) if norm != "none" and isinstance(self.shortcut, nn.Conv2d) else None
        )
        """The projection shortcut's normalisation (``None``: identity shortcut, none, or no norm)."""

    def reset_replica(self, r: int) -> None:
        """Initialise replica ``r``'s filters (every conv in order, then the shortcut) and reset its
        norms to the identity (which draws no random numbers)."""
        for conv in [*self.convs, self.shortcut]:
            if isinstance(conv, nn.Conv2d):
                reset_conv_rows(conv, self.replicas, r)
        for norm in [*self.norms, self.shortcut_norm]:
            if norm is not None:
                norm.reset_replica(r)

    @property
    def input_weight(self) -> Tensor:
        """The weight that reads the block's input (for worker graphs)."""
        return self.convs[0].weight

    def forward(self, x: Tensor, update_stats: bool = True) -> Tensor:
        """The block's pre-activation output ``(B, R*W*k, H', W')`` (the network applies the
        activation); ``update_stats=False`` leaves the inner batch norms' running statistics alone."""
        h = x
        last = len(self.convs) - 1
        for i, conv in enumerate(self.convs):
            h = conv(h)
            if self.norms:
                h = self.norms[i](h, update_stats)
            if i < last:
                h = self.act(h)
        if self.shortcut is None:
            return h
        skip = self.shortcut(x)
        if self.shortcut_norm is not None:
            skip = self.shortcut_norm(skip, update_stats)
        return h + skip

    def forward_path(self, x: Tensor, path: GradientPath) -> tuple[Tensor, Tensor]:
        """Pre-activation as ``(z, z_local)``; see the class docstring for ``split``."""
        if path == "global":
            z = self(x)
            return z, z
        if path == "local":
            z = self(x.detach())
            return z, z
        return self(x), self(x.detach(), update_stats=False)


class WorkerReadout(nn.Module):
    """Maps a layer's worker outputs ``(R, B, W, k)`` to prediction logits ``(R, B, W, C)``.

    ``k = C``: the units are the logits (no parameters). Otherwise either a fixed random ``k -> C``
    projection (a buffer, no trained parameters) or, with ``head=True``, a small trained linear head
    per worker (``W * (k * C + C)`` extra parameters per replica, trained only by that worker's
    local loss). Replica ``r``'s projection or head is drawn from ``seeds[r]``.
    """

    def __init__(self, num_workers: int, worker_size: int, out_units: int, *, projection: bool, head: bool,
                 seeds: list[int] | tuple[int, ...] = (0,), required: bool = True):
        super().__init__()
        self.replicas = len(seeds)
        self.available = True
        """Whether the workers can predict. ``False`` only when ``required=False`` (a rule that reads
        no worker predictions) and ``k != C`` without a head or projection: calling it then fails."""
        self.worker_size, self.out_units = worker_size, out_units
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
        elif worker_size != out_units and not projection:
            if required:
                raise ValueError(
                    f"workers of {worker_size} units: worker predictions need k = {out_units} output units "
                    "(or set model.worker_projection=true for a fixed random projection, or "
                    "model.worker_head=true for a trained head per worker)"
                )
            self.available = False
        elif worker_size != out_units:
            self.register_buffer("projection", torch.stack([
                torch.randn(worker_size, out_units, generator=torch.Generator().manual_seed(s + 7919)) / math.sqrt(worker_size)
                for s in seeds
            ]))  # (R, k, C)

    def forward(self, workers: Tensor) -> Tensor:
        if not self.available:
            raise ValueError(
                f"workers of {self.worker_size} units cannot predict {self.out_units} classes: the network was built for a rule "
                "that reads no worker predictions (set model.worker_projection=true or model.worker_head=true to give them one)"
            )
        R, _, W, k = workers.shape
        if self.weight is not None:
            weight = self.weight.view(R, W, k, -1)
            return torch.einsum("rbwk,rwkc->rbwc", workers, weight) + self.bias.view(R, 1, W, -1)
        return workers if self.projection is None else workers @ self.projection.unsqueeze(1)
