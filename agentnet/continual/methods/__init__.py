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
from agentnet.replica import replica_rows

__all__ = ["CL_METHODS", "CLMethod", "build_cl_method"]


class CLMethod(TrainerPlugin):
    """Base class: a trainer plugin with task-boundary hooks and a say in what each stage trains on."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[CLConfig]] = CLConfig
    #: Numeric config fields that may differ per replica (``vary.cl.<field>``).
    replica_fields: ClassVar[tuple[str, ...]] = ()
    #: What ``agentnet-tune`` searches of this method when ``tune.space`` is not given (besides the
    #: learning rate): ``field -> distribution`` as in ``tune.space``.
    search_space: ClassVar[dict[str, dict]] = {}
    #: What the method reads of the network's output ``model(x)``, if it treats it as the model's
    #: prediction (EWC's Fisher, LwF's distillation); ``None``: it reads only gradients and data. A
    #: strategy that predicts otherwise (``Strategy.predicts_with_model = False``) refuses it.
    reads_model_outputs: ClassVar[str | None] = None

    def __init__(self, cfg: CLConfig, model: torch.nn.Module, variants: dict[str, list[float]] | None = None) -> None:
        self.cfg = cfg
        self.model = model
        self.variants = dict(variants or {})
        unknown = set(self.variants) - set(self.replica_fields)
        if unknown:
            raise ValueError(f"cl={self.name}: {sorted(unknown)} cannot vary per replica (only {list(self.replica_fields)})")

    def per_replica(self, field: str, p: torch.Tensor) -> float | torch.Tensor:
        """``cfg.<field>``, or (in a population varying it) its per-replica values spread over the
        replica-major rows of parameter ``p``."""
        if field not in self.variants:
            return getattr(self.cfg, field)
        return replica_rows(torch.tensor(self.variants[field], device=p.device, dtype=p.dtype), p)

    @property
    def state_key(self) -> str:
        return f"cl.{self.name}"

    def stage_tasks(self, stream: Any, index: int) -> list:
        """The tasks whose training data stage ``index`` draws from (default: that task alone)."""
        return [stream.tasks[index]]

    def penalty(self) -> torch.Tensor:
        """The method's current penalty value (0 when it has none), for logging and tests."""
        return torch.zeros(())


def build_cl_method(node, model: torch.nn.Module, variants: dict[str, list[float]] | None = None) -> CLMethod:
    """Instantiate the method a ``cl`` config names (``None`` means fine-tuning), with a
    population's per-replica values of its ``replica_fields``."""
    node = node if node is not None else {"name": "none"}
    return CL_METHODS.build(node, model, variants) if variants else CL_METHODS.build(node, model)
