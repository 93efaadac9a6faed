"""``neural_collective``: a worker network on real MNIST as a PettingZoo env; every worker is an agent.

The machinery (:mod:`.env`: agents, spaces, episode, seeding, pickling) drives an engine task
sequence (:mod:`.engine`); the scenario (:mod:`.scenario`) says what agents observe and are paid;
one action codec per action mode (:mod:`.actions`); who owns which parameters (:mod:`.agents`);
the graph view (:mod:`.graph`). Documentation: ``docs/env.md``.
"""

from __future__ import annotations

from pettingzoo.utils import parallel_to_aec, wrappers

from .actions import ACTION_MODES, centered_to_scale, scale_to_centered
from .engine import TEST_SUBSET, model_config, run_config
from .env import UNREACHED, NeuralCollectiveEnv
from .scenario import FEATURES, OBS_DIM, OBSERVATION_MODES, REWARDS, ROLE_FOLLOWER, ROLE_LEADER, ROLE_OUTPUT, SQUASHED, squash, unsquash

__all__ = ["ACTION_MODES", "FEATURES", "NeuralCollectiveEnv", "OBSERVATION_MODES", "OBS_DIM", "REWARDS", "ROLE_FOLLOWER", "ROLE_LEADER",
           "ROLE_OUTPUT", "SQUASHED", "TEST_SUBSET", "UNREACHED", "centered_to_scale", "env", "model_config", "parallel_env", "raw_env",
           "run_config", "scale_to_centered", "squash", "unsquash"]


def parallel_env(**kwargs) -> NeuralCollectiveEnv:
    """The native ``ParallelEnv``."""
    return NeuralCollectiveEnv(**kwargs)


def raw_env(**kwargs):
    """The AEC version, unwrapped: ``parallel_to_aec(parallel_env(**kwargs))``."""
    return parallel_to_aec(parallel_env(**kwargs))


def env(**kwargs):
    """The AEC version with PettingZoo's order-enforcing wrapper."""
    return wrappers.OrderEnforcingWrapper(raw_env(**kwargs))
