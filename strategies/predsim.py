"""``predsim``: local prediction and similarity-matching losses (Nøkland & Eidnes 2019, "Training
Neural Networks with Local Error Signals", ICML; code: github.com/anokland/local-loss, ``train.py``).

Every hidden layer with the plain layers in front of it (its *block*) is trained by its own loss

    L_l = (1 - beta) * CE(H_l(pool(h_l)), y) + beta * MSE(S(P_l(h_l)), S(onehot(y)))

on its output ``h_l`` (after the activation, before any pool / dropout): a *prediction* loss — the
cross-entropy of a small trained linear head ``H_l``, exactly ``lg_bp``'s head (imported from
:mod:`strategies.lg_bp`) — and a *similarity-matching* loss — the mean squared difference between
the batch's ``B x B`` similarity matrix of the (projected) outputs and that of the one-hot labels.
``S`` is the authors' ``similarity_matrix``: each row centred over its features, scaled to unit
length (``+1e-8``), ``S = X X^T`` clamped to ``[-1, 1]``; a conv map ``C x H x W`` first becomes
each channel's standard deviation over the map (``C > 3`` and ``H > 1``; otherwise it is
flattened). ``P_l`` is a trained projection without bias: ``n x n`` linear for a fully connected
layer (``linear_loss``), a ``3 x 3`` ``C -> C`` convolution for a conv map (``conv_loss``).

Each block's input is detached (``forward_record(path="local")``), so nothing crosses a block
boundary; the output layer is trained by its task loss on its own detached input, scaled by
``1 - beta`` as the authors' code scales it (``beta < 1``). ``beta = 0`` is ``pred`` alone — the
same gradients as ``lg_bp`` — and ``beta = 1`` is ``sim`` alone (no heads are built; the output
loss is not scaled): ``strategy.beta`` selects them, no separate names.

Batched over replicas: one similarity matrix per replica ``(R, B, B)``, projections per replica
drawn from the replica's seed, so replica ``r`` of a population is the run with seed ``seeds[r]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agentnet.blocks import ForwardRecord
from agentnet.config import StrategyConfig, check
from agentnet.network import WorkerNetwork
from agentnet.registry import register_strategy
from agentnet.replica import ReplicaLinear
from agentnet.strategy import StepResult, Strategy
from strategies.lg_bp import LocalHeads, head_inputs, head_losses, local_heads

__all__ = ["PredSimConfig", "PredSim", "SimilarityProjections", "similarity_matrix", "label_similarity", "similarity_losses"]


@dataclass
class PredSimConfig(StrategyConfig):
    """``predsim`` settings."""

    beta: float = 0.99
    """Weight of the similarity-matching loss in each block's loss ``(1 - beta) pred + beta sim``
    (the paper's ``--beta``, 0.99). ``0``: the prediction loss alone (``pred``, = ``lg_bp``); ``1``:
    the similarity loss alone (``sim``). May vary per replica."""
    projection: bool = True
    """Read the similarity through a trained projection without bias — ``n x n`` linear for fully
    connected layers, ``3 x 3`` ``C -> C`` convolution for conv maps — as the authors' code does;
    ``false``: the block's output itself (their ``--bio`` variant's choice)."""
    similarity_std: bool = True
    """A conv map's similarity reads each channel's standard deviation over the map (the authors'
    default); ``false``: the flattened map (their ``--no-similarity-std``)."""
    scale_output: bool = True
    """Scale the output layer's task loss by ``1 - beta`` as the authors' code does for predsim
    (``beta = 1``, sim alone: not scaled). With Adam, the default optimiser, the scale barely matters."""

    def __post_init__(self) -> None:
        check(0 <= self.beta <= 1, "strategy.beta", self.beta, "must be in [0, 1]")


def similarity_matrix(h: Tensor, replicas: int, std: bool = True) -> Tensor:
    """The authors' adjusted cosine similarity, per replica: ``(R, B, B)`` of features ``(R, B, n)``
    or channel-folded maps ``(B, R*C, H, W)`` (each channel's std over the map when ``std``,
    ``C > 3`` and ``H > 1``; else the flattened map)."""
    if h.dim() == 4:
        B, RC, H = h.shape[:3]
        if std and RC // replicas > 3 and H > 1:
            h = h.flatten(2).std(2)
        h = h.reshape(B, replicas, -1).transpose(0, 1)
    centred = h - h.mean(-1, keepdim=True)
    unit = centred / (1e-8 + centred.pow(2).sum(-1, keepdim=True).sqrt())
    return torch.bmm(unit, unit.transpose(1, 2)).clamp(-1, 1)


def label_similarity(y: Tensor, classes: int, dtype: torch.dtype) -> Tensor:
    """``S(onehot(y))`` ``(R, B, B)`` of labels ``(R, B)``: 1 for a pair of one class, ``-1/(C-1)`` otherwise."""
    onehot = (y.unsqueeze(-1) == torch.arange(classes, device=y.device)).to(dtype)  # F.one_hot would check y on the host
    return similarity_matrix(onehot, y.shape[0])


class _ReplicaConvProjection(nn.Module):
    """``replicas`` independent ``3 x 3`` ``C -> C`` convolutions without bias on channel-folded maps."""

    def __init__(self, channels: int, replicas: int) -> None:
        super().__init__()
        self.replicas = replicas
        self.weight = nn.Parameter(torch.empty(replicas * channels, channels, 3, 3))

    def forward(self, h: Tensor) -> Tensor:
        return F.conv2d(h, self.weight, padding=1, groups=self.replicas)


class SimilarityProjections(nn.Module):
    """Per hidden layer of ``model``, the trained projection its similarity reads, per replica;
    replica ``r``'s drawn from ``seeds[r]`` (uniform in ``±1/sqrt(fan_in)``, ``nn.Linear``'s /
    ``nn.Conv2d``'s default) with its own generator."""

    def __init__(self, model: WorkerNetwork) -> None:
        super().__init__()
        R = model.replicas
        self.projections = nn.ModuleList()
        for i, block in enumerate(model.blocks()):
            n = block.layer.num_workers * block.layer.worker_size
            proj = _ReplicaConvProjection(n, R) if block.layer.folded else ReplicaLinear(n, n, R, bias=False)
            per_replica = proj.weight.shape[0] // R
            fan_in = proj.weight[0].numel()
            rows = [
                (torch.rand(per_replica, *proj.weight.shape[1:], generator=torch.Generator().manual_seed(seed * 1_000_003 + 7_919 + i)) * 2 - 1)
                / math.sqrt(fan_in)
                for seed in model.seeds
            ]
            with torch.no_grad():
                proj.weight.copy_(torch.cat(rows))
            self.projections.append(proj)

    def forward(self, index: int, h: Tensor) -> Tensor:
        return self.projections[index](h)


