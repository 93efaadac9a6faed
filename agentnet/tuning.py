"""``agentnet-tune``: a hyperparameter study on validation data, its trials trained as populations,
then the best setting retrained with fresh seeds and evaluated on the test set once.

The study is Optuna's (ask/tell) in a journal file in the study directory, so a tuner killed with
``kill -9`` loses at most the population it was training, the same command continues the study,
and several tuners (Hydra launcher jobs, SLURM jobs) can share it. Each round asks ``tune.batch``
trials; those whose non-batchable values (categorical choices, shapes) agree train as ONE
population (``replicas`` = trials, ``vary.<group>.<field>`` = their numeric values, every replica on
the run's seed), so a batch of learning rates costs one batched model, not one process per trial.

Outputs in the study directory: ``study.journal`` (Optuna), ``trials/<first>-<last>/`` (each
population's run), ``trials.csv``, ``best.yaml`` (the overrides to reuse), ``history.png`` and
``final/metrics.json`` or ``final/cl_metrics.json`` (the best setting, ``tune.final_seeds`` fresh
seeds, the test set evaluated once). See ``docs/comparing.md``.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import itertools
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agentnet.composition import check_combinations
from agentnet.config import ConfigError, RunConfig, TuneConfig, check
from agentnet.data import ImageData
from agentnet.population import replica_fields
from agentnet.registry import CL_METHODS, STRATEGIES
from agentnet.tables import direction
from agentnet.recipes import run_continual, train
from agentnet.session import load_run_data
from agentnet.training import NonFiniteLossError, RunDirectoryLockedError, atomic_write_json, remove_checkpoints

__all__ = ["DEFAULT_LR", "default_space", "Dimension", "parse_space", "objective_of", "run_study", "JOURNAL"]

log = logging.getLogger(__name__)

#: The learning rate's range when ``tune.space`` is not given: per optimiser, on a log scale.
DEFAULT_LR = {"adam": [1e-5, 1e-1], "adamw": [1e-5, 1e-1], "sgd": [1e-4, 1.0]}
#: Optuna's journal of the study, in the study directory.
JOURNAL = "study.journal"
#: Run settings that do not change what a trial measures (they may differ between tuners of one study).
UNFINGERPRINTED = ("threads", "output_dir", "resume", "resume_from", "device", "tune")


@dataclass
class Dimension:
    """One tuned field: its dotted name, Optuna distribution and whether a population can vary it."""

    field: str
    distribution: Any
    batchable: bool

    @property
    def group(self) -> str:
        return self.field.split(".", 1)[0]

    @property
    def name(self) -> str:
        return self.field.split(".", 1)[1] if "." in self.field else self.field


def _flatten(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{trainer: {lr: {log: [...]}}}`` and ``{"trainer.lr": {log: [...]}}`` alike: dotted field -> spec."""
    flat: dict[str, Any] = {}
    for key, value in space.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not (set(value) & set(("log", "uniform", "int", "choice"))):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _current(run: RunConfig, field: str, key: str = "tune.space") -> Any:
    """The run's value of a dotted field (``trainer.lr``, ``strategy.delta``, ``seed``)."""
    node: Any = run
    for part in field.split("."):
        if not hasattr(node, part):
            raise ConfigError(f"{key}.{field}: {field} is not a field of the run's config")
        node = getattr(node, part)
    return node


def default_space(run: RunConfig) -> dict[str, Any]:
    """What a study searches without ``tune.space``: the learning rate (``DEFAULT_LR`` for the run's
    optimiser) plus the strategy's and the CL method's declared ``search_space``, so that every
    rule of a comparison is tuned over its own hyperparameters with one command."""
    space: dict[str, Any] = {"trainer.lr": {"log": DEFAULT_LR[run.trainer.optimizer]}}
    space.update({f"strategy.{k}": v for k, v in STRATEGIES.get(run.strategy.name).search_space.items()})
    cl_name = getattr(run.cl, "name", "none") if run.cl is not None else "none"
    space.update({f"cl.{k}": v for k, v in CL_METHODS.get(cl_name).search_space.items()})
    return space


