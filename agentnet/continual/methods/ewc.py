"""``ewc`` and ``online_ewc``: elastic weight consolidation (Kirkpatrick et al. 2017; Schwarz et al. 2018).

Penalty ``lambda/2 * sum_t sum_p F_t,p (theta_p - theta*_t,p)^2`` with ``F_t`` the diagonal Fisher at
the end of task ``t``. Online EWC keeps one running ``F = gamma F + F_t`` anchored at the latest
``theta*``. The Fisher uses per-sample gradients on ``fisher_samples`` training examples of the
task, with ``fisher_labels`` saying which labels' log-likelihood: ``all`` (the
default: every class, weighted by the model's predicted probability — the exact diagonal Fisher
``E_{y ~ p(y|x)}[(d log p(y|x))^2]``, van de Ven et al.'s reference code's default), ``pred`` (the
predicted label only) or ``true`` (the data's labels: the "empirical Fisher").

Why ``all`` is the default: it is the Fisher EWC's derivation asks for. For a confident example the
predicted label's gradient is small (``1 - p``) while the other classes carry weight ``p_c``, so
``pred`` underestimates it; measured on ``pmnist_vdv``'s net after one task the exact Fisher is 3.3x
the predicted-label one in total (``docs/benchmarks.md``), so the two need different ``lambda``.

How it is computed: for a network whose every parameter belongs to a fully connected layer
(``ReplicaLinear``: the MLP presets), a sample's gradient of a weight is the outer product
``delta a^T`` of the layer's output gradient and input, so its square is ``delta^2 (a^2)^T`` and the
sum over samples is one matrix product per layer (the per-layer formulation of BackPACK's
``DiagGGNExact``) — the per-sample gradients are never materialised; one backward pass per class.
Any other network (conv, normalisation, heads) takes the general path: per-sample gradients with
``torch.func`` (``vmap`` of ``grad``), which writes ``C`` full gradients per sample and is ~100x
slower on ``mlp_1000x2`` (``pmnist_vdv``'s net). Both are tested against a per-sample autograd loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, vmap

from agentnet.config import CLConfig, check
from agentnet.continual.methods import CL_METHODS, CLMethod
from agentnet.network import eval_mode
from agentnet.replica import ReplicaLinear
from agentnet.workers import WorkerReadout


@dataclass
class EWCConfig(CLConfig):
    """EWC settings."""

    ewc_lambda: float = 100.0
    """Penalty strength (100: the current reference code of van de Ven et al. for domain-IL permuted
    MNIST, with the exact Fisher; their 2019 comparison used 500 with the predicted-label Fisher over
    the whole task: ``docs/benchmarks.md``)."""
    gamma: float = 1.0
    """Online EWC: decay of the running Fisher (1 keeps everything)."""
    online: bool = False
    """One running Fisher and anchor instead of one per task."""
    fisher_samples: int = 1000
    """Training examples of the finished task used to estimate its Fisher."""
    fisher_labels: str = "all"
    """Whose log-likelihood: ``all`` (every class weighted by its predicted probability: the exact
    Fisher), ``pred`` (the predicted label) or ``true`` (the data's label: empirical Fisher)."""

    def __post_init__(self) -> None:
        check(self.ewc_lambda >= 0, "cl.ewc_lambda", self.ewc_lambda, "must be >= 0")
        check(0 < self.gamma <= 1, "cl.gamma", self.gamma, "must lie in (0, 1]")
        check(self.fisher_samples > 0, "cl.fisher_samples", self.fisher_samples, "must be positive")
        check(self.fisher_labels in FISHER_LABELS, "cl.fisher_labels", self.fisher_labels, f"must be one of {FISHER_LABELS}")


#: ``EWCConfig.fisher_labels`` choices.
FISHER_LABELS = ("all", "pred", "true")


def diagonal_fisher(
    model: torch.nn.Module, x: torch.Tensor, labels: str = "all", y: torch.Tensor | None = None, chunk: int = 64
) -> dict[str, torch.Tensor]:
    """Mean squared per-sample gradient of ``log p(label | x)`` for every parameter.

    ``x`` is ``(R, N, D)``: sample ``n`` of every replica in one call; the summed loss's gradient
    on replica ``r``'s rows is replica ``r``'s own per-sample gradient. ``labels``: ``all`` sums
    ``p_c * (d log p_c)^2`` over the classes (the exact diagonal Fisher), ``pred`` uses the
    predicted class, ``true`` the labels ``y`` (``(R, N)`` or ``(N,)``).
    """
    if labels not in FISHER_LABELS:
        raise ValueError(f"cl.fisher_labels={labels!r}: must be one of {FISHER_LABELS}")
    if labels == "true" and y is None:
        raise ValueError("cl.fisher_labels='true' needs the samples' labels")
    if _linear_only(model):
        fisher = _linear_fisher(model, x, labels, y, chunk=max(chunk, 256))
        if fisher is not None:
            return fisher
    return _per_sample_fisher(model, x, labels, y, chunk)


def _linear_only(model: torch.nn.Module) -> bool:
    """Whether every parameter is the weight or bias of a fully connected ``ReplicaLinear``, or of a
    worker's prediction head (``WorkerReadout``: the inference pass ``model(x)`` never runs it, so its
    Fisher is zero)."""
    owned = {id(p) for m in model.modules() if isinstance(m, ReplicaLinear) for p in (m.weight, m.bias) if p is not None}
    owned |= {id(p) for m in model.modules() if isinstance(m, WorkerReadout) for p in m.parameters()}
    return all(id(p) in owned for p in model.parameters())


def _class_losses(model: torch.nn.Module, logits: torch.Tensor, labels: str, y: torch.Tensor | None) -> list[torch.Tensor]:
    """The summed losses whose gradients are the per-sample terms: one per class for ``all`` (each
    sample's ``-log p_c`` weighted by ``sqrt(p_c)``, so its squared gradient is ``p_c (d log p_c)^2``;
    classes a logit mask excludes contribute nothing), one for ``pred`` / ``true``."""
    R, N = logits.shape[:2]
    if labels != "all":
        label = model.head.predict(logits).detach() if labels == "pred" else model.head.labels(y)
        return [model.head.sample_losses(logits, label).sum()]
    classes = 2 if model.head.activation == "sigmoid" else logits.shape[-1]
    return [_sqrt_p_weighted(model.head.sample_losses(logits, torch.full((R, N), c, dtype=torch.long, device=logits.device)))
            for c in range(classes)]


def _sqrt_p_weighted(loss: torch.Tensor) -> torch.Tensor:
    """``sum sqrt(p_c) * -log p_c`` over samples from their losses ``-log p_c``: its squared gradient
    per sample is ``p_c (d log p_c)^2``. Classes a task's logit mask excludes (infinite loss, ``p_c = 0``)
    contribute nothing."""
    finite = torch.isfinite(loss)
    loss = torch.where(finite, loss, torch.zeros_like(loss))
    weight = torch.where(finite, torch.exp(-loss.detach()).sqrt(), torch.zeros_like(loss))
    return (weight * loss).sum()


def _linear_fisher(
    model: torch.nn.Module, x: torch.Tensor, labels: str, y: torch.Tensor | None, chunk: int
) -> dict[str, torch.Tensor] | None:
    """The diagonal Fisher of a network of ``ReplicaLinear`` layers without per-sample gradients:
    for a layer with input ``a`` ``(R, B, in)`` and output gradient ``delta`` ``(R, B, out)`` (one
    sample's loss reaches only its own row, in evaluation mode), ``sum_n g_n^2`` of its weight is
    ``(delta^2)^T a^2`` per replica, and of its bias ``sum_n delta_n^2``. Layers the forward pass does
    not use (heads of local losses) get zeros, as their gradient is zero. ``None`` when a layer runs
    twice in one forward pass (shared weights: a sample's gradient is then a sum of outer products,
    whose square this formula does not give)."""
    names = {id(p): k for k, p in model.named_parameters()}
    total = {k: torch.zeros_like(p, memory_format=torch.contiguous_format).detach() for k, p in model.named_parameters()}
    records: list[tuple[ReplicaLinear, torch.Tensor, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: records.append((mod, inp[0].detach(), out)))
             for m in model.modules() if isinstance(m, ReplicaLinear)]
    n = x.shape[1]
    try:
        with eval_mode(model):
            for start in range(0, n, chunk):
                records.clear()
                xi = x[:, start : start + chunk]
                logits = model(xi)
                if len({id(mod) for mod, _, _ in records}) != len(records):
                    return None
                outputs = [out for _, _, out in records]
                yi = None if y is None else model.head.labels(y)[:, start : start + chunk]
                losses = _class_losses(model, logits, labels, yi)
                for loss in losses:
                    deltas = torch.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True)
                    for (mod, a, _), delta in zip(records, deltas):
                        if delta is None:
                            continue
                        d2 = delta.detach().square()  # (R, B, out)
                        a2 = a.square()
                        if d2.dim() == 2:  # one replica fed a (B, in) input
                            d2, a2 = d2.unsqueeze(0), a2.unsqueeze(0)
                        w = torch.bmm(d2.transpose(1, 2), a2)  # (R, out, in)
                        total[names[id(mod.weight)]] += w.reshape(mod.weight.shape)
                        if mod.bias is not None:
                            total[names[id(mod.bias)]] += d2.sum(1).reshape(mod.bias.shape)
    finally:
        for h in hooks:
            h.remove()
    return {k: v / n for k, v in total.items()}


