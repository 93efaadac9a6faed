"""Continual-learning methods as trainer plugins, composable with every strategy.

Their penalties are per parameter, so they act on ``.grad`` after the strategy's own backward
(``after_backward``): each worker adds its penalty's gradient to its own weights' update, whatever
local objective produced the rest. A method keeps its state (anchors, importances, buffers) in
``state_dict`` so a continual run resumes exactly. A new method is one module here (a
:class:`CLMethod` subclass registered with ``@CL_METHODS.register("<name>")``, its ``Config`` the
one source of its defaults) plus ``configs/cl/<name>.yaml`` that only selects it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from agentnet.config import CLConfig
from agentnet.registry import CL_METHODS
from agentnet.training.plugins import TrainerPlugin

__all__ = ["CL_METHODS", "CLMethod", "build_cl_method"]


class CLMethod(TrainerPlugin):
    """Base class: a trainer plugin with task-boundary hooks and a say in what each stage trains on."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[CLConfig]] = CLConfig

    def __init__(self, cfg: CLConfig, model: torch.nn.Module) -> None:
        self.cfg = cfg
        self.model = model

    @property
    def state_key(self) -> str:
        return f"cl.{self.name}"

    def stage_tasks(self, stream: Any, index: int) -> list:
        """The tasks whose training data stage ``index`` draws from (default: that task alone)."""
        return [stream.tasks[index]]

    def penalty(self) -> torch.Tensor:
        """The method's current penalty value (0 when it has none), for logging and tests."""
        return torch.zeros(())


def build_cl_method(node, model: torch.nn.Module) -> CLMethod:
    """Instantiate the method a ``cl`` config names (``None`` means fine-tuning)."""
    return CL_METHODS.build(node if node is not None else {"name": "none"}, model)
