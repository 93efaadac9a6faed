"""``attention``: neurons that seek the next layer's attention (after arXiv 2310.09952).

Only that paper's abstract is public; this formulation is agentnet's own (``docs/strategies/attention.md``).
Neuron ``i`` with ``a_i = f(z_i)`` feeds next-layer neurons ``j`` (``z_j = sum_i w_ji a_i``). Each ``j``
announces a *need* ``g_j = -dJ_j/dz_j`` (at the output ``J`` is the task loss) and pays neuron ``i``
attention ``alpha_ji``. Neuron ``i`` maximises ``U_i = a_i * sum_j alpha_ji g_j`` over its own
incoming weights, holding the messages fixed: its update is gradient ascent,
``dU_i/dw_i = g_i * a_in`` with its own need ``g_i = f'(z_i) * sum_j alpha_ji g_j``, which it
announces to the layer below. With ``alpha = W`` (``mode=exact``) this is error back-propagation.

The computation is layer-local: the forward pass detaches every layer's input, and ``backward``
walks the layers top-down, each computing its update and outgoing need only from the messages it
received (no global ``loss.backward()``), vectorised over neurons.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from agentnet.config import StrategyConfig, check
from agentnet.network import WorkerNetwork
from agentnet.registry import register_strategy
from agentnet.strategy import StepResult, Strategy

MODES = ("exact", "normalized", "topk")


@dataclass
class AttentionConfig(StrategyConfig):
    """Settings of the attention-seeking strategy."""

    mode: str = "exact"
    """exact (alpha = W: back-propagation), normalized (each next-layer neuron splits a fixed
    attention budget), or topk (alpha = W, but only the most-attended neurons update)."""
    rho: float = 0.5
    """topk: fraction of each layer's neurons, by attention received, that update this step."""

    def __post_init__(self) -> None:
        check(self.mode in MODES, "strategy.mode", self.mode, f"choose one of {MODES}")
        check(0 < self.rho <= 1, "strategy.rho", self.rho, "fraction must lie in (0, 1]")


def attention_weights(weight: Tensor, mode: str) -> Tensor:
    """``alpha`` (shape of ``weight``, ``(R, n_next, n)``): the attention next-layer neurons pay.

    ``normalized``: ``alpha_ji = sign(w_ji) |w_ji| / sum_i' |w_ji'|``, each row a budget of 1,
    rescaled by the replica's mean row L1 norm so the overall magnitude matches ``W``'s.
    """
    if mode == "normalized":
        l1 = weight.abs().sum(-1, keepdim=True).clamp_min(1e-12)
        return weight / l1 * l1.mean((1, 2), keepdim=True)
    return weight


@register_strategy("attention")
class AttentionSeeking(Strategy):
    """Self-interested neurons maximising the attention-weighted help they give the next layer."""

    worker_signal = "attention_received"
    Config = AttentionConfig

    def __init__(self, cfg: AttentionConfig, model: WorkerNetwork, variants: dict[str, list[float]] | None = None) -> None:
        if not model.is_mlp:
            raise ValueError(
                "strategy=attention passes messages through fully connected weights (alpha = W); "
                "it does not support conv or block worker layers yet (use a model with model.conv=[])"
            )
        super().__init__(cfg, model, variants)

    def compute(self, x: Tensor, y: Tensor) -> StepResult:
        """Forward pass with every layer's input detached; keeps inputs and pre-activations."""
        inputs, preacts = [], []
        with torch.no_grad():
            a = self.model._input(x)
            for layer in self.model.hidden:
                inputs.append(a)
                z = layer(a)
                preacts.append(z)
                a = self.model.act(z)
            inputs.append(a)
            logits = self.model.output(a)
        # The only graph of the step: the task loss over the output logits, for the output need.
        logits.requires_grad_()
        with torch.enable_grad():
            loss = self.model.global_loss(logits, y)
        return StepResult(loss=loss, logits=logits, cache={"inputs": inputs, "preacts": preacts})

    def backward(self, result: StepResult) -> None:
        """Top-down message passing: each layer updates from the needs it receives and passes its own on."""
        cache, model = result.cache, self.model
        (grad_out,) = torch.autograd.grad(result.loss.sum(), result.logits)
        need = grad_out.neg_()  # g_j = -dJ/dz_j of the output neurons, (R, B, n_next)
        layers = [*model.hidden, model.output]
        received_all, objective_all, scales = [], [], []
        R = model.replicas
        for index in range(len(layers) - 1, -1, -1):
            layer, a_in = layers[index], cache["inputs"][index]
            # Gradient ascent on U over the layer's own incoming weights (the optimiser descends -U).
            layer.weight.grad = torch.bmm(need.transpose(1, 2), a_in).reshape(layer.weight.shape).neg_()
            layer.bias.grad = need.sum(1).reshape(-1).neg_()
            if index == 0:
                break
            weight = layer.weight.detach().view(R, -1, layer.weight.shape[1])
            message = torch.bmm(need, attention_weights(weight, self.cfg.mode))  # sum_j alpha_ji g_j
            a = cache["inputs"][index]  # this layer's input is the lower layer's activation
            need = message * model.activation_derivative(cache["preacts"][index - 1], a)  # g_i = f'(z_i) * message_i
            received = message.abs().mean(1)  # (R, n)
            received_all.append(received)
            objective_all.append((a * message).mean(1))
            scales.append(self._topk_scale(received) if self.cfg.mode == "topk" else None)
        result.signals["attention_received"] = received_all[::-1]
        result.signals["objective"] = objective_all[::-1]
        result.worker_objectives = [-u for u in objective_all[::-1]]
        if self.cfg.mode == "topk":
            result.update_scale = scales[::-1]

    def _topk_scale(self, received: Tensor) -> Tensor:
        """1 for the ``ceil(rho * n)`` most-attended neurons of a layer (per replica), 0 for the rest."""
        chosen = received.topk(math.ceil(self.cfg.rho * received.shape[-1]), dim=-1).indices
        return torch.zeros_like(received).scatter_(-1, chosen, 1.0)
