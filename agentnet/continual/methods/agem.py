"""``agem``: averaged gradient episodic memory (Chaudhry et al. 2019, "Efficient Lifelong Learning
with A-GEM").

Every finished task leaves ``memory_per_task`` of its training examples in an episodic memory. At
each step, after the strategy's backward has put the update direction ``g`` into ``.grad``, the
reference gradient ``g_ref`` is the strategy's own gradient on ``memory_batch`` examples drawn from
the memory of all earlier tasks; when the update would raise the memory loss (``g . g_ref < 0``)
it is projected onto the half-space where it does not:

    g <- g - (g . g_ref / g_ref . g_ref) g_ref

Per replica; with ``projection=layer`` per layer too (each layer's part of ``g`` against its own
part of ``g_ref``). See :mod:`agentnet.continual.methods._episodic` and docs/continual.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from agentnet.config import check
from agentnet.continual.methods import CL_METHODS
from agentnet.continual.methods._episodic import EpisodicConfig, EpisodicProjection


@dataclass
class AGEMConfig(EpisodicConfig):
    """A-GEM settings."""

    memory_batch: int = 256
    """Memory examples per reference gradient, drawn from all earlier tasks (A-GEM's 256)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.memory_batch > 0, "cl.memory_batch", self.memory_batch, "must be positive")


@CL_METHODS.register("agem")
class AGEM(EpisodicProjection):
    """Projects each update that conflicts with the average memory gradient."""

    Config = AGEMConfig

    def __init__(self, cfg: AGEMConfig, model: nn.Module, variants: dict[str, list[float]] | None = None) -> None:
        super().__init__(cfg, model, variants)
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def reference_batches(self):
        return [self.memory.sample(self.cfg.memory_batch, self.gen)]

    def project(self, g: Tensor, G: Tensor, dots: Tensor) -> tuple[Tensor, Tensor]:
        ref, dot = G[:, 0], dots[:, 0]
        conflict = dot < 0
        coef = dot / (ref * ref).sum(1).clamp_min(torch.finfo(ref.dtype).tiny)
        return torch.where(conflict.unsqueeze(1), g - coef.unsqueeze(1) * ref, g), conflict

    def state_dict(self) -> dict:
        return {**super().state_dict(), "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.gen.set_state(state["gen"].cpu())
