"""``lwf``: learning without forgetting (Li & Hoiem 2016), as a distillation plugin.

At the end of every task a frozen copy of the model (evaluation mode) is kept. On every later
batch ``x`` the current model is pulled towards the copy's outputs:

    L_distill = lwf_alpha * T^2 * mean_batch KL( softmax(z_old(x) / T) || softmax(z(x) / T) )

(a sigmoid output counts as the two logits ``(0, z)``; on task-incremental streams there is one
term per earlier task, over that task's classes). Strategies write their own gradients, so the
term is added in ``after_backward``: a forward of the current model on the step's batch, the KL
against the copy's logits, and its backward *accumulated* into ``.grad``.

That backward is back-propagation of an output-level loss: with ``lwf_local=false`` (the default)
every layer receives it through BP, whatever the strategy — a BP-free rule (``lfnn_local``, ``fa``,
the forward-gradient family) then gets a BP-trained distillation term. ``lwf_local=true`` keeps the
term local: the forward runs with every layer's input detached (``path="local"``), the output layer
distils its own logits, and every hidden worker distils its own predictions (its readout's logits)
against the same worker of the old model — no gradient crosses a layer boundary.
The extra forward leaves batch-norm statistics and torch's RNG as the step left them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agentnet.config import CLConfig, ConfigError, check
from agentnet.continual.methods import CL_METHODS, CLMethod
from agentnet.continual.methods._episodic import autocast_of


@dataclass
class LwFConfig(CLConfig):
    """LwF settings."""

    lwf_alpha: float = 1.0
    """Weight of the distillation term."""
    temperature: float = 2.0
    """Softmax temperature ``T`` of the distillation (Li & Hoiem's 2)."""
    lwf_local: bool = False
    """Distil locally: the output layer its logits, each hidden worker its own predictions, no
    gradient across layers (for BP-free strategies); ``false``: BP of the output-level KL."""

    def __post_init__(self) -> None:
        check(self.lwf_alpha >= 0, "cl.lwf_alpha", self.lwf_alpha, "must be >= 0")
        check(self.temperature > 0, "cl.temperature", self.temperature, "must be > 0")


def _two_way(z: Tensor) -> Tensor:
    """A single sigmoid logit as the softmax logits ``(0, z)``; softmax logits unchanged."""
    return torch.cat([torch.zeros_like(z), z], -1) if z.shape[-1] == 1 else z


def distillation_kl(new: Tensor, old: Tensor, T: float, heads: list[Tensor | None]) -> Tensor:
    """``T^2 KL(softmax(old/T) || softmax(new/T))`` per replica ``(R,)``: the mean over the batch
    (dim 1), summed over any further leading dims (workers) and over ``heads`` (class masks)."""
    new, old = _two_way(new.float()), _two_way(old.float())
    total = torch.zeros(new.shape[0], device=new.device)
    for mask in heads:
        n, o = (new, old) if mask is None or new.shape[-1] != mask.numel() else (new[..., mask], old[..., mask])
        log_p_old = F.log_softmax(o / T, -1)
        kl = (log_p_old.exp() * (log_p_old - F.log_softmax(n / T, -1))).sum(-1)  # (R, B, ...)
        total = total + kl.mean(1).reshape(kl.shape[0], -1).sum(1)
    return T * T * total


@CL_METHODS.register("lwf")
class LwF(CLMethod):
    """Distils the previous task's model into the current one on every batch."""

    Config = LwFConfig
    replica_fields = ("lwf_alpha",)
    reads_model_outputs = "it distils the output logits model(x) (or the workers' read-outs) of the previous model"
    search_space = {"lwf_alpha": {"log": [1e-2, 1e2]}}

    def __init__(self, cfg: LwFConfig, model: nn.Module, variants: dict[str, list[float]] | None = None) -> None:
        super().__init__(cfg, model, variants)
        if cfg.lwf_local and not all(block.readout.available for block in getattr(model, "blocks", list)()):
            raise ConfigError("cl.lwf_local=true distils every worker's predictions, but this network's workers have none "
                              "(built for a rule that reads no worker predictions, with k != C): set "
                              "model.worker_projection=true or model.worker_head=true, or cl.lwf_local=false")
        self.old: nn.Module | None = None
        self.heads: list[Tensor | None] = []
        self._x: Tensor | None = None
        self._last = torch.zeros(())

    def _frozen_copy(self) -> nn.Module:
        old = copy.deepcopy(self.model)
        old.head.logit_mask = None
        old.eval()
        old.requires_grad_(False)
        return old

    def after_task(self, trainer, stream, task) -> None:
        self.old = self._frozen_copy()
        mask = stream.logit_mask(task)
        if mask is None:
            self.heads = [None]
        elif not any(h is not None and torch.equal(h, mask) for h in self.heads):
            self.heads.append(mask)

    def _alpha(self, device) -> float | Tensor:
        if "lwf_alpha" not in self.variants:
            return self.cfg.lwf_alpha
        return torch.tensor(self.variants["lwf_alpha"], device=device)

    def _outputs(self, model: nn.Module, x: Tensor) -> list[Tensor]:
        """The logits distilled: the output's, plus (local) every hidden layer's worker predictions."""
        with model.head.logit_mask_as(None):
            if not self.cfg.lwf_local:
                return [model(x)]
            record = model.forward_record(x, path="local")
            return [record.logits, *(block.readout(rec.workers) for block, rec in zip(model.blocks(), record.layers))]

    def distillation(self, x: Tensor) -> Tensor:
        """The distillation term per replica ``(R,)`` on batch ``x``, with a graph to the current
        model's parameters (zeros before the first task has ended)."""
        if self.old is None:
            return torch.zeros(getattr(self.model, "replicas", 1))
        with torch.no_grad():
            old = self._outputs(self.old, x)
        new = self._outputs(self.model, x)
        kl = sum(distillation_kl(n, o, self.cfg.temperature, self.heads) for n, o in zip(new, old))
        return self._alpha(kl.device) * kl

    def before_step(self, trainer, x, y) -> None:
        self._x = x

    def after_backward(self, trainer, result) -> None:
        if self.old is None or self._x is None or self.cfg.lwf_alpha == 0 and not self.variants:
            return
        model = self.model
        buffers = [b.detach().clone() for b in model.buffers()]
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            with autocast_of(trainer):
                term = self.distillation(self._x)
            term.sum().backward()  # replicas' terms are independent: each gets its own gradient
        with torch.no_grad():  # the strategy's forward already updated the batch statistics this step
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
        self._last = term.detach().sum()
        self._x = None

    def penalty(self) -> torch.Tensor:
        """The distillation term of the last step (summed over replicas)."""
        return self._last

    def state_dict(self) -> dict:
        return {"old": None if self.old is None else self.old.state_dict(), "heads": self.heads, "last": self._last}

    def load_state_dict(self, state: dict) -> None:
        device = next(self.model.parameters()).device
        self.heads = [None if h is None else h.to(device) for h in state["heads"]]
        self._last = state["last"]
        self.old = None
        if state["old"] is not None:
            self.old = self._frozen_copy()
            self.old.load_state_dict(state["old"])
