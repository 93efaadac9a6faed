"""The LFNN paper's online experiments (Sec. 3.1): one-vs-all leader-follower networks on permuted MNIST.

Setup (paper): one hidden FC layer of ``N`` single-neuron sigmoid workers per binary classifier,
one classifier per class (one-vs-all), Adam lr 5e-3, one pass over pixel-permuted MNIST, BCE for the
global and leader losses, MSE for followers, ``lambda1 = lambda2 = 1``.

Every classifier of every setting being compared (leadership fraction, loss variant, BP reference)
is one *member* of :class:`OneVsAllEnsemble`, so a whole figure trains as one batched model: one
matmul per step for all members, leader selection vectorised across members with different
leadership fractions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Setting", "OneVsAllEnsemble", "OnlineResult", "train_online"]


@dataclass
class Setting:
    """One curve/point of a figure: a leadership fraction and loss weights (``bp``: plain BP)."""

    label: str
    delta: float = 0.3
    lambda1: float = 1.0
    lambda2: float = 1.0
    bp: bool = False


class OneVsAllEnsemble(nn.Module):
    """``E`` independent nets ``D -> N sigmoid workers -> 1``; member ``e`` answers "is it class ``e % C``?"."""

    def __init__(self, members: int, input_dim: int, width: int, generator: torch.Generator) -> None:
        super().__init__()
        bound1, bound2 = 1 / math.sqrt(input_dim), 1 / math.sqrt(width)
        self.w1 = nn.Parameter((torch.rand(members * width, input_dim, generator=generator) * 2 - 1) * bound1)
        self.b1 = nn.Parameter((torch.rand(members, width, generator=generator) * 2 - 1) * bound1)
        self.w2 = nn.Parameter((torch.rand(members, width, generator=generator) * 2 - 1) * bound2)
        self.b2 = nn.Parameter((torch.rand(members, generator=generator) * 2 - 1) * bound2)
        self.members, self.width = members, width

    def hidden(self, x: Tensor) -> Tensor:
        """Pre-activations ``(B, E, N)`` of every worker of every member (one matmul)."""
        return (x @ self.w1.t()).view(len(x), self.members, self.width) + self.b1

    def output(self, h: Tensor) -> Tensor:
        """Output logits ``(B, E)`` from hidden activations ``(B, E, N)``."""
        return (h * self.w2).sum(-1) + self.b2


@dataclass
class OnlineResult:
    """Per setting: final test accuracy, prequential accuracy curve; optional worker activity."""

    test_acc: list[float]
    curve_steps: list[int]
    curves: list[list[float]]
    activity: Tensor | None = None
    activity_leaders: Tensor | None = None


def train_online(
    x: Tensor,
    y: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    settings: list[Setting],
    width: int,
    *,
    num_classes: int = 10,
    lr: float = 5e-3,
    batch_size: int = 10,
    seed: int = 0,
    curve_every: int = 100,
    record_activity_of: int | None = None,
    progress=None,
    max_steps: int | None = None,
) -> OnlineResult:
    """One pass over ``(x, y)`` for every setting at once; returns test accuracy and learning curves.

    ``record_activity_of``: index of a setting whose class-0 classifier's per-step worker activity
    (mean |change of sigmoid output| from the update, on the step's batch) is recorded (Fig. 5).
    """
    device = x.device
    S, C = len(settings), num_classes
    gen = torch.Generator().manual_seed(seed)
    model = OneVsAllEnsemble(S * C, x.shape[1], width, gen).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    classes = torch.arange(S * C, device=device) % C
    per_member = lambda values: torch.tensor(values, device=device).repeat_interleave(C)  # noqa: E731
    bp = per_member([s.bp for s in settings]).bool()
    delta = per_member([1.0 if s.bp else s.delta for s in settings])
    lam1 = per_member([0.0 if s.bp else s.lambda1 for s in settings])
    lam2 = per_member([0.0 if s.bp else s.lambda2 for s in settings])
    n_lead = torch.ceil(delta * width).long()
    order = torch.randperm(len(x), generator=gen).to(device)
    steps = len(x) // batch_size if max_steps is None else min(max_steps, len(x) // batch_size)
    correct = torch.zeros(S, device=device)
    seen = 0
    curves: list[list[float]] = []
    curve_steps: list[int] = []
    activity, activity_leaders = [], []
    for step in range(steps):
        idx = order[step * batch_size : (step + 1) * batch_size]
        xb, yb = x[idx], y[idx]
        target = (yb.unsqueeze(1) == classes).float()  # (B, E)
        z = model.hidden(xb)
        a = torch.sigmoid(z)
        e = F.binary_cross_entropy_with_logits(z, target.unsqueeze(-1).expand_as(z), reduction="none").mean(0)  # (E, N)
        ranks = e.detach().argsort(1).argsort(1)
        leaders = ranks < n_lead.unsqueeze(1)  # (E, N), per-member leadership fraction
        best = e.detach().argmin(1)
        # LFNN: the global loss reaches only leaders (BP members: everyone leads).
        h = torch.where(leaders | bp.unsqueeze(1), a, a.detach())
        logits = model.output(h)
        global_loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(0)  # (E,)
        reference = a.detach().gather(2, best.view(1, -1, 1).expand(len(xb), -1, 1))
        align = (a - reference).pow(2).mean(0)  # (E, N)
        local = (lam1.unsqueeze(1) * e * leaders + lam2.unsqueeze(1) * align * ~leaders).sum(1)
        loss = (global_loss + local).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            pred = logits.detach().view(len(xb), S, C).argmax(-1)  # prequential: before the update
            correct += (pred == yb.unsqueeze(1)).float().sum(0)
            seen += len(yb)
            if record_activity_of is not None:
                member = record_activity_of * C
                after = torch.sigmoid(model.hidden(xb))[:, member]
                activity.append((after - a.detach()[:, member]).abs().mean(0).cpu())
                activity_leaders.append(leaders[member].cpu())
        if (step + 1) % curve_every == 0 or step + 1 == steps:
            curves.append((correct / seen).tolist())
            curve_steps.append(step + 1)
            correct.zero_()
            seen = 0
        if progress is not None:
            progress(step + 1, steps)
    with torch.no_grad():
        accs = torch.zeros(S, device=device)
        for start in range(0, len(x_test), 2000):
            xt, yt = x_test[start : start + 2000], y_test[start : start + 2000]
            logits = model.output(torch.sigmoid(model.hidden(xt)))
            accs += (logits.view(len(xt), S, C).argmax(-1) == yt.unsqueeze(1)).float().sum(0)
    return OnlineResult(
        test_acc=(accs / len(x_test)).tolist(),
        curve_steps=curve_steps,
        curves=[list(c) for c in zip(*curves)],
        activity=torch.stack(activity) if activity else None,
        activity_leaders=torch.stack(activity_leaders) if activity_leaders else None,
    )
