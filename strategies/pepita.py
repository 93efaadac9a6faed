"""``pepita``: Present the Error to Perturb the Input To modulate Activity (Dellaferrera & Kreiman
2022, "Error-driven Input Modulation: Solving the Credit Assignment Problem without a Backward
Pass", ICML; analysed in Srinivasan et al. 2023, "Forward Learning with Top-Down Feedback").

Two forward passes per batch and no backward pass. The *standard* pass gives every layer's activity
``h_l`` and the output error ``e = softmax(z_L) - onehot(y)`` (``sigmoid(z_L) - y`` for a binary
sigmoid output). The *modulated* pass runs the same network on ``x_mod = x + F e``, ``F`` a fixed
random ``D x C`` matrix, giving ``h_l^mod``. Each layer then updates from what it saw itself:

    first layer    dW_1 = (h_1 - h_1^mod) (x_mod)^T
    hidden layers  dW_l = (h_l - h_l^mod) (h_{l-1}^mod)^T
    output layer   dW_L = e (h_{L-1}^mod)^T

averaged over the batch and written into ``.grad``; the optimiser steps on them (``W -= lr dW``).
Everything runs under ``torch.no_grad``: autograd never records a graph. Biases (the paper's
networks have none) get the same rule with the input set to 1 (``strategy.train_bias``).

Every weight layer is treated alike: plain and worker layers, fully connected or filter-wise conv.
A conv layer follows the authors' conv code: ``dW`` is the correlation of ``h - h^mod`` with the
layer's modulated input, averaged over the batch and the output positions (their
``compute_delta_w_conv``); its activity is taken before max-pooling, as theirs. Dropout masks are
drawn once per step and shared by the two passes (the authors' "consistent dropout").
Normalisation layers and block-wise workers are refused: the paper defines no rule for them.

``F`` is drawn per replica from that replica's seed (its own generator, nothing from torch's global
one), uniform in ``±feedback_scale * sqrt(6 / D)`` — the authors' ``0.05 * He-uniform`` bound
(``Tutorial_PEPITA_FullyConnectedNets_CIFAR-10.ipynb`` and ``main.py`` / ``functions.py`` of
github.com/GiorgiaD/PEPITA, ``w_init=he_uniform``) — so a population draws exactly what separate
runs draw and a resumed run the same ``F`` as the uninterrupted one. See docs/strategies/pepita.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from agentnet.config import ConfigError, StrategyConfig, check
from agentnet.network import WorkerNetwork
from agentnet.registry import register_strategy
from agentnet.replica import ReplicaLinear
from agentnet.strategy import StepResult, Strategy
from agentnet.workers import WorkerConv2d

__all__ = ["PepitaConfig", "Pepita", "feedback_matrix"]

OUTPUT_ERRORS = ("standard", "modulated")


@dataclass
class PepitaConfig(StrategyConfig):
    """``pepita`` settings."""

    feedback_scale: float = 0.05
    """Scale of the fixed input-feedback matrix ``F``: its entries are uniform in
    ``±feedback_scale * sqrt(6 / D)`` (``D``: input dimension). The authors' 0.05 (their ``Bstd``)."""
    output_error: str = "standard"
    """The error that trains the output layer: ``standard`` — the first pass's ``e``, as the paper's
    Algorithm 1 (and Srinivasan et al.'s code) has it — or ``modulated`` — the modulated pass's
    error ``y_mod - onehot``, as the authors' own code computes it."""
    train_bias: bool = True
    """Update biases by the same rule (hidden ``db_l = h_l - h_l^mod``, output ``db_L = e``, batch
    means). The paper's networks have no biases; ``false`` leaves ours at their initial values."""

    def __post_init__(self) -> None:
        check(math.isfinite(self.feedback_scale) and self.feedback_scale > 0, "strategy.feedback_scale", self.feedback_scale,
              "must be a positive number")
        check(self.output_error in OUTPUT_ERRORS, "strategy.output_error", self.output_error, f"choose one of {OUTPUT_ERRORS}")


