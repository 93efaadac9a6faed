"""Continual-learning methods as trainer plugins, composable with every strategy.

Their penalties are per parameter, so they act on ``.grad`` after the strategy's own backward
(``after_backward``): each worker adds its penalty's gradient to its own weights' update, whatever
local objective produced the rest. A new method is one module here (a :class:`CLMethod` subclass
registered with ``@CL_METHODS.register("<name>")``) plus ``configs/cl/<name>.yaml``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from agentnet.config import CLConfig
from agentnet.registry import Registry
from agentnet.trainer import TrainerPlugin

__all__ = ["CL_METHODS", "CLMethod", "build_cl_method"]

CL_METHODS = Registry("cl", "agentnet.continual.methods", "continual-learning method")


class CLMethod(TrainerPlugin):
    """Base class: a trainer plugin with task-boundary hooks."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[CLConfig]] = CLConfig
    #: Train each stage on every task seen so far (the cumulative/joint upper bound).
    cumulative: ClassVar[bool] = False

    def __init__(self, cfg: CLConfig, model: torch.nn.Module) -> None:
        self.cfg = cfg
        self.model = model

    def before_task(self, trainer, stream, task) -> None:
        """Called before training on ``task``."""

    def after_task(self, trainer, stream, task) -> None:
        """Called after training on ``task`` (consolidate importance, fill buffers...)."""

    def penalty(self) -> torch.Tensor:
        """The method's current penalty value (0 when it has none), for tests and logging."""
        return torch.zeros(())


def build_cl_method(node, model: torch.nn.Module) -> CLMethod:
    """Instantiate the method a ``cl`` config names (``None`` means fine-tuning)."""
    cfg = CL_METHODS.config(node if node is not None else {"name": "none"})
    return CL_METHODS.get(cfg.name)(cfg, model)
