"""One run over several processes: data parallelism through ``torchrun`` for every strategy.

``torchrun --nproc_per_node=N -m agentnet ...`` starts N copies of the run (ranks). Each builds the
same model from the same seeds and takes its shard of every global mini-batch (:func:`shard`); after
the strategy's backward pass — whatever it left in ``.grad``, from autograd or written by hand —
:class:`~agentnet.training.GradientAveraging` averages the gradients over the ranks, so every rank
takes the same optimiser step and the replicas never drift apart (PyTorch's
``DistributedDataParallel`` averages only what its autograd hooks see: several strategies here
write ``.grad`` themselves). Statistics a strategy or layer computes over the batch go through
:func:`batch_mean` (leader selection) and :func:`sync_batch_norm` (batch normalisation), so that
N ranks compute what one process computes on the whole global batch. Rank 0 writes the outputs,
checkpoints and logs; every rank reads a checkpoint on ``resume=true``.

Backends: NCCL when the run's device is CUDA (one GPU per local rank), gloo on the CPU. Without
torchrun's environment (``WORLD_SIZE`` unset or 1) everything here is the identity. A SLURM job
with several tasks started by submitit (Hydra's SLURM launcher with ``tasks_per_node`` > 1) sets the
same environment from SLURM's (:func:`launched`).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from agentnet.config import ConfigError

__all__ = ["World", "DistributedError", "world", "launched", "init_world", "shard", "gather", "batch_mean", "sync_batch_norm",
           "all_reduce", "broadcast_text"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """Where this process stands: ``rank`` of ``size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """More than one process trains this run."""
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes outputs, checkpoints and logs."""
        return self.rank == 0


class DistributedError(RuntimeError):
    """A collective failed: another rank died or was killed, or the ranks disagree about the run."""


_WORLD = World()
_DEVICE = torch.device("cpu")  # where collectives' tensors live: the CPU for gloo, this rank's GPU for NCCL


def world() -> World:
    """This process's :class:`World` (a one-process world unless :func:`init_world` set one up)."""
    return _WORLD


def _from_submitit() -> None:
    """A multi-task SLURM job started by submitit (Hydra's ``hydra/launcher=slurm`` with
    ``tasks_per_node`` > 1, or ``nodes`` > 1): its tasks are the ranks. submitit's own helper exports
    what ``torchrun`` would (``MASTER_ADDR`` = the job's first node, ``MASTER_PORT`` from the job id,
    ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    if "WORLD_SIZE" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or int(os.environ.get("SLURM_NTASKS") or 1) < 2:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def launched() -> World:
    """The world ``torchrun`` (or a multi-task submitit job on SLURM) describes in the environment
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), before any process group exists; a one-process world
    without it."""
    _from_submitit()
    size = int(os.environ.get("WORLD_SIZE") or 1)
    return World(int(os.environ.get("RANK") or 0), size, int(os.environ.get("LOCAL_RANK") or 0)) if size > 1 else World()


def init_world(device: torch.device, timeout_s: float = 600.0) -> tuple[World, torch.device]:
    """Join torchrun's process group (once per process) and return the world and this rank's
    device: ``cuda:<local_rank>`` with NCCL for a CUDA run, the CPU with gloo otherwise.
    ``timeout_s`` bounds how long a collective waits for a rank that stopped answering."""
    global _WORLD, _DEVICE
    found = launched()
    if not found.active:
        return _WORLD, device
    import torch.distributed as dist

    if device.type == "cuda":
        if found.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"torchrun: local rank {found.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                              "set --nproc_per_node to at most the number of GPUs")
        device = torch.device("cuda", found.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        log.info("rank %d of %d joined the process group (%s)", found.rank, found.size, backend)
    _WORLD, _DEVICE = found, device
    return found, device


def shard(batch: Tensor, dim: int = 1) -> Tensor:
    """This rank's part of a global batch (example indices ``(R, B)``, or examples) along ``dim``:
    contiguous, as equal as possible (``torch.tensor_split``), so that the shards of all ranks in
    rank order are the global batch."""
    w = _WORLD
    return batch if not w.active else torch.tensor_split(batch, w.size, dim=dim)[w.rank]


def gather(part: Tensor, dim: int = 1) -> Tensor:
    """The global batch from every rank's ``part`` (its :func:`shard`), concatenated along ``dim`` in
    rank order; ``part`` itself in a one-process world. Shards may differ in size along ``dim``."""
    w = _WORLD
    if not w.active:
        return part
    import torch.distributed as dist

    size = torch.tensor([part.shape[dim]], dtype=torch.int64, device=part.device)
    sizes = [torch.zeros_like(size) for _ in range(w.size)]
    with _guard("gathering a batch"):
        dist.all_gather(sizes, size)
        longest = max(int(s) for s in sizes)
        pad = list(part.shape)
        pad[dim] = longest - part.shape[dim]
        padded = torch.cat([part, part.new_zeros(pad)], dim) if pad[dim] else part.contiguous()
        parts = [torch.empty_like(padded) for _ in range(w.size)]
        dist.all_gather(parts, padded)
    return torch.cat([p.narrow(dim, 0, int(s)) for p, s in zip(parts, sizes)], dim)


def _guard(what: str):
    """Turn a failed collective into a :class:`DistributedError` that says what to do."""
    import contextlib

    @contextlib.contextmanager
    def guarded():
        try:
            yield
        except DistributedError:
            raise
        except RuntimeError as error:  # gloo / NCCL: a peer closed the connection, or a timeout
            raise DistributedError(
                f"rank {_WORLD.rank} of {_WORLD.size}: {what} failed — another rank died, was killed or stopped answering "
                f"({str(error).splitlines()[0] if str(error) else type(error).__name__}). The last checkpoint is kept; "
                "start the same torchrun command again with resume=true"
            ) from error

    return guarded()


def all_reduce(tensor: Tensor, what: str = "a sum over the ranks") -> Tensor:
    """``tensor`` summed over the ranks, in place (and returned); the identity in a one-process world."""
    if _WORLD.active:
        import torch.distributed as dist

        with _guard(what):
            dist.all_reduce(tensor)
    return tensor


def batch_mean(values: Tensor, dim: int) -> Tensor:
    """The mean of ``values`` over its batch dimension ``dim`` — over the *global* batch when the
    batch is sharded over ranks (each rank's sum and count, summed), without gradient: what a
    strategy decides from batch statistics (which workers lead) must be the same on every rank."""
    if not _WORLD.active:
        return values.mean(dim)
    total = values.detach().sum(dim)
    count = torch.tensor([float(values.shape[dim])], device=values.device, dtype=total.dtype)
    packed = all_reduce(torch.cat([total.reshape(-1), count]), "a batch mean (leader selection)")
    return (packed[:-1] / packed[-1]).view_as(total)


class _SumOverRanks(torch.autograd.Function):
    """``x`` summed over the ranks, differentiable in both modes: the backward pass sums each rank's
    gradient (every rank's loss depends on every rank's ``x``) and the forward mode (``torch.func.jvp``:
    the forward-gradient strategies) sums the tangents. ``torch.distributed.nn``'s all-reduce has no
    forward mode."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        import torch.distributed as dist

        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad)
        return grad

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        import torch.distributed as dist

        tangent = tangent.clone()
        dist.all_reduce(tangent)
        return tangent


