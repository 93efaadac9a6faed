"""The parts a :class:`~agentnet.network.WorkerNetwork` is read through: its blocks, its output
head, and what a training forward pass records.

A :class:`Block` is one worker layer with what belongs to it — the plain layers in front of it
(its *stem*), its normalisation, what follows its activation (pool, dropout, flatten) and its
workers' read-out. The :class:`OutputHead` is the output block (its stem and the output layer)
and owns what reads the logits: the task loss, the prediction and the logit mask. A
:class:`BlockHook` is a learning rule's own step inside every block of
:meth:`~agentnet.network.WorkerNetwork.forward_record`.

Blocks and the head are views over the network's modules, not modules: the parameters stay
where the network registers them (their state-dict keys and creation order are the network's).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch.nn.functional as F
from torch import Tensor, nn

from agentnet.replica import GradientPath, ReplicaLinear, ReplicaNorm
from agentnet.workers import WorkerReadout

__all__ = ["LayerRecord", "ForwardRecord", "PlainLayers", "Block", "OutputHead", "BlockHook", "WorkerLosses", "NO_HOOK"]


@dataclass
class LayerRecord:
    """One block's view of a training forward pass."""

    workers: Tensor
    """Worker outputs ``(R, B, W, k)`` whose gradient reaches only this layer."""
    worker_loss: Tensor | None = None
    """Per-sample prediction loss ``e`` ``(R, B, W)``; ``None`` when not requested."""
    leaders: Tensor | None = None
    """Leader mask, bool ``(R, W)`` or ``(R, B, W)`` (sample mode)."""
    best: Tensor | None = None
    """Index of the best leader, ``(R,)`` or ``(R, B)``."""
    activation: Tensor | None = None
    """The layer's activation ``(R, B, n)`` (channel-folded ``(B, R*n, H, W)`` for conv layers), before any pooling."""
    aligned: Tensor | None = None
    """Worker outputs ``(R, B, W, k)`` that followers align, when not :attr:`workers` (``model.align_from``)."""


@dataclass
class ForwardRecord:
    """A training forward pass: output logits plus one :class:`LayerRecord` per block."""

    logits: Tensor
    layers: list[LayerRecord] = field(default_factory=list)


