"""Action codecs, one per action mode: each owns its agents' spaces, checks a step's actions and turns
them into the trainer's update (a per-unit scale, or an external update in place of the optimiser's)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from agentnet.config import ConfigError
from agentnet.network import WorkerNetwork
from agentnet.replica import lerp_rows
from agentnet.training import ExternalUpdate, ScaledUpdate, Update
from agentnet.workers import WorkerBlock

from .agents import AgentLayout

__all__ = ["ACTION_MODES", "DeltaCodec", "ScaleCodec", "centered_to_scale", "make_codec", "scale_to_centered"]

ACTION_MODES = ("scale", "scale_centered", "delta")


def centered_to_scale(u, max_scale: float):
    """``scale_centered``'s map from an action ``u`` in ``[-1, 1]`` to the update multiplier applied:
    ``[-1, 0]`` onto ``[0, 1]`` and ``[0, 1]`` onto ``[1, max_scale]``, so ``u = 0`` is exactly the
    strategy's own step. Works on torch tensors and numpy arrays alike; :func:`scale_to_centered`
    inverts it."""
    return (1 + u) * (u <= 0) + (1 + u * (max_scale - 1)) * (u > 0)


def scale_to_centered(multiplier: float, max_scale: float) -> float:
    """The ``scale_centered`` action that applies ``multiplier`` (in ``[0, max_scale]``)."""
    if not 0.0 <= multiplier <= max_scale:
        raise ValueError(f"multiplier={multiplier}: must lie in [0, max_scale={max_scale}] (scale_centered's range)")
    return multiplier - 1.0 if multiplier <= 1.0 else (multiplier - 1.0) / (max_scale - 1.0)


class ScaleCodec:
    """``scale``: a multiplier in ``[0, max_scale]`` on the update the agent's strategy proposes;
    ``scale_centered`` (``centered=True``): the same multiplier from ``u`` in ``[-1, 1]``, ``u = 0``
    being the strategy's own step (:func:`centered_to_scale`)."""

    def __init__(self, layout: AgentLayout, agents: list[str], max_scale: float, centered: bool, device: torch.device) -> None:
        self.layout, self.agents, self.max_scale, self.centered, self.device = layout, agents, max_scale, centered, device
        self.mode = "scale_centered" if centered else "scale"
        self.bounds = (-1.0, 1.0) if centered else (0, max_scale)
        low, high = self.bounds
        self.spaces = {a: spaces.Box(float(low), float(high), shape=(1,), dtype=np.float32) for a in agents}

    def batch(self, per_agent: list[np.ndarray]) -> torch.Tensor:
        """The dict API's per-agent actions as the batched step's ``(N,)`` tensor."""
        return torch.as_tensor(np.concatenate(per_agent))

    def validate(self, actions: Any) -> None:
        """Shape, finiteness and bounds, naming the first offending agent (``ValueError``)."""
        a = torch.as_tensor(actions)
        n = len(self.agents)
        if a.shape != (n,):
            raise ValueError(f"{self.mode} actions must have shape ({n},), got {tuple(a.shape)}")
        lo, hi = self.bounds
        bad = ~torch.isfinite(a) | (a < lo) | (a > hi)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise ValueError(f"{self.agents[i]}: action {float(a[i])} outside [{lo}, {hi}]")

    def scales(self, actions: Any) -> list[torch.Tensor] | None:
        """Per block, each agent's multiplier; ``None`` when every one is 1 (the trainer's own step)."""
        actions = torch.as_tensor(actions).to(self.device, torch.float32)
        if self.centered:
            # 0 is exactly the strategy's step, so an untrained zero-mean Gaussian policy starts by
            # following the strategy.
            actions = centered_to_scale(actions, self.max_scale)
        if bool((actions == 1).all()):
            return None  # the trainer's own step, bit for bit
        return list(torch.split(actions, self.layout.agents_per_layer))

    def update(self, actions: Any, per_agent_scales: list[torch.Tensor] | None) -> Update:
        """The trainer's update: the optimiser's step scaled per layer, per unit, and on whatever else
        each agent owns (its rows of the plain and normalisation layers of its block)."""
        if per_agent_scales is None:
            return Update()
        return AgentScaledUpdate([c.repeat_interleave(k) for c, k in zip(per_agent_scales, self.layout.units)],
                                 list(zip(self.layout.extra_params, per_agent_scales)))