def sync_batch_norm(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor, bias: Tensor,
                    momentum: float, eps: float = 1e-5) -> Tensor:
    """Training-mode batch normalisation of ``x`` ``(B, C, ...)`` with the statistics of the global
    batch (every rank's sums, through an all-reduce that autograd differentiates: the gradient is
    the one-process gradient on the whole batch); updates the running averages as
    ``F.batch_norm`` does (unbiased variance)."""
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        raise ConfigError(
            "batch normalisation under torchrun inside a forward-mode transform (the forward-gradient strategies fg_w, fg_a, "
            "lg_fg_w, lg_fg_a): the global batch's running statistics cannot be updated inside torch.func.jvp; use group or "
            "layer normalisation (model.conv[*].norm=group) or no normalisation, or train this run in one process")
    dtype = x.dtype
    x = x.float()  # as autocast runs batch_norm: in float32 whatever the activations' dtype
    dims = [0, *range(2, x.dim())]
    c = x.shape[1]
    # Two passes (the mean, then the squared deviations from it), as F.batch_norm: E[x²] − E[x]²
    # loses digits when the mean is large against the spread.
    n_local = x.numel() // c
    with _guard("a batch-norm statistic"):
        first = _SumOverRanks.apply(torch.cat([x.sum(dims), x.new_full((1,), float(n_local))]))
        n = first[-1].detach()
        mean = first[:c] / n
        shape = [1, c, *([1] * (x.dim() - 2))]
        centred = x - mean.view(shape)
        var = _SumOverRanks.apply(centred.square().sum(dims)) / n
    if momentum:
        with torch.no_grad():
            unbiased = var * (n / (n - 1).clamp_min(1))
            running_mean.lerp_(mean.detach().to(running_mean.dtype), momentum)
            running_var.lerp_(unbiased.detach().to(running_var.dtype), momentum)
    y = centred * torch.rsqrt(var.view(shape) + eps) * weight.view(shape) + bias.view(shape)
    return y.to(dtype)


def broadcast_text(text: str) -> str:
    """Rank 0's ``text`` on every rank (e.g. its output directory), as bytes in a tensor: nothing
    is unpickled."""
    if not _WORLD.active:
        return text
    import torch.distributed as dist

    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=_DEVICE)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=_DEVICE)
    with _guard("sharing rank 0's output directory"):
        dist.broadcast(size, 0)
        buffer = data if _WORLD.main else torch.zeros(int(size), dtype=torch.uint8, device=_DEVICE)
        dist.broadcast(buffer, 0)
    return bytes(buffer.cpu().tolist()).decode()
