"""Config-group folders (``model/``, ...) that agentnet adds to Hydra's search path.

A package (with this ``__init__.py``) so Hydra can read it as ``pkg://agentnet_example_plugin.conf``.
"""
