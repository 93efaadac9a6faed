"""Task streams over MNIST held on the device: permuted, split (class- and task-incremental), rotated.

A stream never materialises a task's images: each task is a set of example indices plus an input
transform applied per batch (a pixel gather for permutations, ``grid_sample`` for rotations).

A stream serves a population: each seed (replica) draws its own permutations, and every batch is
``(R, B, D)`` — replica ``r`` sees exactly what a one-replica stream with ``seeds[r]`` would show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from agentnet.config import ConfigError
from agentnet.data import ImageData, Split

__all__ = ["Task", "TaskStream", "build_stream", "pad_to_32"]


def pad_to_32(split: Split, background: float) -> Split:
    """Zero-pad 28x28 images to 32x32 (``background`` is the normalised value of a black pixel)."""
    images = split.x.view(-1, 1, 28, 28)
    padded = F.pad(images, (2, 2, 2, 2), value=background)
    return Split(padded.reshape(len(split), -1), split.y)


@dataclass
class Task:
    """One task: which examples, how inputs are transformed, which classes it covers."""

    index: int
    train_idx: Tensor
    """Indices into the training split: ``(N,)`` shared by every replica, or ``(R, N)`` one row per
    replica (``benchmark.samples_per_task``: each seed draws its own examples)."""
    test_idx: Tensor
    classes: Tensor
    val_idx: Tensor | None = None
    """Indices into the validation split (``data.val_split``); ``None`` without one."""
    permutation: Tensor | None = None
    """Per replica, the pixel permutation ``(R, D)``; ``None`` for no permutation."""
    angle: float | None = None

    @property
    def train_size(self) -> int:
        """Training examples of this task (per replica)."""
        return self.train_idx.shape[-1]


class TaskStream:
    """A sequence of tasks over one dataset.

    ``scenario``: ``permuted`` (domain-incremental, shared head), ``split_class`` (class-incremental,
    shared 10-way head), ``split_task`` (task-incremental: the output is masked to the task's
    classes, i.e. a multi-head model), ``rotated`` (domain-incremental).
    """

    SCENARIOS = ("permuted", "split_class", "split_task", "rotated")

    def __init__(
        self,
        data: ImageData,
        scenario: str,
        num_tasks: int,
        seeds: int | list[int] = 0,
        *,
        first_unpermuted: bool = False,
        pad32: bool = False,
        max_angle: float = 180.0,
        samples_per_task: int | None = None,
    ) -> None:
        if scenario not in self.SCENARIOS:
            raise ValueError(f"benchmark.scenario={scenario!r}: choose one of {self.SCENARIOS}")
        if pad32:
            background = data.train.x.min().item()
            data = replace(data, train=pad_to_32(data.train, background), test=pad_to_32(data.test, background),
                           val=None if data.val is None else pad_to_32(data.val, background))
        self.data = data
        self.scenario = scenario
        self.num_classes = data.num_classes
        self.side = 32 if pad32 else 28
        device = data.train.y.device
        seeds = [seeds] if isinstance(seeds, int) else list(seeds)
        self.replicas = len(seeds)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        all_train = torch.arange(len(data.train), device=device)
        all_test = torch.arange(len(data.test), device=device)
        all_classes = torch.arange(self.num_classes, device=device)
        self.tasks: list[Task] = []
        if scenario == "permuted":
            for t in range(num_tasks):
                perm = None
                if not (t == 0 and first_unpermuted):
                    perm = torch.stack([torch.randperm(self.input_dim, generator=g) for g in gens]).to(device)
                self.tasks.append(Task(t, all_train, all_test, all_classes, permutation=perm))
        elif scenario == "rotated":
            for t in range(num_tasks):
                angle = 0.0 if num_tasks == 1 else max_angle * t / num_tasks
                self.tasks.append(Task(t, all_train, all_test, all_classes, angle=angle))
        else:
            per_task = self.num_classes // num_tasks
            if per_task * num_tasks != self.num_classes:
                raise ValueError(f"benchmark.num_tasks={num_tasks}: split MNIST needs a divisor of {self.num_classes}")
            for t in range(num_tasks):
                classes = all_classes[t * per_task : (t + 1) * per_task]
                train_idx = torch.nonzero(torch.isin(data.train.y, classes)).squeeze(1)
                test_idx = torch.nonzero(torch.isin(data.test.y, classes)).squeeze(1)
                self.tasks.append(Task(t, train_idx, test_idx, classes))
        if data.val is not None:  # each task's validation examples: as its test examples, from the held-out split
            for task in self.tasks:
                task.val_idx = (torch.arange(len(data.val), device=device) if scenario in ("permuted", "rotated")
                                else torch.nonzero(torch.isin(data.val.y, task.classes)).squeeze(1))
        if samples_per_task is not None:
            self._select_samples(samples_per_task, gens)

    @classmethod
    def one_task(cls, data: ImageData, seeds: int | list[int] = 0) -> "TaskStream":
        """A single run's stream: one task, the whole training split, untransformed, shared head."""
        return cls(data, "permuted", 1, seeds, first_unpermuted=True)

    def _select_samples(self, n: int, gens: list[torch.Generator]) -> None:
        """Keep ``n`` training examples per task: per seed, a uniform random choice without
        replacement among the task's examples (drawn task by task from the seed's generator after
        every permutation, so the permutations do not depend on ``n``). Replica ``r`` keeps exactly
        what a one-replica stream with ``seeds[r]`` keeps. Test sets stay whole."""
        for task in self.tasks:
            size = task.train_size
            if n > size:
                raise ConfigError(
                    f"benchmark.samples_per_task={n}: task {task.index + 1} has only {size} training examples"
                    " (check data.subset and the scenario)"
                )
            rows = [torch.randperm(size, generator=g)[:n].sort().values for g in gens]
            task.train_idx = task.train_idx[torch.stack(rows).to(task.train_idx.device)]

    @property
    def input_dim(self) -> int:
        return self.data.train.x.shape[1]

    def __len__(self) -> int:
        return len(self.tasks)

    def transform(self, task: Task, x: Tensor) -> Tensor:
        """Each replica's view ``(R, B, D)`` of a batch: ``x`` is per replica ``(R, B, D)`` or shared ``(B, D)``."""
        R = self.replicas
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(R, *x.shape)
        if task.permutation is not None:
            if R == 1:
                return x.index_select(2, task.permutation[0])
            return x.gather(2, task.permutation.unsqueeze(1).expand(R, x.shape[1], -1))
        if task.angle:
            theta = math.radians(task.angle)
            rot = torch.tensor([[math.cos(theta), -math.sin(theta), 0.0], [math.sin(theta), math.cos(theta), 0.0]], dtype=x.dtype, device=x.device)
            images = x.reshape(-1, 1, self.side, self.side)
            grid = F.affine_grid(rot.expand(len(images), 2, 3), list(images.shape), align_corners=False)
            background = self.data.train.x.min()
            rotated = F.grid_sample(images - background, grid, align_corners=False) + background
            return rotated.view(x.shape)
        return x

    def logit_mask(self, task: Task) -> Tensor | None:
        """For task-incremental split: a boolean mask of the task's classes (others' logits are ignored)."""
        if self.scenario != "split_task":
            return None
        mask = torch.zeros(self.num_classes, dtype=torch.bool, device=task.classes.device)
        mask[task.classes] = True
        return mask

    def batch(self, task: Task, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Training batch ``(R, B, D)``, ``(R, B)`` of ``task`` for positions ``idx`` into its training
        indices: per replica ``(R, B)``, or ``(B,)`` shared by every replica."""
        if task.train_idx.dim() == 1:
            rows = task.train_idx[idx]
        elif idx.dim() == 1:
            rows = task.train_idx[:, idx]  # the same positions in every replica's own examples
        else:
            rows = task.train_idx.gather(1, idx)
        y = self.data.train.y[rows]
        return self.transform(task, self.data.train.x[rows]), y.expand(self.replicas, -1) if y.dim() == 1 else y

    def stage_gather(self, tasks: list[Task]):
        """``gather(positions (R, B)) -> (x, y)`` over the concatenated training sets of ``tasks``.

        One task: a gather on the device. Several (a cumulative stage): which task each position
        belongs to, then each task's own transform (computed for the whole batch and selected).
        """
        if len(tasks) == 1:
            task = tasks[0]
            return lambda idx: self.batch(task, idx)
        device = tasks[0].train_idx.device
        sizes = torch.tensor([t.train_size for t in tasks], device=device)
        offsets = torch.cumsum(sizes, 0) - sizes

        def gather(flat: Tensor) -> tuple[Tensor, Tensor]:
            owner = torch.searchsorted(offsets, flat.contiguous(), right=True) - 1  # (R, B)
            x = y = None
            for i, task in enumerate(tasks):
                xi, yi = self.batch(task, (flat - offsets[i]).clamp(0, task.train_size - 1))
                mine = owner == i
                x = xi if x is None else torch.where(mine.unsqueeze(-1), xi, x)
                y = yi if y is None else torch.where(mine, yi, y)
            return x, y

        return gather

    @property
    def has_val(self) -> bool:
        """Whether the tasks hold validation examples (``data.val_split``)."""
        return self.data.val is not None

    def test_split(self, task: Task) -> tuple[Split, Callable[[Tensor], Tensor]]:
        """The task's whole test set (untransformed) and the per-replica transform to apply per batch."""
        return Split(self.data.test.x[task.test_idx], self.data.test.y[task.test_idx]), lambda x: self.transform(task, x)

    def val_split(self, task: Task) -> tuple[Split, Callable[[Tensor], Tensor]]:
        """The task's validation examples (untransformed) and the per-replica transform, as :meth:`test_split`."""
        if self.data.val is None or task.val_idx is None:
            raise ValueError("this stream has no validation split (data.val_split=0)")
        return Split(self.data.val.x[task.val_idx], self.data.val.y[task.val_idx]), lambda x: self.transform(task, x)


def build_stream(data: ImageData, cfg, seeds: int | list[int]) -> TaskStream:
    """The stream a :class:`~agentnet.config.BenchmarkConfig` describes, one set of tasks per seed."""
    return TaskStream(
        data,
        cfg.scenario,
        cfg.num_tasks,
        seeds,
        first_unpermuted=cfg.first_unpermuted,
        pad32=cfg.pad32,
        max_angle=cfg.max_angle,
        samples_per_task=cfg.samples_per_task,
    )
