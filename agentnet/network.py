"""The worker network: hidden worker layers (conv, block, fully connected) and an output layer.

Hidden layers are :class:`~agentnet.workers.WorkerConv2d` (filter-wise workers),
:class:`~agentnet.workers.WorkerBlock` (block-wise workers) and
:class:`~agentnet.workers.WorkerLinear` (neuron groups), in that order; each may be followed by a
max-pool, and the maps are flattened before the first fully connected layer. Inputs arrive flat
``(R, B, D)`` — one batch per replica; a ``(B, D)`` batch is shared by all replicas — (datasets and
continual streams stay flat, so permutations are gathers) and are viewed as images when the first
layer is a convolution.

A network holds ``R`` replicas (``seeds``, one per replica; see :mod:`agentnet.workers`): replica
``r`` is initialised exactly as a one-replica network built with ``seeds[r]``, so a population
trains the same networks as ``R`` separate runs, in one batched model. Outputs are ``(R, B, C)``.

``forward`` is the plain inference pass. ``forward_record`` is the training pass that strategies
use: per layer it chooses the :data:`~agentnet.workers.GradientPath`, computes every worker's
prediction loss, asks a :class:`~agentnet.workers.LeaderSelection` for leaders and, when asked,
routes the global gradient through leaders only. All of it is batched per layer.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import networkx as nx
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agentnet.config import ModelConfig
from agentnet.workers import (
    GradientPath,
    LeaderSelection,
    ReplicaLinear,
    ReplicaNorm,
    WorkerBlock,
    WorkerConv2d,
    WorkerLinear,
    WorkerPredictor,
    WorkerReadout,
)

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


@dataclass
class LayerRecord:
    """One hidden layer's view of a training forward pass."""

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
    """A training forward pass: output logits plus one :class:`LayerRecord` per hidden layer."""

    logits: Tensor
    layers: list[LayerRecord] = field(default_factory=list)


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

    def __init__(self, input_dim: int, num_classes: int, cfg: ModelConfig, seeds: int | list[int] = 0) -> None:
        super().__init__()
        seeds = [seeds] if isinstance(seeds, int) else list(seeds)
        if not seeds:
            raise ValueError("a network needs at least one replica (one seed)")
        self.seeds = seeds
        self.replicas = R = len(seeds)
        self.cfg = cfg
        self.num_classes = num_classes
        self.act = _ACTIVATIONS[cfg.activation]
        self.output_activation = cfg.output_activation
        out_units = num_classes if cfg.output_activation == "softmax" else 1
        if cfg.output_activation == "sigmoid" and num_classes != 2:
            raise ValueError(f"model.output_activation='sigmoid' needs a binary task, got {num_classes} classes")
        self.image_shape = image_shape(input_dim, cfg.in_channels) if cfg.conv else None
        # Every hidden layer in order as (plain?, layer, norm, what follows its activation).
        layers: list[tuple[bool, nn.Module, nn.Module, nn.Module]] = []
        features = input_dim
        if self.image_shape is not None:
            channels, side = self.image_shape[0], self.image_shape[1]
            for spec in cfg.conv:
                if spec.plain:  # one "worker" of every filter: a replica-grouped plain convolution
                    layer = WorkerConv2d(channels, 1, spec.channels, spec.kernel_size, spec.stride, replicas=R)
                elif spec.block == "none":
                    layer = WorkerConv2d(channels, spec.channels // cfg.worker_size, cfg.worker_size, spec.kernel_size, spec.stride,
                                         replicas=R)
                else:
                    layer = WorkerBlock(
                        channels,
                        spec.workers,
                        spec.channels // spec.workers,
                        width=spec.width,
                        depth=spec.depth,
                        residual=spec.block == "residual",
                        kernel_size=spec.kernel_size,
                        stride=spec.stride,
                        activation=self.act,
                        replicas=R,
                    )
                side = (side - 1) // spec.stride + 1
                if spec.pool > 1:
                    if side < spec.pool:
                        raise ValueError(f"model.conv.pool={spec.pool}: the maps are only {side} pixels wide there")
                    side //= spec.pool
                groups = spec.channels // cfg.worker_size if spec.plain else layer.num_workers
                post = [nn.MaxPool2d(spec.pool)] if spec.pool > 1 else []
                post += [nn.Dropout(spec.dropout)] if spec.dropout > 0 else []
                layers.append((spec.plain, layer, _norm(spec.norm, spec.channels, groups, R), nn.Sequential(*post)))
                channels = spec.channels
            last = layers[-1]
            layers[-1] = (*last[:3], nn.Sequential(*last[3], _ReplicaFlatten(R)))
            features = channels * side * side
        for index, width in enumerate(cfg.hidden):
            plain = index in cfg.hidden_plain
            layer = ReplicaLinear(features, width, R) if plain else WorkerLinear(features, width // cfg.worker_size, cfg.worker_size, R)
            post = nn.Dropout(cfg.hidden_dropout) if cfg.hidden_dropout > 0 else nn.Identity()
            layers.append((plain, layer, _norm(cfg.hidden_norm, width, width // cfg.worker_size, R), post))
            features = width
        # Plain layers join the block of the next worker layer (the last ones: the output's block).
        hidden, norms, post, stems, stem = [], [], [], [], _PlainLayers(self.act)
        for plain, layer, norm, after in layers:
            if plain:
                stem.append(layer, norm, after)
                continue
            stems.append(stem)
            stem = _PlainLayers(self.act)
            hidden.append(layer)
            norms.append(norm)
            post.append(after)
        stems.append(stem)
        self.hidden = nn.ModuleList(hidden)
        """The worker layers, in order."""
        self.norms = nn.ModuleList(norms)
        """Per worker layer, its normalisation between pre-activation and activation (or identity)."""
        self.post = nn.ModuleList(post)
        """What follows each worker layer's activation: max-pool, dropout, flatten, or nothing."""
        self.stems = nn.ModuleList(stems)
        """Plain layers before each worker layer, and (last) before the output layer; empty for most models."""
        self.output = ReplicaLinear(features, out_units, R)
        self.logit_mask: Tensor | None = None
        """Boolean ``(C,)`` (or per example ``(R, B, C)``) of the classes the output may predict
        (task-incremental heads); ``None``: all."""
        for layer in hidden:
            if layer.folded:  # conv workers predict from maps pooled onto a worker_pool x worker_pool grid
                layer.pool = cfg.worker_pool
        self.readouts = nn.ModuleList(
            WorkerReadout(layer.num_workers, layer.prediction_units, out_units, projection=cfg.worker_projection, head=cfg.worker_head,
                          seeds=[s + i for s in seeds])
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
        self.predictor = WorkerPredictor(cfg.output_activation)
        self.aux = nn.ModuleDict()
        """Modules a strategy adds to the network (e.g. local greedy heads): trained by the same
        optimiser and saved in the same checkpoint, but not counted in :attr:`num_params`."""

    @property
    def num_params(self) -> int:
        """Trainable parameters of one replica of the network itself (strategy-added ``aux`` modules excluded)."""
        aux = {id(p) for p in self.aux.parameters()}
        return sum(p.numel() for p in self.parameters() if p.requires_grad and id(p) not in aux) // self.replicas

    @property
    def is_mlp(self) -> bool:
        """True when every hidden layer is a fully connected worker layer, with no plain layers,
        normalisation or dropout (what message-passing strategies need)."""
        return (all(isinstance(layer, WorkerLinear) for layer in self.hidden) and not any(len(stem) for stem in self.stems)
                and all(isinstance(n, nn.Identity) for n in self.norms) and all(isinstance(p, nn.Identity) for p in self.post))

    def _normalized(self, workers: Tensor) -> Tensor:
        """Worker outputs ``(R, B, W, k)`` as they predict and are aligned (``model.worker_norm``)."""
        if self.cfg.worker_norm == "none":
            return workers
        # Standardised over the worker's own k units: no gradient reaches another worker, and the
        # local losses cannot be lowered by scaling the output up.
        return self.cfg.worker_logit_scale * F.layer_norm(workers, workers.shape[-1:], eps=1e-5)

    def worker_loss(self, layer: int, workers: Tensor, y: Tensor) -> Tensor:
        """Per-sample prediction loss ``(R, B, W)`` of hidden layer ``layer``'s workers ``(R, B, W, k)``."""
        return self.predictor.loss(self.readouts[layer](workers), y)

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

    @property
    def workers_per_layer(self) -> list[int]:
        return [layer.num_workers for layer in self.hidden]

    def to_networkx(self, roles: list[list[str]] | None = None, leadership: list[Tensor] | None = None) -> nx.DiGraph:
        """Workers as nodes (``layer``, ``index``, ``role``, ``leadership`` count), plus ``input`` and the
        output group; edges carry the Frobenius norm of the weight block connecting two workers.
        Node names match the PettingZoo agents (``worker_<i>``, output last)."""
        return worker_graph(self, roles, leadership)

    def _input(self, x: Tensor) -> Tensor:
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
        if self.hidden[0].input_weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def per_replica_labels(self, y: Tensor) -> Tensor:
        """Labels ``(R, B)``; ``(B,)`` labels of a batch shared by every replica are broadcast."""
        return y.unsqueeze(0).expand(self.replicas, -1) if y.dim() == 1 else y

    def forward(self, x: Tensor) -> Tensor:
        """Inference: output logits ``(R, B, C)`` (``(R, B, 1)`` for a sigmoid output)."""
        x = self._input(x)
        for stem, layer, norm, post in zip(self.stems, self.hidden, self.norms, self.post):
            x = post(self.act(norm(layer(stem(x)))))
        return self.output(self.stems[-1](x))

    def activation_derivative(self, z: Tensor, a: Tensor) -> Tensor:
        """``f'(z)`` of the hidden activation, from the pre-activation ``z`` and ``a = f(z)``."""
        name = self.cfg.activation
        if name == "relu":
            return (z > 0).to(z.dtype)
        if name == "tanh":
            return 1 - a * a
        return a * (1 - a)  # sigmoid

    def sample_losses(self, logits: Tensor, y: Tensor) -> Tensor:
        """The task loss of every example ``(R, B)``: cross-entropy (BCE for a sigmoid output) of
        logits ``(R, B, C)`` against labels ``(R, B)`` (or ``(B,)``)."""
        R, B = logits.shape[:2]
        y = self.per_replica_labels(y)
        if self.output_activation == "softmax":
            return F.cross_entropy(self._masked(logits).reshape(R * B, -1), y.reshape(-1), reduction="none").view(R, B)
        return F.binary_cross_entropy_with_logits(logits[..., 0], y.to(logits.dtype), reduction="none")

    def global_loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """The task loss per replica ``(R,)``: the mean of :meth:`sample_losses`. Replicas' losses
        are independent, so the gradient of their sum is each replica's own gradient."""
        return self.sample_losses(logits, y).mean(1)

    def predict(self, logits: Tensor) -> Tensor:
        """Class predictions ``(R, B)`` from output logits ``(R, B, C)``."""
        if self.output_activation == "softmax":
            return self._masked(logits).argmax(-1)
        return (logits[..., 0] > 0).long()

    def forward_record(
        self,
        x: Tensor,
        y: Tensor | None = None,
        *,
        path: GradientPath = "global",
        selection: LeaderSelection | None = None,
        leaders_carry_global: bool = False,
        perturb: Callable[[int, Tensor], Tensor] | None = None,
    ) -> ForwardRecord:
        """Training forward pass.

        ``path`` applies to every layer, the output layer included. With ``y`` and a ``selection``,
        each hidden layer's worker losses and leaders are computed as the pass goes. With
        ``leaders_carry_global`` the gradient arriving from above reaches only the leaders' units
        (followers' activations are stop-gradient on the path to the output), as LFNN's Eq. 1 asks.
        ``perturb(index, h)`` replaces each hidden layer's activation ``h`` before it is recorded and
        fed forward (activity-perturbed forward gradients add their tangent there).
        """
        records = []
        x = self._input(x)
        if y is not None:
            y = self.per_replica_labels(y)
        for index, (stem, layer, norm, post) in enumerate(zip(self.stems, self.hidden, self.norms, self.post)):
            x, layer_path = stem.enter_block(x, path)
            z, z_local = _normalize(norm, *layer.forward_path(x, layer_path))
            h = self.act(z)
            if perturb is not None:
                h = perturb(index, h)
            if self.cfg.predict_from == "activation":
                local = h if z_local is z else self.act(z_local)  # one activation unless the paths split
            else:
                local = z_local
            record = LayerRecord(workers=self._normalized(layer.workers(local)))
            if self.cfg.align_from not in (None, self.cfg.predict_from):
                aligned = self.act(z_local) if self.cfg.align_from == "activation" else z_local
                record.aligned = self._normalized(layer.workers(aligned))
            if y is not None and selection is not None:
                record.worker_loss = self.worker_loss(index, record.workers, y)
                record.leaders, record.best = selection.select(index, record.worker_loss)
            if leaders_carry_global and record.leaders is not None:
                # Followers' units feed forward with their values but without a gradient path.
                h = torch.where(_unit_gate(record.leaders, layer, h), h, h.detach())
            record.activation = h
            records.append(record)
            x = post(h)
        x, out_path = self.stems[-1].enter_block(x, path)
        logits = self.output(x.detach() if out_path == "local" else x)
        return ForwardRecord(logits=logits, layers=records)


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


class _PlainLayers(nn.Module):
    """The plain layers (not split into workers) in front of a worker layer or the output layer.

    They belong to that layer's block: under the ``local`` gradient path the block's input — the
    first plain layer's input — is detached, and the gradient flows freely inside the block, so the
    block's losses train them and nothing crosses the block boundary.
    """

    def __init__(self, activation) -> None:
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


def _unit_gate(leaders: Tensor, layer: nn.Module, h: Tensor) -> Tensor:
    """Leader mask ``(R, W)`` or ``(R, B, W)`` expanded over each worker's units, broadcastable to
    the layer's activation ``h`` (``(R, B, n)``, or channel-folded ``(B, R*n, H, W)``)."""
    units = leaders.repeat_interleave(layer.worker_size, dim=-1)  # (R, n) or (R, B, n)
    if not layer.folded:
        return units if units.dim() == 3 else units.unsqueeze(1)
    if units.dim() == 2:
        return units.reshape(1, -1, 1, 1)
    return units.transpose(0, 1).reshape(units.shape[1], -1, 1, 1)


def worker_graph(
    model: WorkerNetwork, roles: list[list[str]] | None = None, leadership: list[Tensor] | None = None
) -> nx.DiGraph:
    """The network as a graph of workers (see :meth:`WorkerNetwork.to_networkx`); the first replica's."""
    R = model.replicas
    graph = nx.DiGraph()
    graph.add_node("input", layer=0, index=0, role="input", leadership=0.0)
    previous = ["input"]
    agent = 0
    with torch.no_grad():
        for li, layer in enumerate(model.hidden):
            previous = _plain_node(graph, model.stems[li], li, previous, R)
            names = []
            for w in range(layer.num_workers):
                name = f"worker_{agent}"
                agent += 1
                role = roles[li][w] if roles else "worker"
                lead = float(leadership[li].reshape(-1, layer.num_workers)[0, w]) if leadership is not None else 0.0
                graph.add_node(name, layer=li + 1, index=w, role=role, leadership=lead)
                names.append(name)
            # The weight reading the layer's input, rows grouped by worker and input columns by the
            # previous layer's workers (FC, conv channels and flattened maps are all worker-major).
            weight = layer.input_weight
            weight = weight[: weight.shape[0] // R]
            if previous[0].startswith(("input", "plain")):  # no worker structure in the columns
                norms = weight.reshape(layer.num_workers, -1).norm(dim=1).view(-1, 1).expand(-1, len(previous))
            else:
                norms = weight.reshape(layer.num_workers, weight.shape[0] // layer.num_workers, len(previous), -1).norm(dim=(1, 3))
            for j, dst in enumerate(names):
                for i, src in enumerate(previous):
                    graph.add_edge(src, dst, weight=float(norms[j, i]))
            previous = names
        previous = _plain_node(graph, model.stems[-1], len(model.hidden), previous, R)
        out = model.output
        graph.add_node(f"worker_{agent}", layer=len(model.hidden) + 1, index=0, role="output", leadership=0.0)
        if previous[0].startswith("plain"):
            norms = out.weight[: out.out_features].norm().view(1)
        else:
            norms = out.weight[: out.out_features].view(out.out_features, len(previous), -1).norm(dim=(0, 2))
        for i, src in enumerate(previous):
            graph.add_edge(src, f"worker_{agent}", weight=float(norms[i]))
    return graph


def _plain_node(graph: nx.DiGraph, stem: _PlainLayers, block: int, previous: list[str], replicas: int) -> list[str]:
    """A block's plain layers as one node ``plain_<block>`` (edges: the first plain weight's norm,
    replica 0); returns the nodes that feed the block's worker layer."""
    if not len(stem):
        return previous
    name = f"plain_{block}"
    weight = stem.layers[0].input_weight
    graph.add_node(name, layer=block + 0.5, index=0, role="plain", leadership=0.0)
    for src in previous:
        graph.add_edge(src, name, weight=float(weight[: weight.shape[0] // replicas].norm()) / len(previous))
    return [name]


def build_model(cfg: ModelConfig, input_dim: int, num_classes: int, seeds: int | list[int] = 0) -> WorkerNetwork:
    """Construct the model preset described by ``cfg`` for the data's dimensions, one replica per seed."""
    return WorkerNetwork(input_dim, num_classes, cfg, seeds)
