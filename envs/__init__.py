"""PettingZoo environments whose agents are the workers of an agentnet network.

``neural_collective_v0``: the worker network on real MNIST as a ``ParallelEnv`` (and AEC).
"""
