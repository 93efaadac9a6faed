"""The scenario: what an agent observes of a step and what it is paid (``docs/env.md``).

Observation features are named (:data:`FEATURES`); :func:`observe` computes them from the step's
(pre-update) record; rewards are small classes (:class:`SelfInterest`, :class:`Cooperative`).
"""

from __future__ import annotations

import numpy as np
import torch

from agentnet.network import ForwardRecord, WorkerNetwork, eval_mode
from agentnet.strategy import StepResult
from agentnet.training import TrainerPlugin
from agentnet.blocks import WorkerLosses

__all__ = ["FEATURES", "OBS_DIM", "REWARDS", "REWARD_CLASSES", "Cooperative", "SelfInterest", "StepRecord", "feature", "observe", "observation_bounds",
           "squash", "unsquash"]

FEATURES = (
    "role_leader",  # role one-hot: leader, follower, output (hidden workers of strategies without leaders: all 0)
    "role_follower",
    "role_output",
    "own_loss",  # own prediction loss on the batch (output agent: the global loss)
    "distance_to_best",  # MSE between its outputs and its layer's best worker's
    "worker_signal",  # the strategy's declared per-worker signal, summed over the worker's units
    "activation_mean",
    "activation_std",
    "param_norm",  # norm of the parameters it owns
    "update_norm",  # norm of their last update
    "depth",  # layer / (L + 1)
)
OBS_DIM = len(FEATURES)


def feature(name: str) -> int:
    """The observation index of feature ``name``."""
    return FEATURES.index(name)


ROLE_LEADER, ROLE_FOLLOWER, ROLE_OUTPUT = feature("role_leader"), feature("role_follower"), feature("role_output")
#: Observation entries that are unbounded signals (losses, distances, statistics, norms): squashed
#: by default; the role one-hot and the depth already lie in [0, 1].
SQUASHED = slice(feature("own_loss"), feature("depth"))
_RAW_LOW = np.array([0, 0, 0, 0, 0, 0, -np.inf, 0, 0, 0, 0], dtype=np.float32)
_RAW_HIGH = np.array([1, 1, 1, np.inf, np.inf, np.inf, np.inf, np.inf, np.inf, np.inf, 1], dtype=np.float32)
OBSERVATION_MODES = ("squashed", "raw")


def squash(x: torch.Tensor) -> torch.Tensor:
    """``x / (1 + |x|)``: monotone, sign-preserving, onto ``(-1, 1)``; its inverse is :func:`unsquash`."""
    return x / (1 + x.abs())


def unsquash(y: torch.Tensor) -> torch.Tensor:
    """The raw signal back from a squashed one: ``y / (1 - |y|)``."""
    return y / (1 - y.abs())


def observation_bounds(mode: str) -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)`` of one agent's observation in ``mode`` (``squashed``: finite; ``raw``: the signals')."""
    low, high = _RAW_LOW.copy(), _RAW_HIGH.copy()
    if mode == "squashed":  # squash maps [0, inf) onto [0, 1] and R onto [-1, 1]
        low[SQUASHED], high[SQUASHED] = np.sign(low[SQUASHED]), np.sign(high[SQUASHED])
    return low, high


def present(obs: torch.Tensor, mode: str) -> torch.Tensor:
    """Observations as the agents receive them in ``mode``; the env keeps them raw."""
    if mode == "raw":
        return obs
    out = obs.clone()
    out[:, SQUASHED] = squash(obs[:, SQUASHED])
    return out


class StepRecord(TrainerPlugin):
    """The step's mini-batch and the network's record on it before the update, for the observations.

    When the step's own record carries no per-worker losses (``bp``, ``fa``, ...), a pass with an
    hook that only records per-worker losses is made right after the strategy's backward, before the
    update: no gradient, evaluation mode (no random numbers drawn, normalisation statistics
    untouched), so the trainer's trajectory is unchanged.
    """

    model: WorkerNetwork
    losses: WorkerLosses
    """A hook that only records per-worker losses: nothing is trained by it."""
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    record: ForwardRecord | None = None

    def before_run(self, trainer) -> None:
        self.model = trainer.model
        self.losses = WorkerLosses()

    def before_step(self, trainer, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x[0], y[0]  # the env trains one replica

    def after_backward(self, trainer, result: StepResult) -> None:
        self.record = result.record
        if result.record is None or result.record.layers[0].worker_loss is None:
            with torch.no_grad(), eval_mode(self.model):
                self.record = self.model.forward_record(self.x, self.y, hook=self.losses)


def global_loss(model: WorkerNetwork, result: StepResult, y: torch.Tensor) -> torch.Tensor:
    """The task (prediction) loss of the step's forward pass on the batch it consumed, a scalar (not
    ``result.loss``, the strategy's whole objective, e.g. LFNN's sum of every worker's terms)."""
    with torch.no_grad():
        return model.head.global_loss(result.logits.detach()[:, : len(y)], y.unsqueeze(0))[0]