def _per_sample_fisher(
    model: torch.nn.Module, x: torch.Tensor, labels: str, y: torch.Tensor | None, chunk: int
) -> dict[str, torch.Tensor]:
    """The general path: per-sample gradients with ``torch.func`` for any network."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    R, n = x.shape[:2]
    classes = 2 if model.head.activation == "sigmoid" else None

    def nll(p, xi, yi):  # xi: (R, D), one sample per replica; yi: (R,) its labels (pred / true)
        logits = functional_call(model, p, (xi.unsqueeze(1),))
        label = model.head.predict(logits).detach() if yi is None else yi.unsqueeze(1)
        return model.head.global_loss(logits, label).sum()

    def weighted_nll(p, xi, c):  # sqrt(p_c) * -log p_c: its squared gradient is p_c (d log p_c)^2
        logits = functional_call(model, p, (xi.unsqueeze(1),))
        return _sqrt_p_weighted(model.head.sample_losses(logits, c.reshape(1, 1).expand(R, 1)))

    total = {k: torch.zeros_like(v) for k, v in params.items()}
    with eval_mode(model):  # one sample per call: batch norms use their running statistics
        if labels == "all":
            C = classes or functional_call(model, params, (x[:, :1],)).shape[-1]
            per_class = vmap(vmap(grad(weighted_nll), in_dims=(None, 1, None)), in_dims=(None, None, 0))
            step = max(1, chunk // C)  # C gradients per sample in memory at once
            for start in range(0, n, step):
                grads = per_class(params, x[:, start : start + step], torch.arange(C, device=x.device))
                for k, g in grads.items():
                    total[k] += g.pow(2).sum((0, 1))
        else:
            per_sample = vmap(grad(nll), in_dims=(None, 1, None if labels == "pred" else 1))
            labels_ = None if labels == "pred" else (y if y.dim() == 2 else y.expand(R, -1))
            for start in range(0, n, chunk):
                yi = None if labels_ is None else labels_[:, start : start + chunk]
                for k, g in per_sample(params, x[:, start : start + chunk], yi).items():
                    total[k] += g.pow(2).sum(0)
    return {k: v / n for k, v in total.items()}


@CL_METHODS.register("ewc")
class EWC(CLMethod):
    """Quadratic pull of every parameter toward its value after earlier tasks, weighted by Fisher."""

    Config = EWCConfig
    replica_fields = ("ewc_lambda",)
    reads_model_outputs = "its Fisher is the curvature of the output distribution softmax(model(x))"
    search_space = {"ewc_lambda": {"log": [1e-2, 1e3]}}

    def __init__(self, cfg: EWCConfig, model: torch.nn.Module, variants: dict[str, list[float]] | None = None) -> None:
        super().__init__(cfg, model, variants)
        self.anchors: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []  # (fisher, theta*)
        # The penalty's gradient sum_t F_t (p - theta_t) = F (p - theta_bar) with F = sum_t F_t and
        # theta_bar the Fisher-weighted mean anchor: one term per step however many tasks are anchored.
        self._merged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def after_task(self, trainer, stream, task) -> None:
        gen = torch.Generator().manual_seed(1000 + task.index)
        n = min(self.cfg.fisher_samples, task.train_size)
        pick = torch.randperm(task.train_size, generator=gen)[:n].to(task.train_idx.device)
        x, y = stream.batch(task, pick)
        with self.model.head.logit_mask_as(stream.logit_mask(task)):
            fisher = diagonal_fisher(self.model, x, self.cfg.fisher_labels, y)
        theta = {k: v.detach().clone() for k, v in self.model.named_parameters()}
        if self.cfg.online and self.anchors:
            old, _ = self.anchors[0]
            fisher = {k: self.cfg.gamma * old[k] + fisher[k] for k in fisher}
            self.anchors = []
        self.anchors.append((fisher, theta))
        self._merge()

    def _merge(self) -> None:
        """``F = sum_t F_t`` and ``theta_bar = sum_t F_t theta_t / F`` (``theta_bar`` is unused where ``F = 0``)."""
        self._merged = {}
        if not self.anchors:  # before the first task ends (e.g. resuming a checkpoint from task 1)
            return
        for name, _ in self.model.named_parameters():
            total = sum(f[name] for f, _ in self.anchors)
            if len(self.anchors) == 1:
                self._merged[name] = (total, self.anchors[0][1][name])
                continue
            weighted = sum(f[name] * theta[name] for f, theta in self.anchors)
            self._merged[name] = (total, torch.where(total > 0, weighted / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0))

    def after_backward(self, trainer, result) -> None:
        if not self.anchors:
            return
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                fisher, theta = self._merged[name]
                g = fisher * (p - theta) * self.per_replica("ewc_lambda", p)
                p.grad = g if p.grad is None else p.grad.add_(g)

    def state_dict(self) -> dict:
        return {"anchors": [{"fisher": f, "theta": t} for f, t in self.anchors]}

    def load_state_dict(self, state: dict) -> None:
        device = next(self.model.parameters()).device
        self.anchors = [
            ({k: v.to(device) for k, v in a["fisher"].items()}, {k: v.to(device) for k, v in a["theta"].items()})
            for a in state["anchors"]
        ]
        self._merge()

    def penalty(self) -> torch.Tensor:
        value = torch.zeros(())
        for fisher, theta in self.anchors:
            for name, p in self.model.named_parameters():
                value = value + 0.5 * (self.per_replica("ewc_lambda", p) * fisher[name] * (p.detach() - theta[name]).pow(2)).sum()
        return value


@dataclass
class OnlineEWCConfig(EWCConfig):
    """Online EWC: one running Fisher with decay ``gamma``."""

    online: bool = True


@CL_METHODS.register("online_ewc")
class OnlineEWC(EWC):
    """EWC with a single decayed running Fisher (Schwarz et al. 2018)."""

    Config = OnlineEWCConfig
