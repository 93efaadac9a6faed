"""What A-GEM and GEM share: an episodic memory per task, the strategy's gradient on it, and the
parameter groups a projection acts on.

**Reference gradients through the strategy.** A memory gradient is whatever the run's strategy
puts into ``.grad`` for a memory batch — ``strategy.compute`` then ``strategy.backward``, exactly
as for a training batch — so the projection composes with every learning rule, not just BP. Taking
it must not disturb the training step: :func:`preserved_step_state` keeps the step's ``.grad``,
the strategy's state (leadership counts, forward-gradient generators), the model's buffers (batch
norm running statistics) and torch's RNG (dropout masks) as they were.

**Per replica.** Every parameter is replica-major (:mod:`agentnet.workers`): replica ``r``'s part
of a gradient is rows ``[r*rows//R, (r+1)*rows//R)`` of every tensor, so ``g.reshape(R, -1)`` lists
it. Dot products, norms and projections are taken per replica; replicas never mix.

**Projection groups** (``projection``): ``global`` — one vector per replica, every trainable
parameter; ``layer`` — each layer's parameters on their own (:func:`parameter_groups`), so each
layer's agents project their own update against their own part of the memory gradient.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from agentnet.config import CLConfig, check
from agentnet.continual.methods import CLMethod
from agentnet.devices import to_device

PROJECTIONS = ("global", "layer")

__all__ = ["PROJECTIONS", "EpisodicConfig", "EpisodicMemory", "EpisodicProjection", "parameter_groups",
           "preserved_step_state", "strategy_gradient", "flat", "write_flat"]


class EpisodicMemory:
    """``per_task`` training examples of every finished task, per replica ``(R, m, D)``.

    Which examples a task keeps depends only on ``seed`` and the task's index (as in a one-replica
    run); each replica stores its own view of them (its own permutation). Task-incremental streams
    also keep each task's logit mask, so memory examples are scored among their own task's classes.
    """

    def __init__(self, per_task: int, seed: int) -> None:
        self.per_task = per_task
        self.seed = seed
        self.x: list[Tensor] = []
        self.y: list[Tensor] = []
        self.masks: list[Tensor | None] = []

    def __len__(self) -> int:
        """Tasks held."""
        return len(self.x)

    @property
    def size(self) -> int:
        """Examples held (per replica)."""
        return sum(y.shape[1] for y in self.y)

    def add_task(self, stream, task) -> None:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + task.index)
        n = min(self.per_task, task.train_size)
        pick = torch.randperm(task.train_size, generator=gen)[:n].to(task.train_idx.device)
        x, y = stream.batch(task, pick)
        self.x.append(x.clone())
        self.y.append(y.clone())
        self.masks.append(stream.logit_mask(task))

    def _mask(self, tasks: Tensor, like: Tensor) -> Tensor | None:
        """Per-example logit masks ``(R, n, C)`` for examples of ``tasks`` ``(n,)``; ``None`` without heads."""
        if not self.masks or self.masks[0] is None:
            return None
        table = torch.stack(self.masks)  # (T, C)
        return table[to_device(tasks, table.device)].unsqueeze(0).expand(like.shape[0], -1, -1)

    def task_batch(self, t: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """The whole memory of task ``t``: ``x`` ``(R, m, D)``, ``y`` ``(R, m)``, its logit mask."""
        y = self.y[t]
        return self.x[t], y, self._mask(torch.full((y.shape[1],), t, dtype=torch.long), y)

    def sample(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor | None]:
        """``n`` examples drawn without replacement from every task's memory (all of it when ``n``
        is at least its size), the same positions for every replica."""
        x, y = torch.cat(self.x, 1), torch.cat(self.y, 1)
        tasks = torch.cat([torch.full((yt.shape[1],), t, dtype=torch.long) for t, yt in enumerate(self.y)])
        if n < y.shape[1]:
            idx = torch.randperm(y.shape[1], generator=gen)[:n]
            tasks = tasks[idx]
            idx = to_device(idx, y.device)
            x, y = x[:, idx], y[:, idx]
        return x, y, self._mask(tasks, y)

    def state_dict(self) -> dict:
        return {"x": self.x, "y": self.y, "masks": self.masks}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.x = [x.to(device) for x in state["x"]]
        self.y = [y.to(device) for y in state["y"]]
        self.masks = [None if m is None else m.to(device) for m in state["masks"]]


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def parameter_groups(model: nn.Module, projection: str) -> list[list[nn.Parameter]]:
    """The parameter groups a projection treats as one vector each (per replica).

    ``global``: one group of every trainable parameter. ``layer``: the network's layers as it
    groups them — each plain-layer stem, each worker layer, each normalisation, the output layer,
    each worker readout — then every module of ``model.aux`` (a strategy's local heads) that owns
    parameters directly, and any parameter left over as a last group.
    """
    params = trainable(model)
    if projection == "global":
        return [params]
    entries: list[tuple[nn.Module, bool]] = []  # (module, whether its submodules' parameters count)
    for name in ("stems", "hidden", "norms"):
        entries += [(m, True) for m in getattr(model, name, [])]
    if hasattr(model, "output"):
        entries.append((model.output, True))
    entries += [(m, True) for m in getattr(model, "readouts", [])]
    aux = getattr(model, "aux", None)
    if aux is not None:
        entries += [(m, False) for m in aux.modules() if any(True for _ in m.parameters(recurse=False))]
    groups, seen = [], set()
    for module, recurse in entries:
        group = [p for p in module.parameters(recurse=recurse) if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in group)
        if group:
            groups.append(group)
    rest = [p for p in params if id(p) not in seen]
    if rest:
        groups.append(rest)
    return groups


@contextlib.contextmanager
def preserved_step_state(model: nn.Module, strategy) -> Iterator[None]:
    """Within the block, extra forward/backward passes leave no trace on the training step: every
    ``.grad`` starts empty and is put back after; the strategy's state, the model's buffers, its
    logit mask and torch's RNG (CPU and the model's CUDA device) are restored on exit."""
    params = list(model.parameters())
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    strategy_state = copy.deepcopy(strategy.state_dict()) if strategy is not None else None
    buffers = [b.detach().clone() for b in model.buffers()]
    mask = getattr(model, "logit_mask", None)
    device = next(model.parameters()).device
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
        if strategy is not None:
            strategy.load_state_dict(strategy_state)
        if hasattr(model, "logit_mask"):
            model.head.logit_mask = mask
        for p, g in zip(params, grads):
            p.grad = g


def autocast_of(trainer):
    """The trainer's autocast context (bf16 when ``trainer.amp=bf16``), or none."""
    return getattr(trainer, "_autocast", contextlib.nullcontext)()


