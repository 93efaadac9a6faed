"""``neural_collective_v0``: the PettingZoo env of :mod:`envs.neural_collective` under its versioned
name (``docs/env.md``). Outputs of every configuration v0 accepted are unchanged."""

from envs.neural_collective import *  # noqa: F401,F403
from envs.neural_collective import __all__  # noqa: F401
