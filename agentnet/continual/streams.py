"""Task streams over MNIST held on the device: permuted, split (class- and task-incremental), rotated.

A stream never materialises a task's images: each task is a set of example indices plus an input
transform applied per batch (a pixel gather for permutations, ``grid_sample`` for rotations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

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
    test_idx: Tensor
    classes: Tensor
    permutation: Tensor | None = None
    angle: float | None = None


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
        seed: int = 0,
        *,
        first_unpermuted: bool = False,
        pad32: bool = False,
        max_angle: float = 180.0,
    ) -> None:
        if scenario not in self.SCENARIOS:
            raise ValueError(f"benchmark.scenario={scenario!r}: choose one of {self.SCENARIOS}")
        if pad32:
            background = data.train.x.min().item()
            data = ImageData(train=pad_to_32(data.train, background), test=pad_to_32(data.test, background))
        self.data = data
        self.scenario = scenario
        self.num_classes = data.num_classes
        self.side = 32 if pad32 else 28
        device = data.train.y.device
        gen = torch.Generator().manual_seed(seed)
        all_train = torch.arange(len(data.train), device=device)
        all_test = torch.arange(len(data.test), device=device)
        all_classes = torch.arange(self.num_classes, device=device)
        self.tasks: list[Task] = []
        if scenario == "permuted":
            for t in range(num_tasks):
                perm = None if (t == 0 and first_unpermuted) else torch.randperm(self.input_dim, generator=gen).to(device)
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

    @property
    def input_dim(self) -> int:
        return self.data.train.x.shape[1]

    def __len__(self) -> int:
        return len(self.tasks)

    def transform(self, task: Task, x: Tensor) -> Tensor:
        """Apply the task's input transform to a batch ``(B, D)``."""
        if task.permutation is not None:
            return x.index_select(1, task.permutation)
        if task.angle:
            theta = math.radians(task.angle)
            rot = torch.tensor([[math.cos(theta), -math.sin(theta), 0.0], [math.sin(theta), math.cos(theta), 0.0]], dtype=x.dtype, device=x.device)
            images = x.view(-1, 1, self.side, self.side)
            grid = F.affine_grid(rot.expand(len(x), 2, 3), list(images.shape), align_corners=False)
            background = self.data.train.x.min()
            rotated = F.grid_sample(images - background, grid, align_corners=False) + background
            return rotated.view(len(x), -1)
        return x

    def logit_mask(self, task: Task) -> Tensor | None:
        """For task-incremental split: a boolean mask of the task's classes (others' logits are ignored)."""
        if self.scenario != "split_task":
            return None
        mask = torch.zeros(self.num_classes, dtype=torch.bool, device=task.classes.device)
        mask[task.classes] = True
        return mask

    def batch(self, task: Task, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Training batch of ``task`` for positions ``idx`` into its training indices."""
        rows = task.train_idx[idx]
        return self.transform(task, self.data.train.x[rows]), self.data.train.y[rows]

    def stage_gather(self, tasks: list[Task]):
        """``gather(positions) -> (x, y)`` over the concatenated training sets of ``tasks``.

        One task: a gather on the device, no host round trip. Several (a cumulative stage): which
        task each position belongs to, then each task's own transform.
        """
        if len(tasks) == 1:
            task = tasks[0]
            return lambda idx: self.batch(task, idx)
        sizes = torch.tensor([len(t.train_idx) for t in tasks])
        offsets = torch.cumsum(sizes, 0) - sizes
        device = tasks[0].train_idx.device

        def gather(flat: Tensor) -> tuple[Tensor, Tensor]:
            flat = flat.cpu()
            owner = torch.searchsorted(offsets, flat, right=True) - 1
            parts = [
                self.batch(task, (flat[owner == i] - offsets[i]).to(device))
                for i, task in enumerate(tasks)
                if bool((owner == i).any())
            ]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

        return gather

    def test_split(self, task: Task) -> Split:
        """The task's whole test set, transformed."""
        return Split(self.transform(task, self.data.test.x[task.test_idx]), self.data.test.y[task.test_idx])


def build_stream(data: ImageData, cfg, seed: int) -> TaskStream:
    """The stream a :class:`~agentnet.continual.config.BenchmarkConfig` describes."""
    return TaskStream(
        data,
        cfg.scenario,
        cfg.num_tasks,
        seed,
        first_unpermuted=cfg.first_unpermuted,
        pad32=cfg.pad32,
        max_angle=cfg.max_angle,
    )
