"""The worker network: hidden :class:`~agentnet.workers.WorkerLinear` layers and an output layer.

``forward`` is the plain inference pass. ``forward_record`` is the training pass that strategies
use: per layer it chooses the :data:`~agentnet.workers.GradientPath`, computes every worker's
prediction loss, asks a :class:`~agentnet.workers.LeaderSelection` for leaders and, when asked,
routes the global gradient through leaders only. All of it is batched per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agentnet.config import ModelConfig
from agentnet.workers import (
    GradientPath,
    LeaderSelection,
    WorkerLinear,
    WorkerPredictor,
)

__all__ = ["LayerRecord", "ForwardRecord", "WorkerMLP", "build_model"]

_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


@dataclass
class LayerRecord:
    """One hidden layer's view of a training forward pass."""

    workers: Tensor
    """Worker outputs ``(B, W, k)`` (pre-activation) whose gradient reaches only this layer."""
    worker_loss: Tensor | None = None
    """Per-sample prediction loss ``e`` ``(B, W)``; ``None`` when not requested."""
    leaders: Tensor | None = None
    """Leader mask, bool ``(W,)`` or ``(B, W)``."""
    best: Tensor | None = None
    """Index of the best leader, 0-d or ``(B,)``."""
    activation: Tensor | None = None
    """The layer's activation ``(B, n)`` fed to the next layer."""


@dataclass
class ForwardRecord:
    """A training forward pass: output logits plus one :class:`LayerRecord` per hidden layer."""

    logits: Tensor
    layers: list[LayerRecord] = field(default_factory=list)


class WorkerMLP(nn.Module):
    """An MLP whose hidden layers are split into workers of ``worker_size`` units."""

    def __init__(self, input_dim: int, num_classes: int, cfg: ModelConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.act = _ACTIVATIONS[cfg.activation]
        self.output_activation = cfg.output_activation
        out_units = num_classes if cfg.output_activation == "softmax" else 1
        if cfg.output_activation == "sigmoid" and num_classes != 2:
            raise ValueError(f"model.output_activation='sigmoid' needs a binary task, got {num_classes} classes")
        widths = [input_dim, *cfg.hidden]
        self.hidden = nn.ModuleList(
            WorkerLinear(widths[i], widths[i + 1] // cfg.worker_size, cfg.worker_size) for i in range(len(cfg.hidden))
        )
        self.output = nn.Linear(widths[-1], out_units)
        self.logit_mask: Tensor | None = None
        """Boolean ``(C,)`` of the classes the output may predict (task-incremental heads); ``None``: all."""
        self.predictor = WorkerPredictor(cfg.worker_size, num_classes, cfg.output_activation, cfg.worker_projection, seed)

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

    def forward(self, x: Tensor) -> Tensor:
        """Inference: output logits ``(B, C)`` (``(B, 1)`` for a sigmoid output)."""
        for layer in self.hidden:
            x = self.act(layer(x))
        return self.output(x)

    def activation_derivative(self, z: Tensor, a: Tensor) -> Tensor:
        """``f'(z)`` of the hidden activation, from the pre-activation ``z`` and ``a = f(z)``."""
        name = self.cfg.activation
        if name == "relu":
            return (z > 0).to(z.dtype)
        if name == "tanh":
            return 1 - a * a
        return a * (1 - a)  # sigmoid

    def global_loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """The task loss at the output: cross-entropy, or BCE for a sigmoid output."""
        if self.output_activation == "softmax":
            return F.cross_entropy(self._masked(logits), y)
        return F.binary_cross_entropy_with_logits(logits[:, 0], y.to(logits.dtype))

    def predict(self, logits: Tensor) -> Tensor:
        """Class predictions from output logits."""
        if self.output_activation == "softmax":
            return self._masked(logits).argmax(1)
        return (logits[:, 0] > 0).long()

    def forward_record(
        self,
        x: Tensor,
        y: Tensor | None = None,
        *,
        path: GradientPath = "global",
        selection: LeaderSelection | None = None,
        leaders_carry_global: bool = False,
    ) -> ForwardRecord:
        """Training forward pass.

        ``path`` applies to every layer, the output layer included. With ``y`` and a ``selection``,
        each hidden layer's worker losses and leaders are computed as the pass goes. With
        ``leaders_carry_global`` the gradient arriving from above reaches only the leaders' units
        (followers' activations are stop-gradient on the path to the output), as LFNN's Eq. 1 asks.
        """
        records = []
        for index, layer in enumerate(self.hidden):
            z, z_local = layer.forward_path(x, path)
            h = self.act(z)
            if self.cfg.predict_from == "activation":
                local = h if z_local is z else self.act(z_local)  # one activation unless the paths split
            else:
                local = z_local
            record = LayerRecord(workers=layer.workers(local))
            if y is not None and selection is not None:
                record.worker_loss = self.predictor.loss(record.workers, y)
                record.leaders, record.best = selection.select(index, record.worker_loss)
            if leaders_carry_global and record.leaders is not None:
                # Followers' units feed forward with their values but without a gradient path.
                gate = record.leaders.unsqueeze(-1).expand(*record.leaders.shape, layer.worker_size)
                h = torch.where(gate.reshape(-1, h.shape[1]) if gate.dim() == 3 else gate.reshape(1, -1), h, h.detach())
            record.activation = h
            records.append(record)
            x = h
        logits = self.output(x.detach() if path == "local" else x)
        return ForwardRecord(logits=logits, layers=records)


def worker_graph(
    model: WorkerMLP, roles: list[list[str]] | None = None, leadership: list[Tensor] | None = None
) -> nx.DiGraph:
    """The network as a graph of workers (see :meth:`WorkerMLP.to_networkx`)."""
    graph = nx.DiGraph()
    graph.add_node("input", layer=0, index=0, role="input", leadership=0.0)
    previous = ["input"]
    agent = 0
    with torch.no_grad():
        for li, layer in enumerate(model.hidden):
            names = []
            for w in range(layer.num_workers):
                name = f"worker_{agent}"
                agent += 1
                role = roles[li][w] if roles else "worker"
                lead = float(leadership[li][w]) if leadership is not None else 0.0
                graph.add_node(name, layer=li + 1, index=w, role=role, leadership=lead)
                names.append(name)
            k = layer.worker_size
            if li == 0:
                norms = layer.weight.view(layer.num_workers, -1).norm(dim=1).view(-1, 1)
            else:
                prev_k = model.hidden[li - 1].worker_size
                norms = layer.weight.view(layer.num_workers, k, len(previous), prev_k).norm(dim=(1, 3))
            for j, dst in enumerate(names):
                for i, src in enumerate(previous):
                    graph.add_edge(src, dst, weight=float(norms[j, i]))
            previous = names
        out = model.output
        graph.add_node(f"worker_{agent}", layer=len(model.hidden) + 1, index=0, role="output", leadership=0.0)
        k = model.hidden[-1].worker_size
        norms = out.weight.view(out.out_features, len(previous), k).norm(dim=(0, 2))
        for i, src in enumerate(previous):
            graph.add_edge(src, f"worker_{agent}", weight=float(norms[i]))
    return graph


def build_model(cfg: ModelConfig, input_dim: int, num_classes: int, seed: int = 0) -> WorkerMLP:
    """Construct the model preset described by ``cfg`` for the data's dimensions."""
    return WorkerMLP(input_dim, num_classes, cfg, seed)
