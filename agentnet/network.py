"""The worker network: hidden worker layers (conv, block, fully connected) and an output layer.

Hidden layers are :class:`~agentnet.workers.WorkerConv2d` (filter-wise workers),
:class:`~agentnet.workers.WorkerBlock` (block-wise workers) and
:class:`~agentnet.workers.WorkerLinear` (neuron groups), in that order; each may be followed by a
max-pool, and the maps are flattened (or, with ``model.global_pool``, averaged over their pixels)
before the first fully connected layer. Inputs arrive flat ``(R, B, D)`` — one batch per replica; a
``(B, D)`` batch is shared by all replicas — (datasets and continual streams stay flat, so
permutations are gathers) and are viewed as images when the first layer is a convolution.

A network holds ``R`` replicas (``seeds``, one per replica; see :mod:`agentnet.workers`): replica
``r`` is initialised exactly as a one-replica network built with ``seeds[r]``, so a population
trains the same networks as ``R`` separate runs, in one batched model. Outputs are ``(R, B, C)``.

The network is read as a sequence of :class:`~agentnet.blocks.Block` (:meth:`WorkerNetwork.blocks`)
and an :class:`~agentnet.blocks.OutputHead` (:attr:`WorkerNetwork.head`: the output layer, the task
loss, the prediction, the logit mask). ``forward`` is the plain inference pass. ``forward_record``
is the training pass that strategies use: every block under one
:data:`~agentnet.replica.GradientPath`, its worker outputs recorded, and in every block the
rule's own :class:`~agentnet.blocks.BlockHook` (worker losses, leader selection, perturbations).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agentnet.blocks import NO_HOOK, Block, BlockHook, ForwardRecord, LayerRecord, OutputHead, PlainLayers
from agentnet.config import ModelConfig
from agentnet.replica import GradientPath, ReplicaLinear, ReplicaNorm
from agentnet.workers import WorkerBlock, WorkerConv2d, WorkerLinear, WorkerReadout

__all__ = ["LayerRecord", "ForwardRecord", "WorkerNetwork", "build_model", "eval_mode", "image_shape"]

_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Within the block the model is in evaluation mode (batch normalisation uses its running
    statistics and leaves them alone, dropout is off); its previous mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def image_shape(input_dim: int, channels: int) -> tuple[int, int, int]:
    """``(channels, s, s)`` for a flat input of ``input_dim`` values; fails clearly when not square."""
    side = math.isqrt(input_dim // channels) if input_dim % channels == 0 else 0
    if side * side * channels != input_dim:
        raise ValueError(
            f"model.in_channels={channels}: a conv model needs square images, but {input_dim} input values "
            f"are not {channels} x s x s"
        )
    return channels, side, side


class _ReplicaFlatten(nn.Module):
    """Channel-folded maps ``(B, R*C, H, W)`` -> per-replica flat features ``(R, B, C*H*W)``."""

    def __init__(self, replicas: int) -> None:
        super().__init__()
        self.replicas = replicas

    def forward(self, h: Tensor) -> Tensor:
        return h.reshape(h.shape[0], self.replicas, -1).transpose(0, 1)


class WorkerNetwork(nn.Module):
    """A network whose hidden layers (conv, block and fully connected) are split into workers,
    held as ``len(seeds)`` independent replicas."""

    def __init__(self, input_dim: int, num_classes: int, cfg: ModelConfig, seeds: int | list[int] = 0,
                 predictions: bool = True) -> None:
        super().__init__()
        seeds = [seeds] if isinstance(seeds, int) else list(seeds)
        if not seeds:
            raise ValueError("a network needs at least one replica (one seed)")
        self.seeds = seeds
        self.replicas = R = len(seeds)
        self.cfg = cfg
        self.num_classes = num_classes
        self.act = _ACTIVATIONS[cfg.activation]
        out_units = num_classes if cfg.output_activation == "softmax" else 1
        if cfg.output_activation == "sigmoid" and num_classes != 2:
            raise ValueError(f"model.output_activation='sigmoid' needs a binary task, got {num_classes} classes")
        self.image_shape = image_shape(input_dim, cfg.in_channels) if cfg.conv else None
        cfg.check_workers(predictions)
        self.predictions = predictions
        """Whether every worker can predict (``False``: built for a rule that reads no worker
        predictions, whose layers may be single workers of any width without a read-out)."""
        self.channels_last = False
        """Conv inputs are made channels-last (set with the weights' layout, ``trainer.channels_last``)."""
        layers, features = _conv_layers(cfg, self.image_shape, self.act, R, predictions) if self.image_shape else ([], input_dim)
        features = _fc_layers(cfg, features, R, layers, predictions)
        hidden, norms, post, stems = _into_blocks(layers, self.act)
        # Where the modules are registered (their names are the state-dict keys); read them
        # through blocks() and head.
        self.hidden = nn.ModuleList(hidden)
        """The worker layers, in order."""
        self.norms = nn.ModuleList(norms)
        self.post = nn.ModuleList(post)
        self.stems = nn.ModuleList(stems)
        """Plain layers before each worker layer, and (last) before the output layer."""
        self.output = ReplicaLinear(features, out_units, R)
        self.head = OutputHead(self.stems[-1], self.output, cfg.output_activation, R)
        """The output block and what reads its logits (loss, prediction, logit mask)."""
        for layer in hidden:
            if layer.folded:  # conv workers predict from maps pooled onto a worker_pool x worker_pool grid
                layer.pool = cfg.worker_pool
        self.readouts = nn.ModuleList(
            WorkerReadout(layer.num_workers, layer.prediction_units, out_units, projection=cfg.worker_projection, head=cfg.worker_head,
                          seeds=[s + i for s in seeds], required=predictions)
            for i, layer in enumerate(hidden)
        )
        """Per hidden layer, worker outputs ``(R, B, W, k)`` -> prediction logits ``(R, B, W, C)``."""
        # Replica r starts exactly where a one-replica network seeded with seeds[r] starts.
        for r, seed in enumerate(seeds):
            torch.manual_seed(seed)
            for stem, layer, norm in zip(self.stems, [*self.hidden, self.output], [*self.norms, None]):
                stem.reset_replica(r)
                layer.reset_replica(r)
                if isinstance(norm, ReplicaNorm):
                    norm.reset_replica(r)
        if cfg.init == "he_uniform":
            _he_uniform([*self.stems, *self.hidden, self.output])
        self.aux = nn.ModuleDict()
        """Modules a strategy adds to the network (e.g. local greedy heads): trained by the same
        optimiser and saved in the same checkpoint, but not counted in :attr:`num_params`."""

    @property
    def num_params(self) -> int:
        """Trainable parameters of one replica of the network itself (strategy-added ``aux`` modules excluded)."""
        aux = {id(p) for p in self.aux.parameters()}
        return sum(p.numel() for p in self.parameters() if p.requires_grad and id(p) not in aux) // self.replicas

    def _normalized(self, workers: Tensor) -> Tensor:
        """Worker outputs ``(R, B, W, k)`` as they predict and are aligned (``model.worker_norm``)."""
        if self.cfg.worker_norm == "none":
            return workers
        # Standardised over the worker's own k units: no gradient reaches another worker, and the
        # local losses cannot be lowered by scaling the output up.
        return self.cfg.worker_logit_scale * F.layer_norm(workers, workers.shape[-1:], eps=1e-5)

    def blocks(self) -> list[Block]:
        """The network's blocks (one per worker layer), from the input; the output block is :attr:`head`."""
        return [
            Block(i, stem, layer, norm, post, readout, self.head)
            for i, (stem, layer, norm, post, readout) in enumerate(zip(self.stems, self.hidden, self.norms, self.post, self.readouts))
        ]

    @property
    def workers_per_layer(self) -> list[int]:
        return [layer.num_workers for layer in self.hidden]

    def inputs(self, x: Tensor) -> Tensor:
        """Flat ``(R, B, D)`` inputs (``(B, D)``: the same batch for every replica); for conv models
        channel-folded images ``(B, R*C, s, s)`` (channels-last when the model is)."""
        R = self.replicas
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(R, *x.shape)
        elif x.dim() != 3 or x.shape[0] != R:
            raise ValueError(f"inputs must be (B, D) or (replicas={R}, B, D), got {tuple(x.shape)}")
        if self.image_shape is None:
            return x
        B = x.shape[1]
        x = x.reshape(R, B, *self.image_shape).transpose(0, 1).reshape(B, R * self.image_shape[0], *self.image_shape[1:])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Inference: output logits ``(R, B, C)`` (``(R, B, 1)`` for a sigmoid output)."""
        x = self.inputs(x)
        for block in self.blocks():
            x = block.post(self.act(block.norm(block.layer(block.stem(x)))))
        return self.head(x)

    def forward_record(self, x: Tensor, y: Tensor | None = None, *, path: GradientPath = "global",
                       hook: BlockHook = NO_HOOK) -> ForwardRecord:
        """Training forward pass: every block (and the output) under the gradient ``path``, each
        block's worker outputs recorded, and the rule's ``hook`` run in every block (with the labels
        ``y`` as ``(R, B)``, when given)."""
        records = []
        x = self.inputs(x)
        if y is not None:
            y = self.head.labels(y)
        for block in self.blocks():
            x, layer_path = block.stem.enter_block(x, path)
            z, z_local = _normalize(block.norm, *block.layer.forward_path(x, layer_path))
            h = hook.activation(block, self.act(z))
            if self.cfg.predict_from == "activation":
                local = h if z_local is z else self.act(z_local)  # one activation unless the paths split
            else:
                local = z_local
            record = LayerRecord(workers=self._normalized(block.layer.workers(local)))
            if self.cfg.align_from not in (None, self.cfg.predict_from):
                aligned = self.act(z_local) if self.cfg.align_from == "activation" else z_local
                record.aligned = self._normalized(block.layer.workers(aligned))
            record.activation = h = hook.recorded(block, record, h, y)
            records.append(record)
            x = block.post(h)
        return ForwardRecord(logits=self.head(x, path), layers=records)



#: One hidden layer as it is built: (plain?, layer, norm, what follows its activation).
_Layer = tuple[bool, nn.Module, nn.Module, nn.Module]


def _conv_layers(cfg: ModelConfig, shape: tuple[int, int, int], activation, R: int, predictions: bool) -> tuple[list[_Layer], int]:
    """The conv layers of ``cfg.conv`` for images of ``shape``, the last one flattening; and the
    number of features they output (``predictions``: see :meth:`ModelConfig.units_per_worker`)."""
    channels, side = shape[0], shape[1]
    layers: list[_Layer] = []
    for spec in cfg.conv:
        if spec.plain:  # one "worker" of every filter: a replica-grouped plain convolution
            layer = WorkerConv2d(channels, 1, spec.channels, spec.kernel_size, spec.stride, spec.bias, replicas=R)
        elif spec.block == "none":
            k = cfg.units_per_worker(spec.channels, predictions, "conv channels")
            layer = WorkerConv2d(channels, spec.channels // k, k, spec.kernel_size, spec.stride, spec.bias, replicas=R)
        else:
            layer = WorkerBlock(
                channels,
                spec.workers,
                spec.channels // spec.workers,
                width=spec.width,
                depth=spec.depth,
                residual=spec.block in ("residual", "basic"),
                kernel_size=spec.kernel_size,
                stride=spec.stride,
                activation=activation,
                replicas=R,
                norm=spec.norm if spec.block == "basic" else "none",
                bias=spec.bias,
            )
        side = (side - 1) // spec.stride + 1
        if spec.pool > 1:
            if side < spec.pool:
                raise ValueError(f"model.conv.pool={spec.pool}: the maps are only {side} pixels wide there")
            side //= spec.pool
        groups = spec.channels // cfg.worker_size if spec.plain else layer.num_workers
        post = [nn.MaxPool2d(spec.pool)] if spec.pool > 1 else []
        post += [nn.Dropout(spec.dropout)] if spec.dropout > 0 else []
        # A basic block normalises inside (after every conv); its sum goes straight to the activation.
        norm = nn.Identity() if spec.block == "basic" else _norm(spec.norm, spec.channels, groups, R)
        layers.append((spec.plain, layer, norm, nn.Sequential(*post)))
        channels = spec.channels
    last = layers[-1]
    if cfg.global_pool:  # ResNet's head: one average per channel, whatever the input size
        layers[-1] = (*last[:3], nn.Sequential(*last[3], nn.AdaptiveAvgPool2d(1), _ReplicaFlatten(R)))
        return layers, channels
    layers[-1] = (*last[:3], nn.Sequential(*last[3], _ReplicaFlatten(R)))
    return layers, channels * side * side


def _fc_layers(cfg: ModelConfig, features: int, R: int, layers: list[_Layer], predictions: bool) -> int:
    """Append the fully connected layers of ``cfg.hidden`` to ``layers``; returns the last width."""
    for index, width in enumerate(cfg.hidden):
        plain = index in cfg.hidden_plain
        k = cfg.worker_size if plain else cfg.units_per_worker(width, predictions)
        layer = ReplicaLinear(features, width, R) if plain else WorkerLinear(features, width // k, k, R)
        post = nn.Dropout(cfg.hidden_dropout) if cfg.hidden_dropout > 0 else nn.Identity()
        layers.append((plain, layer, _norm(cfg.hidden_norm, width, width // k, R), post))
        features = width
    return features


def _into_blocks(layers: list[_Layer], activation) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module], list[PlainLayers]]:
    """The worker layers, their norms and post-processing, and the stems (one per worker layer,
    then the output's): plain layers join the block of the next worker layer."""
    hidden, norms, post, stems, stem = [], [], [], [], PlainLayers(activation)
    for plain, layer, norm, after in layers:
        if plain:
            stem.append(layer, norm, after)
            continue
        stems.append(stem)
        stem = PlainLayers(activation)
        hidden.append(layer)
        norms.append(norm)
        post.append(after)
    stems.append(stem)
    return hidden, norms, post, stems


def _he_uniform(modules: list[nn.Module]) -> None:
    """He-uniform weights (``±sqrt(6/fan_in)``) and zero biases for every weight layer in ``modules``:
    the default draws (``±1/sqrt(fan_in)``, the same ``fan_in``) scaled by ``sqrt(6)``."""
    with torch.no_grad():
        for module in modules:
            for layer in module.modules():
                if isinstance(layer, (ReplicaLinear, nn.Conv2d)):
                    layer.weight.mul_(math.sqrt(6.0))
                    if layer.bias is not None:
                        layer.bias.zero_()


def _norm(kind: str, channels: int, groups: int, replicas: int) -> nn.Module:
    """A layer's normalisation (``model.conv.norm`` / ``model.hidden_norm``), identity for ``none``."""
    return nn.Identity() if kind == "none" else ReplicaNorm(kind, channels, groups, replicas)


def _normalize(norm: nn.Module, z: Tensor, z_local: Tensor) -> tuple[Tensor, Tensor]:
    """A layer's two pre-activation views through its normalisation; when the views are distinct
    (the ``split`` path) both are normalised, but batch statistics are updated once."""
    if not isinstance(norm, ReplicaNorm):
        return z, z_local
    if z_local is z:
        z = norm(z)
        return z, z
    return norm(z), norm(z_local, update_stats=False)


def build_model(cfg: ModelConfig, input_dim: int, num_classes: int, seeds: int | list[int] = 0,
                predictions: bool = True) -> WorkerNetwork:
    """Construct the model preset described by ``cfg`` for the data's dimensions, one replica per
    seed; ``predictions=False`` for a rule that reads no worker predictions (any widths build)."""
    return WorkerNetwork(input_dim, num_classes, cfg, seeds, predictions)
