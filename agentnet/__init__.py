"""agentnet: neural networks whose workers are self-interested agents.

Core pieces: :mod:`agentnet.workers` (worker layers, predictions, leader selection),
:mod:`agentnet.network` (the worker MLP), :mod:`agentnet.strategy` and :mod:`agentnet.registry`
(pluggable local objectives; built-ins in the top-level ``strategies`` package),
:mod:`agentnet.trainer` (``train(cfg) -> metrics``), :mod:`agentnet.data` / :mod:`agentnet.fetch` (MNIST).
"""

__version__ = "0.1.0"
