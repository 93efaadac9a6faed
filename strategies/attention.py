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

``mode=protect`` adds memory across tasks (docs/strategies/attention.md, "Protecting old tasks"):
during a task each neuron accumulates the attention it receives (the mean square of its own need
``g_i``) and its inputs' activity; at the task's end (:meth:`AttentionSeeking.on_task_end`) these
are consolidated into an importance, and on later tasks the neuron is pulled back toward its
incoming weights of that task end in proportion to how much attention it received there
(``protect_lambda``), and/or its step is shrunk by it (``protect_c``).
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
from agentnet.workers import WorkerLinear

MODES = ("exact", "normalized", "topk", "protect")


@dataclass
class AttentionConfig(StrategyConfig):
    """Settings of the attention-seeking strategy."""

    mode: str = "exact"
    """exact (alpha = W: back-propagation), normalized (each next-layer neuron splits a fixed
    attention budget), topk (alpha = W, but only the most-attended neurons update), or protect
    (alpha = W, and the attention a neuron received on earlier tasks holds its incoming weights)."""
    rho: float = 0.5
    """topk: fraction of each layer's neurons, by attention received, that update this step."""
    protect_lambda: float = 30.0
    """protect: strength ``lambda`` of the attention-weighted pull toward each earlier task end's
    weights, ``lambda * Omega_i * nu_k * (w_ik - w*_ik)`` added to neuron ``i``'s gradient
    (``Omega_i`` its mean squared need, ``nu_k`` its input's mean square). 0 turns the pull off."""
    protect_c: float = 0.0
    """protect: attention-weighted plasticity, each neuron's update scaled by
    ``1 / (1 + c * Omega_i / mean_i' Omega_i')`` after the optimiser step. 0 turns it off."""
    protect_decay: float = 1.0
    """protect: ``gamma`` in ``Omega <- gamma * Omega + Omega_task`` at each task end (1: every
    earlier task counts fully, as in SI; < 1: older tasks fade, as in online EWC)."""
    protect_output: bool = True
    """protect: also protect the output neurons (their attention is the task loss's, ``alpha = 1``)."""

    def __post_init__(self) -> None:
        check(self.mode in MODES, "strategy.mode", self.mode, f"choose one of {MODES}")
        check(0 < self.rho <= 1, "strategy.rho", self.rho, "fraction must lie in (0, 1]")
        check(self.protect_lambda >= 0, "strategy.protect_lambda", self.protect_lambda, "must be >= 0")
        check(self.protect_c >= 0, "strategy.protect_c", self.protect_c, "must be >= 0")
        check(0 <= self.protect_decay <= 1, "strategy.protect_decay", self.protect_decay, "must lie in [0, 1]")
        if self.mode == "protect":
            check(self.protect_lambda > 0 or self.protect_c > 0, "strategy.protect_lambda", self.protect_lambda,
                  "mode=protect with protect_lambda=0 and protect_c=0 protects nothing (it is mode=exact); set one > 0")


def attention_weights(weight: Tensor, mode: str) -> Tensor:
    """``alpha`` (shape of ``weight``, ``(R, n_next, n)``): the attention next-layer neurons pay.

    ``normalized``: ``alpha_ji = sign(w_ji) |w_ji| / sum_i' |w_ji'|``, each row a budget of 1,
    rescaled by the replica's mean row L1 norm so the overall magnitude matches ``W``'s.
    """
    if mode == "normalized":
        l1 = weight.abs().sum(-1, keepdim=True).clamp_min(1e-12)
        return weight / l1 * l1.mean((1, 2), keepdim=True)
    return weight


def is_mlp(model: WorkerNetwork) -> bool:
    """True when every block is a bare fully connected worker layer: no plain layers,
    normalisation or dropout (what message passing through ``alpha = W`` needs)."""
    blocks = model.blocks()
    return (all(isinstance(b.layer, WorkerLinear) and isinstance(b.norm, nn.Identity) and isinstance(b.post, nn.Identity)
                and not len(b.stem) for b in blocks) and not len(model.head.stem))


def unit_layers(model: WorkerNetwork) -> list[nn.Module]:
    """The layers whose units send and receive messages, from the input: worker layers, then the output."""
    return [*(b.layer for b in model.blocks()), model.head.layer]


def activation_derivative(name: str, z: Tensor, a: Tensor) -> Tensor:
    """``f'(z)`` of the hidden activation ``name`` (``model.activation``), from the pre-activation
    ``z`` and ``a = f(z)``."""
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "tanh":
        return 1 - a * a
    return a * (1 - a)  # sigmoid