def similarity_projections(model: WorkerNetwork) -> SimilarityProjections:
    """The model's similarity projections, added to ``model.aux`` on first use (trained by the
    optimiser, kept by checkpoints, not counted in ``num_params``)."""
    if "similarity_projections" not in model.aux:
        param = next(model.parameters())
        model.aux["similarity_projections"] = SimilarityProjections(model).to(param.device, param.dtype)
    return model.aux["similarity_projections"]


def similarity_losses(model: WorkerNetwork, record: ForwardRecord, y: Tensor, projections: SimilarityProjections | None,
                      std: bool = True) -> list[Tensor]:
    """Per hidden layer, each replica's similarity-matching loss ``(R,)``: ``MSE(S(P(h)), S(onehot(y)))``."""
    y = model.head.labels(y)
    target = None
    losses = []
    for i, rec in enumerate(record.layers):
        h = rec.activation if projections is None else projections(i, rec.activation)
        sim = similarity_matrix(h, model.replicas, std)
        if target is None:
            target = label_similarity(y, model.num_classes, sim.dtype)
        losses.append((sim - target).pow(2).mean((1, 2)))
    return losses


@register_strategy("predsim")
class PredSim(Strategy):
    """Each block trained by ``(1 - beta)`` its head's cross-entropy plus ``beta`` its similarity-matching
    loss, nothing crossing a block boundary; the output layer by its own (scaled) task loss."""

    Config = PredSimConfig
    replica_fields = ("beta",)
    search_space = {"beta": {"uniform": [0.5, 1.0]}}

    def __init__(self, cfg: PredSimConfig, model: WorkerNetwork, variants: dict[str, list[float]] | None = None) -> None:
        super().__init__(cfg, model, variants)
        betas = self.variants.get("beta", [cfg.beta])
        for b in betas:
            check(0 <= b <= 1, "strategy.beta", b, "must be in [0, 1]")
        self.heads: LocalHeads | None = local_heads(model) if any(b < 1 for b in betas) else None
        """``lg_bp``'s heads (shared with it in ``model.aux["local_heads"]``); none when ``beta = 1``."""
        uses_sim = any(b > 0 for b in betas)
        self.projections: SimilarityProjections | None = similarity_projections(model) if uses_sim and cfg.projection else None
        self.uses_sim = uses_sim

    def _beta(self) -> float | Tensor:
        beta = self.per_replica("beta")
        return beta if isinstance(beta, float | int) else beta.view(-1)

    def compute(self, x: Tensor, y: Tensor) -> StepResult:
        record = self.model.forward_record(x, y, path="local")
        beta = self._beta()
        output = self.model.head.global_loss(record.logits, y)
        if self.cfg.scale_output:
            if isinstance(beta, Tensor):
                output = output * torch.where(beta < 1, 1 - beta, torch.ones_like(beta))
            elif beta < 1:
                output = output * (1 - beta)
        total = output
        if not record.layers:
            return StepResult(loss=total, logits=record.logits, record=record)
        if self.heads is not None:
            pred = head_losses(self.model, self.heads, head_inputs(self.model, record), y)
            total = total + (1 - beta) * torch.stack([loss.mean(1) for loss in pred]).sum(0)
        if self.uses_sim:
            sim = similarity_losses(self.model, record, y, self.projections, self.cfg.similarity_std)
            total = total + beta * torch.stack(sim).sum(0)
        return StepResult(loss=total, logits=record.logits, record=record)
