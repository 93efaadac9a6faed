"""``ff``: the Forward-Forward algorithm (Hinton 2022, "The Forward-Forward Algorithm: Some Preliminary
Investigations").

Every hidden weight layer ``l`` learns on its own from two kinds of data. *Positive* data is the
image with its true label embedded (one-hot in its first ``C`` pixels), *negative* data the same
image with a wrong label (uniform among the other classes, or ``negatives=hard``: in proportion to
the network's own predicted probability). A layer's *goodness* is the sum of its squared
activities ``G_l = sum_j h_lj^2`` (``goodness=mean``: their mean); its loss pushes positive goodness
above a threshold ``theta_l`` and negative goodness below it:

    L_l = mean_b softplus(-(G_l(x_pos) - theta_l)) + mean_b softplus(G_l(x_neg) - theta_l)

with ``theta_l = threshold * n_l`` for ``n_l`` units (``goodness=mean``: ``threshold``). Each
layer's input is length-normalised, ``x / rms(x)`` (so only the direction of the previous layer's
activity passes on, not its goodness) and *detached*: no gradient crosses a layer, and the
strategy's loss ``sum_l L_l`` back-propagates only inside each layer.

Prediction: for every candidate label ``c`` embed it, run the net, sum the goodness over the layers
(``predict_first_layer=false``: all but the first, as Hinton does) and predict the label with the
highest sum. :meth:`ForwardForward.predict_logits` returns these per-class sums ``(R, B, C)``, and the
trainer's evaluation reads them as logits (argmax = the prediction; its reported loss is the
cross-entropy of that softmax). ``compute`` returns them for the batch too, so the running training
accuracy is FF's own (``trainer.train_accuracy=false`` skips that pass, most of a step's cost).

The network's output layer is not trained by FF. ``prediction=goodness`` (the default) leaves it out
entirely: it gets no gradient (frozen at its initial values) and nothing reads it.
``prediction=linear`` trains it, as a softmax classifier on the *detached*, length-normalised last
activity of a pass with a neutral label (every label pixel ``1/C`` of the label value), and predicts
with it in one pass (Hinton's section 3.3 classifier, on the last layer only; loeweX's
``forward_downstream_classification_model`` reads every layer but the first).

Details we follow from the faithful reimplementation github.com/loeweX/Forward-Forward
(``src/ff_model.py``, ``src/ff_mnist.py``): normalisation by the root mean square (``z / (sqrt(mean
z^2) + 1e-8)``, also on the input), goodness a sum of squares with threshold the layer width, the
loss as softplus of the goodness margin, the one-hot label over the first ``C`` pixels, the neutral
label ``1/C``, prediction by summed goodness of all but the first layer. Ours differs: the loss sums
the two means instead of averaging them; ReLU keeps its true derivative (theirs passes the gradient
through ``ReLU_full_grad``); no peer normalisation; the label value is the example's largest pixel
times ``label_scale`` (theirs: 1 on ``[0, 1]`` pixels; mohammadpz/pytorch_forward_forward: the batch's
maximum); all layers learn at once from mini-batches, as in Hinton's paper. See docs/strategies/ff.md.

Layers: fully connected, plain and worker (every weight layer of the network's blocks is an FF
layer; the output layer is not). Conv layers and normalisation layers are refused. Negative labels
are drawn from one generator per replica seeded from ``seeds[r]`` (checkpointed), so a population
draws what separate runs draw and a resumed run what the uninterrupted one draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agentnet.config import ConfigError, StrategyConfig, check
from agentnet.devices import to_device
from agentnet.network import WorkerNetwork
from agentnet.registry import register_strategy
from agentnet.replica import ReplicaLinear
from agentnet.strategy import StepResult, Strategy
from agentnet.workers import WorkerLinear

__all__ = ["FFConfig", "ForwardForward", "embed_labels", "rms_normalize"]

GOODNESS = ("sum", "mean")
NEGATIVES = ("random", "hard")
PREDICTIONS = ("goodness", "linear")


@dataclass
class FFConfig(StrategyConfig):
    """``ff`` settings."""

    threshold: float = 1.0
    """The goodness threshold per unit: ``theta_l = threshold * n_l`` for a layer of ``n_l`` units with
    ``goodness=sum`` (1: the layer width, as loeweX/Forward-Forward), ``theta = threshold`` with
    ``goodness=mean``. May vary per replica."""
    goodness: str = "sum"
    """A layer's goodness: ``sum`` of its squared activities (Hinton) or their ``mean`` (the same
    loss with a margin ``n_l`` times softer, as mohammadpz/pytorch_forward_forward, whose threshold is 2)."""
    label_scale: float = 1.0
    """The label pixel's value, as a multiple of the example's largest pixel (1 on ``[0, 1]`` pixels
    is loeweX's one-hot); the other label pixels are 0."""
    negatives: str = "random"
    """Wrong labels of the negative data: ``random`` (uniform among the other classes) or ``hard``
    (drawn in proportion to the network's softmax over its per-class goodness, Hinton's section 3.3;
    costs one pass per class each step)."""
    predict_first_layer: bool = True
    """Whether the first FF layer's goodness counts in the prediction (Hinton skips it: ``false``;
    needs two or more FF layers)."""
    prediction: str = "goodness"
    """``goodness``: predict the label of highest summed goodness, the output layer unused and
    frozen; ``linear``: train the output layer as a softmax classifier on the detached last activity
    of a neutral-label pass and predict with it."""

    def __post_init__(self) -> None:
        check(math.isfinite(self.threshold) and self.threshold > 0, "strategy.threshold", self.threshold, "must be a positive number")
        check(self.goodness in GOODNESS, "strategy.goodness", self.goodness, f"choose one of {GOODNESS}")
        check(math.isfinite(self.label_scale) and self.label_scale > 0, "strategy.label_scale", self.label_scale,
              "must be a positive number")
        check(self.negatives in NEGATIVES, "strategy.negatives", self.negatives, f"choose one of {NEGATIVES}")
        check(self.prediction in PREDICTIONS, "strategy.prediction", self.prediction, f"choose one of {PREDICTIONS}")


def rms_normalize(h: Tensor, eps: float = 1e-8) -> Tensor:
    """``h / (rms(h) + eps)`` over the last dim: the direction of ``h`` at length ``sqrt(n)``."""
    return h / (h.pow(2).mean(-1, keepdim=True).sqrt() + eps)


def embed_labels(x: Tensor, labels: Tensor | None, classes: int, scale: float) -> Tensor:
    """``x`` ``(..., D)`` with its first ``classes`` values replaced by the one-hot ``labels`` (``...``)
    times ``scale`` times each example's largest value; ``labels=None``: the neutral label, every
    label pixel ``1/classes`` of that value."""
    value = x.amax(-1, keepdim=True) * scale
    if labels is None:
        code = (value / classes).expand(*x.shape[:-1], classes)
    else:
        code = torch.zeros(*x.shape[:-1], classes, device=x.device, dtype=x.dtype).scatter_(-1, labels.unsqueeze(-1), 1.0) * value
    return torch.cat([code, x[..., classes:]], -1)


@register_strategy("ff")
class ForwardForward(Strategy):
    """Every hidden layer separates the goodness of positive (true label) from negative (wrong label)
    data on its own detached, length-normalised input; prediction by summed goodness per label."""

    Config = FFConfig
    replica_fields = ("threshold",)
    search_space = {"threshold": {"log": [0.25, 4.0]}}
    predicts_with_model = False

    def __init__(self, cfg: FFConfig, model: WorkerNetwork, variants: dict[str, list[float]] | None = None) -> None:
        super().__init__(cfg, model, variants)
        if model.image_shape is not None:
            raise ConfigError(
                "strategy=ff: Forward-Forward is implemented here for fully connected layers only (model.conv must be empty); "
                "the paper's locally connected / conv variant is not"
            )
        layers: list[tuple[nn.Module, nn.Module, nn.Module]] = []  # (layer, norm, post) of every FF layer
        self.worker_layer: list[int] = []  # positions in `layers` of the network's worker layers (model.hidden)
        for block in model.blocks():
            layers += list(zip(block.stem.layers, block.stem.norms, block.stem.post))
            self.worker_layer.append(len(layers))
            layers.append((block.layer, block.norm, block.post))
        layers += list(zip(model.head.stem.layers, model.head.stem.norms, model.head.stem.post))
        if not layers:
            raise ConfigError("strategy=ff: Forward-Forward trains hidden layers; model.hidden is empty")
        for layer, norm, post in layers:
            if not isinstance(layer, (ReplicaLinear, WorkerLinear)):
                raise ConfigError(f"strategy=ff: Forward-Forward is implemented for fully connected layers, not {type(layer).__name__}")
            if not isinstance(norm, nn.Identity):
                raise ConfigError("strategy=ff: the layers must have no normalisation (model.hidden_norm=none): FF length-normalises "
                                  "each layer's input itself, and a norm inside the layer would set its goodness")
            if not isinstance(post, (nn.Identity, nn.Dropout)):
                raise ConfigError(f"strategy=ff: unsupported module {type(post).__name__} after a layer")
        if not cfg.predict_first_layer and len(layers) < 2:
            raise ConfigError("strategy.predict_first_layer=false needs two or more hidden layers (the first is skipped in prediction)")
        self.layers = layers
        C = model.num_classes
        D = layers[0][0].in_features
        if C > D:
            raise ConfigError(f"strategy=ff: the {C} labels are embedded in the first pixels, but the input has only {D}")
        self.generators = [torch.Generator().manual_seed(seed * 1_000_003 + 15_485_863) for seed in model.seeds]
        """Per replica, the generator of its negative labels (from ``seeds[r]`` alone; checkpointed)."""
        self.rows = 8192
        """Rows (example x candidate label) per batched pass of :meth:`class_goodness`."""

    # -- passes --------------------------------------------------------------------------------
    def _inputs(self, x: Tensor) -> Tensor:
        R = self.model.replicas
        return x.unsqueeze(0).expand(R, *x.shape) if x.dim() == 2 else x

    def activities(self, x: Tensor, dropout: bool = True) -> list[Tensor]:
        """Each FF layer's activity ``(R, B, n_l)`` for label-embedded inputs ``x`` ``(R, B, D)``: its
        input detached and length-normalised, after the activation (and dropout, when training and
        ``dropout``)."""
        h, out = x, []
        for layer, _, post in self.layers:
            h = self.model.act(layer(rms_normalize(h.detach())))
            if isinstance(post, nn.Dropout) and dropout and post.training and post.p > 0:
                h = post(h)
            out.append(h)
        return out

    @staticmethod
    def _full(h: Tensor) -> Tensor:
        """``h`` in float32 when it is half precision (autocast), else as it is."""
        return h.float() if h.dtype in (torch.float16, torch.bfloat16) else h

    def _goodness(self, h: Tensor) -> Tensor:
        g = self._full(h).pow(2)
        return g.sum(-1) if self.cfg.goodness == "sum" else g.mean(-1)

    def _thresholds(self) -> list[float | Tensor]:
        """``theta_l`` per FF layer: a number, or ``(R, 1)`` when a population varies ``threshold``."""
        t = self.per_replica("threshold")
        if isinstance(t, Tensor):
            t = t.view(-1, 1)
        return [t * (layer.out_features if self.cfg.goodness == "sum" else 1) for layer, _, _ in self.layers]

    @torch.no_grad()
    def class_goodness(self, x: Tensor) -> Tensor:
        """Summed goodness of every candidate label ``(R, B, C)`` (over the layers the prediction counts),
        without dropout: every (example, label) pair one row of a batched pass, ``rows`` rows at a time."""
        x = self._inputs(x)
        R, B, D = x.shape
        C = self.model.num_classes
        first = 0 if self.cfg.predict_first_layer else 1
        labels = torch.arange(C, device=x.device)
        chunk = max(1, self.rows // C)
        parts = []
        for start in range(0, B, chunk):
            xs = x[:, start : start + chunk]
            n = xs.shape[1]
            embedded = embed_labels(xs.unsqueeze(2).expand(R, n, C, D), labels.expand(R, n, C), C, self.cfg.label_scale)
            acts = self.activities(embedded.reshape(R, n * C, D), dropout=False)
            parts.append(sum(self._goodness(h) for h in acts[first:]).view(R, n, C))
        return torch.cat(parts, 1)

    def _linear_logits(self, x: Tensor) -> Tensor:
        """The output layer on the detached, normalised last activity of a neutral-label pass."""
        with torch.no_grad():
            last = self.activities(embed_labels(x, None, self.model.num_classes, self.cfg.label_scale))[-1]
        return self.model.head.layer(rms_normalize(last))

    def predict_logits(self, x: Tensor) -> Tensor:
        """FF's prediction as logits: per-class summed goodness ``(R, B, C)`` (``prediction=linear``: the
        trained output layer's logits). A binary sigmoid head gets ``G_1 - G_0`` as its one logit."""
        x = self._inputs(x)
        if self.cfg.prediction == "linear":
            return self._linear_logits(x)
        g = self.class_goodness(x)
        return (g[..., 1] - g[..., 0]).unsqueeze(-1) if self.model.head.activation == "sigmoid" else g

    # -- negatives -------------------------------------------------------------------------------
    def negative_labels(self, y: Tensor, goodness: Tensor | None = None) -> Tensor:
        """A wrong label per example ``(R, B)``: uniform among the other classes the head allows (its
        logit mask), or, given per-class ``goodness`` ``(R, B, C)``, drawn from their softmax (Gumbel-max
        on the same uniform draws). Replica ``r`` draws from its own generator."""
        R, B = y.shape
        C = self.model.num_classes
        u = to_device(torch.stack([torch.rand(B, C, generator=g, dtype=torch.float64) for g in self.generators]), y.device)
        score = -torch.log(-torch.log(u.clamp(1e-300, 1 - 1e-16)))  # Gumbel noise
        if goodness is not None:
            score = score + torch.log_softmax(goodness.double(), -1)
        others = torch.ones(R, B, C, dtype=torch.bool, device=y.device).scatter_(-1, y.unsqueeze(-1), False)
        mask = self.model.head.logit_mask
        allowed = others if mask is None else others & mask.expand(R, B, C)
        allowed = torch.where(allowed.any(-1, keepdim=True), allowed, others)  # a one-class head: any other label
        return score.masked_fill(~allowed, float("-inf")).argmax(-1)

    # -- the step ------------------------------------------------------------------------------
    def compute(self, x: Tensor, y: Tensor) -> StepResult:
        model, cfg = self.model, self.cfg
        x = self._inputs(x)
        y = model.head.labels(y)
        B, C = y.shape[1], model.num_classes
        logits = None
        if (cfg.prediction == "goodness" and self.logits_wanted) or cfg.negatives == "hard":
            goodness = self.class_goodness(x)
            logits = goodness if model.head.activation == "softmax" else (goodness[..., 1] - goodness[..., 0]).unsqueeze(-1)
        negative = self.negative_labels(y, goodness if cfg.negatives == "hard" else None)
        both = torch.cat([embed_labels(x, y, C, cfg.label_scale), embed_labels(x, negative, C, cfg.label_scale)], 1)
        acts = self.activities(both)
        loss = 0.0
        objectives, gaps = [], []
        for i, (h, theta) in enumerate(zip(acts, self._thresholds())):
            g = self._goodness(h)
            g_pos, g_neg = g[:, :B], g[:, B:]
            loss = loss + F.softplus(theta - g_pos).mean(1) + F.softplus(g_neg - theta).mean(1)
            if i in self.worker_layer:
                objectives.append(self._worker_objective(h.detach(), B, i))
                sq = self._full(h.detach()).pow(2)
                gaps.append(sq[:, :B].mean(1) - sq[:, B:].mean(1))
        if cfg.prediction == "linear":
            out = self._linear_logits(x)
            loss = loss + model.head.global_loss(out, y)
            logits = out.detach()
        return StepResult(loss=loss, logits=logits, worker_objectives=objectives, signals={"goodness_gap": gaps})

    def _worker_objective(self, h: Tensor, B: int, index: int) -> Tensor:
        """Each worker's own FF loss ``(R, W)``: the layer's loss on the goodness of its ``k`` units
        (threshold per unit as the layer's)."""
        layer = self.layers[index][0]
        W = getattr(layer, "num_workers", 1)
        sq = self._full(h).pow(2).view(*h.shape[:2], W, -1)
        g = sq.sum(-1) if self.cfg.goodness == "sum" else sq.mean(-1)
        t = self.per_replica("threshold")
        t = t.view(-1, 1, 1) if isinstance(t, Tensor) else t
        theta = t * (sq.shape[-1] if self.cfg.goodness == "sum" else 1)
        return (F.softplus(theta - g[:, :B]).mean(1) + F.softplus(g[:, B:] - theta).mean(1)).view(h.shape[0], W)

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "generators": [g.get_state() for g in self.generators]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for g, s in zip(self.generators, state.get("generators", [])):
            g.set_state(s if s.device.type == "cpu" else s.cpu())