def parse_space(run: RunConfig, space: dict[str, Any] | None) -> list[Dimension]:
    """Validate ``tune.space`` against the run's config into Optuna distributions; every problem
    names its ``tune.space.<field>``."""
    import optuna.distributions as od

    dims = []
    for field, spec in _flatten(space or default_space(run)).items():
        key = f"tune.space.{field}"
        current = _current(run, field)
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{key}={spec!r}: give one of {{log: [low, high]}}, {{uniform: [low, high]}}, {{int: [low, high]}}, {{choice: [...]}}")
        (kind, values), = spec.items()
        check(kind in ("log", "uniform", "int", "choice"), key, spec, "choose log, uniform, int or choice")
        check(isinstance(values, (list, tuple)) and len(values) >= (1 if kind == "choice" else 2), key, spec,
              "a [low, high] pair" if kind != "choice" else "a list of values")
        if kind == "choice":
            distribution = od.CategoricalDistribution(list(values))
        else:
            check(len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values), key, spec, "a [low, high] pair of numbers")
            low, high = values
            check(low < high, key, spec, "low must be below high")
            check(kind != "log" or low > 0, key, spec, "a log scale needs low > 0")
            check(kind != "int" or (float(low).is_integer() and float(high).is_integer()), key, spec, "int bounds must be whole numbers")
            check(isinstance(current, (int, float)) and not isinstance(current, bool), key, spec,
                  f"{field} is not numeric (it is {current!r}); use choice")
            distribution = (od.IntDistribution(int(low), int(high)) if kind == "int"
                            else od.FloatDistribution(float(low), float(high), log=kind == "log"))
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in
                      (values if kind == "choice" else [0.0]))
        group, _, name = field.partition(".")
        batchable = numeric and bool(name) and name in replica_fields(run, group)
        dims.append(Dimension(field, distribution, batchable))
    return dims


def objective_of(run: RunConfig, tune: TuneConfig) -> tuple[str, str]:
    """The validation metric a study optimises and its direction; a run without validation data is refused."""
    check(run.data.val_split > 0, "tune.objective", tune.objective,
          "tuning needs validation data: set data.val_split (a count or a fraction of the training set)")
    metric = tune.objective if tune.objective != "auto" else ("val_ACC" if run.benchmark is not None else "val_error")
    if tune.direction != "auto":
        return metric, tune.direction
    sense = direction(metric)
    check(sense is not None, "tune.direction", tune.direction, f"which way {metric} is better is unknown: say minimize or maximize")
    return metric, "maximize" if sense == 1 else "minimize"


