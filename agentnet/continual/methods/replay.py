"""``replay``: experience replay from a fixed-size reservoir buffer (Chaudhry et al. 2019).

Every step appends ``replay_batch`` examples drawn from the buffer to the mini-batch; the current
batch then enters the buffer by reservoir sampling, so the buffer is a uniform sample of the whole
stream seen so far and never exceeds ``buffer_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agentnet.config import CLConfig, check
from agentnet.continual.methods import CL_METHODS, CLMethod
from agentnet.devices import to_device
from agentnet.distributed import gather, shard


@dataclass
class ReplayConfig(CLConfig):
    """Replay settings."""

    buffer_size: int = 1000
    """Examples kept in memory, over all tasks."""
    replay_batch: int = 128
    """Replayed examples added to every mini-batch."""
    seed: int = 0
    """Seeds reservoir and replay sampling."""

    def __post_init__(self) -> None:
        check(self.buffer_size > 0, "cl.buffer_size", self.buffer_size, "must be positive")
        check(self.replay_batch > 0, "cl.replay_batch", self.replay_batch, "must be positive")


class ReservoirBuffer:
    """Uniform sample of a stream with fixed capacity (Vitter's algorithm R, vectorised per batch).

    Examples are stored per replica along dim 1 (``x`` ``(R, capacity, D)``); which slots are kept
    and drawn depends only on the stream position and the buffer's own seed, as in one replica.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.seen = 0
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.x is None:
            self.x = torch.empty(x.shape[0], self.capacity, *x.shape[2:], dtype=x.dtype, device=x.device)
            self.y = torch.empty(y.shape[0], self.capacity, dtype=y.dtype, device=y.device)
        n = x.shape[1]
        positions = torch.arange(self.seen, self.seen + n)
        slots = torch.where(
            positions < self.capacity, positions, (torch.rand(n, generator=self.gen) * (positions + 1)).long()
        )
        # Algorithm R is sequential: when two examples of the batch draw the same slot, the later
        # one wins. Written explicitly, so the result never depends on scatter order.
        kept = torch.nonzero(slots < self.capacity).view(-1)
        unique, inverse = torch.unique(slots[kept], return_inverse=True)
        last = torch.full((len(unique),), -1, dtype=torch.long).scatter_reduce(0, inverse, torch.arange(len(kept)), "amax")
        # The slots are drawn on the host (the same on every device); moved without a stall.
        source, unique = to_device(kept[last], x.device), to_device(unique, x.device)
        self.x[:, unique] = x[:, source]
        self.y[:, unique] = y[:, source]
        self.seen += n

    def state_dict(self) -> dict:
        return {"seen": self.seen, "x": self.x, "y": self.y, "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.seen, self.x, self.y = state["seen"], state["x"], state["y"]
        self.gen.set_state(state["gen"].cpu())

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = to_device(torch.randint(0, len(self), (n,), generator=self.gen), self.x.device)
        return self.x[:, idx], self.y[:, idx]


@CL_METHODS.register("replay")
class ExperienceReplay(CLMethod):
    """Mixes replayed examples into every mini-batch."""

    Config = ReplayConfig

    def __init__(self, cfg: ReplayConfig, model: torch.nn.Module, variants: dict[str, list[float]] | None = None) -> None:
        super().__init__(cfg, model, variants)
        self.buffer = ReservoirBuffer(cfg.buffer_size, cfg.seed)
        self._fresh: tuple[torch.Tensor, torch.Tensor] | None = None

    def adapt_batch(self, trainer, x, y):
        self._fresh = (x, y)
        if len(self.buffer) == 0:
            return x, y
        # Under torchrun every rank holds the same buffer and draws the same sample; each replays its shard of it.
        rx, ry = (shard(t) for t in self.buffer.sample(self.cfg.replay_batch))
        return torch.cat([x, rx], 1), torch.cat([y, ry], 1)

    def after_step(self, trainer, x, y, result) -> None:
        self.buffer.add(*(gather(t) for t in self._fresh))  # the global batch: the same buffer on every rank

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state["buffer"])
        if self.buffer.x is not None:
            device = next(self.model.parameters()).device
            self.buffer.x, self.buffer.y = self.buffer.x.to(device), self.buffer.y.to(device)
