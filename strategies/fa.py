"""``fa``: feedback alignment (Lillicrap et al. 2016, "Random synaptic feedback weights support
error backpropagation for deep learning").

BP sends the error down through the transposed forward weights: ``delta_in = delta_out W``.
Feedback alignment sends it through a fixed random matrix ``B`` of the same shape instead,
``delta_in = delta_out B``, so no layer needs to know another layer's weights (the "weight transport"
problem); each layer's own weight gradient ``delta_out^T x`` is unchanged. The forward weights come to
align with ``B`` during training, which is why the random signal is useful.

Every weight layer (fully connected, conv, plain or worker, and the output layer) gets a backward
hook that replaces its input gradient; normalisation layers and activations keep their exact
derivatives. ``B`` is drawn like the layer's own initial weights (uniform in ``±1/sqrt(fan_in)``,
times ``strategy.feedback_scale``), per replica from that replica's seed, and never trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from agentnet.config import ConfigError, StrategyConfig, check
from agentnet.network import WorkerNetwork
from agentnet.registry import register_strategy
from agentnet.strategy import StepResult, Strategy
from agentnet.replica import ReplicaLinear
from agentnet.workers import WorkerConv2d


@dataclass
class FeedbackAlignmentConfig(StrategyConfig):
    """``fa`` settings."""

    feedback_scale: float = 1.0
    """Scale of the fixed feedback matrices relative to the layer's initial weight distribution."""

    def __post_init__(self) -> None:
        check(self.feedback_scale > 0, "strategy.feedback_scale", self.feedback_scale, "must be > 0")


def weight_layers(model: WorkerNetwork) -> list[nn.Module]:
    """Every layer with a weight matrix that reads the layer below, in forward order (plain layers,
    worker layers, output layer)."""
    layers: list[nn.Module] = []
    for block in [*model.blocks(), model.head]:
        layers += list(block.stem.layers)
        layers.append(block.layer)
    return layers


def _feedback_matrix(layer: nn.Module, replicas: int, seeds: list[int], index: int, scale: float) -> Tensor:
    """A fixed random matrix shaped like ``layer.weight``; replica ``r``'s rows drawn from ``seeds[r]``."""
    weight = layer.weight
    rows = weight.shape[0] // replicas
    bound = scale / math.sqrt(weight[0].numel())
    parts = [
        (torch.rand(rows, *weight.shape[1:], generator=torch.Generator().manual_seed(seed * 1_000_003 + 7 * index + 1)) * 2 - 1)
        * bound
        for seed in seeds
    ]
    return torch.cat(parts).to(weight.device, weight.dtype)


def feedback_input_grad(layer: nn.Module, feedback: Tensor, grad_out: Tensor, input_shape: torch.Size) -> Tensor:
    """The gradient a layer sends to its input when ``feedback`` stands in for its weight."""
    feedback = feedback.to(grad_out.dtype)
    if isinstance(layer, WorkerConv2d):
        return torch.nn.grad.conv2d_input(input_shape, feedback, grad_out, layer.stride, layer.padding, layer.dilation, layer.groups)
    R = grad_out.shape[0]
    return torch.bmm(grad_out, feedback.view(R, -1, feedback.shape[1]))  # (R, B, out) x (R, out, in)


@register_strategy("fa")
class FeedbackAlignment(Strategy):
    """Back-propagation of the task loss with fixed random feedback matrices in place of ``W^T``."""

    Config = FeedbackAlignmentConfig

    def __init__(self, cfg: FeedbackAlignmentConfig, model: WorkerNetwork, variants: dict[str, list[float]] | None = None) -> None:
        super().__init__(cfg, model, variants)
        layers = weight_layers(model)
        unsupported = [type(layer).__name__ for layer in layers if not isinstance(layer, (ReplicaLinear, WorkerConv2d))]
        if unsupported:
            raise ConfigError(
                f"strategy=fa: feedback alignment is defined here for fully connected and conv layers, not {unsupported[0]} "
                "(model.conv[*].block); use filter-wise conv layers"
            )
        self.layers = layers[1:]  # the first sends nothing down: its input is the data
        self.feedback = [_feedback_matrix(layer, model.replicas, model.seeds, i, cfg.feedback_scale) for i, layer in enumerate(layers)][1:]
        self._handles: list = []

    def _hook(self, feedback: Tensor):
        def replace_input_grad(layer: nn.Module, grad_input: tuple, grad_output: tuple):
            if grad_input[0] is None or grad_output[0] is None:
                return None
            return (feedback_input_grad(layer, feedback, grad_output[0], grad_input[0].shape).to(grad_input[0].dtype),)

        return replace_input_grad

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def compute(self, x: Tensor, y: Tensor) -> StepResult:
        # The hooks exist only for this step's forward and backward: other gradients taken through
        # the model (an EWC Fisher estimate with torch.func, say) see an ordinary network.
        self._remove_hooks()
        self._handles = [layer.register_full_backward_hook(self._hook(b)) for layer, b in zip(self.layers, self.feedback)]
        try:
            logits = self.model(x)
        except BaseException:
            self._remove_hooks()
            raise
        return StepResult(loss=self.model.head.global_loss(logits, y), logits=logits)

    def backward(self, result: StepResult) -> None:
        try:
            result.loss.sum().backward()
        finally:
            self._remove_hooks()
