"""agentnet: neural networks whose workers are self-interested agents.

Imports point one way (enforced by import-linter, ``pyproject.toml``): :mod:`agentnet.config` →
:mod:`agentnet.registry` → :mod:`agentnet.hydra_setup` → :mod:`agentnet.composition` → core
(:mod:`agentnet.replica`, :mod:`agentnet.workers`, :mod:`agentnet.blocks`, :mod:`agentnet.network`, :mod:`agentnet.data`)
→ :mod:`agentnet.strategy` and the ``strategies`` package → :mod:`agentnet.training` (the one loop,
plugins, checkpoints, ``train(cfg)``) → :mod:`agentnet.continual` / :mod:`agentnet.experiments` →
:mod:`agentnet.cli`. See docs/architecture.md.
"""

__version__ = "0.1.0"
