"""An external multi-agent learner on ``neural_collective_v0``: every worker is an epsilon-greedy bandit.

Each agent chooses its step-size multiplier from a few arms and learns, from its own reward (its
local objective), which multiplier serves it best — the loop a multi-agent RL user writes around
any PettingZoo ``ParallelEnv``. At the end it compares test accuracy with the all-ones policy
(the strategy's own updates)::

    python examples/bandit_step_sizes.py --strategy lfnn --steps 300
"""

from __future__ import annotations

import argparse

import numpy as np

from envs import neural_collective_v0

ARMS = np.array([0.0, 0.5, 1.0, 1.5, 2.0], dtype=np.float32)


class EpsilonGreedy:
    """One bandit per agent, all held as arrays: values (agents, arms), counts (agents, arms)."""

    def __init__(self, agents: list[str], epsilon: float, seed: int) -> None:
        self.agents = agents
        self.epsilon = epsilon
        self.rng = np.random.default_rng(seed)
        self.values = np.zeros((len(agents), len(ARMS)))
        self.counts = np.zeros((len(agents), len(ARMS)))
        self.choice = np.full(len(agents), list(ARMS).index(1.0))

    def act(self) -> dict[str, np.ndarray]:
        explore = self.rng.random(len(self.agents)) < self.epsilon
        greedy = self.values.argmax(1)
        self.choice = np.where(explore, self.rng.integers(0, len(ARMS), len(self.agents)), greedy)
        return {a: ARMS[self.choice[i : i + 1]] for i, a in enumerate(self.agents)}

    def learn(self, improvement: np.ndarray) -> None:
        rows = np.arange(len(self.agents))
        self.counts[rows, self.choice] += 1
        self.values[rows, self.choice] += (improvement - self.values[rows, self.choice]) / self.counts[rows, self.choice]


def run(strategy: str, steps: int, subset: int, policy: bool, seed: int = 0) -> float:
    env = neural_collective_v0.parallel_env(strategy=strategy, max_cycles=steps, data_subset=subset, epochs=100)
    env.reset(seed=seed)
    bandit = EpsilonGreedy(env.possible_agents, epsilon=0.2, seed=seed)
    last = None
    while env.agents:
        actions = bandit.act() if policy else {a: np.ones(1, np.float32) for a in env.agents}
        _, rewards, _, _, _ = env.step(actions)
        reward = np.array([rewards[a] for a in env.possible_agents])
        if policy and last is not None:
            bandit.learn(reward - last)  # credit: how much the agent's own objective improved
        last = reward
    if policy:
        favourite = ARMS[bandit.values.argmax(1)]
        print(f"  learned multipliers per agent: {favourite.tolist()}")
    return env.trainer.evaluate(env.data.test)["acc"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", default="lfnn")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--subset", type=int, default=5000)
    args = parser.parse_args()
    print(f"bandit policy ({args.strategy}, {args.steps} steps):")
    learned = run(args.strategy, args.steps, args.subset, policy=True)
    baseline = run(args.strategy, args.steps, args.subset, policy=False)
    print(f"test accuracy: bandit {learned:.4f}  vs  all-ones {baseline:.4f}")


if __name__ == "__main__":
    main()