def strategy_gradient(trainer, x: Tensor, y: Tensor, mask: Tensor | None, params: list[nn.Parameter]) -> list[Tensor | None]:
    """The strategy's gradient on ``(x, y)`` for ``params`` (call inside :func:`preserved_step_state`);
    ``.grad`` is empty again afterwards."""
    model, strategy = trainer.model, trainer.strategy
    with model.head.logit_mask_as(mask):
        with autocast_of(trainer):
            result = strategy.compute(x, y)
        strategy.backward(result)
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    return grads


def flat(tensors: list[Tensor | None], params: list[nn.Parameter], replicas: int) -> Tensor:
    """Per-replica flat vector ``(R, P)`` of ``tensors`` shaped like ``params`` (``None`` is zero)."""
    return torch.cat(
        [(torch.zeros_like(p) if t is None else t).reshape(replicas, -1) for t, p in zip(tensors, params)], 1
    )


def write_flat(vector: Tensor, params: list[nn.Parameter], untouched: frozenset[int] = frozenset()) -> None:
    """Set ``.grad`` of ``params`` from a per-replica flat vector ``(R, P)`` (inverse of :func:`flat`).
    A parameter without ``.grad`` keeps none where its part is zero: always for ``untouched`` (ids of
    parameters no gradient reached, so any projection leaves their part 0: nothing is tested)."""
    offset = 0
    for p in params:
        n = p.numel() // vector.shape[0]
        value = vector[:, offset : offset + n].reshape(p.shape)
        offset += n
        if p.grad is None:
            if id(p) not in untouched and bool((value != 0).any()):
                p.grad = value.clone()
        else:
            p.grad.copy_(value)


