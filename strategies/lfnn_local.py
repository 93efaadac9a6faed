"""``lfnn_local``: LFNN-l, the BP-free Leader-Follower network (LFNN paper, Eq. 2).

Every layer's input is detached, so no gradient crosses a layer boundary: the output layer is
trained by the output loss ``L_o`` alone, hidden leaders by their own prediction loss, followers by
alignment to their best leader. Layers could therefore update in parallel, and no input-gradient
matmul is ever computed.
"""

from __future__ import annotations

from agentnet.registry import register_strategy
from strategies.lfnn import LeaderFollower


@register_strategy("lfnn_local")
class LFNNLocal(LeaderFollower):
    """LFNN-l (Eq. 2): purely local losses, layer inputs detached."""

    path = "local"
    leaders_carry_global = False
