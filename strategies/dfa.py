"""``dfa``: direct feedback alignment (Nøkland 2016, "Direct Feedback Alignment Provides Learning in
Deep Neural Networks").

The output error ``e = dL/d(logits)`` reaches every hidden weight layer ``l`` directly through the
layer's own fixed random matrix ``B_l`` (output units x the layer's units): the layer's activation
``h_l = f(a_l)`` receives ``e B_l`` as its gradient, so ``delta_l = (e B_l) ⊙ f'(a_l)`` and the
layer's weight gradient is ``delta_l^T x_l`` with its own input ``x_l``. The output layer gets its
ordinary gradient. No gradient travels from one layer to another, and no layer ever uses another
layer's (transposed) weights: every layer's update needs only its own input and pre-activation, the
output error and its own ``B_l``, so all layers could update at once after one forward pass.

How: during the strategy's forward pass every weight layer's input is detached (a forward pre-hook)
and each hidden layer's activation is recorded where the next part of the network reads it (a
forward pre-hook on what follows the activation: pool, dropout, flatten, or the identity); the
backward then sends ``e`` into the output layer and ``e B_l`` (one batched matmul for every layer at
once) into each layer's own local graph — activation derivative, normalisation, weights. The hooks
live only inside ``compute``: gradients other code takes through the model (an EWC Fisher, GEM's
memory gradients through this strategy, LwF's distillation) see an ordinary network.

Layers: fully connected and filter-wise conv layers, worker or plain. For a conv layer ``B_l`` maps
the error onto the layer's whole activation map ``C x H x W`` (before any max-pool), as in the DFA
literature; a block-wise worker (``model.conv[*].block``) is refused, its inner convs would need
their own feedback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from agentnet.config import ConfigError, StrategyConfig, check
from agentnet.network import WorkerNetwork, eval_mode
from agentnet.registry import register_strategy
from agentnet.replica import ReplicaLinear
from agentnet.strategy import StepResult, Strategy
from agentnet.workers import WorkerConv2d

__all__ = ["DFAConfig", "DirectFeedbackAlignment", "hidden_layers"]


@dataclass
class DFAConfig(StrategyConfig):
    """``dfa`` settings."""

    feedback_scale: float = 1.0
    """Scale of every fixed feedback matrix ``B_l``: its entries are uniform in
    ``±feedback_scale / sqrt(n_l)`` for a layer of ``n_l`` units (``C*H*W`` for a conv map), the
    distribution of an output layer reading that layer directly. May vary per replica."""

    def __post_init__(self) -> None:
        check(self.feedback_scale > 0, "strategy.feedback_scale", self.feedback_scale, "must be > 0")


def hidden_layers(model: WorkerNetwork) -> list[tuple[nn.Module, nn.Module]]:
    """Every hidden weight layer (plain and worker, in forward order) with the module that reads its
    activation (its pool / dropout / flatten, or an identity)."""
    pairs: list[tuple[nn.Module, nn.Module]] = []
    for block in model.blocks():
        pairs += list(zip(block.stem.layers, block.stem.post))
        pairs.append((block.layer, block.post))
    pairs += list(zip(model.head.stem.layers, model.head.stem.post))
    return pairs


def _detach_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].detach(), *args[1:])


def _units(h: Tensor, replicas: int) -> int:
    """Units of one replica's activation: ``n`` of ``(R, B, n)``, ``C*H*W`` of ``(B, R*C, H, W)``."""
    return h.shape[-1] if h.dim() == 3 else h[0].numel() // replicas


