"""``lfnn_local``: LFNN-l, the BP-free Leader-Follower network (LFNN paper, Eq. 2).

Every layer's input is detached, so no gradient crosses a layer boundary: the output layer is
trained by the output loss ``L_o`` alone, hidden leaders by their own prediction loss, followers by
alignment to their best leader. Layers could therefore update in parallel, and no input-gradient
matmul is ever computed.
"""

from __future__ import annotations

from dataclasses import dataclass

from agentnet.registry import register_strategy
from strategies.lfnn import LeaderFollower, LeaderFollowerConfig


@dataclass
class LFNNLocalConfig(LeaderFollowerConfig):
    """``lfnn_local`` settings: the local terms are each worker's whole objective, so weight 1."""


@register_strategy("lfnn_local")
class LFNNLocal(LeaderFollower):
    """LFNN-l (Eq. 2): purely local losses, layer inputs detached."""

    Config = LFNNLocalConfig
    path = "local"
    leaders_carry_global = False