def feedback_matrix(seed: int, input_dim: int, outputs: int, scale: float) -> Tensor:
    """One replica's ``F`` ``(D, C)``: uniform in ``±scale * sqrt(6 / D)``, drawn from ``seed`` alone."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 7_919)
    bound = scale * math.sqrt(6.0 / input_dim)
    return (torch.rand(input_dim, outputs, generator=gen, dtype=torch.float64) * 2 - 1).mul_(bound).float()


def _modules(post: nn.Module) -> list[nn.Module]:
    """``post`` as the flat list of modules it applies in order."""
    if isinstance(post, nn.Sequential):
        return [m for child in post for m in _modules(child)]
    return [post]


class _Stage:
    """One weight layer as PEPITA sees it: the layer, its normalisation, what follows its activation."""

    def __init__(self, layer: nn.Module, norm: nn.Module, post: nn.Module | None) -> None:
        self.layer, self.norm, self.post = layer, norm, (_modules(post) if post is not None else [])


@register_strategy("pepita")
class Pepita(Strategy):
    """Two forward passes (standard, and on the error-modulated input); every layer learns from the
    difference of its own activities. No backward pass."""

    Config = PepitaConfig
    replica_fields = ("feedback_scale",)
    search_space = {"feedback_scale": {"log": [0.01, 0.5]}}

    def __init__(self, cfg: PepitaConfig, model: WorkerNetwork, variants: dict[str, list[float]] | None = None) -> None:
        super().__init__(cfg, model, variants)
        stages: list[_Stage] = []
        for block in model.blocks():
            stages += [_Stage(*parts) for parts in zip(block.stem.layers, block.stem.norms, block.stem.post)]
            stages.append(_Stage(block.layer, block.norm, block.post))
        stages += [_Stage(*parts) for parts in zip(model.head.stem.layers, model.head.stem.norms, model.head.stem.post)]
        for stage in stages:
            if not isinstance(stage.layer, (ReplicaLinear, WorkerConv2d)):
                raise ConfigError(
                    f"strategy=pepita: PEPITA is defined for fully connected and conv layers, not {type(stage.layer).__name__} "
                    "(block-wise workers, model.conv[*].block); use filter-wise conv layers (block: none)"
                )
            if not isinstance(stage.norm, nn.Identity):
                raise ConfigError(
                    "strategy=pepita: PEPITA defines no update for normalisation layers (model.hidden_norm / model.conv[*].norm "
                    "must be none)"
                )
        self.stages = stages
        self.output = model.head.layer
        R = model.replicas
        self.input_dim = math.prod(model.image_shape) if model.image_shape is not None else stages[0].layer.in_features
        scales = variants.get("feedback_scale") if variants else None
        scales = list(scales) if scales is not None else [cfg.feedback_scale] * R
        device, dtype = model.output.weight.device, model.output.weight.dtype
        self.feedback = torch.stack([
            feedback_matrix(seed, self.input_dim, self.output.out_features, scale) for seed, scale in zip(model.seeds, scales)
        ]).to(device, dtype)
        """``F`` per replica ``(R, D, C)``, never trained (not a parameter: rebuilt from the seeds)."""

    # -- the two passes ----------------------------------------------------------------------
    def _error(self, logits: Tensor, y: Tensor) -> Tensor:
        """``y_hat - target`` ``(R, B, C)``: softmax over the classes the logit mask allows (sigmoid
        for a binary output) minus the one-hot label."""
        head = self.model.head
        if logits.dtype in (torch.float16, torch.bfloat16):  # autocast: the error in fp32
            logits = logits.float()
        if head.activation == "softmax":
            if head.logit_mask is not None:
                logits = logits.masked_fill(~head.logit_mask, float("-inf"))
            p = torch.softmax(logits, -1)
            return p - torch.zeros_like(p).scatter_(-1, y.unsqueeze(-1), 1.0)  # one-hot without F.one_hot's host-side range check
        return torch.sigmoid(logits) - y.unsqueeze(-1).to(logits.dtype)

    def _pass(self, x: Tensor, masks: dict) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """One forward pass on flat inputs ``x`` ``(R, B, D)``: the logits, each weight layer's input
        (the first's is the network input as the layer reads it) and activity ``h_l`` (after the
        activation and any dropout, before pooling or flattening). ``masks`` holds the step's dropout
        masks: drawn by the first pass, reused by the second."""
        act = self.model.act
        h = self.model.inputs(x)
        inputs, activities = [], []
        for i, stage in enumerate(self.stages):
            inputs.append(h)
            h = act(stage.layer(h))  # norm is the identity (checked at construction)
            activity, shaping = h, False
            for j, module in enumerate(stage.post):
                if isinstance(module, nn.Dropout):
                    if module.training and module.p > 0:
                        mask = masks.get((i, j))
                        if mask is None:
                            mask = masks[(i, j)] = torch.empty_like(h).bernoulli_(1 - module.p).div_(1 - module.p)
                        h = h * mask
                elif not isinstance(module, nn.Identity):
                    h = module(h)
                    shaping = True
                if not shaping:
                    activity = h
            activities.append(activity)
        inputs.append(h)
        return self.output(h), inputs, activities

    def compute(self, x: Tensor, y: Tensor) -> StepResult:
        model = self.model
        R = model.replicas
        with torch.no_grad():
            y = model.head.labels(y)
            if x.dim() == 2:
                x = x.unsqueeze(0).expand(R, *x.shape)
            masks: dict = {}
            logits, _, activities = self._pass(x, masks)
            e = self._error(logits, y)
            x_mod = x + torch.bmm(e.to(self.feedback.dtype), self.feedback.transpose(1, 2)).to(x.dtype)
            logits_mod, inputs_mod, activities_mod = self._pass(x_mod, masks)
            out_error = e if self.cfg.output_error == "standard" else self._error(logits_mod, y)
            grads = {}
            for stage, inp, h, h_mod in zip(self.stages, inputs_mod, activities, activities_mod):
                grads.update(self._layer_grads(stage.layer, inp, h - h_mod))
            grads.update(self._layer_grads(self.output, inputs_mod[-1], out_error))
            loss = model.head.global_loss(logits, y)
        return StepResult(loss=loss, logits=logits, cache={"grads": grads})

    def _layer_grads(self, layer: nn.Module, inp: Tensor, delta: Tensor) -> dict[nn.Parameter, Tensor]:
        """``delta inp^T`` averaged over the batch (and a conv layer's output positions) for the
        layer's weight, ``delta``'s mean for its bias."""
        weight, bias = layer.weight, layer.bias
        if isinstance(layer, WorkerConv2d):
            delta, inp = delta.to(weight.dtype), inp.to(weight.dtype)
            count = delta.shape[0] * delta.shape[2] * delta.shape[3]
            gw = torch.nn.grad.conv2d_weight(inp, weight.shape, delta, layer.stride, layer.padding, layer.dilation, layer.groups) / count
            gb = delta.sum((0, 2, 3)) / count
        else:
            delta, inp = delta.to(weight.dtype), inp.to(weight.dtype)
            gw = torch.bmm(delta.transpose(1, 2), inp).reshape(weight.shape) / delta.shape[1]
            gb = delta.mean(1).reshape(-1)
        grads = {weight: gw}
        if bias is not None and self.cfg.train_bias:
            grads[bias] = gb.to(bias.dtype)
        return grads

    def backward(self, result: StepResult) -> None:
        for p, g in result.cache["grads"].items():
            p.grad = g