def observe(
    step: StepRecord, result: StepResult, signal_name: str | None, param_norms: torch.Tensor, last_update: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Raw observations ``(N, OBS_DIM)`` of the step from its pre-update record, with each hidden
    layer's declared worker signal (``None`` if the strategy declares none) and the global loss."""
    # The env holds one replica: every signal below is replica 0's.
    record, x, y = step.record, step.x, step.y
    device = param_norms.device
    has_roles = result.record is not None and result.record.layers[0].leaders is not None
    signal = result.signals.get(signal_name) if signal_name else None
    loss = global_loss(step.model, result, y)
    rows = []
    n_layers = len(record.layers) + 1
    for li, layer_record in enumerate(record.layers):
        workers = layer_record.workers.detach()[0]
        W = workers.shape[1]
        obs = torch.zeros(W, OBS_DIM, device=device)
        if has_roles:
            leaders = result.record.layers[li].leaders[0]
            lead = leaders.float().mean(0) if leaders.dim() == 2 else leaders.float()
            obs[:, ROLE_LEADER] = lead
            obs[:, ROLE_FOLLOWER] = 1 - lead
        e = layer_record.worker_loss.detach()[0].mean(0)
        obs[:, 3] = e
        best = workers[:, e.argmin()]
        obs[:, 4] = (workers - best.unsqueeze(1)).pow(2).mean((0, 2))
        if signal is not None:
            obs[:, 5] = signal[li][0].view(W, -1).sum(1)
        act = layer_record.activation.detach()
        act = (act[0] if act.dim() == 3 else act).reshape(len(x), W, -1)  # FC (R, B, n); conv (B, R*n, H, W) with R = 1
        # One contiguous row per worker, and the two-pass formula: torch's std over the strided
        # dims (0, 2), or its std_mean, costs ~0.2 ms here, most of the env's overhead per layer.
        per_worker = act.transpose(0, 1).reshape(W, -1)
        mean = per_worker.mean(1)
        obs[:, 6] = mean
        if per_worker.shape[1] > 1:
            obs[:, 7] = (per_worker - mean.unsqueeze(1)).square_().sum(1).div_(per_worker.shape[1] - 1).sqrt_()
        obs[:, 10] = (li + 1) / n_layers
        rows.append(obs)
    out = torch.zeros(1, OBS_DIM, device=device)
    out[0, ROLE_OUTPUT] = 1.0
    out[0, 3] = loss
    logits = result.logits.detach()[0]
    out[0, 6], out[0, 7] = logits.mean(), logits.std()
    out[0, 10] = 1.0
    rows.append(out)
    obs = torch.cat(rows)
    obs[:, 8] = param_norms
    obs[:, 9] = last_update
    return obs, signal, loss


def reset_observation(param_norms: torch.Tensor, layer_of: np.ndarray, n_layers: int) -> torch.Tensor:
    """The observation before any batch: parameter norms, depth and the output agent's role."""
    obs = torch.zeros(len(layer_of), OBS_DIM, device=param_norms.device)
    obs[:, 8] = param_norms
    obs[:, 10] = torch.as_tensor(layer_of / n_layers, dtype=torch.float32)
    obs[-1, ROLE_OUTPUT] = 1.0
    return obs


class SelfInterest:
    """Each agent's own local objective on the batch: the strategy's declared worker signal (higher
    is better), else minus its per-worker objective, else (and for the output agent) minus the
    global loss; times ``scale``."""

    def __init__(self, scale: float, agents_per_layer: list[int]) -> None:
        self.scale = scale
        self.hidden_widths = agents_per_layer[:-1]

    def __call__(self, obs: torch.Tensor, signal: list | None, result: StepResult, loss: torch.Tensor, sequence, task: int) -> torch.Tensor:
        rewards, row = [], 0
        for li, W in enumerate(self.hidden_widths):
            if signal is not None:  # a declared signal is what the worker seeks (higher is better)
                rewards.append(obs[row : row + W, feature("worker_signal")])
            elif result.worker_objectives:
                rewards.append(-result.worker_objectives[li][0])
            else:
                rewards.append(-loss.expand(W))
            row += W
        rewards.append(-loss.view(1))
        return torch.cat(rewards).float() * self.scale


class Cooperative:
    """Every agent the same reward: at the step that ends task ``i`` (1-based), the mean test
    accuracy over the tasks seen so far, ``mean_{j<=i} R[i][j]``; 0 at every other step."""

    def __init__(self, scale: float, agents_per_layer: list[int]) -> None:
        self.scale = scale
        self.num_agents = sum(agents_per_layer)

    def __call__(self, obs: torch.Tensor, signal: list | None, result: StepResult, loss: torch.Tensor, sequence, task: int) -> torch.Tensor:
        """``task``: the task the step's batch belonged to (``sequence.task`` has moved on if the step ended it)."""
        rewards = torch.zeros(self.num_agents, device=obs.device)
        if sequence.task > task:  # the step ended a task: the mean accuracy over the tasks seen
            rewards += float(np.mean(sequence.record.acc_matrices[0][-1][: sequence.task])) * self.scale
        return rewards


REWARD_CLASSES = {"self": SelfInterest, "cooperative": Cooperative}
REWARDS = tuple(REWARD_CLASSES)