def _sampler(tune: TuneConfig, dims: list[Dimension]):
    import optuna

    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=tune.seed)
    if tune.sampler == "grid":  # the grid's points are enqueued (see _grid); nothing is left to sample
        for d in dims:
            check(isinstance(d.distribution, optuna.distributions.CategoricalDistribution), f"tune.space.{d.field}", "",
                  "tune.sampler=grid needs every entry of tune.space to be a {choice: [...]}")
        return optuna.samplers.RandomSampler(seed=tune.seed)
    return optuna.samplers.TPESampler(seed=tune.seed, constant_liar=True, n_startup_trials=min(10, max(1, tune.trials // 2)))


def _grid(dims: list[Dimension]) -> list[dict[str, Any]]:
    """Every point of a grid of ``choice`` dimensions. (Optuna's GridSampler stops the study from
    inside a callback, which ask/tell does not have; the points are enqueued instead.)"""
    return [dict(zip((d.field for d in dims), values)) for values in itertools.product(*(d.distribution.choices for d in dims))]


def _fingerprint(run: RunConfig, dims: list[Dimension], metric: str, direction: str) -> dict[str, Any]:
    """What a trial measures; a study continued with a different one is refused."""
    plain = {k: v for k, v in dataclasses.asdict(run).items() if k not in UNFINGERPRINTED}
    plain["trainer"] = {k: v for k, v in plain["trainer"].items() if k not in ("progress", "loggers", "tracking_uri", "project", "checkpoint", "checkpoint_every")}
    plain["data"] = {k: v for k, v in plain["data"].items() if k != "root"}
    flat = _flat_dict(json.loads(json.dumps(plain, default=str)))
    flat["tune.space"] = {d.field: repr(d.distribution) for d in dims}
    flat["tune.objective"] = f"{direction} {metric}"
    if run.tune is not None and run.tune.seeds != 1:  # (absent at 1: studies begun before the field existed continue)
        flat["tune.seeds"] = run.tune.seeds
    return flat


def _flat_dict(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat_dict(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): node}


def _trial_run(run: RunConfig, fixed: dict[str, Any], varied: dict[str, list[float]], seeds: list[int], out: Path) -> RunConfig:
    """The run of one population: ``fixed`` values set on the config (validated by their groups),
    ``varied`` per replica (``vary``), replica ``r`` on ``seeds[r]``."""
    trial = copy.deepcopy(run)
    for field, value in fixed.items():
        group, _, name = field.partition(".")
        if not name:
            setattr(trial, group, value)
            continue
        config = getattr(trial, group)
        old = getattr(config, name)
        if isinstance(old, (int, float)) and not isinstance(old, bool) and isinstance(value, (int, float)):
            value = type(old)(value)  # an int field takes a sampled 3.0 as 3
        try:
            setattr(trial, group, dataclasses.replace(config, **{name: value}))
        except ConfigError as exc:
            raise ConfigError(f"tune.space.{field}: {exc}") from None
    vary: dict[str, Any] = {}
    for field, values in varied.items():
        group, _, name = field.partition(".")
        vary.setdefault(group, {})[name] = values
    vary["seed"] = list(seeds)  # explicit, so a resumed final stage's config matches
    trial.vary, trial.replicas, trial.seed = vary, len(seeds), seeds[0]
    trial.output_dir, trial.resume, trial.resume_from, trial.tune = str(out), False, None, None
    check_combinations(trial)
    return trial


def _execute(run: RunConfig, data: ImageData) -> dict[str, Any]:
    return run_continual(run, data) if run.benchmark is not None else train(run, data)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Study:
    """The Optuna study of a directory, with this tuner's identity for crash recovery."""

    def __init__(self, out: Path, direction: str, sampler, fingerprint: dict[str, Any]) -> None:
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.storage = JournalStorage(JournalFileBackend(str(out / JOURNAL)))
        self.study = optuna.create_study(study_name="agentnet", storage=self.storage, direction=direction,
                                         sampler=sampler, load_if_exists=True)
        if self.study.direction.name.lower() != direction:
            raise ConfigError(f"tune.direction={direction}: the study at {out} was started to {self.study.direction.name.lower()}")
        saved = self.study.user_attrs.get("fingerprint")
        if saved is None:
            self.study.set_user_attr("fingerprint", fingerprint)
        else:
            changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
            if changed:
                detail = "; ".join(f"{k}: study {saved.get(k)!r}, now {fingerprint.get(k)!r}" for k in changed[:6])
                raise ConfigError(
                    f"{changed[0]}: the study at {out} was run with other settings ({detail}). "
                    "Continue it with the same command, or start another study (tune.name=... or hydra.run.dir=...)"
                )
        self.owner = f"{socket.gethostname()}:{os.getpid()}"

    def recover(self) -> int:
        """Trials left RUNNING by a dead tuner of this host (``kill -9``) are marked lost (state FAIL,
        ``lost=True``, not counted in the budget) and their parameters asked again first."""
        from optuna.trial import TrialState

        host = socket.gethostname()
        lost = 0
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = str(t.user_attrs.get("owner", ""))
            name, _, pid = owner.rpartition(":")
            if name == host and pid.isdigit() and not _alive(int(pid)):
                self.storage.set_trial_user_attr(t._trial_id, "lost", True)
                self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                self.study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
                lost += 1
        return lost

    def counts(self) -> tuple[int, int]:
        """Trials finished (lost ones excluded) and running (in any tuner)."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        done = sum(1 for t in trials if t.state.is_finished() and not t.user_attrs.get("lost"))
        running = sum(1 for t in trials if t.state == TrialState.RUNNING)
        return done, running


def run_study(run: RunConfig, out: Path, data: ImageData | None = None) -> dict[str, Any]:
    """Tune ``run.tune.space`` on validation data, retrain the best setting with fresh seeds and
    evaluate it on the test set once; write the study's outputs to ``out``. Returns a summary
    (``best``, ``objective``, ``final``: the final run's metrics)."""
    import optuna
    from optuna.trial import TrialState

    tune: TuneConfig = run.tune if run.tune is not None else TuneConfig()
    metric, direction = objective_of(run, tune)
    dims = parse_space(run, tune.space)
    sampler = _sampler(tune, dims)
    budget = tune.trials
    if tune.sampler == "grid":
        size = math.prod(len(d.distribution.choices) for d in dims)
        if budget != size:
            log.info("tune.sampler=grid: %d grid points; the study runs %d trials", size, size)
        budget = size
    out.mkdir(parents=True, exist_ok=True)
    study = _Study(out, direction, sampler, _fingerprint(run, dims, metric, direction))
    if tune.sampler == "grid" and not study.study.user_attrs.get("grid"):
        for point in _grid(dims):
            study.study.enqueue_trial(point)
        study.study.set_user_attr("grid", True)
    lost = study.recover()
    if lost:
        log.warning("%d trial(s) of a killed tuner were lost; their settings are asked again", lost)
    distributions = {d.field: d.distribution for d in dims}
    data = data if data is not None else load_run_data(run)
    while True:
        done, running = study.counts()
        want = min(tune.batch, budget - done - running)
        if want <= 0:
            break
        trials = [study.study.ask(distributions) for _ in range(want)]
        for t in trials:
            t.set_user_attr("owner", study.owner)
        groups: dict[tuple, list] = {}
        for t in trials:
            key = tuple((d.field, repr(t.params[d.field])) for d in dims if not d.batchable)
            groups.setdefault(key, []).append(t)
        for members in groups.values():
            _train_trials(run, dims, members, study.study, metric, data, out)
        log.info("study %s: %d of %d trials done; best %s = %s", out, study.counts()[0], budget, metric, _best_value(study.study))
    done, running = study.counts()
    complete = [t for t in study.study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    write_trials(study.study, out, metric)
    if not complete:
        raise ConfigError(f"tune.space: none of the study's {done} trials finished (every one failed; see {out / 'trials.csv'})")
    if running:
        log.warning("%d trial(s) still run in other tuners; the final stage waits for the study to finish", running)
        return {"best": study.study.best_trial.params, "objective": metric, "final": None}
    best = study.study.best_trial
    overrides = {field: best.params[field] for field in distributions}
    (out / "best.yaml").write_text(
        f"# agentnet-tune: best of {done} trials by {direction} {metric} = {best.value:.6g} (trial {best.number})\n"
        f"# reuse on the command line: {' '.join(f'{k}={v}' for k, v in overrides.items())}\n"
        + yaml.safe_dump(overrides, sort_keys=True)
    )
    final = _final(run, tune, overrides, data, out / "final")
    if not final:
        return {"best": overrides, "objective": metric, "final": None}
    summary = {"best": overrides, "objective": metric, "direction": direction, "best_value": best.value,
               "trials": done, "final": {k: v for k, v in final.items() if k not in ("replicas", "history", "curves")}}
    atomic_write_json(summary, out / "tune.json")
    return summary


def _best_value(study) -> str:
    try:
        return f"{study.best_value:.6g}"
    except ValueError:
        return "-"


def _train_trials(run: RunConfig, dims: list[Dimension], trials: list, study, metric: str, data: ImageData, out: Path) -> None:
    """Train ``trials`` (equal in their non-batchable values) as one population — ``tune.seeds``
    replicas each, trial-major — and tell Optuna each trial's mean over its seeds. A trial one of
    whose replicas' loss becomes non-finite fails; the others are trained again without it."""
    from optuna.trial import TrialState

    k = run.tune.seeds if run.tune is not None else 1
    seeds = [run.seed + j for j in range(k)]

    pending = list(trials)
    attempt = 0
    while pending:
        first = pending[0]
        fixed = {d.field: first.params[d.field] for d in dims if not d.batchable}
        varied = {d.field: [float(t.params[d.field]) for t in pending for _ in seeds] for d in dims if d.batchable}
        if not varied:  # nothing a population can vary: one trial per run
            pending, rest = pending[:1], pending[1:]
        else:
            rest = []
        folder = out / "trials" / (f"{pending[0].number:04d}" + (f"-{pending[-1].number:04d}" if len(pending) > 1 else "")
                                   + (f"_retry{attempt}" if attempt else ""))
        attempt += 1
        trial_run = _trial_run(run, fixed, varied, seeds * len(pending), folder)
        # trials select on validation data: no test evaluation, no checkpoints (a killed population is retrained), no trackers
        trial_run.trainer = dataclasses.replace(trial_run.trainer, checkpoint=False, loggers=[], test=False)
        start = time.perf_counter()
        try:
            metrics = _execute(trial_run, data)
        except NonFiniteLossError as exc:
            diverged = sorted({r // k for r in exc.replicas}) or list(range(len(pending)))
            for r in diverged:
                pending[r].set_user_attr("error", "non-finite loss")
                study.tell(pending[r], state=TrialState.FAIL)
            pending = [t for r, t in enumerate(pending) if r not in diverged] + rest
            log.warning("trial(s) %s diverged (non-finite loss); %d retrained without them",
                        [t.number for r, t in enumerate(trials) if r in diverged], len(pending))
            continue
        wall = time.perf_counter() - start
        replicas = metrics.get("replicas") or [metrics]
        for i, t in enumerate(pending):
            own = replicas[i * k:(i + 1) * k]
            if any(metric not in m for m in own):
                raise ConfigError(f"tune.objective={metric}: not in the run's metrics (has {sorted(n for n in own[0] if n.startswith('val_'))})")
            value = sum(float(m[metric]) for m in own) / len(own)
            t.set_user_attr("wall_s", wall / len(pending))
            t.set_user_attr("population", str(folder.relative_to(out)))
            if math.isfinite(value):
                study.tell(t, value)
            else:
                t.set_user_attr("error", f"{metric} is {value}")
                study.tell(t, state=TrialState.FAIL)
        pending = rest


def _final(run: RunConfig, tune: TuneConfig, overrides: dict[str, Any], data: ImageData, out: Path) -> dict[str, Any]:
    """The best setting with ``tune.final_seeds`` fresh seeds as one population; the test set's one
    evaluation. A killed final stage resumes from its checkpoint. A seed whose loss becomes
    non-finite is recorded (``diverged_seeds``: the setting is not robust to it) and the others are
    trained again without it; if every seed diverges the stage fails."""
    name = "cl_metrics.json" if run.benchmark is not None else "metrics.json"
    planned = list(range(tune.final_seed, tune.final_seed + tune.final_seeds))
    if (out / name).is_file():
        done = json.loads((out / name).read_text())
        if (done.get("tuned") == overrides and done.get("final_settings") == (tune.final or {})
                and done.get("planned_seeds", done.get("seeds")) == planned):
            return done
    schedule = _flat_dict(tune.final or {})
    for field in schedule:
        _current(run, field, "tune.final")  # an unknown field is an error naming it
    seeds, diverged = list(planned), []
    while True:
        final = _trial_run(run, {**schedule, **overrides}, {}, seeds, out)
        final.resume = (out / "checkpoint.pt").is_file()
        try:
            metrics = _execute(final, data)
            break
        except RunDirectoryLockedError:  # a tuner sharing the study runs it now
            log.warning("another tuner is running the final stage in %s; this one stops here", out)
            return {}
        except NonFiniteLossError as exc:
            bad = [seeds[r] for r in (exc.replicas or range(len(seeds)))]
            diverged += bad
            seeds = [s for s in seeds if s not in bad]
            remove_checkpoints(out)  # they hold the diverged seeds' population
            if not seeds:
                raise NonFiniteLossError(f"final stage: every seed ({diverged}) diverged at the best setting {overrides}") from None
            log.warning("final stage: seed(s) %s diverged at the best setting; %s trained again without them", bad, seeds)
    metrics["tuned"], metrics["final_settings"] = overrides, tune.final or {}
    metrics["planned_seeds"], metrics["diverged_seeds"] = planned, diverged
    atomic_write_json(metrics, out / name)
    return metrics


def write_trials(study, out: Path, metric: str) -> None:
    """``trials.csv`` (every trial: number, state, values, objective, wall time, population) and
    ``history.png`` (objective by trial, best so far)."""
    trials = study.get_trials(deepcopy=False)
    fields = sorted({k for t in trials for k in t.params})
    with open(out / "trials.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["trial", "state", *fields, metric, "wall_s", "population", "note"])
        for t in trials:
            note = "lost (tuner killed; asked again)" if t.user_attrs.get("lost") else t.user_attrs.get("error", "")
            writer.writerow([t.number, t.state.name, *(t.params.get(f, "") for f in fields),
                             "" if t.value is None else f"{t.value:.6g}", f"{t.user_attrs.get('wall_s', 0.0):.2f}",
                             t.user_attrs.get("population", ""), note])
    _plot_history(study, out / "history.png", metric)


def _plot_history(study, path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    if complete:
        xs = [t.number for t in complete]
        ys = [t.value for t in complete]
        better = min if study.direction.name == "MINIMIZE" else max
        best, running = [], None
        for y in ys:
            running = y if running is None else better(running, y)
            best.append(running)
        ax.scatter(xs, ys, s=14, label="trial")
        ax.step(xs, best, where="post", color="tab:red", label="best so far")
        ax.legend()
        if min(ys) > 0 and max(ys) / min(ys) > 20:  # diverging trials would flatten the good ones
            ax.set_yscale("log")
    ax.set(xlabel="trial", ylabel=metric, title=f"{study.direction.name.lower()} {metric}: {len(complete)} trials")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
