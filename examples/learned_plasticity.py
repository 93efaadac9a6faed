"""Learn every worker's plasticity on a continual task stream with parameter-shared PPO.

Each worker of the network is an agent of ``neural_collective_v0``; at every mini-batch it chooses
how much of its strategy's proposed update to apply (``action_mode="scale_centered"``: ``u`` in
``[-1, 1]``, ``u = 0`` the strategy's own step, ``u = -1`` frozen, ``u = 1`` twice the step). One
episode is a whole permuted-MNIST task sequence (``benchmark=``), and every agent is paid the same
**cooperative** reward: at the end of task ``i``, the mean test accuracy over the tasks seen so far.
An episode's return is the sum of those stage accuracies, so a policy is paid both for learning
each new task and for not forgetting the earlier ones.

The policy is the standard CleanRL / Stable-Baselines3 recipe for parameter sharing: SuperSuit turns
the env's agents into slots of one vector env (``pettingzoo_env_to_vec_env_v1``), ``concat_vec_envs_v1``
runs several copies, and one SB3 ``PPO`` ``MlpPolicy`` (actor and critic) acts for every slot from
the slot's own observation. Two features are appended to the env's 11 local signals
(:class:`TaskClock`): how far the current task has progressed and how far the episode has, so the
shared critic can tell how far away the next task-end reward is (the env's observation describes
the batch, not the clock).

Evaluation is on **held-out task sequences**: episodes whose seed (network initialisation, batch
order and every task's permutation) no training episode had; the training episode seeds are
recorded and checked disjoint. The fixed rule — every action ``u = 0``, exactly the strategy's own
updates — runs on the same sequences, so each sequence gives a paired difference::

    python examples/learned_plasticity.py --seed 0        # 200k agent-steps: 4-8 min on a 2-core CPU

``benchmarks/learned_plasticity.py`` repeats this over policy seeds and prints the comparison table.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
from gymnasium import spaces
from pettingzoo.utils.wrappers import BaseParallelWrapper

from agentnet.continual.metrics import summarize
from envs import neural_collective_v0

#: Held-out episode seeds start here; training episodes are seeded 0.. and then draw from each copy's
#: own seed stream (recorded, and checked disjoint from the held-out ones).
HELD_OUT_BASE = 1_000_000


@dataclass
class PlasticityConfig:
    """The continual stream, the network and PPO's settings. The one source of this example's defaults."""

    strategy: str = "bp"
    """The rule every worker follows (its proposed update is what the action scales)."""
    num_tasks: int = 5
    """Permuted-MNIST tasks per episode (``pmnist_quick``'s stream, every task one pass over the subset)."""
    data_subset: int = 2000
    """Training examples per task (one pass each: ``data_subset / batch_size`` steps per task)."""
    batch_size: int = 64
    """Mini-batch size: one env step consumes one batch."""
    hidden: tuple[int, ...] = (40, 40)
    """Hidden layer widths; with ``worker_size`` 10 the default net has 4 + 4 workers and the output agent."""
    worker_size: int = 10
    """Units per worker (agent)."""
    lr: float = 1e-3
    """The network's Adam learning rate (the strategy's own step, which the action scales)."""
    max_scale: float = 2.0
    """The largest multiplier (action ``u = 1``)."""
    copies: int = 4
    """Env copies in the vector env (each contributes one slot per agent)."""
    timesteps: int = 200_000
    """PPO's budget in agent-steps (SB3 timesteps: one per slot per vector step)."""
    n_steps: int = 160
    """PPO rollout length per slot (the default episode is 160 steps: one episode per copy per rollout)."""
    ppo_batch_size: int = 640
    """PPO minibatch size (agent-steps)."""
    n_epochs: int = 5
    """PPO epochs per rollout."""
    gamma: float = 0.995
    """Discount: task-end rewards come every 32 steps and forgetting shows several tasks later."""
    gae_lambda: float = 0.95
    """GAE's lambda."""
    learning_rate: float = 3e-4
    """PPO's Adam learning rate."""
    log_std_init: float = -1.0
    """Initial log standard deviation of the Gaussian policy (std 0.37: explores around the strategy's step)."""
    net_arch: list[int] = field(default_factory=lambda: [64, 64])
    """Hidden layers of the shared actor and critic."""
    data_root: Optional[str] = None
    """MNIST directory (``None``: ``AGENTNET_DATA`` or the cache, as everywhere)."""

    def env_kwargs(self) -> dict[str, Any]:
        """``neural_collective_v0.parallel_env`` arguments for this stream."""
        return dict(
            strategy=self.strategy, hidden=tuple(self.hidden), worker_size=self.worker_size,
            data_subset=self.data_subset, batch_size=self.batch_size, lr=self.lr, data_root=self.data_root,
            action_mode="scale_centered", max_scale=self.max_scale, reward="cooperative",
            benchmark={"name": "pmnist_quick", "num_tasks": self.num_tasks},
        )


class TaskClock(BaseParallelWrapper):
    """Appends ``[fraction of the current task done, fraction of the episode done]`` to every observation.

    Both come from the step counter and the benchmark's stage length (every task of the stream has
    the same number of steps). The global ``state()`` (centralised critics: the TorchRL example
    ``examples/marl_torchrl.py``) gets the same two entries after the env's own state. It also
    records every episode seed it starts, so evaluation can check that held-out sequences were
    never trained on.
    """

    def __init__(self, env) -> None:
        super().__init__(env)
        base = env.observation_space(env.possible_agents[0])
        low = np.concatenate([base.low, np.zeros(2, np.float32)])
        high = np.concatenate([base.high, np.ones(2, np.float32)])
        self._spaces = {a: spaces.Box(low, high, dtype=np.float32) for a in env.possible_agents}
        state = env.unwrapped.state_space
        self.state_space = spaces.Box(np.concatenate([state.low, np.zeros(2, np.float32)]),
                                      np.concatenate([state.high, np.ones(2, np.float32)]), dtype=np.float32)
        self.episode_seeds: list[int] = []

    def observation_space(self, agent):
        return self._spaces[agent]

    def _clock(self, cycle: int) -> np.ndarray:
        inner = self.env.unwrapped
        per_task = inner.sequence.stage_steps[0]
        return np.array([(cycle % per_task) / per_task, min(cycle / inner.max_cycles, 1.0)], np.float32)

    def _extend(self, obs: dict, cycle: int) -> dict:
        clock = self._clock(cycle)
        return {a: np.concatenate([o, clock]) for a, o in obs.items()}

    def reset(self, seed=None, options=None):
        obs, infos = self.env.reset(seed=seed, options=options)
        self.episode_seeds.append(int(self.env.unwrapped.episode_seed))
        return self._extend(obs, 0), infos

    def step(self, actions):
        obs, rewards, terms, truncs, infos = self.env.step(actions)
        return self._extend(obs, self.env.unwrapped.cycles), rewards, terms, truncs, infos

    def state(self) -> np.ndarray:
        """The env's global state (every agent's 11 signals) and the clock."""
        return np.concatenate([self.env.state(), self._clock(self.env.unwrapped.cycles)])


def make_env(cfg: PlasticityConfig) -> TaskClock:
    """One env of the stream, with the task clock."""
    return TaskClock(neural_collective_v0.parallel_env(**cfg.env_kwargs()))


def make_vec_env(cfg: PlasticityConfig, seed: int):
    """SuperSuit's vector env for SB3: ``cfg.copies`` copies, copy ``i``'s first episode seeded ``seed + i``."""
    import supersuit as ss
    from stable_baselines3.common.vec_env import VecMonitor

    vec = ss.pettingzoo_env_to_vec_env_v1(make_env(cfg))
    with warnings.catch_warnings():  # SuperSuit's SB3 wrapper answers get_attr("render_mode") with an error; SB3 warns
        warnings.filterwarnings("ignore", message="The `render_mode` attribute is not defined")
        vec = ss.concat_vec_envs_v1(vec, cfg.copies, num_cpus=0, base_class="stable_baselines3")
        # The copies are pickled clones; seed them apart once (SB3's PPO(seed=) cannot reach them through
        # SuperSuit's wrapper). Later auto-resets draw from each copy's own seed stream.
        vec.venv.reset(seed=seed)
        return VecMonitor(vec)  # episode returns in the infos (SB3's ep_rew_mean, ReturnCurve)


def training_episode_seeds(vec) -> set[int]:
    """Every episode seed the vector env's copies started (the recorded ones)."""
    return {s for copy in vec.venv.venv.vec_envs for s in copy.par_env.episode_seeds}


def return_curve_callback():
    """An SB3 callback recording ``(timesteps, mean episode return)`` at every rollout's end.

    The return is the sum of the task-end stage accuracies (every agent of a copy gets the same,
    so each finished episode is counted once per copy, not once per agent slot).
    """
    from stable_baselines3.common.callbacks import BaseCallback

    class ReturnCurve(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.points: list[tuple[int, float]] = []
            self._returns: list[float] = []

        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    self._returns.append(float(info["episode"]["r"]))
            return True

        def _on_rollout_end(self) -> None:
            if self._returns:
                self.points.append((self.num_timesteps, float(np.mean(self._returns))))
                self._returns = []

    return ReturnCurve()


def train_policy(cfg: PlasticityConfig, seed: int, verbose: int = 0):
    """PPO with one policy shared by every agent.

    Returns ``(model, training episode seeds)``; ``model.return_curve`` holds ``(timesteps, mean
    training episode return)`` per rollout.
    """
    import stable_baselines3 as sb3
    from stable_baselines3.common.utils import set_random_seed

    set_random_seed(seed)  # SB3's own generators (policy init, sampling, minibatch order)
    vec = make_vec_env(cfg, seed)
    model = sb3.PPO(
        "MlpPolicy", vec, n_steps=cfg.n_steps, batch_size=cfg.ppo_batch_size, n_epochs=cfg.n_epochs,
        gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, learning_rate=cfg.learning_rate, device="cpu",
        policy_kwargs=dict(net_arch=list(cfg.net_arch), log_std_init=cfg.log_std_init), verbose=verbose,
    )
    curve = return_curve_callback()
    model.learn(total_timesteps=cfg.timesteps, callback=curve)
    model.return_curve = curve.points
    seeds = training_episode_seeds(vec)
    vec.close()
    return model, seeds


#: A policy for evaluation: observations ``(agents, obs_dim)`` -> actions ``(agents, 1)`` in ``[-1, 1]``.
Policy = Callable[[np.ndarray], np.ndarray]


def fixed_rule(obs: np.ndarray) -> np.ndarray:
    """Every action 0 in ``scale_centered``: exactly the strategy's own update (multiplier 1)."""
    return np.zeros((len(obs), 1), np.float32)


def constant_multiplier(multiplier: float, cfg: PlasticityConfig) -> Policy:
    """Every worker's update scaled by ``multiplier`` (in ``[0, max_scale]``) at every step: a tuned step size, not a policy."""
    u = neural_collective_v0.scale_to_centered(multiplier, cfg.max_scale)
    return lambda obs: np.full((len(obs), 1), u, np.float32)


def ppo_policy(model) -> Policy:
    """The trained policy's deterministic (mean) action, clipped to the action space."""
    return lambda obs: model.predict(obs, deterministic=True)[0]


def episode_return(matrix) -> float:
    """The cooperative return an episode paid: ``sum_i mean_{j<=i} R[i][j]`` (each stage's accuracy on
    the tasks seen). Not ACC (``mean_j R[T][j]``, the last stage only): the earlier stages weigh
    learning each task quickly, so the two can disagree."""
    R = np.asarray(matrix, dtype=float)
    return float(sum(R[i, :i].mean() for i in range(1, len(R))))


def run_episode(cfg: PlasticityConfig, policy: Policy, seed: int) -> dict[str, Any]:
    """One held-out task sequence under ``policy``: its accuracy matrix, metrics and mean multiplier."""
    env = make_env(cfg)
    obs, _ = env.reset(seed=seed)
    agents = env.possible_agents
    multipliers = []
    while env.agents:
        u = np.asarray(policy(np.stack([obs[a] for a in agents])), dtype=np.float32).reshape(len(agents), 1)
        multipliers.append(neural_collective_v0.centered_to_scale(u, cfg.max_scale).ravel())  # for the report only
        obs, _, _, _, _ = env.step({a: u[i] for i, a in enumerate(agents)})
    matrix = env.unwrapped.last_acc_matrix
    metrics = summarize(matrix)
    layer = env.unwrapped.layer_of
    mean_multiplier = np.mean(multipliers, axis=0)
    return {
        "seed": seed, "acc_matrix": matrix.tolist(), "ACC": metrics["ACC"], "BWT": metrics["BWT"],
        "forgetting": metrics["forgetting"], "learning_acc": float(np.mean(metrics["learning_acc"])),
        "return": episode_return(matrix),
        "multiplier_by_layer": {int(l): float(mean_multiplier[layer == l].mean()) for l in np.unique(layer)},
    }


#: The metrics reported for every policy (``run_episode``'s keys), their scale in the tables and the tables' header.
METRICS = ("ACC", "BWT", "forgetting", "learning_acc", "return")
#: Percent for the accuracies; the return (a sum of T stage accuracies, what PPO maximises) as it is.
SCALE = {"ACC": 100, "BWT": 100, "forgetting": 100, "learning_acc": 100, "return": 1}
HEADER = ["policy", "spread over", "ACC %", "BWT %", "forgetting %", "learning acc %", "return (sum of stage accuracies)"]


def mean_std(values: Sequence[float], scale: float = 100) -> str:
    """``"mean ± std"`` of ``scale * values`` (population std; 0 for one value), as the tables print it."""
    values = [scale * v for v in values]
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    digits = 2 if scale == 100 else 3
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def held_out_seeds(count: int) -> list[int]:
    """The evaluation sequences' episode seeds."""
    return [HELD_OUT_BASE + i for i in range(count)]


def evaluate(cfg: PlasticityConfig, policy: Policy, seeds: Sequence[int], trained_on: set[int] = frozenset()) -> list[dict]:
    """``run_episode`` on every seed; refuses a seed some training episode used."""
    overlap = set(seeds) & set(trained_on)
    if overlap:
        raise ValueError(f"held-out seeds {sorted(overlap)} were training episodes; choose others")
    return [run_episode(cfg, policy, s) for s in seeds]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="policy (PPO) seed; training episodes start at it")
    parser.add_argument("--timesteps", type=int, default=PlasticityConfig.timesteps)
    parser.add_argument("--strategy", default=PlasticityConfig.strategy)
    parser.add_argument("--eval-sequences", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save", default=None, help="write the trained policy here (SB3 .zip)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(PlasticityConfig(), timesteps=args.timesteps, strategy=args.strategy)
    start = time.perf_counter()
    model, trained_on = train_policy(cfg, args.seed, verbose=1)
    print(f"trained {cfg.timesteps} agent-steps in {time.perf_counter() - start:.0f} s over {len(trained_on)} episodes")
    if args.save:
        model.save(args.save)
    seeds = held_out_seeds(args.eval_sequences)
    learned = evaluate(cfg, ppo_policy(model), seeds, trained_on)
    fixed = evaluate(cfg, fixed_rule, seeds)
    print("| policy | ACC % | BWT % | forgetting % | learning acc % |")
    print("|---|---|---|---|---|")
    for name, runs in (("fixed rule (u = 0)", fixed), ("learned (PPO)", learned)):
        cells = [f"{100 * np.mean([r[k] for r in runs]):.2f} ± {100 * np.std([r[k] for r in runs]):.2f}"
                 for k in ("ACC", "BWT", "forgetting", "learning_acc")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("learned mean multiplier per layer:", {l: round(float(np.mean([r["multiplier_by_layer"][l] for r in learned])), 3)
                                                 for l in learned[0]["multiplier_by_layer"]})


if __name__ == "__main__":
    main()