@register_strategy("attention")
class AttentionSeeking(Strategy):
    """Self-interested neurons maximising the attention-weighted help they give the next layer."""

    worker_signal = "attention_received"
    Config = AttentionConfig
    replica_fields = ("protect_lambda", "protect_c")

    def __init__(self, cfg: AttentionConfig, model: WorkerNetwork, variants: dict[str, list[float]] | None = None) -> None:
        if not is_mlp(model):
            raise ConfigError(
                "strategy=attention passes messages through fully connected weights (alpha = W); "
                "it does not support conv or block worker layers yet (use a model with model.conv=[])"
            )
        super().__init__(cfg, model, variants)
        self.protect = _Protection(model, cfg.protect_output) if cfg.mode == "protect" else None

    def compute(self, x: Tensor, y: Tensor) -> StepResult:
        """Forward pass with every layer's input detached; keeps inputs and pre-activations."""
        inputs, preacts = [], []
        with torch.no_grad():
            a = self.model.inputs(x)
            for layer in unit_layers(self.model)[:-1]:
                inputs.append(a)
                z = layer(a)
                preacts.append(z)
                a = self.model.act(z)
            inputs.append(a)
            logits = self.model.head.layer(a)
        # The only graph of the step: the task loss over the output logits, for the output need.
        logits.requires_grad_()
        with torch.enable_grad():
            loss = self.model.head.global_loss(logits, y)
        return StepResult(loss=loss, logits=logits, cache={"inputs": inputs, "preacts": preacts})

    def backward(self, result: StepResult) -> None:
        """Top-down message passing: each layer updates from the needs it receives and passes its own on."""
        cache, model = result.cache, self.model
        (grad_out,) = torch.autograd.grad(result.loss.sum(), result.logits)
        need = grad_out.neg_()  # g_j = -dJ/dz_j of the output neurons, (R, B, n_next)
        layers = unit_layers(model)
        received_all, objective_all, scales = [], [], []
        R = model.replicas
        for index in range(len(layers) - 1, -1, -1):
            layer, a_in = layers[index], cache["inputs"][index]
            # Gradient ascent on U over the layer's own incoming weights (the optimiser descends -U).
            layer.weight.grad = torch.bmm(need.transpose(1, 2), a_in).reshape(layer.weight.shape).neg_()
            layer.bias.grad = need.sum(1).reshape(-1).neg_()
            if self.protect is not None:
                self.protect.observe(index, need, a_in)
            if index == 0:
                break
            weight = layer.weight.detach().view(R, -1, layer.weight.shape[1])
            message = torch.bmm(need, attention_weights(weight, self.cfg.mode))  # sum_j alpha_ji g_j
            a = cache["inputs"][index]  # this layer's input is the lower layer's activation
            need = message * activation_derivative(model.cfg.activation, cache["preacts"][index - 1], a)  # g_i = f'(z_i) * message_i
            received = message.abs().mean(1)  # (R, n)
            received_all.append(received)
            objective_all.append((a * message).mean(1))
            scales.append(self._topk_scale(received) if self.cfg.mode == "topk" else None)
        result.signals["attention_received"] = received_all[::-1]
        result.signals["objective"] = objective_all[::-1]
        result.worker_objectives = [-u for u in objective_all[::-1]]
        if self.cfg.mode == "topk":
            result.update_scale = scales[::-1]
        if self.protect is not None and self.protect.tasks > 0:
            self.protect.pull(self.per_replica("protect_lambda"))
            result.update_scale = self.protect.plasticity(self.per_replica("protect_c"))

    def _topk_scale(self, received: Tensor) -> Tensor:
        """1 for the ``ceil(rho * n)`` most-attended neurons of a layer (per replica), 0 for the rest."""
        chosen = received.topk(math.ceil(self.cfg.rho * received.shape[-1]), dim=-1).indices
        return torch.zeros_like(received).scatter_(-1, chosen, 1.0)

    def on_task_end(self) -> None:
        """protect: consolidate this task's attention into the importances; anchor at the weights now."""
        if self.protect is not None:
            self.protect.consolidate(self.cfg.protect_decay)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.protect is not None:
            state["protect"] = self.protect.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.protect is not None and "protect" in state:
            self.protect.load_state_dict(state["protect"])