class PlainLayers(nn.Module):
    """The plain layers (not split into workers) in front of a worker layer or the output layer.

    They belong to that layer's block: under the ``local`` gradient path the block's input — the
    first plain layer's input — is detached, and the gradient flows freely inside the block, so the
    block's losses train them and nothing crosses the block boundary.
    """

    def __init__(self, activation: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.act = activation
        self.layers, self.norms, self.post = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()

    def append(self, layer: nn.Module, norm: nn.Module, post: nn.Module) -> None:
        self.layers.append(layer)
        self.norms.append(norm)
        self.post.append(post)

    def __len__(self) -> int:
        return len(self.layers)

    def reset_replica(self, r: int) -> None:
        for layer, norm in zip(self.layers, self.norms):
            layer.reset_replica(r)
            if isinstance(norm, ReplicaNorm):
                norm.reset_replica(r)

    def forward(self, x: Tensor) -> Tensor:
        for layer, norm, post in zip(self.layers, self.norms, self.post):
            x = post(self.act(norm(layer(x))))
        return x

    def enter_block(self, x: Tensor, path: GradientPath) -> tuple[Tensor, GradientPath]:
        """Run the plain layers on a block's input ``x``; returns their output and the gradient path
        for the block's worker (or output) layer. ``local`` detaches the block's input here, so
        inside the block the gradient flows (``global``); ``split`` keeps the worker layer's own
        split (plain layers then learn from the global loss only, as BP would train them)."""
        if not len(self):
            return x, path
        if path == "local":
            return self(x.detach()), "global"
        return self(x), path


@dataclass(frozen=True)
class Block:
    """One worker layer of a network with the modules that belong to it (a view, see the module docstring)."""

    index: int
    """Position among the network's blocks (worker layers), from the input."""
    stem: PlainLayers
    """Plain layers in front of the worker layer (often none)."""
    layer: nn.Module
    """The worker layer (:class:`~agentnet.workers.WorkerLinear`, ``WorkerConv2d`` or ``WorkerBlock``)."""
    norm: nn.Module
    """Normalisation between pre-activation and activation (or identity)."""
    post: nn.Module
    """What follows the activation: max-pool, dropout, flatten, or nothing."""
    readout: WorkerReadout
    """Worker outputs ``(R, B, W, k)`` -> prediction logits ``(R, B, W, C)``."""
    head: OutputHead
    """The network's output head (the loss its workers' predictions are scored with)."""

    def worker_loss(self, workers: Tensor, y: Tensor) -> Tensor:
        """Per-sample prediction loss ``(R, B, W)`` of the block's workers ``(R, B, W, k)`` for labels ``(R, B)``."""
        return self.head.worker_losses(self.readout(workers), y)


class OutputHead:
    """The output block — its plain layers and the output layer — and what reads its logits: the
    task loss, the prediction and the logit mask (task-incremental heads)."""

    def __init__(self, stem: PlainLayers, layer: ReplicaLinear, activation: str, replicas: int) -> None:
        self.stem = stem
        self.layer = layer
        self.activation = activation
        """``softmax`` (``C`` logits) or ``sigmoid`` (one logit of a binary task)."""
        self.replicas = replicas
        self.logit_mask: Tensor | None = None
        """Boolean ``(C,)`` (or per example ``(R, B, C)``) of the classes the output may predict
        (task-incremental heads); ``None``: all."""

    def __call__(self, x: Tensor, path: GradientPath = "global") -> Tensor:
        """Output logits ``(R, B, C)`` of the last block's output ``x`` under a gradient path."""
        x, out_path = self.stem.enter_block(x, path)
        return self.layer(x.detach() if out_path == "local" else x)

    @contextlib.contextmanager
    def logit_mask_as(self, mask: Tensor | None) -> Iterator[None]:
        """Within the block, restrict predictions to ``mask``'s classes (``None``: all); restored after."""
        saved, self.logit_mask = self.logit_mask, mask
        try:
            yield
        finally:
            self.logit_mask = saved

    def _masked(self, logits: Tensor) -> Tensor:
        # Task-incremental heads: classes outside the active task never win and get no gradient.
        return logits if self.logit_mask is None else logits.masked_fill(~self.logit_mask, float("-inf"))

    def labels(self, y: Tensor) -> Tensor:
        """Labels ``(R, B)``; ``(B,)`` labels of a batch shared by every replica are broadcast."""
        return y.unsqueeze(0).expand(self.replicas, -1) if y.dim() == 1 else y

    def sample_losses(self, logits: Tensor, y: Tensor) -> Tensor:
        """The task loss of every example ``(R, B)``: cross-entropy (BCE for a sigmoid output) of
        logits ``(R, B, C)`` against labels ``(R, B)`` (or ``(B,)``)."""
        R, B = logits.shape[:2]
        y = self.labels(y)
        if self.activation == "softmax":
            return F.cross_entropy(self._masked(logits).reshape(R * B, -1), y.reshape(-1), reduction="none").view(R, B)
        return F.binary_cross_entropy_with_logits(logits[..., 0], y.to(logits.dtype), reduction="none")

    def global_loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """The task loss per replica ``(R,)``: the mean of :meth:`sample_losses`. Replicas' losses
        are independent, so the gradient of their sum is each replica's own gradient."""
        return self.sample_losses(logits, y).mean(1)

    def predict(self, logits: Tensor) -> Tensor:
        """Class predictions ``(R, B)`` from output logits ``(R, B, C)``."""
        if self.activation == "softmax":
            return self._masked(logits).argmax(-1)
        return (logits[..., 0] > 0).long()

    def worker_losses(self, logits: Tensor, y: Tensor) -> Tensor:
        """Per-sample, per-worker prediction losses ``(R, B, W)`` from worker logits ``(R, B, W, C)``
        and labels ``(R, B)``: cross-entropy over the ``C`` logits (BCE of the one logit for a
        sigmoid output). The logit mask does not apply: workers predict every class."""
        R, B, W, C = logits.shape
        if self.activation == "softmax":
            # Classes on dim 1: CPU softmax over a short innermost dim is several times slower.
            flat = logits.reshape(R * B, W, C).transpose(1, 2)
            return F.cross_entropy(flat, y.reshape(-1, 1).expand(-1, W), reduction="none").view(R, B, W)
        target = y.to(logits.dtype).view(R, B, 1).expand(R, B, W)
        return F.binary_cross_entropy_with_logits(logits[..., 0], target, reduction="none")


class BlockHook:
    """A learning rule's own step inside every block of ``forward_record``; the base does nothing.

    ``activation`` sees the block's activation first (it may replace it: activity-perturbed forward
    gradients add their tangent there); ``recorded`` then sees the block's record, with the worker
    outputs filled in, and returns the activation the record keeps and the next block reads.
    """

    def activation(self, block: Block, h: Tensor) -> Tensor:
        """The block's activation ``h`` as the pass goes on with it."""
        return h

    def recorded(self, block: Block, record: LayerRecord, h: Tensor, y: Tensor | None) -> Tensor:
        """Complete ``record`` (labels ``y`` ``(R, B)``, ``None`` without labels); returns the activation fed forward."""
        return h


class WorkerLosses(BlockHook):
    """Records every worker's prediction loss (``LayerRecord.worker_loss``) when labels are given."""

    def recorded(self, block: Block, record: LayerRecord, h: Tensor, y: Tensor | None) -> Tensor:
        if y is not None:
            record.worker_loss = block.worker_loss(record.workers, y)
        return h


#: The hook of a pass with no rule-specific step.
NO_HOOK = BlockHook()
