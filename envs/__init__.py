"""PettingZoo environments whose agents are the workers of an agentnet network.

``neural_collective_v0``: the worker network on real MNIST as a ``ParallelEnv`` (and AEC); its
code is the package :mod:`envs.neural_collective`, its documentation ``docs/env.md``.
"""