class _Protection:
    """``mode=protect``'s memory: per layer of ``[*hidden, output]`` and replica, vectorised over neurons.

    Within a task it accumulates, per step, each neuron's mean squared per-sample need
    ``mean_b (B g_bi)^2`` (the attention it received, through its own ``f'``) and each input's
    mean square ``mean_b a_bk^2``. At the task's end the task means give ``Omega_i`` (per neuron) and
    ``F_ik = Omega_i nu_k`` (per incoming weight), added to the decayed earlier ones, and the
    weights become the anchor.
    """

    def __init__(self, model: WorkerNetwork, protect_output: bool) -> None:
        self.model = model
        self.R = model.replicas
        layers = unit_layers(model)
        self.protected = list(range(len(layers) if protect_output else len(layers) - 1))
        p = layers[0].weight
        zeros = lambda *shape: torch.zeros(*shape, device=p.device, dtype=p.dtype)  # noqa: E731
        shapes = [(l.weight.shape[0] // self.R, l.weight.shape[1]) for l in layers]
        self.tasks = 0  # task ends consolidated so far
        self.steps = 0  # steps observed in the current task
        self.need_sum = [zeros(self.R, n) for n, _ in shapes]
        self.input_sum = [zeros(self.R, k) for _, k in shapes]
        self.omega = [zeros(self.R, n) for n, _ in shapes]
        self.fisher = [zeros(self.R, n, k) for n, k in shapes]
        self.anchor_w = [l.weight.detach().clone() for l in layers]
        self.anchor_b = [l.bias.detach().clone() for l in layers]

    @property
    def layers(self) -> list:
        return unit_layers(self.model)

    @torch.no_grad()
    def observe(self, index: int, need: Tensor, a_in: Tensor) -> None:
        """One layer's messages of this step: its needs ``(R, B, n)`` and its inputs ``(R, B, k)``."""
        B = need.shape[1]
        self.need_sum[index] += (need * B).square().mean(1)  # needs carry the loss's 1/B
        self.input_sum[index] += a_in.square().mean(1)
        if index == 0:
            self.steps += 1

    @torch.no_grad()
    def consolidate(self, decay: float) -> None:
        steps = max(self.steps, 1)
        for i, layer in enumerate(self.layers):
            omega, nu = self.need_sum[i] / steps, self.input_sum[i] / steps
            self.omega[i].mul_(decay).add_(omega)
            self.fisher[i].mul_(decay).add_(omega.unsqueeze(-1) * nu.unsqueeze(1))
            self.need_sum[i].zero_()
            self.input_sum[i].zero_()
            self.anchor_w[i] = layer.weight.detach().clone()
            self.anchor_b[i] = layer.bias.detach().clone()
        self.steps = 0
        self.tasks += 1

    @torch.no_grad()
    def pull(self, strength: float | Tensor) -> None:
        """Add ``lambda * F * (w - w*)`` (and ``lambda * Omega * (b - b*)``) to each protected layer's gradient."""
        if not torch.is_tensor(strength) and strength == 0:
            return
        lam_b = strength.view(-1, 1) if torch.is_tensor(strength) else strength
        for i in self.protected:
            layer = self.layers[i]
            w = layer.weight.detach()
            delta = (w - self.anchor_w[i]).view(self.R, -1, w.shape[1])
            layer.weight.grad.add_((strength * self.fisher[i] * delta).view_as(w))
            delta_b = (layer.bias.detach() - self.anchor_b[i]).view(self.R, -1)
            layer.bias.grad.add_((lam_b * self.omega[i] * delta_b).view(-1))

    def plasticity(self, c: float | Tensor) -> list[Tensor | None] | None:
        """Per layer, the update scale ``1 / (1 + c Omega_i / mean Omega)`` ``(R, n)``; ``None`` when ``c = 0``."""
        if not torch.is_tensor(c) and c == 0:
            return None
        c = c.view(-1, 1) if torch.is_tensor(c) else c
        scales: list[Tensor | None] = [None] * len(self.layers)
        for i in self.protected:
            omega = self.omega[i]
            scales[i] = 1.0 / (1.0 + c * omega / omega.mean(-1, keepdim=True).clamp_min(1e-30))
        return scales

    def state_dict(self) -> dict:
        return {"tasks": self.tasks, "steps": self.steps, "need_sum": self.need_sum, "input_sum": self.input_sum,
                "omega": self.omega, "fisher": self.fisher, "anchor_w": self.anchor_w, "anchor_b": self.anchor_b}

    def load_state_dict(self, state: dict) -> None:
        device = self.omega[0].device
        self.tasks, self.steps = state["tasks"], state["steps"]
        for key in ("need_sum", "input_sum", "omega", "fisher", "anchor_w", "anchor_b"):
            setattr(self, key, [t.to(device) for t in state[key]])
