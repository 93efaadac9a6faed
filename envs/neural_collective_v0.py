"""# Neural Collective

A neural network trained on real MNIST, seen as a multi-agent system: every **worker** of every
hidden layer (a group of ``k`` neurons, or of ``k`` filters in a conv layer) and the output layer
are the agents. One ``step`` consumes
one mini-batch: each worker's strategy (``bp``, ``lfnn``, ``lfnn_local``, ``attention``, or any
registered one) proposes an update to the worker's own incoming weights, and the agent's action
decides what is applied.

| | |
|---|---|
| Import | ``from envs import neural_collective_v0`` |
| Actions | continuous |
| Parallel API | yes (native); AEC through ``parallel_to_aec`` |
| Agents | ``worker_0`` … ``worker_{N-1}``: hidden workers layer by layer, then the output layer |
| Observation shape | ``(11,)`` float32, the same for every agent; finite bounds (squashed, the default) |
| Action shape | ``(1,)`` in ``[0, max_scale]`` (scale) or ``[-1, 1]`` (scale_centered); delta mode the agent's own parameter count |
| State shape | ``(N * 11,)`` float32: every agent's observation (``state()``, ``state_space``) |
| Continual benchmark | ``benchmark="pmnist_quick"``: one episode is the whole task sequence (see below) |

## Agents
For the default network (two hidden layers of 40 units, workers of 10) there are 4 + 4 workers plus
the output agent. With ``conv=[{"channels": 20, "pool": 2}]`` the network starts with a conv layer
of filter-wise workers (``channels / worker_size`` workers of ``k`` filters each, their maps
globally average-pooled to predict); they are agents like the others, layer 1. Block-wise workers
(``{"block": "vgg" | "residual", "workers": W, ...}``) are agents too: each of the ``W`` blocks is one,
and its action scales every parameter of its block (all its convs and its rows of the shortcut).
Plain layers and normalisation layers are refused (``ConfigError`` naming ``conv[i].plain`` /
``.norm``): every parameter must belong to exactly one agent. In delta mode a conv worker's action
holds its ``k`` filters flattened (``in_channels * kernel**2`` values each) plus their biases; delta
mode is for layers of one weight and bias per unit, so block workers take the scale modes. ``infos[agent]`` holds ``layer`` (1-based; the output layer is ``L+1``), ``index``
within the layer, ``cycle`` (steps taken in the episode) and the global metrics of the last step
(``batch_loss``, ``batch_acc``). ``reset`` returns the same keys (vectorising libraries such as
TorchRL preallocate infos from the reset); as no batch has been consumed then, ``cycle`` is 0 and
both metrics are 0.0. With a benchmark, ``infos`` also carry ``task``, ``tasks_done`` and
``acc_matrix`` (below), at reset and at every step.

## Observation (local signals only)
| index | signal |
|---|---|
| 0-2 | role one-hot: leader, follower, output (hidden workers of strategies without leaders: all 0) |
| 3 | own prediction loss ``e_w`` on the batch (output agent: the global loss) |
| 4 | distance to the best worker of its layer: MSE between the outputs (0 for the best and the output agent) |
| 5 | the strategy's declared per-worker signal (``Strategy.worker_signal``) summed over the worker's units; ``attention``: the attention received, ``mean_b \\|sum_j alpha_ji g_j\\|``; 0 for strategies that declare none |
| 6, 7 | mean and standard deviation of its activation on the batch |
| 8 | norm of its incoming weights (and biases) |
| 9 | norm of its last update |
| 10 | depth: layer / (L + 1) |

Signals describe the batch just consumed, before the update: the strategy's own forward pass, or,
for strategies whose step records no per-worker losses (``bp``, ``fa``, ...), a no-grad pass in
evaluation mode before the update (no random numbers drawn, batch-norm statistics untouched).
"The global loss" is the task loss of the output on the batch (cross-entropy), not the strategy's
whole objective.

``observation_mode="squashed"`` (default): entries 3-9 are passed through ``squash(x) = x / (1 + |x|)``,
monotone and sign-preserving, so the space has finite bounds (``[0, 1]``; ``[-1, 1]`` for entry 6)
as RL libraries' normalisers and PettingZoo's ``api_test`` expect; ``unsquash(y) = y / (1 - |y|)``
recovers the signal. ``observation_mode="raw"``: the signals themselves, with infinite upper bounds
(``api_test`` warns about them; for analysis rather than for RL libraries).

## State
``state()`` returns every agent's current observation concatenated in ``possible_agents`` order, a
global state for centralised critics (MAPPO, QMIX; TorchRL's ``return_state=True``); its space is
``state_space``. Before the first ``reset`` it raises.

## Actions
* ``action_mode="scale"`` (default): a multiplier in ``[0, max_scale]`` on the update the agent's
  strategy proposes for its weights this step (``w <- w_old + a * (w_new - w_old)``; ``a = 0``
  leaves them bit-identical, ``a = 1`` is exactly the strategy's own step).
* ``action_mode="scale_centered"``: the same multiplier, reached from an action ``u`` in ``[-1, 1]``
  centred on the strategy's own step: ``[-1, 0]`` maps linearly onto ``[0, 1]`` and ``[0, 1]`` onto
  ``[1, max_scale]`` (``max_scale >= 1``), so ``u = 0`` is exactly the strategy's step (bit for bit)
  and ``u = -1`` freezes the worker. An untrained zero-mean Gaussian policy thus starts by following
  the strategy instead of freezing the network, as it would at ``a = 0`` in scale mode.
* ``action_mode="delta"``: the agent's own parameter update, a flat vector over its weight rows and
  biases (``k * (fan_in + 1)`` values), each in ``[-max_delta, max_delta]``, added directly; the
  optimiser does not step. The strategy's proposed gradient is available as ``env.proposed_gradient()``.

Every action is checked against its own agent's space before anything is applied: a wrong shape
(a scalar or ``(1, 1)`` where the space is ``(1,)`` included — nothing is broadcast or squeezed), a
non-numeric value, NaN, a value out of bounds, an unknown or a missing agent raise ``ValueError``
naming the agent. Any real dtype (float64 from SB3, torch tensors) of the right shape is accepted.

## Rewards
Each agent's own local objective on the batch: ``lfnn`` / ``lfnn_local`` workers (and any strategy
that reports per-worker objectives) get minus their weighted local loss (leader prediction loss or
follower alignment), ``attention`` workers the attention they received, ``bp`` workers and the
output agent minus the global loss — the task loss on the batch (cross-entropy, about 2.3 for an
untrained 10-way network), never the strategy's whole objective (LFNN's sums every worker's terms).
``infos[agent]["batch_loss"]`` is that global loss too. ``reward_scale`` (positive, default 1)
multiplies every reward.

``reward="self"`` (the default) is that self-interest. ``reward="cooperative"`` (needs a benchmark)
gives every agent the same reward: at the step that ends task ``i`` (1-based), the mean test
accuracy over the tasks seen so far, ``mean_{j<=i} R[i][j]``; 0 at every other step. An episode's
return is thus ``sum_i ACC_i``, the accuracy on the tasks seen averaged over the sequence's stages
(times ``T``): it pays for learning each new task *and* for keeping the earlier ones, the
trade-off continual learning is about. Why sparse and not, say, minus the global loss every step
plus the task-end accuracy: the per-step loss is the current task's only (it rewards overwriting
what earlier tasks need, the very thing to learn to avoid), and summed over a task's hundreds of
steps it would drown the task-end term whatever the weighting; the unshaped reward keeps the return
equal to a standard metric. Dense self-interest stays available in ``reward="self"``; the two do
not change training (same actions, same weights).

## Groups
``env.group_map`` groups the agents by layer (``layer_1``, …, ``output``); agents of a group share
their action shape in every mode. In delta mode pass it to TorchRL
(``PettingZooWrapper(env, group_map=env.group_map)``): TorchRL's default groups every ``worker_<i>``
together and cannot stack the layers' different action shapes. In the scale modes the default works.

## With MARL libraries
Tested in ``tests/test_env_marl.py`` (the ``marl`` extra installs the libraries)::

    import supersuit as ss, stable_baselines3 as sb3
    par = neural_collective_v0.parallel_env(action_mode="scale_centered", max_cycles=100)
    vec = ss.concat_vec_envs_v1(ss.pettingzoo_env_to_vec_env_v1(par), 4, base_class="stable_baselines3")
    vec.venv.reset(seed=0)  # the 4 copies are exact clones: seed them apart once (copy i: seed 0 + i)
    sb3.PPO("MlpPolicy", vec).learn(10_000)

    from torchrl.envs.libs.pettingzoo import PettingZooWrapper
    par = neural_collective_v0.parallel_env(action_mode="delta")
    env = PettingZooWrapper(env=par, return_state=True, group_map=par.group_map)  # one group per layer

``examples/learned_plasticity.py`` is the whole recipe on a continual stream (``benchmark=``,
``reward="cooperative"``): SB3 PPO sets every worker's plasticity, evaluated on held-out task
sequences against the fixed rule (``benchmarks/learned_plasticity.py``; the result, in
``docs/benchmarks.md``: PPO raises the return it is paid, not ACC — it learns larger steps that
help each task's learning and cost forgetting).

SuperSuit copies the env by pickling, so its copies share the seed stream until seeded apart;
Stable-Baselines3's ``PPO(seed=...)`` cannot do it through SuperSuit's SB3 wrapper (it forwards
``VecEnv.seed`` to a ``ConcatVecEnv`` that has no ``seed``), hence the explicit seeded reset.

## Seeding and random generators
The env owns its random generators and never reseeds or advances Python's, NumPy's or torch's
global ones: model construction and anything a strategy draws run on the env's own torch stream
(swapped in and out around each call), so an RL library's exploration noise in the same process is
unaffected. Python's and NumPy's global states are saved and restored around construction, reset
and unpickling (which seed them); steps restore torch's only, as strategies draw from torch alone. ``reset(seed=s)`` starts the episode seeded with ``s`` (network, batch order)
and reseeds the env's own seed stream; ``reset()`` without a seed uses the constructor's ``seed``
the first time and afterwards draws a fresh episode seed from that stream, so every auto-reset
episode differs while the whole sequence stays reproducible. ``env.episode_seed`` is the current
episode's seed. ``reset``'s ``options`` are accepted (the API requires them) but none are read.

## Pickling and copying
The env pickles (and ``copy.deepcopy``-s) at any point — before ``reset``, mid-episode, after the
end — and the copy continues exactly where the original was: same observations, rewards and
weights for the same actions, and the same unseeded episodes after it. The pickle holds the
constructor's arguments and the training state as tensors (model, optimiser, strategy and leader
selection, batch-stream position, generator states): a few hundred kB for the default network, never
the dataset, which the copy reloads through the loader's per-process cache (vector-env workers in
other processes read it from ``data_root``).

## Episode
Ends (``terminations``) when the data stream is exhausted (``epochs`` passes over the training
subset) or is truncated at ``max_cycles`` steps (a positive integer; default 100, or with a
benchmark the whole sequence). Stepping after the end (or
before the first ``reset``) raises ``RuntimeError("... episode over; call reset()")``; so does
``step_batched``, which shares the episode with the dict API. Every step goes through the trainer's one loop
(``Trainer.run``), so epochs close as in a training run: leader-selection bookkeeping, a history
entry and an evaluation on the env's 2000 test examples (``env.trainer.history``). With every
action equal to 1 (scale mode), the env reproduces :class:`agentnet.training.Trainer` exactly for
the same seed and settings.

## Continual benchmark
``benchmark=`` makes one episode a continual-learning task sequence: a protocol name
(``"pmnist_quick"``: the ``benchmark`` node ``agentnet benchmark=pmnist_quick`` composes, through
Hydra's compose), a dict naming one with fields overridden (``{"name": "pmnist_quick", "num_tasks": 3}``)
or a :class:`agentnet.config.BenchmarkConfig`. Only the task stream and the per-task length come
from the protocol; the network, batch size and optimiser stay this env's arguments (a preset's
``model`` / ``trainer`` / ``data`` overrides, e.g. pmnist_quick's ``mlp_400x2``, are the CLI's: pass
``hidden=(400, 400), lr=1e-3`` to match, and ``data_normalize=False`` for pmnist_vdv's and
pmnist_online's pixels in [0, 1]). ``cl=`` adds a CL method (``"ewc"``, ``{"name": "si", "c": 1}``;
refused without a benchmark). The episode is the continual runner's own
:class:`agentnet.continual.runner.TaskSequence` advanced one batch per step: task streams (each
task's permutation drawn from the episode seed), stage lengths (``epochs_per_task`` passes over
the training subset, or ``iterations_per_task``), CL hooks and the evaluation of every task's test
set (the env's 2000 test examples, transformed per task) at reset (row 0 of ``R``) and at the step
that ends each task. So with every action 1 (scale mode), an episode's accuracy matrix is exactly
``agentnet benchmark=<same> strategy=<same> cl=<same>``'s with this env's network, data and seed
(``run_continual(env.run)`` with an ``output_dir`` is that run).

Extra ``infos`` keys for every agent, at reset and every step, fixed in type and shape (TorchRL
and SuperSuit stack them): ``task`` (0-based index of the task the step's batch belonged to; 0 at
reset), ``tasks_done`` (tasks trained and evaluated so far) and ``acc_matrix``, a ``(T+1, T)``
float32 array: row 0 before training, row ``i`` after task ``i``; rows not reached yet hold
``UNREACHED = -1.0`` (not NaN: ``NaN != NaN`` fails PettingZoo's ``seed_test`` and any equality
check on infos; accuracies lie in ``[0, 1]``). All agents share the step's one array.
``env.last_acc_matrix`` keeps the matrix the last finished (terminated or truncated) episode ended
with: SuperSuit's vector envs auto-reset at the end and hand on the *reset's* infos (row 0 of the
next episode), so the final matrix is read there (``vec.venv.vec_envs[i].par_env.unwrapped``);
the task-end cooperative rewards themselves do come through.

Length: ``max_cycles`` defaults to the sequence's total steps (terminated at its end, never
truncated there); a smaller value truncates the sequence mid-way (``truncations``, and rows of
tasks not finished stay -1); a larger one is refused (``ConfigError``: it can never be reached).

## Arguments
Invalid arguments raise :class:`agentnet.config.ConfigError` (a ``ValueError``) whose message
starts with the field, e.g. ``max_cycles=0: must be a positive whole number of steps``.

``neural_collective_v0.parallel_env(strategy="lfnn", hidden=(40, 40), worker_size=10, activation="relu",
batch_size=64, data_subset=2000, epochs=1, data_root=None, data_normalize=True, device="cpu",
max_cycles=None, action_mode="scale", max_scale=2.0, max_delta=0.1, observation_mode="squashed",
reward_scale=1.0, reward="self", lr=1e-3, optimizer="adam", seed=0, render_mode=None, conv=(),
worker_projection=False, benchmark=None, cl=None)``

``strategy`` is a registered name or a dict config (``{"name": "lfnn", "delta": 0.3}``).
``data_normalize`` standardises MNIST's pixels (``data.normalize``); ``False`` keeps them in [0, 1].
``conv`` lists filter-wise conv worker layers (dicts of :class:`agentnet.config.ConvLayerConfig`
fields) placed before ``hidden``.

## Rendering
``render_mode="ansi"``: a per-layer map (``L`` leader, ``f`` follower, ``.`` worker, ``O`` output);
``"rgb_array"``: the worker graph (``WorkerNetwork.to_networkx``) drawn with roles coloured;
``"human"`` prints the ansi map.

## Fast path
``step_batched(actions: Tensor) -> (obs (N, 11), rewards (N,), terminated, truncated, info)``
runs the same step on tensors (scale modes: ``actions`` of shape ``(N,)``; delta mode: a list of N
flat tensors); the dict API is a thin adapter over it. Observations are presented as the dict API's
(``observation_mode``).

## Version history
* v0: initial release.
* v0, issue #14 (changes what v0 returned; conv models accepted): observations squashed into finite bounds by default
  (``observation_mode="raw"`` gives the old values); the output agent's reward, the ``bp`` workers'
  and ``batch_loss`` are the task loss, no longer the strategy's whole objective; ``reset()``
  without a seed starts a new episode; stepping after the end raises; ``step_batched`` honours
  ``max_cycles``; new ``scale_centered`` action mode, ``reward_scale``, ``state()``, ``group_map``;
  picklable.
* v0, issue #14 item 6 (additive: without the new arguments every output is as before, so no new
  version): ``benchmark=`` hosts the continual benchmark (one episode = a task sequence; ``infos``
  gain ``task``, ``tasks_done``, ``acc_matrix``), ``cl=``, ``reward="cooperative"``;
  ``max_cycles`` defaults to ``None`` (100 without a benchmark, as before).
* v0, fix (issue #14 benchmark round): for strategies without a per-worker record (``bp``, ``fa``,
  ...) the observation pass ran after the update, so entries 3-7 described the updated network;
  it now runs before the update, as documented (and as for ``lfnn``). Entry 7 is the sample
  standard deviation computed with the two-pass formula (equal to ``torch.std`` to float precision).
* v0, issue #14 item 5 (additive): block-wise conv workers (VGG-style and residual blocks) are agents
  in the scale modes (refused before); delta mode still refuses them, naming ``action_mode``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
from typing import Any, Callable, Iterator

import numpy as np
import torch
from gymnasium import spaces
from pettingzoo import ParallelEnv
from pettingzoo.utils import parallel_to_aec, wrappers

from agentnet.composition import benchmark_config, check_combinations
from agentnet.config import BenchmarkConfig, ConfigError, ConvLayerConfig, DataConfig, ModelConfig, RunConfig, TrainerConfig, check
from agentnet.data import ImageData, load_dataset, run_splits
from agentnet.network import ForwardRecord, WorkerNetwork, build_model, eval_mode
from agentnet.registry import CL_METHODS, STRATEGIES, build_strategy
from agentnet.strategy import StepResult
from agentnet.session import build_session, resolve_device
from agentnet.training import ExternalUpdate, ScaledUpdate, TrainerPlugin
from agentnet.workers import LeaderSelection, WorkerBlock, WorkerConv2d, WorkerLinear

__all__ = ["NeuralCollectiveEnv", "parallel_env", "raw_env", "env", "OBS_DIM", "REWARDS", "UNREACHED", "run_config", "squash", "unsquash",
           "centered_to_scale", "scale_to_centered"]

OBS_DIM = 11
ROLE_LEADER, ROLE_FOLLOWER, ROLE_OUTPUT = 0, 1, 2
ACTION_MODES = ("scale", "scale_centered", "delta")
OBSERVATION_MODES = ("squashed", "raw")
REWARDS = ("self", "cooperative")
#: ``infos["acc_matrix"]`` entries of rows not reached yet (accuracies lie in [0, 1]; not NaN, which
#: breaks equality checks such as PettingZoo's ``seed_test``).
UNREACHED = -1.0
#: Test examples the env evaluates on (every task's test set, with a benchmark).
TEST_SUBSET = 2000
#: Observation entries that are unbounded signals (losses, distances, statistics, norms): squashed
#: by default; the role one-hot (0-2) and the depth (10) already lie in [0, 1].
SQUASHED = slice(3, 10)
_RAW_LOW = np.array([0, 0, 0, 0, 0, 0, -np.inf, 0, 0, 0, 0], dtype=np.float32)
_RAW_HIGH = np.array([1, 1, 1, np.inf, np.inf, np.inf, np.inf, np.inf, np.inf, np.inf, 1], dtype=np.float32)


def squash(x: torch.Tensor) -> torch.Tensor:
    """``x / (1 + |x|)``: monotone, sign-preserving, onto ``(-1, 1)``; its inverse is :func:`unsquash`."""
    return x / (1 + x.abs())


def unsquash(y: torch.Tensor) -> torch.Tensor:
    """The raw signal back from a squashed one: ``y / (1 - |y|)``."""
    return y / (1 - y.abs())


def centered_to_scale(u, max_scale: float):
    """``scale_centered``'s map from an action ``u`` in ``[-1, 1]`` to the update multiplier applied:
    ``[-1, 0]`` onto ``[0, 1]`` and ``[0, 1]`` onto ``[1, max_scale]``, so ``u = 0`` is exactly the
    strategy's own step. Works on torch tensors and numpy arrays alike; :func:`scale_to_centered`
    inverts it."""
    return (1 + u) * (u <= 0) + (1 + u * (max_scale - 1)) * (u > 0)


def scale_to_centered(multiplier: float, max_scale: float) -> float:
    """The ``scale_centered`` action that applies ``multiplier`` (in ``[0, max_scale]``)."""
    if not 0.0 <= multiplier <= max_scale:
        raise ValueError(f"multiplier={multiplier}: must lie in [0, max_scale={max_scale}] (scale_centered's range)")
    return multiplier - 1.0 if multiplier <= 1.0 else (multiplier - 1.0) / (max_scale - 1.0)


@functools.lru_cache(maxsize=4)
def _dataset(name: str, root: str | None, device: str, verify: bool, normalize: bool) -> ImageData:
    """A dataset is loaded once per process, as ``run.data`` asks; envs are built often (tests, seeding)."""
    return load_dataset(name, root, device, verify=verify, normalize=normalize)


def run_config(
    strategy: str | dict = "lfnn",
    hidden: tuple[int, ...] | list[int] = (40, 40),
    worker_size: int = 10,
    activation: str = "relu",
    batch_size: int = 64,
    data_subset: int | None = 2000,
    epochs: int = 1,
    data_root: str | None = None,
    data_normalize: bool = True,
    device: str = "cpu",
    lr: float = 1e-3,
    optimizer: str = "adam",
    seed: int = 0,
    worker_projection: bool = False,
    conv: list[dict | ConvLayerConfig] | tuple = (),
    benchmark: str | dict | BenchmarkConfig | None = None,
    cl: str | dict | None = None,
) -> RunConfig:
    """The :class:`RunConfig` an env with these arguments trains under (also for an equivalent Trainer).

    ``conv``: filter-wise conv worker layers in front of ``hidden`` (each a :class:`ConvLayerConfig`
    or its fields as a dict, e.g. ``{"channels": 20, "pool": 2}``); their workers are agents too.
    ``benchmark``: a continual-learning protocol (:func:`agentnet.composition.benchmark_config`); then
    :func:`agentnet.continual.runner.run_continual` on this config (with an ``output_dir``) is the
    run an episode with every action 1 reproduces. ``cl``: a CL method (needs a benchmark).
    """
    specs = [c if isinstance(c, ConvLayerConfig) else ConvLayerConfig(**c) for c in conv]
    for i, spec in enumerate(specs):
        # Every parameter of the network must belong to exactly one agent: plain layers and
        # normalisation layers would leave parameters no action controls (a block's rows are its worker's).
        check(not spec.plain, f"conv[{i}].plain", spec.plain, "plain layers belong to no agent; the env needs worker layers")
        check(spec.norm == "none", f"conv[{i}].norm", spec.norm, "normalisation parameters belong to no agent; use 'none'")
    run = RunConfig(
        strategy=STRATEGIES.config(strategy),  # a bare name gets exactly what `agentnet strategy=<name>` trains
        model=ModelConfig(
            name="env", hidden=list(hidden), worker_size=worker_size, activation=activation, worker_projection=worker_projection,
            conv=specs,
        ),
        data=DataConfig(root=data_root, subset=data_subset, test_subset=TEST_SUBSET, normalize=data_normalize),
        trainer=TrainerConfig(
            epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, lr_schedule="none", progress=False, checkpoint=False
        ),
        seed=seed,
        device=device,
    )
    if benchmark is not None:
        run.benchmark = benchmark_config(benchmark)
    if cl is not None:
        run.cl = CL_METHODS.config(cl)
    check_combinations(run)  # a CL method without a task sequence is refused
    return run


class _StepInputs(TrainerPlugin):
    """Keeps the mini-batch of the latest step (observations describe the batch just consumed) and,
    when ``observe`` is set, a record of the network on it before the update."""

    observe: Callable[[torch.Tensor, torch.Tensor], ForwardRecord | None] | None = None
    record: ForwardRecord | None = None

    def before_step(self, trainer, x, y) -> None:
        self.x, self.y = x[0], y[0]  # the env trains one replica
        self.record = None if self.observe is None else self.observe(self.x, self.y)


class NeuralCollectiveEnv(ParallelEnv):
    """The network as a ``ParallelEnv``; see the module docstring."""

    metadata = {"name": "neural_collective_v0", "render_modes": ["ansi", "rgb_array"], "is_parallelizable": True}

    def __init__(
        self,
        max_cycles: int | None = None,
        action_mode: str = "scale",
        max_scale: float = 2.0,
        max_delta: float = 0.1,
        render_mode: str | None = None,
        observation_mode: str = "squashed",
        reward_scale: float = 1.0,
        reward: str = "self",
        **run_args: Any,
    ) -> None:
        """``run_args`` are :func:`run_config`'s (strategy, network, data, device, optimiser, seed)."""
        # Kept to rebuild the env on unpickling (the pickle holds state, not the dataset).
        self._init_args = dict(
            max_cycles=max_cycles, action_mode=action_mode, max_scale=max_scale, max_delta=max_delta,
            render_mode=render_mode, observation_mode=observation_mode, reward_scale=reward_scale, reward=reward, **run_args,
        )
        check(action_mode in ACTION_MODES, "action_mode", action_mode, f"choose one of {ACTION_MODES}")
        check(observation_mode in OBSERVATION_MODES, "observation_mode", observation_mode, f"choose one of {OBSERVATION_MODES}")
        check(render_mode in (None, "ansi", "rgb_array", "human"), "render_mode", render_mode, "choose ansi, rgb_array, human or None")
        check(max_cycles is None or (isinstance(max_cycles, (int, np.integer)) and not isinstance(max_cycles, bool) and max_cycles > 0),
              "max_cycles", max_cycles, "must be a positive whole number of steps (or None: the default)")
        check(reward in REWARDS, "reward", reward, f"choose one of {REWARDS}")
        for key, value in (("max_scale", max_scale), ("max_delta", max_delta), ("reward_scale", reward_scale)):
            check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0,
                  key, value, "must be a positive finite number")
        check(action_mode != "scale_centered" or max_scale >= 1, "max_scale", max_scale,
              "action_mode='scale_centered' maps 0 to scale 1 and 1 to max_scale, so it must be at least 1")
        self.run = run_config(**run_args)
        self.benchmark = self.run.benchmark
        check(reward != "cooperative" or self.benchmark is not None, "reward", reward,
              "the cooperative reward is paid at task ends; it needs a benchmark (e.g. benchmark='pmnist_quick')")
        self.reward = reward
        self.action_mode = action_mode
        self.max_scale = max_scale
        self.max_delta = max_delta
        self.render_mode = render_mode
        self.observation_mode = observation_mode
        self.reward_scale = float(reward_scale)
        self.device = resolve_device(self.run.device)
        data_cfg = self.run.data
        self._base_data = _dataset(data_cfg.name, data_cfg.root, str(self.device), data_cfg.verify, data_cfg.normalize)
        # The env's own generators: torch's stream (model init, strategies' draws) lives in
        # _torch_stream between steps; episode seeds for reset() without a seed come from _seeder.
        self._torch_stream: torch.Tensor | None = None
        self._cuda_stream: torch.Tensor | None = None
        self._seeder = np.random.default_rng(self.run.seed)
        self._pending_seed: int | None = self.run.seed  # the first unseeded reset() uses the constructor's seed
        self.cycles = 0
        self._started = False  # whether reset() was called: stepping before it is an error
        #: With a benchmark: the accuracy matrix the last finished episode ended with (None before).
        self.last_acc_matrix: np.ndarray | None = None
        self._build(self.run.seed)
        if max_cycles is None:  # the default: 100 steps, or a benchmark's whole task sequence
            max_cycles = 100 if self.benchmark is None else self.stream_steps
        elif self.benchmark is not None and max_cycles > self.stream_steps:
            raise ConfigError(
                f"max_cycles={max_cycles}: the benchmark's task sequence ends after {self.stream_steps} steps "
                f"({self.sequence.num_tasks} tasks of {self.sequence.stage_steps[0]}); leave max_cycles unset "
                f"(the whole sequence) or choose at most {self.stream_steps} to truncate it"
            )
        self.max_cycles = int(max_cycles)
        layers = self._layers
        self.layer_of = np.concatenate([np.full(n, i + 1) for i, n in enumerate(self._agents_per_layer)])
        self.index_in_layer = np.concatenate([np.arange(n) for n in self._agents_per_layer])
        self.possible_agents = [f"worker_{i}" for i in range(sum(self._agents_per_layer))]
        self.agents: list[str] = []
        self._index = {a: i for i, a in enumerate(self.possible_agents)}
        self._base_infos = [{"layer": int(l), "index": int(i)} for l, i in zip(self.layer_of, self.index_in_layer)]
        low, high = _RAW_LOW.copy(), _RAW_HIGH.copy()
        if observation_mode == "squashed":  # squash maps [0, inf) onto [0, 1] and R onto [-1, 1]
            low[SQUASHED], high[SQUASHED] = np.sign(low[SQUASHED]), np.sign(high[SQUASHED])
        self.observation_spaces = {a: spaces.Box(low, high, dtype=np.float32) for a in self.possible_agents}
        # The global state for centralised critics: every agent's observation, in agent order.
        self.state_space = spaces.Box(np.tile(low, self.num_workers), np.tile(high, self.num_workers), dtype=np.float32)
        if action_mode == "scale":
            self.action_spaces = {a: spaces.Box(0.0, max_scale, shape=(1,), dtype=np.float32) for a in self.possible_agents}
        elif action_mode == "scale_centered":
            self.action_spaces = {a: spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32) for a in self.possible_agents}
        else:
            sizes = np.concatenate([[l.weight[0].numel() + 1] * n for l, n in zip(layers, self._agents_per_layer)])
            units = np.concatenate([[self._units[i]] * n for i, n in enumerate(self._agents_per_layer)])
            self.action_spaces = {
                a: spaces.Box(-max_delta, max_delta, shape=(int(units[i] * sizes[i]),), dtype=np.float32)
                for i, a in enumerate(self.possible_agents)
            }
        self._action_shapes = [self.action_spaces[a].shape for a in self.possible_agents]

    # -- construction --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _own_rng(self, python_and_numpy: bool = True) -> Iterator[None]:
        """Run a block on the env's own random stream, leaving every global generator as it was.

        Model construction (``seed_everything``, ``WorkerNetwork``'s init) and strategies draw from
        torch's global generator; an RL library sharing the process must not see its own noise
        reseeded or consumed by the env. So the block runs with torch's global CPU (and CUDA) state
        set to the env's saved stream, which is saved back afterwards, and torch's global state is
        restored whatever the block did (also when it raises). With ``python_and_numpy`` Python's
        and NumPy's global states are restored too: construction seeds them (``seed_everything``)
        and unpickling loads them; steps skip it, since strategies draw only from torch (and saving
        NumPy's state costs about 0.2 ms, more than a small network's whole step).
        """
        python_state = random.getstate() if python_and_numpy else None
        numpy_state = np.random.get_state() if python_and_numpy else None
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            try:
                if self._torch_stream is not None:
                    torch.set_rng_state(self._torch_stream)
                    if cuda:
                        torch.cuda.set_rng_state(self._cuda_stream, self.device)
                yield
            finally:
                self._torch_stream = torch.get_rng_state()
                self._cuda_stream = torch.cuda.get_rng_state(self.device) if cuda else None
                if python_and_numpy:
                    random.setstate(python_state)
                    np.random.set_state(numpy_state)

    def _build(self, seed: int) -> None:
        """(Re)build model, strategy and trainer exactly as :func:`agentnet.training.train` would,
        on the env's own random stream (seeded with ``seed``; global generators untouched)."""
        with self._own_rng():
            self._build_seeded(seed)

    def _build_seeded(self, seed: int) -> None:
        run = self.run
        run.seed = seed
        self.episode_seed = seed
        self.data = run_splits(self._base_data, run.data)  # the splits train() uses: the same for every seed
        # The env steps through the one training loop (Trainer.run), one batch per env step; a
        # plugin hands it the batch each step consumed, for the observations.
        self._step_inputs = _StepInputs()
        # The run built exactly as `agentnet ...` builds it (a single run: a stream of one task),
        # advanced one batch per env step; a benchmark evaluates every task at reset (row 0 of R)
        # and at task ends.
        self.sequence = build_session(run, self.data, None, [self._step_inputs])
        self.model, self.strategy, self.trainer = self.sequence.model, self.sequence.strategy, self.sequence.trainer
        if not (all(isinstance(l, (WorkerLinear, WorkerConv2d, WorkerBlock)) for l in self.model.hidden)
                and not any(len(stem) for stem in self.model.stems) and all(isinstance(n, torch.nn.Identity) for n in self.model.norms)):
            raise ValueError("neural_collective_v0 exposes fully connected, filter-wise and block-wise conv worker layers only "
                             "(no plain layers or normalisation); train those with agentnet's trainer")
        if self.action_mode == "delta" and any(isinstance(l, WorkerBlock) for l in self.model.hidden):
            raise ConfigError("action_mode='delta': an agent's delta is its units' weights and biases, which block-wise "
                              "workers do not have (several convs per block); use 'scale' or 'scale_centered'")
        self.sequence.begin()
        self._layers = [*self.model.hidden, self.model.output]
        self._units = [l.worker_size for l in self.model.hidden] + [self.model.output.out_features]
        self._agents_per_layer = [l.num_workers for l in self.model.hidden] + [1]
        # Roles and losses for strategies whose step records no per-worker losses (bp, fa, ...) come
        # from a pass before the update with an observation-only selection (nothing is trained by it).
        # Whether one is needed is known after the first step; until then it is made.
        self._observer = LeaderSelection(1.0, "batch", self.model.workers_per_layer, self.device)
        self._observer_needed = True
        self._step_inputs.observe = self._observer_record
        self._last_params = [[p.detach().clone() for p in l.parameters()] for l in self._layers]
        self._last_update = torch.zeros(sum(self._agents_per_layer), device=self.device)
        self._param_norms = self._agent_norms(self._last_params)

    # -- pickling --------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """What a copy needs to continue exactly: the constructor's arguments and the training
        state as tensors (model, optimiser, strategy, batch stream, generator states) — never the
        dataset (reloaded through the loader's per-process cache) nor generator objects."""
        with self._own_rng():
            # Inside, torch's global state is the env's stream: the trainer's "rng" entry records it
            # (and loading it back inside the same guard touches nothing global).
            trainer = self.trainer.state_dict()
        return {
            "format": 1,
            "init": dict(self._init_args),
            "episode_seed": self.episode_seed,
            "trainer": trainer,
            "observer": self._observer.state_dict(),
            "torch_stream": self._torch_stream,
            "cuda_stream": self._cuda_stream,
            "seeder": self._seeder.bit_generator.state,
            "pending_seed": self._pending_seed,
            "agents": list(self.agents),
            "started": self._started,
            "cycles": self.cycles,
            "last_params": self._last_params,
            "last_update": self._last_update,
            "last_obs": getattr(self, "_last_obs", None),
            "last_acc_matrix": self.last_acc_matrix,
        }

    def __setstate__(self, state: dict) -> None:
        if state.get("format") != 1:
            raise ValueError(f"neural_collective_v0: cannot unpickle state format {state.get('format')!r} (expected 1)")
        self.__init__(**state["init"])
        self._build(state["episode_seed"])
        with self._own_rng():
            self.trainer.load_state_dict(state["trainer"])
            self._observer.load_state_dict(state["observer"])
        self._torch_stream, self._cuda_stream = state["torch_stream"], state["cuda_stream"]
        self._seeder.bit_generator.state = state["seeder"]
        self._pending_seed = state["pending_seed"]
        self.agents, self.cycles, self._started = list(state["agents"]), state["cycles"], state["started"]
        self._last_params = [[p.to(self.device) for p in layer] for layer in state["last_params"]]
        self._param_norms = self._agent_norms(self._last_params)
        self._last_update = state["last_update"].to(self.device)
        self.last_acc_matrix = state.get("last_acc_matrix")
        if state["last_obs"] is not None:
            self._last_obs = state["last_obs"].to(self.device)

    def observation_space(self, agent: str) -> spaces.Space:
        return self.observation_spaces[agent]

    def action_space(self, agent: str) -> spaces.Space:
        return self.action_spaces[agent]

    @property
    def num_workers(self) -> int:
        return len(self.possible_agents)

    # -- the batched core ----------------------------------------------------------------------
    @property
    def stream_steps(self) -> int:
        """Steps until the data stream ends: ``epochs`` passes over the training subset, or a
        benchmark's whole task sequence."""
        return self.sequence.total_steps

    def acc_matrix(self) -> np.ndarray:
        """The benchmark's accuracy matrix so far, ``(T+1, T)`` float32: row 0 before training,
        row ``i`` after task ``i``; rows not reached hold :data:`UNREACHED` (-1)."""
        T = self.sequence.num_tasks
        out = np.full((T + 1, T), UNREACHED, dtype=np.float32)
        rows = self.sequence.record.acc_matrices[0]  # the env trains one replica
        if rows:
            out[: len(rows)] = np.asarray(rows, dtype=np.float32)
        return out

    def _benchmark_info(self, task: int) -> dict:
        return {"task": task, "tasks_done": self.sequence.task, "acc_matrix": self.acc_matrix()}

    def _observe(self, x: torch.Tensor, y: torch.Tensor, result: StepResult) -> tuple[torch.Tensor, torch.Tensor]:
        """Observations ``(N, 11)`` and rewards ``(N,)`` from the step's (pre-update) signals."""
        # The env holds one replica: every signal below is replica 0's.
        record = result.record
        self._observer_needed = record is None or record.layers[0].worker_loss is None
        if self._observer_needed:
            record = self._step_inputs.record
            if record is None:  # not foreseen (the step's record changed kind): a pass after the update
                record = self._observer_record(x, y)
        has_roles = result.record is not None and result.record.layers[0].leaders is not None
        # The strategy's own per-worker signal, if it declares one (nothing strategy-specific here).
        signal_name = type(self.strategy).worker_signal
        signal = result.signals.get(signal_name) if signal_name else None
        # The task loss on the batch (not result.loss, which is the strategy's whole objective,
        # e.g. LFNN's L_g + lambda1 * leader losses + lambda2 * alignment).
        global_loss = self._global_loss(result, y)
        rows, rewards = [], []
        n_layers = len(self._layers)
        for li, layer_record in enumerate(record.layers):
            workers = layer_record.workers.detach()[0]
            W = workers.shape[1]
            obs = torch.zeros(W, OBS_DIM, device=self.device)
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
            if signal is not None:  # a declared signal is what the worker seeks (higher is better)
                rewards.append(obs[:, 5])
            elif result.worker_objectives:
                rewards.append(-result.worker_objectives[li][0])
            else:
                rewards.append(-global_loss.expand(W))
        out = torch.zeros(1, OBS_DIM, device=self.device)
        out[0, ROLE_OUTPUT] = 1.0
        out[0, 3] = global_loss
        logits = result.logits.detach()[0]
        out[0, 6], out[0, 7] = logits.mean(), logits.std()
        out[0, 10] = 1.0
        rows.append(out)
        rewards.append(-global_loss.view(1))
        obs = torch.cat(rows)
        obs[:, 8] = self._param_norms
        obs[:, 9] = self._last_update
        return obs, torch.cat(rewards).float() * self.reward_scale

    def _observer_record(self, x: torch.Tensor, y: torch.Tensor) -> ForwardRecord | None:
        """The network's record on the batch with the observation-only selection, when the step's
        own record will not carry per-worker losses. No gradient; evaluation mode, so it draws no
        random numbers and leaves batch-normalisation statistics alone (the trainer's trajectory is
        unchanged)."""
        if not self._observer_needed:
            return None
        with torch.no_grad(), eval_mode(self.model):
            return self.model.forward_record(x, y, selection=self._observer)

    def _global_loss(self, result: StepResult, y: torch.Tensor) -> torch.Tensor:
        """The task (prediction) loss of the step's forward pass on the batch it consumed, a scalar."""
        with torch.no_grad():
            return self.model.global_loss(result.logits.detach()[:, : len(y)], y.unsqueeze(0))[0]

    def _present(self, obs: torch.Tensor) -> torch.Tensor:
        """Observations as the agents receive them (``observation_mode``); the env keeps them raw."""
        if self.observation_mode == "raw":
            return obs
        out = obs.clone()
        out[:, SQUASHED] = squash(obs[:, SQUASHED])
        return out

    def state(self) -> np.ndarray:
        """The global state for centralised critics: every agent's current observation, concatenated
        in ``possible_agents`` order (``state_space``: ``(N * 11,)`` float32)."""
        if not self._started:
            raise RuntimeError("neural_collective_v0: no episode started; call reset()")
        return self._present(self._last_obs).reshape(-1).cpu().numpy()

    @property
    def group_map(self) -> dict[str, list[str]]:
        """Agents grouped by layer (``layer_1``, ..., ``output``): agents of a group share their
        action shape in every mode. Pass it to TorchRL's ``PettingZooWrapper(group_map=...)`` in
        delta mode, where the default grouping (by name prefix: all ``worker_*`` together) cannot
        stack the layers' different action shapes."""
        bounds = np.cumsum([0, *self._agents_per_layer])
        names = [f"layer_{i + 1}" for i in range(len(self._agents_per_layer) - 1)] + ["output"]
        return {name: self.possible_agents[bounds[i] : bounds[i + 1]] for i, name in enumerate(names)}

    def _agent_norms(self, params: list[list[torch.Tensor]]) -> torch.Tensor:
        """Per agent, the norm of its parameters: ``params`` holds each layer's parameters, whose rows
        (dim 0: neurons, conv filters, a block's channels) are grouped by worker, so agent ``i`` of a
        layer of ``n`` owns chunk ``i`` of ``p.view(n, -1)`` of every one."""
        norm = torch.linalg.vector_norm  # one pass per tensor (square-then-sum takes two)
        out = []
        for layer, n in zip(params, self._agents_per_layer):
            norms = [norm(p.reshape(n, -1), dim=1) for p in layer]
            out.append(torch.hypot(*norms) if len(norms) == 2 else norm(torch.stack(norms), dim=0))
        return torch.cat(out)

    def _scales(self, actions: torch.Tensor) -> list[torch.Tensor] | None:
        actions = actions.to(self.device, torch.float32)
        if self.action_mode == "scale_centered":
            # 0 is exactly the strategy's step, so an untrained zero-mean Gaussian policy starts by
            # following the strategy.
            actions = centered_to_scale(actions, self.max_scale)
        if bool((actions == 1).all()):
            return None  # the trainer's own step, bit for bit
        chunks = torch.split(actions.to(self.device, torch.float32), self._agents_per_layer)
        return [c.repeat_interleave(k) for c, k in zip(chunks, self._units)]

    def step_batched(self, actions: torch.Tensor | list[torch.Tensor]):
        """One step on tensors. Scale mode: ``actions`` ``(N,)``; delta mode: a list of N flat tensors.

        Returns ``(observations (N, 11), rewards (N,), terminated, truncated, info)``. The episode
        is the same as the dict API's: it ends at ``max_cycles`` steps or when the data stream is
        exhausted, after which stepping raises until ``reset()``.
        """
        self._check_running()
        self._validate(actions)
        return self._step_validated(actions)

    def _check_running(self) -> None:
        if not self.agents:
            if self._started:
                raise RuntimeError("neural_collective_v0: episode over; call reset()")
            raise RuntimeError("neural_collective_v0: no episode started; call reset()")

    def _step_validated(self, actions):
        plugin = self._step_inputs
        sequence = self.sequence
        with self._own_rng(python_and_numpy=False):
            if self.action_mode != "delta":
                self.trainer.update = ScaledUpdate(self._scales(torch.as_tensor(actions)))
            else:
                self.trainer.update = ExternalUpdate(self._delta_update(actions))
            # one batch of the current task; its last batch ends the task (a benchmark: a row of R)
            task = sequence.task  # the batch's task; sequence.task moves on when this step ends it
            result = sequence.advance(1)
            x, y = plugin.x, plugin.y
            obs, rewards = self._finish_step(x, y, result)
            if self.reward == "cooperative":
                rewards = torch.zeros_like(rewards)
                if sequence.task > task:  # the step ended a task: the mean accuracy over the tasks seen
                    row = sequence.record.acc_matrices[0][-1][: sequence.task]
                    rewards += float(np.mean(row)) * self.reward_scale
        self._last_obs = obs
        obs = self._present(obs)
        self.cycles += 1
        info = {
            "cycle": self.cycles,
            "batch_loss": float(self._global_loss(result, y)),
            "batch_acc": float((self.model.predict(result.logits.detach()[:, : len(y)])[0] == y).float().mean()),
        }
        if self.benchmark is not None:
            info.update(self._benchmark_info(task))
            # The sequence's end terminates; max_cycles below its length truncates it (never both).
            terminated = sequence.done
            truncated = self.cycles >= self.max_cycles and not terminated
            if terminated or truncated:  # kept past the auto-reset that replaces these infos (SuperSuit)
                self.last_acc_matrix = info["acc_matrix"]
        else:
            terminated = self.trainer.step >= self.stream_steps
            truncated = self.cycles >= self.max_cycles
        if terminated or truncated:
            self.agents = []
        return obs, rewards, terminated, truncated, info

    def _finish_step(self, x, y, result):
        with torch.no_grad():
            params = [[p.detach() for p in l.parameters()] for l in self._layers]
            self._last_update = self._agent_norms([[p - q for p, q in zip(now, then)] for now, then in zip(params, self._last_params)])
            self._param_norms = self._agent_norms(params)
            for now, then in zip(params, self._last_params):
                for p, q in zip(now, then):
                    q.copy_(p)
        return self._observe(x, y, result)

    def _delta_update(self, actions):
        """The agents' own updates as the step's external update (applied in place of the optimiser's)."""
        offsets = np.cumsum([0, *self._agents_per_layer])
        layers = self._layers

        def apply(model: WorkerNetwork) -> None:
            for li, layer in enumerate(layers):
                delta = torch.stack([torch.as_tensor(a, dtype=torch.float32) for a in actions[offsets[li] : offsets[li + 1]]])
                delta = delta.to(self.device).view(layer.weight.shape[0], -1)
                layer.weight.add_(delta[:, :-1].reshape(layer.weight.shape).to(layer.weight.dtype))
                layer.bias.add_(delta[:, -1].to(layer.bias.dtype))

        return apply

    def proposed_gradient(self) -> list[torch.Tensor | None]:
        """The strategy's gradient from the last step, per layer (weights with the bias as last column).
        Layers of one weight and bias per unit only (what delta mode acts on); block-wise workers raise."""
        if any(isinstance(l, WorkerBlock) for l in self._layers):
            raise ValueError("proposed_gradient: block-wise workers have several convs, not one weight and bias per unit")
        return [None if l.weight.grad is None else torch.cat([l.weight.grad.flatten(1), l.bias.grad.unsqueeze(1)], 1) for l in self._layers]

    def _validate(self, actions) -> None:
        if self.action_mode != "delta":
            a = torch.as_tensor(actions)
            if a.shape != (self.num_workers,):
                raise ValueError(f"{self.action_mode} actions must have shape ({self.num_workers},), got {tuple(a.shape)}")
            lo, hi = (0, self.max_scale) if self.action_mode == "scale" else (-1.0, 1.0)
            bad = ~torch.isfinite(a) | (a < lo) | (a > hi)
            if bool(bad.any()):
                i = int(torch.nonzero(bad)[0])
                raise ValueError(f"{self.possible_agents[i]}: action {float(a[i])} outside [{lo}, {hi}]")
            return
        if len(actions) != self.num_workers:
            raise ValueError(f"delta actions: expected {self.num_workers} vectors, got {len(actions)}")
        for i, a in enumerate(actions):
            a = torch.as_tensor(a)
            expected = self.action_spaces[self.possible_agents[i]].shape
            if tuple(a.shape) != expected:
                raise ValueError(f"{self.possible_agents[i]}: delta action shape {tuple(a.shape)}, expected {expected}")
            if not bool(torch.isfinite(a).all()) or bool((a.abs() > self.max_delta).any()):
                raise ValueError(f"{self.possible_agents[i]}: delta action has NaN/inf or values outside ±{self.max_delta}")

    # -- the PettingZoo dict API (a thin adapter) ----------------------------------------------
    def reset(self, seed: int | None = None, options: dict | None = None):
        """Start an episode: a fresh network and batch order from the episode's seed.

        ``seed=s`` starts the episode seeded with ``s`` and reseeds the env's own seed stream;
        without a seed, the first reset uses the constructor's ``seed`` and every later one draws a
        new episode seed from that stream (auto-resetting vector envs get distinct episodes).
        ``options`` has no keys this env reads; it is accepted because the PettingZoo API (and its
        ``api_test``, which passes arbitrary options) requires the parameter.
        """
        if seed is not None:
            seed = int(seed)
            self._seeder = np.random.default_rng(seed)
        elif self._pending_seed is not None:
            seed = self._pending_seed
        else:
            seed = int(self._seeder.integers(0, 2**31 - 1))
        self._pending_seed = None
        self._build(seed)
        self._started = True
        self.agents = self.possible_agents[:]
        self.cycles = 0
        obs = torch.zeros(self.num_workers, OBS_DIM, device=self.device)
        obs[:, 8] = self._param_norms
        obs[:, 10] = torch.as_tensor(self.layer_of / len(self._layers), dtype=torch.float32)
        obs[-1, ROLE_OUTPUT] = 1.0
        self._last_obs = obs
        obs_np = self._present(obs).cpu().numpy()
        # Same keys as step's infos (vectorising libraries preallocate them from reset); no batch
        # has been consumed yet, which "cycle": 0 tells (0.0 rather than NaN: NaN != NaN breaks
        # PettingZoo's seed_test and any equality check on infos).
        no_batch = {"batch_loss": 0.0, "batch_acc": 0.0, "cycle": 0}
        if self.benchmark is not None:  # the first task is next; row 0 of R (before training) is known
            no_batch.update(self._benchmark_info(0))
        return {a: obs_np[i] for i, a in enumerate(self.agents)}, {a: self._agent_info(i, no_batch) for i, a in enumerate(self.agents)}

    def _agent_info(self, i: int, extra: dict | None = None) -> dict:
        info = self._base_infos[i]
        return dict(info) if extra is None else {**info, **extra}

    def step(self, actions: dict[str, Any]):
        """One mini-batch: every live agent's action (an array of its action space's shape) is applied.

        Each action is checked against its agent's space before anything is applied; a wrong
        shape (also a scalar or ``(1, 1)`` where ``(1,)`` is expected), a NaN or a value out of
        bounds raises ``ValueError`` naming the agent. After the episode ended, ``RuntimeError``.
        """
        self._check_running()
        unknown = set(actions) - set(self.agents)
        if unknown:
            raise ValueError(f"actions for unknown agents: {sorted(unknown)[:5]} (agents are worker_0 ... worker_{self.num_workers - 1})")
        missing = set(self.agents) - set(actions)
        if missing:
            raise ValueError(f"no action for {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}")
        per_agent = [self._agent_action(a, actions[a], shape) for a, shape in zip(self.possible_agents, self._action_shapes)]
        if self.action_mode != "delta":
            batched = torch.as_tensor(np.concatenate(per_agent))
            self._validate(batched)  # bounds and NaN, naming the agent
        else:
            batched = per_agent
            self._validate(batched)
        agents = self.agents
        obs, rewards, terminated, truncated, info = self._step_validated(batched)
        obs_np, rew_np = obs.cpu().numpy(), rewards.cpu().numpy()
        observations = {a: obs_np[i] for i, a in enumerate(agents)}
        reward_d = {a: float(rew_np[i]) for i, a in enumerate(agents)}
        terms = {a: terminated for a in agents}
        truncs = {a: truncated for a in agents}
        infos = {a: self._agent_info(i, info) for i, a in enumerate(agents)}
        return observations, reward_d, terms, truncs, infos

    def _agent_action(self, agent: str, action: Any, expected: tuple[int, ...]) -> np.ndarray:
        """``agent``'s action as float32 of exactly its space's shape ``expected`` (no broadcasting, no squeezing)."""
        if type(action) is np.ndarray and action.shape == expected and action.dtype.kind == "f":
            return action.astype(np.float32, copy=False)  # the common case, kept cheap (dict overhead per agent)
        if isinstance(action, torch.Tensor):
            action = action.detach().cpu().numpy()
        try:
            a = np.asarray(action, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{agent}: action {action!r} is not numeric ({exc})") from exc
        if a.shape != expected:
            raise ValueError(f"{agent}: action shape {a.shape}, expected {expected} (its action_space)")
        return a

    # -- rendering -------------------------------------------------------------------------------
    def _roles(self) -> list[list[str]]:
        """Each hidden worker's role in the last step: leader, follower, or worker (no leaders)."""
        obs = self._last_obs.cpu().numpy()
        names = np.where(obs[:, ROLE_LEADER] >= 0.5, "leader", np.where(obs[:, ROLE_FOLLOWER] >= 0.5, "follower", "worker"))
        bounds = np.cumsum([0, *self._agents_per_layer])
        return [names[bounds[i] : bounds[i + 1]].tolist() for i in range(len(self._agents_per_layer) - 1)]

    def render(self):
        if self.render_mode is None:
            return None
        if self.render_mode in ("ansi", "human"):
            symbol = {"leader": "L", "follower": "f", "worker": "."}
            lines = [f"layer {i + 1}: " + "".join(symbol[r] for r in layer) for i, layer in enumerate(self._roles())]
            lines.append(f"output : O   (step {getattr(self, 'cycles', 0)})")
            text = "\n".join(lines)
            if self.render_mode == "human":
                print(text)
                return None
            return text
        return self._draw()

    def _draw(self) -> np.ndarray:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import networkx as nx

        selection = self.strategy.selection
        graph = self.model.to_networkx(self._roles(), None if selection is None else selection.counts)
        pos = {}
        for layer in {d["layer"] for _, d in graph.nodes(data=True)}:  # columns by layer, centred
            members = [n for n, d in graph.nodes(data=True) if d["layer"] == layer]
            for j, n in enumerate(members):
                pos[n] = (layer, (len(members) - 1) / 2 - j)
        colours = {"leader": "tab:red", "follower": "tab:blue", "worker": "tab:gray", "input": "black", "output": "tab:green"}
        fig, ax = plt.subplots(figsize=(6, 4), dpi=80)
        widths = np.array([d["weight"] for _, _, d in graph.edges(data=True)])
        widths = 0.2 + 1.5 * widths / widths.max() if len(widths) and widths.max() > 0 else 0.5
        nx.draw_networkx_edges(graph, pos, ax=ax, width=widths, alpha=0.3, arrows=False)
        nx.draw_networkx_nodes(graph, pos, ax=ax, node_size=60, node_color=[colours[d["role"]] for _, d in graph.nodes(data=True)])
        ax.set_title(f"neural_collective_v0 step {getattr(self, 'cycles', 0)}: leaders red, followers blue")
        ax.axis("off")
        fig.canvas.draw()
        image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
        plt.close(fig)
        return image

    def close(self) -> None:
        pass


def parallel_env(**kwargs) -> NeuralCollectiveEnv:
    """The native ``ParallelEnv``."""
    return NeuralCollectiveEnv(**kwargs)


def raw_env(**kwargs):
    """The AEC version, unwrapped: ``parallel_to_aec(parallel_env(**kwargs))``."""
    return parallel_to_aec(parallel_env(**kwargs))


def env(**kwargs):
    """The AEC version with PettingZoo's order-enforcing wrapper."""
    return wrappers.OrderEnforcingWrapper(raw_env(**kwargs))
