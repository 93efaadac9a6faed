"""Populations: ``R`` replicas of a run — seeds and per-replica hyperparameter variants — trained as
one batched model.

``replicas=R`` trains the networks that ``seed=<seed + r>`` (``r < R``) would train, in one process:
every layer holds all replicas (:mod:`agentnet.workers`), so the per-layer overhead of the local
objectives (worker losses, leader selection, alignment) is paid once for all of them.
``vary.<group>.<field>=[v_0, ..., v_{R-1}]`` gives replica ``r`` its own value of a numeric field that
the component declares per-replica (a strategy's or CL method's ``replica_fields``, the trainer's
``lr``); ``vary.seed=[...]`` sets the seeds explicitly (e.g. the same seed for every variant).

Metrics of a population keep the single-run keys as the mean over replicas, add ``<key>_std``
(sample standard deviation) for every numeric one and list each replica's own metrics under
``replicas`` (:func:`summarize`).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from agentnet.config import ConfigError, RunConfig
from agentnet.registry import CL_METHODS, STRATEGIES

__all__ = ["TRAINER_REPLICA_FIELDS", "Population", "population_of", "replica_fields", "summarize"]

#: Trainer fields that may differ per replica (``vary.trainer.<field>``).
TRAINER_REPLICA_FIELDS = ("lr",)


@dataclass
class Population:
    """Who the replicas of a run are: their seeds and per-replica field values."""

    seeds: list[int]
    variants: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """``group -> field -> one value per replica`` (groups: strategy, trainer, cl)."""

    @property
    def replicas(self) -> int:
        return len(self.seeds)

    def of(self, group: str) -> dict[str, list[float]]:
        """The varied fields of one group (empty when none)."""
        return self.variants.get(group, {})

    def describe(self, r: int) -> dict[str, Any]:
        """Replica ``r``'s seed and variant values, e.g. ``{"seed": 3, "strategy.delta": 0.4}``."""
        out: dict[str, Any] = {"seed": self.seeds[r]}
        for group, fields in self.variants.items():
            for name, values in fields.items():
                out[f"{group}.{name}"] = values[r]
        return out


def replica_fields(run: RunConfig, group: str) -> tuple[str, ...]:
    """The fields of a run's config group (``trainer``, ``strategy``, ``cl``) that may vary per replica."""
    if group == "trainer":
        return TRAINER_REPLICA_FIELDS
    if group == "strategy":
        return STRATEGIES.get(run.strategy.name).replica_fields
    if group == "cl":
        name = getattr(run.cl, "name", "none") if run.cl is not None else "none"
        return CL_METHODS.get(name).replica_fields
    return ()


def population_of(run: RunConfig) -> Population:
    """The population a run describes (``replicas``, ``seed``, ``vary``), validated: every varied
    field must be numeric, declared per-replica by its component, with one value per replica."""
    R = run.replicas
    vary = dict(run.vary or {})
    seeds = [run.seed + r for r in range(R)]
    if "seed" in vary:
        values = vary.pop("seed")
        if not isinstance(values, (list, tuple)) or len(values) != R or not all(isinstance(v, int) for v in values):
            raise ConfigError(f"vary.seed={values!r}: give {R} integer seeds (one per replica; replicas={R})")
        seeds = list(values)
    variants: dict[str, dict[str, list[float]]] = {}
    for group, fields in vary.items():
        if group not in ("strategy", "trainer", "cl"):
            raise ConfigError(f"vary.{group}: only strategy, trainer, cl and seed fields can vary per replica")
        if not isinstance(fields, dict):
            raise ConfigError(f"vary.{group}={fields!r}: expected vary.{group}.<field>=[values]")
        allowed = replica_fields(run, group)
        for name, values in fields.items():
            key = f"vary.{group}.{name}"
            if name not in allowed:
                owner = {"strategy": f"strategy={run.strategy.name}", "cl": f"cl={getattr(run.cl, 'name', 'none')}"}.get(group, group)
                raise ConfigError(
                    f"{key}: not a per-replica field of {owner} (per-replica fields: {', '.join(allowed) or 'none'})"
                )
            if not isinstance(values, (list, tuple)) or len(values) != R:
                raise ConfigError(f"{key}={values!r}: give one value per replica ({R} values; replicas={R})")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
                raise ConfigError(f"{key}={values!r}: per-replica values must be finite numbers")
            config = getattr(run, group)
            # Each value must be valid on its own: dataclasses.replace runs the group's own checks.
            for v in values:
                try:
                    dataclasses.replace(config, **{name: type(getattr(config, name))(v)})
                except ConfigError as exc:
                    raise ConfigError(f"{key}: {exc}") from None
            variants.setdefault(group, {})[name] = [float(v) for v in values]
    return Population(seeds, variants)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def summarize(per_replica: list[dict[str, Any]]) -> dict[str, Any]:
    """One metrics dict for a population: each key's mean over replicas (numbers; lists of numbers
    elementwise, e.g. accuracy matrices), ``<key>_std`` for numeric keys when there are several
    replicas, non-numeric keys from the first replica, and ``replicas``: every replica's own dict."""
    first = per_replica[0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        values = [m[key] for m in per_replica]
        if isinstance(value, int) and all(v == value for v in values):
            out[key] = value  # a count every replica shares (epochs, steps, parameters)
        elif _is_number(value) and all(_is_number(v) for v in values):
            out[key] = statistics.fmean(values)
            if len(values) > 1:  # statistics.stdev fails on inf: a diverged replica gives nan
                out[f"{key}_std"] = statistics.stdev(values) if all(math.isfinite(v) for v in values) else math.nan
        elif _is_numeric_nested(value) and all(_same_shape(value, v) for v in values):
            out[key] = _mean_nested(values)
        else:
            out[key] = value
    out["replicas"] = per_replica
    return out


def _is_numeric_nested(value: Any) -> bool:
    if isinstance(value, list) and value:
        return all(_is_number(v) or _is_numeric_nested(v) for v in value)
    return False


def _same_shape(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_shape(x, y) for x, y in zip(a, b))
    return _is_number(a) and _is_number(b)


def _mean_nested(values: list[Any]) -> Any:
    if _is_number(values[0]):
        return statistics.fmean(values)
    return [_mean_nested([v[i] for v in values]) for i in range(len(values[0]))]
