"""Local objectives ("strategies") that the workers of a network follow.

Every module here is imported by :mod:`agentnet.registry` on first lookup and registers itself with
``@register_strategy("<name>")``. To add one: write ``strategies/<name>.py`` with a
:class:`agentnet.strategy.Strategy` subclass and its ``Config`` dataclass, and
``configs/strategy/<name>.yaml`` naming ``<name>_schema`` in its defaults. Nothing else changes.
"""
