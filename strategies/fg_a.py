"""``fg_a`` and ``lg_fg_a``: activity-perturbed forward gradient (Ren et al. 2023, "Scaling Forward
Gradient with Local Losses"; the FG-A and LG-FG-A rows of the LFNN paper's Table 1).

Instead of the weights, the *activities* are perturbed: every hidden layer's activation ``h_l`` of
every example gets a random tangent ``u_l ~ N(0, I)``, and one forward-mode pass
(``torch.autograd.forward_ad``) gives each example's directional derivative
``d_b = sum_l grad_{h_l[b]} L_b . u_l[b]``. The activity gradient estimate ``g_l[b] = d_b u_l[b]`` is
unbiased (the ``u`` of different layers are independent and zero-mean) and has far fewer dimensions
than the weights, so less variance than ``fg_w``. Each layer then turns its own estimate into
weight gradients by back-propagating it *inside the layer* (``x^T g`` for a linear layer): a second,
local forward pass with detached layer inputs, so nothing crosses a layer boundary. The output
layer's gradient is its own exact local gradient (its loss reads it directly).

``lg_fg_a`` gives every block its own loss (a local head, as in ``lg_bp``) and detaches block inputs
in the perturbed pass too, so ``d`` is per block and each ``u_l`` meets only its own block's loss.

With batch statistics (``norm: batch``) an example's loss also depends on the other examples'
activities; the per-example estimate ignores those cross terms (the statistics are treated as
constants of the perturbation), so it is slightly biased there.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from agentnet.blocks import Block, BlockHook
from agentnet.network import WorkerNetwork
from agentnet.registry import register_strategy
from agentnet.replica import replica_randn
from agentnet.strategy import StepResult
from strategies.fg_w import ForwardGradientConfig, ForwardGradientStrategy
from strategies.lg_bp import head_inputs, head_losses, local_heads


def per_unit(values: Tensor, h: Tensor) -> Tensor:
    """Per-example values ``(R, B)`` broadcastable against an activation ``h`` (``(R, B, n)`` or
    channel-folded ``(B, R*C, H, W)``)."""
    if h.dim() == 3:
        return values.unsqueeze(-1)
    R, B = values.shape
    return values.t().repeat_interleave(h.shape[1] // R, dim=1).view(B, -1, 1, 1)


class _Perturb(BlockHook):
    """Adds a dual tangent ``u_l ~ N(0, I)`` (one chunk per replica, from its own generator) to
    every block's activation, before it is recorded and fed forward; keeps the tangents."""

    def __init__(self, generators: list[torch.Generator]) -> None:
        self.generators = generators
        self.tangents: list[Tensor] = []

    def activation(self, block: Block, h: Tensor) -> Tensor:
        u = replica_randn(h, self.generators, dim=0 if h.dim() == 3 else 1)  # (R, B, n) or folded (B, R*C, H, W)
        self.tangents.append(u)
        return h + fwAD.make_dual(torch.zeros_like(h), u)


@register_strategy("fg_a")
class ActivityForwardGradient(ForwardGradientStrategy):
    """Forward gradient with activity perturbation; weights learn from their layer's estimated activity gradient."""

    stream = 37

    def __init__(self, cfg: ForwardGradientConfig, model: WorkerNetwork, variants: dict[str, list[float]] | None = None) -> None:
        super().__init__(cfg, model, variants)
        self.heads = local_heads(model) if self.local else None

    def _sample_losses(self, record, y: Tensor, heads_detached: bool) -> list[Tensor]:
        """Per block, each example's loss ``(R, B)``: the heads' (local) and the task loss (last)."""
        losses = []
        if self.heads is not None:
            features = head_inputs(self.model, record)
            losses = head_losses(self.model, self.heads, [f.detach() if heads_detached else f for f in features], y)
        return [*losses, self.model.head.sample_losses(record.logits, y)]

    def _slopes(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        """One perturbed forward pass: the tangents ``u_l`` and every block's per-example directional
        derivative ``(R, B, blocks)``. Leaves the model's state (batch statistics, RNG) as it found it."""
        model = self.model
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        perturb = _Perturb(self.generators)
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the same dropout masks in both passes
            with torch.no_grad(), fwAD.dual_level():
                record = model.forward_record(x, y, path="local" if self.local else "global", hook=perturb)
                slopes = [fwAD.unpack_dual(loss).tangent for loss in self._sample_losses(record, y, heads_detached=False)]
        with torch.no_grad():  # the second pass updates batch statistics, once per step as every strategy does
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        slopes = [torch.zeros_like(record.logits[..., 0]) if s is None else s for s in slopes]
        return perturb.tangents, torch.stack(slopes, -1)

    def compute(self, x: Tensor, y: Tensor) -> StepResult:
        estimates: list[Tensor] = []
        for _ in range(self.cfg.directions):
            tangents, slopes = self._slopes(x, y)
            batch = slopes.shape[1]
            for i, u in enumerate(tangents):
                # lg_fg_a: layer i's tangent meets only its own block's loss; fg_a: the task loss.
                slope = slopes[..., i if self.local else -1]
                g = per_unit(slope, u) * u / (batch * self.cfg.directions)
                estimates[i:i + 1] = [g if i >= len(estimates) else estimates[i] + g]
        # The local pass: each layer back-propagates its estimate into its own weights only.
        record = self.model.forward_record(x, y, path="local")
        surrogate = sum((rec.activation * g).sum() for rec, g in zip(record.layers, estimates))
        losses = torch.stack([loss.mean(1) for loss in self._sample_losses(record, y, heads_detached=True)]).sum(0)
        return StepResult(loss=losses, logits=record.logits, record=record, cache={"surrogate": surrogate})

    def backward(self, result: StepResult) -> None:
        # The surrogate's gradient is the estimate (its value means nothing); the heads' and the
        # output layer's losses give those their exact local gradients.
        (result.loss.sum() + result.cache["surrogate"]).backward()


@register_strategy("lg_fg_a")
class LocalActivityForwardGradient(ActivityForwardGradient):
    """``fg_a`` per block: every block's activities are perturbed against its own local loss."""

    local = True