@dataclass
class EpisodicConfig(CLConfig):
    """Settings shared by A-GEM and GEM."""

    memory_per_task: int = 256
    """Examples of each finished task kept in the episodic memory (GEM's 256)."""
    projection: str = "global"
    """``global``: project the whole update (per replica); ``layer``: each layer's parameters
    against their own part of the memory gradient (local constraints, see docs/continual.md)."""
    seed: int = 0
    """Seeds which examples each task's memory keeps and (A-GEM) which memory batch each step draws."""

    def __post_init__(self) -> None:
        check(self.memory_per_task > 0, "cl.memory_per_task", self.memory_per_task, "must be positive")
        check(self.projection in PROJECTIONS, "cl.projection", self.projection, f"choose one of {PROJECTIONS}")


class EpisodicProjection(CLMethod):
    """Base of A-GEM and GEM: fills the memory at every task's end, projects ``.grad`` after the
    strategy's backward (:meth:`project`), and counts the projections per replica."""

    Config = EpisodicConfig

    def __init__(self, cfg: EpisodicConfig, model: nn.Module, variants: dict[str, list[float]] | None = None) -> None:
        super().__init__(cfg, model, variants)
        self.memory = EpisodicMemory(cfg.memory_per_task, cfg.seed)
        replicas = getattr(model, "replicas", 1)
        self.projections = torch.zeros(replicas, dtype=torch.long, device=next(model.parameters()).device)
        """Per replica, how many (step, group) updates were projected so far."""
        self.last: dict[str, list[Tensor]] = {}
        """The last step's per-group dot products with the memory gradients (``before``/``after``
        projection, each ``(R, constraints)``), for logging and tests."""

    def after_task(self, trainer, stream, task) -> None:
        self.memory.add_task(stream, task)

    def after_backward(self, trainer, result) -> None:
        if len(self.memory) == 0:
            return
        params = trainable(self.model)
        with preserved_step_state(self.model, trainer.strategy):
            references = [strategy_gradient(trainer, x, y, mask, params) for x, y, mask in self.reference_batches()]
        index = {id(p): i for i, p in enumerate(params)}
        R = self.projections.numel()
        self.last = {"before": [], "after": []}
        for group in parameter_groups(self.model, self.cfg.projection):
            at = [index[id(p)] for p in group]
            g = flat([params[i].grad for i in at], group, R)
            G = torch.stack([flat([ref[i] for i in at], group, R) for ref in references], 1)  # (R, K, P)
            before = torch.einsum("rkp,rp->rk", G, g)
            new, projected = self.project(g, G, before)
            self.last["before"].append(before.detach())
            self.last["after"].append(torch.einsum("rkp,rp->rk", G, new).detach())
            # Written back whether or not a replica was projected (``new`` is ``g`` where it was
            # not): testing first would wait for the device every step.
            self.projections += projected.long()
            # Parameters neither the update nor any memory gradient reached (a layer the strategy
            # does not train) stay without a gradient, and without a test that would wait for the device.
            untouched = frozenset(id(params[i]) for i in at if params[i].grad is None and all(ref[i] is None for ref in references))
            with torch.no_grad():
                write_flat(new, group, untouched)

    def reference_batches(self) -> list[tuple[Tensor, Tensor, Tensor | None]]:
        """The memory batches whose strategy gradients constrain the update."""
        raise NotImplementedError

    def project(self, g: Tensor, G: Tensor, dots: Tensor) -> tuple[Tensor, Tensor]:
        """Per replica, the update ``(R, P)`` given the memory gradients ``G`` ``(R, K, P)`` and
        their dot products ``dots`` ``(R, K)`` with ``g``; and which replicas were projected ``(R,)``."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"memory": self.memory.state_dict(), "projections": self.projections}

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state["memory"], next(self.model.parameters()).device)
        self.projections = state["projections"].to(self.projections.device, copy=True)
