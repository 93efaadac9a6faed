"""Multi-agent PPO with TorchRL on ``neural_collective_v0``: IPPO and MAPPO over the env's layer groups.

The task is ``examples/learned_plasticity.py``'s (the Stable-Baselines3 example), unchanged: every
worker of the network is an agent that sets its step multiplier at every mini-batch
(``action_mode="scale_centered"``: ``u = 0`` the strategy's own step, ``u = -1`` frozen, ``u = 1``
twice the step) on a permuted-MNIST task sequence, and every agent is paid the **cooperative**
reward (at each task end, the mean test accuracy over the tasks seen). Observations are the env's 11
local signals plus the task clock (``TaskClock``).

Here the learner is TorchRL's, in the structure of its multi-agent PPO tutorial:
``PettingZooWrapper`` over the env's ``group_map`` (one group per layer: ``layer_1``, ``layer_2``,
``output``), per group a ``ProbabilisticActor`` (``MultiAgentMLP`` with ``share_params=True``, a
``TanhNormal`` onto the action bounds) and a critic, the synchronous ``Collector`` (TorchRL 0.14's
name for the tutorial's ``SyncDataCollector``), GAE, a ``ReplayBuffer`` sampled without replacement
and ``ClipPPOLoss`` (one per group). Two critics:

* ``--algo ippo``: each agent's value from its own observation (``MultiAgentMLP``, parameters
  shared within the group, ``centralised=False``);
* ``--algo mappo``: a centralised critic reading the env's global ``state()`` (every agent's
  signals and the clock), one MLP per group giving each of the group's agents a value.

Actors are the same in both (decentralised execution: an agent acts on its own observation), so
evaluation runs without the state. It is the SB3 example's: the deterministic policy (``tanh`` of
the mean) on held-out task sequences (episode seeds no training episode had, checked), and the
fixed rule (every multiplier 1) on the same sequences, with the same helpers and table::

    python examples/marl_torchrl.py --algo both --seeds 0,1,2 --timesteps 57600 --eval-sequences 10 \\
        --json outputs/marl_torchrl.json                       # about 10 min on one core

``--timesteps`` counts agent-steps as SB3 does (one per agent per env step); TorchRL's frames are
env steps, so ``timesteps / agents`` frames are collected (whole batches).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule, TensorDictSequential
from torch import nn
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, ReplayBuffer
from torchrl.data.replay_buffers.samplers import SamplerWithoutReplacement
from torchrl.envs import RewardSum, TransformedEnv
from torchrl.envs.libs.pettingzoo import PettingZooWrapper
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import MLP, MultiAgentMLP, ProbabilisticActor, TanhNormal
from torchrl.objectives import ClipPPOLoss, ValueEstimators

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the SB3 example beside this one
import learned_plasticity as lp  # noqa: E402  (its stream, task clock, evaluation and table)

from agentnet.tables import markdown_table  # noqa: E402

ALGOS = ("ippo", "mappo")


@dataclass
class MarlConfig:
    """The stream (the SB3 example's config: only its env fields are used here) and PPO's settings."""

    stream: lp.PlasticityConfig = field(default_factory=lp.PlasticityConfig)
    """The continual stream and network (``lp.PlasticityConfig.env_kwargs``); its PPO fields are SB3's, unused."""
    timesteps: int = 57_600
    """Budget in agent-steps (SB3's unit); ``timesteps / agents`` env steps (TorchRL frames), whole batches."""
    frames_per_batch: int = 160
    """Env steps per collected batch (the default episode: 5 tasks of 32 steps)."""
    minibatch_frames: int = 40
    """Env steps per PPO minibatch (each carries every agent: 360 agent-steps with 9 agents)."""
    epochs: int = 5
    """PPO epochs per batch."""
    gamma: float = 0.995
    """Discount, as the SB3 example's (task-end rewards every 32 steps)."""
    lmbda: float = 0.95
    """GAE's lambda."""
    lr: float = 3e-4
    """Adam's learning rate for every actor and critic."""
    clip_epsilon: float = 0.2
    """PPO's ratio clip."""
    entropy_coeff: float = 0.0
    """Entropy bonus (0, as SB3's default: no bonus)."""
    max_grad_norm: float = 1.0
    """Gradient norm clip, per group."""
    init_scale: float = 0.37
    """The Gaussian's standard deviation (before tanh) at a zero network output, as SB3's ``log_std_init=-1``."""
    num_cells: int = 64
    """Width of every actor's and critic's hidden layers."""
    depth: int = 2
    """Hidden layers of every actor and critic."""


# -- the env -------------------------------------------------------------------------------------
def make_env(cfg: MarlConfig, seed: int) -> tuple[TransformedEnv, lp.TaskClock]:
    """The SB3 example's env (task clock included) in ``PettingZooWrapper``, one group per layer.

    ``return_state=True`` adds the global ``state`` (every agent's signals and the clock) at the
    root of every step; ``RewardSum`` keeps each group's episode return for the progress lines.
    The wrapper's ``seed`` reseeds the env's seed stream: every episode seed follows from it (the
    ``TaskClock`` returned records them all).
    """
    par = lp.make_env(cfg.stream)
    with warnings.catch_warnings():  # TorchRL warns that it was tested with another PettingZoo version
        warnings.filterwarnings("ignore", message="PettingZoo in TorchRL is tested")
        env = PettingZooWrapper(env=par, group_map=par.unwrapped.group_map, return_state=True, seed=seed)
    groups = list(env.group_map)  # RewardSum pairs each reward with its group's reset key
    env = TransformedEnv(env, RewardSum(in_keys=[(g, "reward") for g in groups], reset_keys=[(g, "_reset") for g in groups]))
    return env, par


# -- the agents: per group, an actor and a critic, parameters shared within the group -------------
def make_actor(env, group: str, cfg: MarlConfig) -> ProbabilisticActor:
    """Observation -> ``TanhNormal`` over the group's action bounds; one MLP shared by the group's agents."""
    n_agents, obs_dim = env.full_observation_spec[group, "observation"].shape
    spec = env.full_action_spec_unbatched[group, "action"]
    net = nn.Sequential(
        MultiAgentMLP(n_agent_inputs=obs_dim, n_agent_outputs=2 * spec.shape[-1], n_agents=n_agents,
                      centralised=False, share_params=True, depth=cfg.depth, num_cells=cfg.num_cells, activation_class=nn.Tanh),
        NormalParamExtractor(scale_mapping=f"biased_softplus_{cfg.init_scale}"),  # (loc, scale); scale init_scale at 0
    )
    module = TensorDictModule(net, in_keys=[(group, "observation")], out_keys=[(group, "loc"), (group, "scale")])
    return ProbabilisticActor(
        module, spec=spec, in_keys=[(group, "loc"), (group, "scale")], out_keys=[(group, "action")],
        distribution_class=TanhNormal, distribution_kwargs={"low": spec.space.low, "high": spec.space.high},
        return_log_prob=True, log_prob_key=(group, "action_log_prob"),
    )


def make_critic(env, group: str, cfg: MarlConfig, algo: str) -> TensorDictModule:
    """The group's value per agent, ``(group, "state_value")`` of shape ``(..., agents, 1)``.

    IPPO: from each agent's own observation, one MLP shared by the group's agents. MAPPO: from the
    global ``state`` (centralised), one MLP per group with an output per agent.
    """
    n_agents, obs_dim = env.full_observation_spec[group, "observation"].shape
    if algo == "ippo":
        net = MultiAgentMLP(n_agent_inputs=obs_dim, n_agent_outputs=1, n_agents=n_agents, centralised=False,
                            share_params=True, depth=cfg.depth, num_cells=cfg.num_cells, activation_class=nn.Tanh)
        in_keys = [(group, "observation")]
    elif algo == "mappo":
        state_dim = env.full_observation_spec["state"].shape[-1]
        net = nn.Sequential(MLP(in_features=state_dim, out_features=n_agents, depth=cfg.depth, num_cells=cfg.num_cells,
                                activation_class=nn.Tanh), nn.Unflatten(-1, (n_agents, 1)))
        in_keys = ["state"]
    else:
        raise ValueError(f"algo={algo!r}: choose one of {ALGOS}")
    return TensorDictModule(net, in_keys=in_keys, out_keys=[(group, "state_value")])


def make_loss(actor, critic, group: str, cfg: MarlConfig) -> ClipPPOLoss:
    """TorchRL's clipped PPO loss for one group, its keys under the group, with GAE as value estimator."""
    loss = ClipPPOLoss(actor_network=actor, critic_network=critic, clip_epsilon=cfg.clip_epsilon,
                       entropy_bonus=cfg.entropy_coeff > 0, entropy_coeff=cfg.entropy_coeff or None,
                       normalize_advantage=True, normalize_advantage_exclude_dims=(-2,))  # per minibatch, each agent apart
    loss.set_keys(reward=(group, "reward"), action=(group, "action"), sample_log_prob=(group, "action_log_prob"),
                  value=(group, "state_value"), done=(group, "done"), terminated=(group, "terminated"),
                  advantage=(group, "advantage"), value_target=(group, "value_target"))
    loss.make_value_estimator(ValueEstimators.GAE, gamma=cfg.gamma, lmbda=cfg.lmbda)
    return loss


# -- training -------------------------------------------------------------------------------------
@dataclass
class Trained:
    """A trained policy: per group its actor, critic and loss; what training saw."""

    algo: str
    actors: dict[str, ProbabilisticActor]
    critics: dict[str, TensorDictModule]
    losses: dict[str, ClipPPOLoss]
    group_map: dict[str, list[str]]
    agents: list[str]
    frames: int = 0
    """Env steps collected (TorchRL frames)."""
    episode_seeds: set[int] = field(default_factory=set)
    """Every training episode's seed (held-out sequences must avoid them)."""
    return_curve: list[tuple[int, float]] = field(default_factory=list)
    """``(agent-steps, mean return of the episodes finished in the batch)`` per batch."""
    log: list[dict[str, float]] = field(default_factory=list)
    """Per batch: the last minibatch's loss terms per group (``"<group>/<term>"``)."""
    train_s: float = 0.0


def train(cfg: MarlConfig, algo: str, seed: int, progress: Callable[[str], None] | None = print) -> Trained:
    """Multi-agent PPO (``algo``: ippo or mappo) on the stream; ``seed`` seeds the networks, the
    sampling and the env's episode seed stream (the same training episodes for both algorithms)."""
    if algo not in ALGOS:
        raise ValueError(f"algo={algo!r}: choose one of {ALGOS}")
    start = time.perf_counter()
    torch.manual_seed(seed)  # the networks' initialisation, the actions sampled, the minibatch order
    env, par = make_env(cfg, seed)
    groups = list(env.group_map)
    actors = {g: make_actor(env, g, cfg) for g in groups}
    critics = {g: make_critic(env, g, cfg, algo) for g in groups}
    losses = {g: make_loss(actors[g], critics[g], g, cfg) for g in groups}
    agents = list(par.possible_agents)
    trained = Trained(algo, actors, critics, losses, {g: list(a) for g, a in env.group_map.items()}, agents)

    batches = max(1, -(-cfg.timesteps // (len(agents) * cfg.frames_per_batch)))  # whole batches, rounded up
    collector = Collector(env, TensorDictSequential(*actors.values()), frames_per_batch=cfg.frames_per_batch,
                          total_frames=batches * cfg.frames_per_batch,
                          auto_register_policy_transforms=False)  # a feed-forward policy: no InitTracker needed
    buffer = ReplayBuffer(storage=LazyTensorStorage(cfg.frames_per_batch), sampler=SamplerWithoutReplacement(),
                          batch_size=cfg.minibatch_frames)
    optimiser = torch.optim.Adam(nn.ModuleList(losses.values()).parameters(), lr=cfg.lr)

    for i, batch in enumerate(collector):
        with torch.no_grad():  # advantages and value targets, per group, from the critics before this batch's update
            for loss in losses.values():
                loss.value_estimator(batch, params=loss.critic_network_params, target_params=loss.target_critic_network_params)
        buffer.extend(batch.reshape(-1))
        for _ in range(cfg.epochs):
            for _ in range(cfg.frames_per_batch // cfg.minibatch_frames):
                sample = buffer.sample()
                terms = {g: loss(sample) for g, loss in losses.items()}
                total = sum(t["loss_objective"] + t["loss_critic"] + t.get("loss_entropy", 0.0) for t in terms.values())
                optimiser.zero_grad()
                total.backward()
                for loss in losses.values():
                    nn.utils.clip_grad_norm_(loss.parameters(), cfg.max_grad_norm)
                optimiser.step()
        collector.update_policy_weights_()

        trained.frames += batch.numel()
        trained.log.append({f"{g}/{k}": v.item() for g, t in terms.items() for k, v in t.items() if k.startswith("loss_")})
        finished = batch["next", "done"].squeeze(-1)
        if finished.any():  # the episode return: the sum of the task-end rewards (every agent gets the same)
            returns = batch["next", groups[-1], "episode_reward"][finished]
            trained.return_curve.append((trained.frames * len(agents), float(returns.mean())))
        if progress is not None:
            ret = f"episode return {trained.return_curve[-1][1]:.3f}" if finished.any() else "no episode finished"
            objective = np.mean([v for k, v in trained.log[-1].items() if k.endswith("loss_objective")])
            critic = np.mean([v for k, v in trained.log[-1].items() if k.endswith("loss_critic")])
            progress(f"[{algo} seed {seed}] batch {i + 1}/{batches}: {trained.frames * len(agents)} agent-steps, {ret}, "
                     f"loss objective {objective:+.4f} critic {critic:.4f} ({time.perf_counter() - start:.0f} s)")
    collector.shutdown()
    trained.episode_seeds = set(par.episode_seeds)
    trained.train_s = time.perf_counter() - start
    return trained


# -- evaluation: the SB3 example's, on a policy made of the groups' actors --------------------------
def torchrl_policy(trained: Trained) -> lp.Policy:
    """The trained actors as the SB3 example's ``Policy`` (observations ``(agents, 13)`` ->
    actions ``(agents, 1)``): each group's deterministic action, ``tanh`` of the Gaussian's mean
    onto the action bounds."""
    index = {g: [trained.agents.index(a) for a in members] for g, members in trained.group_map.items()}

    def act(obs: np.ndarray) -> np.ndarray:
        obs = torch.as_tensor(np.asarray(obs), dtype=torch.float32)
        out = np.empty((len(obs), 1), np.float32)
        with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
            for g, actor in trained.actors.items():
                td = actor(TensorDict({(g, "observation"): obs[index[g]]}, batch_size=[]))
                out[index[g]] = td[g, "action"].numpy()
        return out

    return act


def evaluate(cfg: MarlConfig, trained: Trained, seeds: Sequence[int]) -> list[dict]:
    """``lp.evaluate`` of the trained policy on ``seeds`` (refused if a training episode had one)."""
    return lp.evaluate(cfg.stream, torchrl_policy(trained), seeds, trained.episode_seeds)


def table(fixed: list[dict], learned: dict[str, dict[int, list[dict]]]) -> str:
    """The SB3 benchmark's table: the fixed rule (spread over sequences), each algorithm (spread
    over policy seeds, each seed's mean over the sequences) and its paired difference to the fixed rule."""
    rows = [["fixed rule (every multiplier 1)", f"{len(fixed)} sequences"] + [lp.mean_std([r[m] for r in fixed], lp.SCALE[m]) for m in lp.METRICS]]
    for algo, per_seed in learned.items():
        means = {m: [float(np.mean([x[m] for x in runs])) for runs in per_seed.values()] for m in lp.METRICS}
        paired = {m: [x[m] - f[m] for runs in per_seed.values() for x, f in zip(runs, fixed)] for m in lp.METRICS}
        rows.append([f"{algo.upper()} (TorchRL)", f"{len(per_seed)} policy seeds"] + [lp.mean_std(means[m], lp.SCALE[m]) for m in lp.METRICS])
        rows.append([f"{algo.upper()} − fixed, paired", f"{len(paired['ACC'])} (seed, sequence) pairs"]
                    + [lp.mean_std(paired[m], lp.SCALE[m]) for m in lp.METRICS])
    return markdown_table(lp.HEADER, rows)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", choices=[*ALGOS, "both"], default="both")
    parser.add_argument("--seeds", default="0", help="policy seeds, comma-separated (each trains one policy per algorithm)")
    parser.add_argument("--timesteps", type=int, default=MarlConfig.timesteps, help="agent-steps per policy")
    parser.add_argument("--strategy", default=lp.PlasticityConfig.strategy)
    parser.add_argument("--eval-sequences", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the report here (after every policy)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = MarlConfig(stream=dataclasses.replace(lp.PlasticityConfig(), strategy=args.strategy), timesteps=args.timesteps)
    algos = list(ALGOS) if args.algo == "both" else [args.algo]
    policy_seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    seeds = lp.held_out_seeds(args.eval_sequences)

    fixed = lp.evaluate(cfg.stream, lp.fixed_rule, seeds)
    report = {"config": dataclasses.asdict(cfg), "algos": algos, "policy_seeds": policy_seeds, "held_out_seeds": seeds,
              "fixed": fixed, "learned": {a: {} for a in algos}, "train_s": {a: {} for a in algos},
              "return_curves": {a: {} for a in algos}}
    for algo in algos:
        for s in policy_seeds:
            trained = train(cfg, algo, s)
            runs = evaluate(cfg, trained, seeds)
            report["learned"][algo][s] = runs
            report["train_s"][algo][s] = trained.train_s
            report["return_curves"][algo][s] = trained.return_curve
            print(f"{algo} seed {s}: trained in {trained.train_s:.0f} s on {len(trained.episode_seeds)} episodes; held-out "
                  f"ACC {100 * np.mean([r['ACC'] for r in runs]):.2f}, return {np.mean([r['return'] for r in runs]):.3f} "
                  f"(fixed rule {100 * np.mean([r['ACC'] for r in fixed]):.2f}, {np.mean([r['return'] for r in fixed]):.3f})", flush=True)
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(report, indent=2, default=float))
    print(f"\n{cfg.stream.strategy}, {cfg.stream.num_tasks} permuted-MNIST tasks of {cfg.stream.data_subset} examples, "
          f"{cfg.timesteps} agent-steps per policy, held-out seeds {seeds[0]}..{seeds[-1]}\n")
    print(table(fixed, report["learned"]))
    for algo in algos:
        per_seed = report["learned"][algo]
        layers = sorted(next(iter(per_seed.values()))[0]["multiplier_by_layer"])
        multipliers = {l: [np.mean([r["multiplier_by_layer"][l] for r in runs]) for runs in per_seed.values()] for l in layers}
        print(f"{algo} mean multiplier per layer (mean ± std over policy seeds): "
              + ", ".join(f"layer {l}: {np.mean(v):.3f} ± {np.std(v):.3f}" for l, v in multipliers.items()))
    return report


if __name__ == "__main__":
    main()
