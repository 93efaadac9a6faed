"""An example agentnet plugin package (``docs/extending.md``).

agentnet finds what this package adds through the entry points in its ``pyproject.toml``; nothing
here is imported until agentnet looks a strategy or a CL method up:

* strategy ``bp_label_smoothing`` (:mod:`agentnet_example_plugin.label_smoothing`),
* continual-learning method ``l2_anchor`` (:mod:`agentnet_example_plugin.l2_anchor`),
* model preset ``example_mlp_100x2`` (``conf/model/``, on Hydra's config search path).
"""

__version__ = "0.1.0"
