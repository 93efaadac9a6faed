"""Data parallelism's plugin: every rank's gradients averaged before the update (``torchrun``; see
:mod:`agentnet.distributed`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from agentnet.distributed import DistributedError, all_reduce, world
from agentnet.strategy import StepResult
from agentnet.training.plugins import TrainerPlugin

if TYPE_CHECKING:
    from agentnet.training.engine import Trainer

__all__ = ["GradientAveraging", "config_fingerprint"]

log = logging.getLogger(__name__)

#: Run settings that may differ between ranks: where each writes, and whether it resumes (all do).
_RANK_LOCAL = ("output_dir", "resume_from")


def config_fingerprint(cfg) -> int:
    """A 62-bit hash of the run's config (without :data:`_RANK_LOCAL`): ranks must train one run."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RANK_LOCAL}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


class GradientAveraging(TrainerPlugin):
    """After the strategy's backward pass, each parameter's ``.grad`` becomes the average over the
    ranks, weighted by each rank's share of the global batch: exactly the gradient of the loss's
    mean over the global batch, whether autograd or the strategy wrote it (forward gradients,
    feedback alignment's hooks, PEPITA's and attention's hand-written updates).

    Per step: one small all-reduce of bookkeeping (shard sizes, the replicas' losses, which
    parameters have a gradient on any rank, whether a rank was asked to stop), then the gradients in
    buckets of ``bucket_mb`` MiB, all in flight at once (asynchronous all-reduces: the transfer of one
    bucket overlaps the packing of the next; it cannot overlap the backward pass, because several
    strategies write ``.grad`` only after it). The step's reported loss becomes the global batch's.
    At ``before_run`` the ranks check that they train the same config and start from rank 0's
    parameters and buffers; at each epoch's end, that their parameters are still identical.
    """

    def __init__(self, bucket_mb: float = 25.0) -> None:
        self.bucket_bytes = max(int(bucket_mb * 2**20), 1)
        self.steps = 0
        self._examples = 0
        self.bytes_per_step = 0
        """Bytes of gradient all-reduced in the last step (per rank)."""

    def before_run(self, trainer: "Trainer") -> None:
        w = world()
        mine = config_fingerprint(trainer.cfg)
        both = torch.tensor([mine, -mine], dtype=torch.int64, device=trainer.device)
        if w.active:
            import torch.distributed as dist

            try:
                dist.all_reduce(both, op=dist.ReduceOp.MAX)
            except RuntimeError as error:
                raise DistributedError(f"rank {w.rank}: the ranks could not compare their configs ({error})") from error
            if int(both[0]) != mine or int(-both[1]) != mine:
                raise DistributedError(
                    f"rank {w.rank}: the ranks were started with different configs; every rank of a torchrun job "
                    "must get the same overrides (only output_dir and resume_from may differ)")
            tensors = [*trainer.model.parameters(), *trainer.model.buffers()]
            flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
            try:
                dist.broadcast(flat, 0)
            except RuntimeError as error:
                raise DistributedError(f"rank {w.rank}: broadcasting rank 0's parameters failed ({error})") from error
            with torch.no_grad():
                offset = 0
                for t in tensors:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t).to(t.dtype))
                    offset += t.numel()

    def before_step(self, trainer: "Trainer", x: Tensor, y: Tensor) -> None:
        self._examples = x.shape[1]  # this rank's examples in the step, replayed ones included

    def after_backward(self, trainer: "Trainer", result: StepResult) -> None:
        if not world().active:
            return
        params = list(trainer.model.parameters())
        losses = result.loss.detach().reshape(-1)
        n_local = float(self._examples)
        meta = torch.cat([
            torch.tensor([1.0 if trainer.stop_requested else 0.0, n_local], dtype=torch.float64, device=trainer.device),
            losses.to(torch.float64) * n_local,
            torch.tensor([p.grad is not None for p in params], dtype=torch.float64, device=trainer.device),
        ])
        all_reduce(meta, f"the bookkeeping of step {trainer.step + 1}")
        if meta[0] > 0 and trainer.stop_agreed is None:
            trainer.stop_agreed = trainer.stop_requested or "a stop request on another rank"
        total = float(meta[1])
        result.loss = (meta[2 : 2 + losses.numel()] / total).to(result.loss.dtype).view_as(result.loss)
        has_grad = meta[2 + losses.numel():] > 0
        share = n_local / total
        grads: list[Tensor] = []
        for p, present in zip(params, has_grad.tolist()):
            if not present:
                continue
            if p.grad is None:  # no gradient on this rank's shard, some on another's
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        self.bytes_per_step = sum(g.numel() * g.element_size() for g in grads)
        self._reduce(grads, share, trainer.step + 1)
        self.steps += 1

    def _reduce(self, grads: list[Tensor], share: float, step: int) -> None:
        """``grads`` ← their share-weighted sum over the ranks, bucket by bucket (one dtype per bucket)."""
        import torch.distributed as dist

        buckets: list[list[Tensor]] = []
        size = 0
        for g in grads:
            if not buckets or size + g.numel() * g.element_size() > self.bucket_bytes or buckets[-1][0].dtype != g.dtype:
                buckets.append([])
                size = 0
            buckets[-1].append(g)
            size += g.numel() * g.element_size()
        pending = []
        try:
            for bucket in buckets:
                flat = torch.cat([g.reshape(-1) for g in bucket]).mul_(share)
                pending.append((bucket, flat, dist.all_reduce(flat, async_op=True)))
            for bucket, flat, work in pending:
                work.wait()
                offset = 0
                for g in bucket:
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()
        except RuntimeError as error:
            w = world()
            raise DistributedError(
                f"rank {w.rank} of {w.size}: averaging the gradients of step {step} failed — another rank died, was "
                f"killed or stopped answering ({str(error).splitlines()[0] if str(error) else type(error).__name__}). "
                "The last checkpoint is kept; start the same torchrun command again with resume=true") from error

    def after_epoch(self, trainer: "Trainer", entry: dict) -> None:
        """Check that the ranks' parameters are still identical (they take identical steps; a
        difference means a strategy decided something from its shard alone)."""
        if not world().active:
            return
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in trainer.model.parameters()])
            local = torch.stack([flat.sum(), flat.square().sum()])
        spread = torch.cat([local, -local])
        import torch.distributed as dist

        try:
            dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        except RuntimeError as error:
            raise DistributedError(f"rank {world().rank}: comparing the ranks' parameters failed ({error})") from error
        high, low = spread[:2], -spread[2:]
        if not torch.equal(high, low):
            raise DistributedError(
                f"epoch {trainer.epoch}: the ranks' parameters differ (sums {low.tolist()} .. {high.tolist()}): the strategy "
                f"{trainer.strategy.name} computed something from its own shard that should be global")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