class AgentScaledUpdate(ScaledUpdate):
    """:class:`ScaledUpdate` on the worker and output layers, plus each agent's scale on the rows it
    owns of its block's plain and normalisation layers (``owned``: per block, its parameters outside
    the worker layer and one multiplier per agent), applied in the same update."""

    def __init__(self, scales: list[torch.Tensor], owned: list[tuple[list[torch.Tensor], torch.Tensor]]) -> None:
        super().__init__(scales)
        self.owned = [(params, scale) for params, scale in owned if params]

    def apply(self, trainer, result) -> None:
        olds = [[p.detach().clone() for p in params] for params, _ in self.owned]
        super().apply(trainer, result)
        for (params, scale), old in zip(self.owned, olds):
            lerp_rows(params, old, scale, scale.numel())


class DeltaCodec:
    """``delta``: the agent's own parameter update, a flat vector over its weight rows and biases,
    each in ``[-max_delta, max_delta]``, added in place of the optimiser's step. For layers of one
    weight and bias per unit (no block-wise workers, plain or normalisation layers)."""

    mode = "delta"

    def __init__(self, layout: AgentLayout, agents: list[str], max_delta: float, device: torch.device) -> None:
        self.check_model(layout)
        self.layout, self.agents, self.max_delta, self.device = layout, agents, max_delta, device
        sizes = np.concatenate([[l.weight[0].numel() + 1] * n for l, n in zip(layout.layers, layout.agents_per_layer)])
        units = np.concatenate([[layout.units[i]] * n for i, n in enumerate(layout.agents_per_layer)])
        self.spaces = {
            a: spaces.Box(-max_delta, max_delta, shape=(int(units[i] * sizes[i]),), dtype=np.float32) for i, a in enumerate(agents)
        }

    @staticmethod
    def check_model(layout: AgentLayout) -> None:
        """Refuse models whose agents own more than one weight and bias per unit."""
        if any(isinstance(l, WorkerBlock) for l in layout.layers):
            raise ConfigError("action_mode='delta': an agent's delta is its units' weights and biases, which block-wise "
                              "workers do not have (several convs per block); use 'scale' or 'scale_centered'")
        if layout.has_extra_params:
            raise ConfigError("action_mode='delta': an agent's delta is its units' weights and biases; this model's agents "
                              "also own plain or normalisation layers; use 'scale' or 'scale_centered'")

    def batch(self, per_agent: list[np.ndarray]) -> list[np.ndarray]:
        return per_agent

    def validate(self, actions: Any) -> None:
        if len(actions) != len(self.agents):
            raise ValueError(f"delta actions: expected {len(self.agents)} vectors, got {len(actions)}")
        for agent, a in zip(self.agents, actions):
            a = torch.as_tensor(a)
            expected = self.spaces[agent].shape
            if tuple(a.shape) != expected:
                raise ValueError(f"{agent}: delta action shape {tuple(a.shape)}, expected {expected}")
            if not bool(torch.isfinite(a).all()) or bool((a.abs() > self.max_delta).any()):
                raise ValueError(f"{agent}: delta action has NaN/inf or values outside ±{self.max_delta}")

    def scales(self, actions: Any) -> None:
        """Delta actions scale nothing."""
        return None

    def update(self, actions: Any, per_agent_scales: None) -> Update:
        """The agents' own updates as the step's external update (applied in place of the optimiser's)."""
        offsets = np.cumsum([0, *self.layout.agents_per_layer])
        layers, device = self.layout.layers, self.device

        def apply(model: WorkerNetwork) -> None:
            for li, layer in enumerate(layers):
                delta = torch.stack([torch.as_tensor(a, dtype=torch.float32) for a in actions[offsets[li] : offsets[li + 1]]])
                delta = delta.to(device).view(layer.weight.shape[0], -1)
                layer.weight.add_(delta[:, :-1].reshape(layer.weight.shape).to(layer.weight.dtype))
                layer.bias.add_(delta[:, -1].to(layer.bias.dtype))

        return ExternalUpdate(apply)


def make_codec(mode: str, layout: AgentLayout, agents: list[str], max_scale: float, max_delta: float,
               device: torch.device) -> ScaleCodec | DeltaCodec:
    """The codec of action mode ``mode`` (one of :data:`ACTION_MODES`)."""
    if mode == "delta":
        return DeltaCodec(layout, agents, max_delta, device)
    return ScaleCodec(layout, agents, max_scale, mode == "scale_centered", device)
