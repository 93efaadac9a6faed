"""The machinery: agents, spaces, the episode (a task sequence advanced one batch per step), the env's
own random generators, pickling, and the PettingZoo dict API over a batched core (``docs/env.md``)."""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any, Iterator

import numpy as np
import torch
from gymnasium import spaces
from pettingzoo import ParallelEnv

from agentnet.config import ConfigError, check
from agentnet.data import run_splits
from agentnet.devices import resolve_device
from agentnet.workers import WorkerBlock

from . import scenario
from .actions import ACTION_MODES, make_codec
from .agents import AgentLayout
from .engine import build, dataset, run_config
from .graph import draw, worker_graph
from .scenario import OBSERVATION_MODES, REWARD_CLASSES, REWARDS, ROLE_FOLLOWER, ROLE_LEADER, StepRecord

__all__ = ["NeuralCollectiveEnv", "UNREACHED"]

#: ``infos["acc_matrix"]`` entries of rows not reached yet (accuracies lie in [0, 1]; not NaN, which
#: breaks equality checks such as PettingZoo's ``seed_test``).
UNREACHED = -1.0
#: The default episode length without a benchmark (with one: the whole task sequence).
DEFAULT_MAX_CYCLES = 100


class NeuralCollectiveEnv(ParallelEnv):
    """The network as a ``ParallelEnv``: every worker an agent (``docs/env.md``)."""

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
        """``run_args`` are :func:`~envs.neural_collective.engine.run_config`'s (strategy, network or
        model preset, data, device, optimiser, seed, benchmark, CL method)."""
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
        self._base_data = dataset(data_cfg.name, data_cfg.root, str(self.device), data_cfg.verify, data_cfg.normalize,
                                  data_cfg.folder, data_cfg.image_size, data_cfg.grayscale)
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
            max_cycles = DEFAULT_MAX_CYCLES if self.benchmark is None else self.stream_steps
        elif self.benchmark is not None and max_cycles > self.stream_steps:
            raise ConfigError(
                f"max_cycles={max_cycles}: the benchmark's task sequence ends after {self.stream_steps} steps "
                f"({self.sequence.num_tasks} tasks of {self.sequence.stage_steps[0]}); leave max_cycles unset "
                f"(the whole sequence) or choose at most {self.stream_steps} to truncate it"
            )
        self.max_cycles = int(max_cycles)
        layout = self._layout
        self.layer_of, self.index_in_layer = layout.layer_of, layout.index_in_layer
        self.possible_agents = [f"worker_{i}" for i in range(layout.num_agents)]
        self.agents: list[str] = []
        self._base_infos = [{"layer": int(l), "index": int(i)} for l, i in zip(self.layer_of, self.index_in_layer)]
        low, high = scenario.observation_bounds(observation_mode)
        self.observation_spaces = {a: spaces.Box(low, high, dtype=np.float32) for a in self.possible_agents}
        # The global state for centralised critics: every agent's observation, in agent order.
        self.state_space = spaces.Box(np.tile(low, self.num_workers), np.tile(high, self.num_workers), dtype=np.float32)
        self.action_spaces = self._codec.spaces
        self._action_shapes = [self.action_spaces[a].shape for a in self.possible_agents]

    # -- construction --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _own_rng(self, python_and_numpy: bool = True) -> Iterator[None]:
        """Run a block on the env's own random stream, leaving every global generator as it was.

        Model construction and strategies draw from torch's global generator; an RL library sharing
        the process must not see its own noise reseeded or consumed by the env. So the block runs
        with torch's global CPU (and CUDA) state set to the env's saved stream, saved back
        afterwards, and torch's global state is restored whatever the block did. With
        ``python_and_numpy`` Python's and NumPy's global states are restored too: construction
        seeds them and unpickling loads them; steps skip it (strategies draw only from torch, and
        saving NumPy's state costs more than a small network's whole step).
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
        """(Re)build the episode's task sequence (model, strategy, trainer) on the env's own random
        stream, seeded with ``seed``; global generators untouched."""
        with self._own_rng():
            run = self.run
            run.seed = seed
            self.episode_seed = seed
            self.data = run_splits(self._base_data, run.data)  # the splits train() uses: the same for every seed
            self._step_record = StepRecord()
            self.sequence = build(run, self.data, [self._step_record])
            self.model, self.strategy, self.trainer = self.sequence.model, self.sequence.strategy, self.sequence.trainer
            self._layout = AgentLayout(self.model)
            agents = [f"worker_{i}" for i in range(self._layout.num_agents)]
            self._codec = make_codec(self.action_mode, self._layout, agents, self.max_scale, self.max_delta, self.device)
            self._reward = REWARD_CLASSES[self.reward](self.reward_scale, self._layout.agents_per_layer)
            self.sequence.begin()  # before_run binds the plugins to the model
        self._last_params = self._layout.snapshot()
        self._last_update = torch.zeros(self._layout.num_agents, device=self.device)
        self._param_norms = self._layout.agent_norms(self._last_params)

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
        self._torch_stream, self._cuda_stream = state["torch_stream"], state["cuda_stream"]
        self._seeder.bit_generator.state = state["seeder"]
        self._pending_seed = state["pending_seed"]
        self.agents, self.cycles, self._started = list(state["agents"]), state["cycles"], state["started"]
        self._last_params = [[p.to(self.device) for p in block] for block in state["last_params"]]
        self._param_norms = self._layout.agent_norms(self._last_params)
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
        """The number of agents (workers and the output agent)."""
        return len(self.possible_agents)

    @property
    def stream_steps(self) -> int:
        """Steps until the episode's task sequence ends: ``epochs`` passes over the training subset,
        or a benchmark's whole task sequence."""
        return self.sequence.total_steps

    @property
    def last_step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mini-batch ``(x, y)`` the last step consumed."""
        return self._step_record.x, self._step_record.y

    def acc_matrix(self) -> np.ndarray:
        """The benchmark's accuracy matrix so far, ``(T+1, T)`` float32: row 0 before training,
        row ``i`` after task ``i``; rows not reached hold :data:`UNREACHED` (-1)."""
        T = self.sequence.num_tasks
        out = np.full((T + 1, T), UNREACHED, dtype=np.float32)
        rows = self.sequence.record.acc_matrices[0]  # the env trains one replica
        if rows:
            out[: len(rows)] = np.asarray(rows, dtype=np.float32)
        return out

    def _task_info(self, task: int) -> dict:
        """The infos a benchmark episode adds (none without one): the step's task, tasks done, ``R`` so far."""
        if self.benchmark is None:
            return {}
        return {"task": task, "tasks_done": self.sequence.task, "acc_matrix": self.acc_matrix()}

    # -- the batched core ----------------------------------------------------------------------
    def step_batched(self, actions: torch.Tensor | list[torch.Tensor]):
        """One step on tensors. Scale modes: ``actions`` ``(N,)``; delta mode: a list of N flat tensors.

        Returns ``(observations (N, 11), rewards (N,), terminated, truncated, info)``. The episode
        is the same as the dict API's: it ends at ``max_cycles`` steps or when the task sequence
        ends, after which stepping raises until ``reset()``.
        """
        self._check_running()
        self._codec.validate(actions)
        return self._step_validated(actions)

    def _check_running(self) -> None:
        if not self.agents:
            if self._started:
                raise RuntimeError("neural_collective_v0: episode over; call reset()")
            raise RuntimeError("neural_collective_v0: no episode started; call reset()")

    def _step_validated(self, actions):
        sequence = self.sequence
        with self._own_rng(python_and_numpy=False):
            scales = self._codec.scales(actions)
            task = sequence.task  # the batch's task; sequence.task moves on when this step ends it
            self.trainer.update = self._codec.update(actions, scales)
            with torch.enable_grad():  # the step trains the network, also under a caller's no_grad (TorchRL's collectors)
                result = sequence.advance(1)
            with torch.no_grad():
                params = [[p.detach() for p in block] for block in self._layout.params]
                self._last_update = self._layout.agent_norms([[p - q for p, q in zip(now, then)] for now, then in zip(params, self._last_params)])
                self._param_norms = self._layout.agent_norms(params)
                for now, then in zip(params, self._last_params):
                    for p, q in zip(now, then):
                        q.copy_(p)
            obs, signal, loss = scenario.observe(
                self._step_record, result, type(self.strategy).worker_signal, self._param_norms, self._last_update)
            rewards = self._reward(obs, signal, result, loss, sequence, task)
        self._last_obs = obs
        obs = scenario.present(obs, self.observation_mode)
        self.cycles += 1
        y = self._step_record.y
        info = {
            "cycle": self.cycles,
            "batch_loss": float(loss),
            "batch_acc": float((self.model.head.predict(result.logits.detach()[:, : len(y)])[0] == y).float().mean()),
            **self._task_info(task),
        }
        terminated = sequence.done
        # A benchmark's end terminates; max_cycles below its length truncates it (never both).
        truncated = self.cycles >= self.max_cycles and not (terminated and self.benchmark is not None)
        if (terminated or truncated) and self.benchmark is not None:  # kept past the auto-reset that replaces these infos (SuperSuit)
            self.last_acc_matrix = info["acc_matrix"]
        if terminated or truncated:
            self.agents = []
        return obs, rewards, terminated, truncated, info

    def proposed_gradient(self) -> list[torch.Tensor | None]:
        """The strategy's gradient from the last step, per layer (weights with the bias as last column).
        Layers of one weight and bias per unit only (what delta mode acts on); block-wise workers raise."""
        layers = self._layout.layers
        if any(isinstance(l, WorkerBlock) for l in layers):
            raise ValueError("proposed_gradient: block-wise workers have several convs, not one weight and bias per unit")
        return [None if l.weight.grad is None else torch.cat([l.weight.grad.flatten(1), l.bias.grad.unsqueeze(1)], 1) for l in layers]

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
        self._last_obs = scenario.reset_observation(self._param_norms, self.layer_of, len(self._layout.layers))
        obs_np = scenario.present(self._last_obs, self.observation_mode).cpu().numpy()
        # Same keys as step's infos (vectorising libraries preallocate them from reset); no batch
        # has been consumed yet, which "cycle": 0 tells (0.0 rather than NaN: NaN != NaN breaks
        # PettingZoo's seed_test and any equality check on infos).
        no_batch = {"batch_loss": 0.0, "batch_acc": 0.0, "cycle": 0, **self._task_info(0)}
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
        batched = self._codec.batch(per_agent)
        self._codec.validate(batched)  # bounds and NaN, naming the agent
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

    def state(self) -> np.ndarray:
        """The global state for centralised critics: every agent's current observation, concatenated
        in ``possible_agents`` order (``state_space``: ``(N * 11,)`` float32)."""
        if not self._started:
            raise RuntimeError("neural_collective_v0: no episode started; call reset()")
        return scenario.present(self._last_obs, self.observation_mode).reshape(-1).cpu().numpy()

    @property
    def group_map(self) -> dict[str, list[str]]:
        """Agents grouped by layer (``layer_1``, ..., ``output``): agents of a group share their
        action shape in every mode. Pass it to TorchRL's ``PettingZooWrapper(group_map=...)`` in
        delta mode, where the default grouping (by name prefix: all ``worker_*`` together) cannot
        stack the layers' different action shapes."""
        per_layer = self._layout.agents_per_layer
        bounds = np.cumsum([0, *per_layer])
        names = [f"layer_{i + 1}" for i in range(len(per_layer) - 1)] + ["output"]
        return {name: self.possible_agents[bounds[i] : bounds[i + 1]] for i, name in enumerate(names)}

    # -- rendering -------------------------------------------------------------------------------
    def _roles(self) -> list[list[str]]:
        """Each hidden worker's role in the last step: leader, follower, or worker (no leaders)."""
        obs = self._last_obs.cpu().numpy()
        names = np.where(obs[:, ROLE_LEADER] >= 0.5, "leader", np.where(obs[:, ROLE_FOLLOWER] >= 0.5, "follower", "worker"))
        per_layer = self._layout.agents_per_layer
        bounds = np.cumsum([0, *per_layer])
        return [names[bounds[i] : bounds[i + 1]].tolist() for i in range(len(per_layer) - 1)]

    def to_networkx(self):
        """The network as a ``networkx.DiGraph`` of its agents, with their roles in the last step and
        their leadership counts (:func:`envs.neural_collective.graph.worker_graph`)."""
        selection = self.strategy.selection
        return worker_graph(self.model, self._roles(), None if selection is None else selection.counts)

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
        return draw(self.to_networkx(), f"neural_collective_v0 step {getattr(self, 'cycles', 0)}: leaders red, followers blue")

    def close(self) -> None:
        pass