@register_strategy("dfa")
class DirectFeedbackAlignment(Strategy):
    """The output error sent straight to every hidden layer through its own fixed random matrix."""

    Config = DFAConfig
    replica_fields = ("feedback_scale",)

    def __init__(self, cfg: DFAConfig, model: WorkerNetwork, variants: dict[str, list[float]] | None = None) -> None:
        super().__init__(cfg, model, variants)
        self.layers = hidden_layers(model)
        unsupported = [type(layer).__name__ for layer, _ in self.layers if not isinstance(layer, (ReplicaLinear, WorkerConv2d))]
        if unsupported:
            raise ConfigError(
                f"strategy=dfa: direct feedback alignment is defined here for fully connected and filter-wise conv layers, "
                f"not {unsupported[0]} (model.conv[*].block): its inner convs would need their own feedback; use filter-wise conv layers"
            )
        self._weight_layers = [layer for layer, _ in self.layers] + [model.head.layer]
        self.units = self._layer_units()
        """Units of each hidden layer's activation per replica (``C*H*W`` for conv maps)."""
        parts = [self._feedback_matrix(i, n) for i, n in enumerate(self.units)]
        self._all = torch.cat(parts, 2) if parts else None  # every layer's B side by side: one bmm for all
        self.feedback: list[Tensor] = [] if self._all is None else list(self._all.split(self.units, dim=2))
        """Per hidden layer, ``B_l`` ``(R, out units, n_l)`` (views): replica ``r``'s drawn from ``seeds[r]``; never trained."""

    # -- setup ---------------------------------------------------------------------------------
    def _record(self, store: list[Tensor]) -> list:
        """Hooks for one forward pass: every weight layer's input detached, every hidden activation appended to ``store``."""
        handles = [layer.register_forward_pre_hook(_detach_input) for layer in self._weight_layers]
        handles += [post.register_forward_pre_hook(lambda module, args: store.append(args[0])) for _, post in self.layers]
        return handles

    def _layer_units(self) -> list[int]:
        """One example through the network (evaluation mode, no gradient: no state or RNG touched) to read the map sizes."""
        param = next(self.model.parameters())
        inputs = math.prod(self.model.image_shape) if self.model.image_shape else self._weight_layers[0].in_features
        store: list[Tensor] = []
        handles = self._record(store)
        try:
            with torch.no_grad(), eval_mode(self.model):
                self.model(torch.zeros(1, inputs, device=param.device, dtype=param.dtype))
        finally:
            for handle in handles:
                handle.remove()
        return [_units(h, self.model.replicas) for h in store]

    def _feedback_matrix(self, index: int, units: int) -> Tensor:
        """``B_l`` for hidden layer ``index`` of ``units`` units, uniform in ``±scale/sqrt(units)``; replica ``r``'s from ``seeds[r]``."""
        param = next(self.model.parameters())
        out = self.model.head.layer.out_features
        scales = self.variants.get("feedback_scale", [self.cfg.feedback_scale] * self.model.replicas)
        parts = [
            (torch.rand(out, units, generator=torch.Generator().manual_seed(seed * 1_000_003 + 7 * index + 5)) * 2 - 1)
            * (scale / math.sqrt(units))
            for seed, scale in zip(self.model.seeds, scales)
        ]
        return torch.stack(parts).to(param.device, param.dtype)

    # -- the step ------------------------------------------------------------------------------
    def compute(self, x: Tensor, y: Tensor) -> StepResult:
        activations: list[Tensor] = []
        handles = self._record(activations)
        try:
            logits = self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        if len(activations) != len(self.layers):
            raise RuntimeError(f"strategy=dfa: recorded {len(activations)} activations for {len(self.layers)} hidden layers")
        cache = {"activations": activations, "labels": y, "mask": self.model.head.logit_mask}
        return StepResult(loss=self.model.head.global_loss(logits, y), logits=logits, cache=cache)

    def signals(self, error: Tensor, activations: list[Tensor]) -> list[Tensor]:
        """Each hidden layer's feedback ``e B_l``, shaped like its activation (channel-folded for conv maps)."""
        if self._all is None:
            return []
        R, B = error.shape[:2]
        flat = torch.bmm(error.to(self._all.dtype), self._all)  # (R, B, sum n_l)
        signals = []
        for part, h in zip(flat.split(self.units, dim=2), activations):
            if h.dim() != 3:  # conv maps (B, R*C, H, W): replica r's C*H*W units are channels r*C.. of each example
                part = part.reshape(R, B, -1, *h.shape[2:]).transpose(0, 1).reshape(h.shape)
            signals.append(part.to(h.dtype))
        return signals

    def error(self, result: StepResult) -> Tensor:
        """``e = dL/d(logits)`` ``(R, B, C)`` of the step's task loss, taken on a copy of the logits (so
        one backward call then serves every layer, also when ``compute`` ran as one compiled graph);
        under autocast in float32, as the autocast loss computes it."""
        logits = result.logits.detach()
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        logits.requires_grad_(True)
        with torch.enable_grad(), self.model.head.logit_mask_as(result.cache["mask"]):
            (error,) = torch.autograd.grad(self.model.head.global_loss(logits, result.cache["labels"]).sum(), logits)
        return error

    def backward(self, result: StepResult) -> None:
        """The output layer's ordinary gradient and every hidden layer's ``e B_l``, in one backward call."""
        activations = result.cache["activations"]
        error = self.error(result)
        torch.autograd.backward([result.logits, *activations], [error.to(result.logits.dtype), *self.signals(error, activations)])
