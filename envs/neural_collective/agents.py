"""Who the agents are and what each owns: every worker of every worker layer, then the output layer.

An agent owns its rows (units, filters, a block's channels) of its worker layer and, where the
model has them, its rows of the plain layers in front of that layer and of the layer's
normalisation — the grouping gradient routing uses for a block (``model.stems``, ``model.hidden``,
``model.norms``). The output agent owns the output layer and the plain layers in front of it.
"""

from __future__ import annotations

import numpy as np
import torch

from agentnet.config import ConfigError
from agentnet.network import WorkerNetwork

__all__ = ["AgentLayout"]


class AgentLayout:
    """The agents of a one-replica network, layer by layer, and the parameters each layer's agents own."""

    def __init__(self, model: WorkerNetwork) -> None:
        self.layers = [*model.hidden, model.output]
        """The worker layers, then the output layer: one per block of agents."""
        self.units = [layer.worker_size for layer in model.hidden] + [model.output.out_features]
        """Units per agent, per block."""
        self.agents_per_layer = [layer.num_workers for layer in model.hidden] + [1]
        self.layer_of = np.concatenate([np.full(n, i + 1) for i, n in enumerate(self.agents_per_layer)])
        """Each agent's block, 1-based (the output layer is ``L + 1``)."""
        self.index_in_layer = np.concatenate([np.arange(n) for n in self.agents_per_layer])
        norms = [*model.norms, None]
        self.extra_params = [
            [*stem.parameters(), *([] if norm is None else norm.parameters())] for stem, norm in zip(model.stems, norms)
        ]
        """Per block, the parameters outside its worker (or output) layer that its agents own:
        plain layers in front of it and its normalisation; rows split evenly among the agents."""
        for block, (params, n) in enumerate(zip(self.extra_params, self.agents_per_layer)):
            for p in params:
                if p.shape[0] % n:
                    raise ConfigError(f"model: a plain layer in front of worker layer {block + 1} has {p.shape[0]} channels, "
                                      f"which its {n} workers cannot share evenly; every parameter must belong to one agent")
        self.params = [[*layer.parameters(), *extra] for layer, extra in zip(self.layers, self.extra_params)]
        """Per block, every parameter its agents own (rows grouped by agent)."""

    @property
    def num_agents(self) -> int:
        return int(sum(self.agents_per_layer))

    @property
    def has_extra_params(self) -> bool:
        """Whether agents own parameters beyond their worker layers' (plain or normalisation layers)."""
        return any(self.extra_params)

    def snapshot(self) -> list[list[torch.Tensor]]:
        """A copy of every owned parameter, per block."""
        return [[p.detach().clone() for p in block] for block in self.params]

    def agent_norms(self, params: list[list[torch.Tensor]]) -> torch.Tensor:
        """Per agent, the norm of its parameters: ``params`` holds each block's parameters, whose rows
        (dim 0: neurons, conv filters, a block's channels) are grouped by agent, so agent ``i`` of a
        block of ``n`` owns chunk ``i`` of ``p.view(n, -1)`` of every one."""
        norm = torch.linalg.vector_norm  # one pass per tensor (square-then-sum takes two)
        out = []
        for block, n in zip(params, self.agents_per_layer):
            norms = [norm(p.reshape(n, -1), dim=1) for p in block]
            out.append(torch.hypot(*norms) if len(norms) == 2 else norm(torch.stack(norms), dim=0))
        return torch.cat(out)
