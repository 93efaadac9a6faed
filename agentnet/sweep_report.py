"""``agentnet-report <sweep dir>``: one table (and plots) from every job of a Hydra multirun.

Each job directory holds ``.hydra/overrides.yaml`` and, if it finished, ``metrics.json`` (a single
training run) or ``cl_metrics.json`` (a continual-learning run), or, for an ``agentnet-tune`` job,
``final/metrics.json`` / ``final/cl_metrics.json`` (its tuned settings are listed under the table). Jobs are grouped by their overrides
minus ``seed`` (and output paths). A job's replicas (a population, ``replicas=R``) count like seeds:
every group gets mean ± std (sample std) over all its runs — each job's replicas, over all its jobs —
the run count and a 95 % confidence interval of the mean (Student's t). A job without metrics is
listed as failed with its error, and the others are still reported. Writes ``summary.md``,
``summary.csv`` and ``summary.png`` into the sweep directory and prints the table.

Significance: for every compared metric (ACC, BWT, FWT, forgetting; test_error, train_error; the
validation metrics when present) the best group is tested against every other one, by Welch's
t-test, or a paired t-test (runs paired by seed) when every group holds exactly the same seeds,
each once; the p-values are Holm-corrected over those comparisons (α = 0.05). The best group and
those not distinguishable from it are bold in ``summary.md``, ``summary.csv`` says
``best`` / ``tied (p=…)`` / ``worse (p=…)`` / ``untested (n<2)`` per metric, and ``summary.png``
hatches their bars. ``--compare A B`` prints the difference between two groups instead.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence, Union

import yaml

from agentnet.tables import direction, markdown_table

__all__ = [
    "Job", "Group", "Comparison", "Mark", "collect_jobs", "group_jobs", "group_runs", "summary_rows", "direction",
    "holm", "shared_seeds", "compare", "significance", "select_group", "compare_report", "markdown_table", "write_report", "main",
]

CL_COLUMNS = ("ACC", "BWT", "FWT", "forgetting", "wall_s")
TRAIN_COLUMNS = ("test_error", "train_error", "samples_per_s", "wall_s")
# Validation metrics exist only when the runs held out a validation split: a column when any job has one.
VALIDATION_COLUMNS = {"cl": ("val_ACC",), "train": ("val_error", "val_acc")}
PERCENT = {"ACC", "BWT", "FWT", "forgetting", "val_ACC"}
IGNORED_KEYS = ("seed", "output_dir", "hydra.", "trainer.progress", "resume")
ALPHA = 0.05
"""Significance level of the comparisons with the best group (after Holm's correction)."""

Seed = Union[int, str]


def _seed_key(value: object) -> Seed:
    """A seed comparable across sources: replicas store ints, overrides strings (``"1"``)."""
    try:
        return int(str(value))
    except ValueError:
        return str(value)


def _seed_order(seed: Seed) -> tuple[int, int, str]:
    return (0, seed, "") if isinstance(seed, int) else (1, 0, seed)


@dataclass
class Job:
    """One job of a sweep."""

    directory: Path
    overrides: dict[str, str]
    metrics: dict | None = None
    error: str | None = None

    @property
    def kind(self) -> str:
        if self.metrics is None or "experiment" in self.metrics:
            return "experiment"
        return "cl" if "ACC" in self.metrics else "train"

    def value(self, column: str) -> float | None:
        """A column's value: a metric, or an experiment summary entry."""
        source = self.metrics.get("summary", self.metrics) if self.metrics else {}
        value = source.get(column, self.metrics.get(column) if self.metrics else None)
        return value if isinstance(value, (int, float)) else None

    def values(self, column: str) -> list[float]:
        """A column's value for each of the job's runs: one per replica when the replica's own
        metrics have it (a population), else the job's single value."""
        return [v for _, v in self.seeded_values(column)]

    @property
    def seed(self) -> Seed:
        """The job's own seed: its metrics' ``seed``, else its ``seed`` override, else 0."""
        if self.metrics is not None and "seed" in self.metrics:
            return _seed_key(self.metrics["seed"])
        return _seed_key(self.overrides.get("seed", 0))

    def run_seeds(self) -> list[Seed]:
        """The seed of each of the job's runs: each replica's ``seed`` (a population), else the job's."""
        if self.metrics is None:
            return []
        replicas = self.metrics.get("replicas") or []
        if replicas and all(isinstance(r, dict) and "seed" in r for r in replicas):
            return [_seed_key(r["seed"]) for r in replicas]
        return [self.seed] * self.runs

    def seeded_values(self, column: str) -> list[tuple[Seed, float]]:
        """``(seed, value)`` of each run holding ``column``: per replica when every replica has it,
        else the job's single value under the job's seed (a job-level metric such as ``wall_s``)."""
        if self.metrics is None:
            return []
        replicas = self.metrics.get("replicas") or []
        per_run = [r.get(column) if isinstance(r, dict) else None for r in replicas]
        if per_run and all(isinstance(v, (int, float)) for v in per_run):
            return list(zip(self.run_seeds(), (float(v) for v in per_run)))
        value = self.value(column)
        return [] if value is None else [(self.seed, float(value))]

    @property
    def runs(self) -> int:
        """Independent runs this job holds (its replicas)."""
        return len(self.metrics.get("replicas") or [None]) if self.metrics else 0


@dataclass
class Group:
    """Jobs sharing every override but the seed."""

    key: tuple[tuple[str, str], ...]
    jobs: list[Job] = field(default_factory=list)

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.key) or "(defaults)"

    def finished(self) -> list[Job]:
        return [j for j in self.jobs if j.metrics is not None]


def group_runs(group: Group, column: str) -> tuple[list[float], list[Seed]]:
    """A column's value of each of the group's runs (its finished jobs' replicas) and their seeds."""
    pairs = [pair for job in group.finished() for pair in job.seeded_values(column)]
    return [v for _, v in pairs], [s for s, _ in pairs]


def _overrides(job_dir: Path) -> dict[str, str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    result = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, _, value = str(item).partition("=")
        result[key.lstrip("+~")] = value
    return result


def collect_jobs(sweep_dir: Path) -> list[Job]:
    """Every job directory under ``sweep_dir`` (those with a ``.hydra`` folder), finished or not."""
    jobs = []
    for hydra_dir in sorted(sweep_dir.glob("**/.hydra")):
        job_dir = hydra_dir.parent
        job = Job(job_dir, _overrides(job_dir))
        # An agentnet-tune job: its final stage (the best setting, fresh seeds, the test set once).
        for name in ("experiment.json", "cl_metrics.json", "metrics.json", "final/cl_metrics.json", "final/metrics.json"):
            if (job_dir / name).is_file():
                job.metrics = json.loads((job_dir / name).read_text())
                break
        if job.metrics is None:
            error_file = job_dir / "error.txt"
            job.error = error_file.read_text().strip() if error_file.is_file() else "no metrics written (crashed or still running)"
        jobs.append(job)
    # A scheduler may end a job before Hydra made its directory (scancel, a node failure): submitit
    # still left a folder per array task, so such a job is listed as failed rather than missing.
    started = {j.directory.name.split("_", 1)[0] for j in jobs}
    for folder in sorted((sweep_dir / ".submitit").glob("*_*")):
        num = folder.name.rsplit("_", 1)[1]
        if num.isdigit() and num not in started:
            logs = sorted(folder.glob("*_log.err"))
            tail = logs[0].read_text().strip().splitlines()[-1:] if logs else []
            reason = f"scheduler job {folder.name} ended before the run started ({tail[0] if tail else 'no log'})"
            jobs.append(Job(folder, {"hydra.job.num": num}, error=reason))
            started.add(num)
    return jobs


def swept_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs between jobs (seeds and paths excluded)."""
    keys = sorted({k for j in jobs for k in j.overrides if not k.startswith(IGNORED_KEYS)})
    return [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]


def group_jobs(jobs: list[Job]) -> list[Group]:
    """Group by the swept keys (all but seeds and paths), in first-seen order."""
    keys = swept_keys(jobs)
    groups: dict[tuple, Group] = {}
    for job in jobs:
        key = tuple((k, job.overrides.get(k, "(default)")) for k in keys)
        groups.setdefault(key, Group(key)).jobs.append(job)
    return list(groups.values())


def _stat(values: list[float], scale: float) -> str:
    if not values:
        return "-"
    mean = statistics.mean(values) * scale
    if len(values) == 1:  # one run has no spread: "± 0.00" would claim a measured one
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {statistics.stdev(values) * scale:.2f}"


def confidence_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Student-t confidence interval of the mean of ``values`` (``None`` for fewer than two)."""
    if len(values) < 2:
        return None
    from scipy import stats

    mean = statistics.mean(values)
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean - half, mean + half


def _interval(values: list[float], scale: float) -> str:
    ci = confidence_interval(values)
    return "-" if ci is None else f"[{ci[0] * scale:.2f}, {ci[1] * scale:.2f}]"


@dataclass(frozen=True)
class Comparison:
    """Group A against group B on one metric.

    ``diff`` is mean(A) − mean(B), ``ci_low``/``ci_high`` its 95 % interval, ``p`` the two-sided
    p-value (not corrected for multiple comparisons), ``paired`` whether runs were paired by seed
    (paired t-test) rather than compared by Welch's t-test, ``n_a``/``n_b`` the run counts. With
    fewer than two runs (or non-finite values) on either side nothing is tested: ``p`` and the
    interval are NaN and :attr:`tested` is false."""

    diff: float
    ci_low: float
    ci_high: float
    p: float
    paired: bool
    n_a: int
    n_b: int

    @property
    def tested(self) -> bool:
        return not math.isnan(self.p)


def shared_seeds(seed_lists: Sequence[Sequence[Seed]]) -> bool:
    """Whether runs can be paired by seed: every list holds each seed once, all lists hold the same
    seeds, and there are at least two (a paired test needs two differences)."""
    if not seed_lists or any(len(set(s)) != len(s) for s in seed_lists):
        return False
    first = set(seed_lists[0])
    return len(first) >= 2 and all(set(s) == first for s in seed_lists)


def compare(
    values_a: Sequence[float],
    values_b: Sequence[float],
    seeds_a: Sequence[Seed] | None = None,
    seeds_b: Sequence[Seed] | None = None,
    level: float = 0.95,
) -> Comparison:
    """Compare two groups' runs: the difference of means A − B, its ``level`` interval and p-value.

    When both seed lists are given and :func:`shared_seeds` holds for them, runs are paired by seed:
    a paired t-test (``scipy.stats.ttest_rel``) and the t-interval of the paired differences.
    Otherwise Welch's t-test (``scipy.stats.ttest_ind(equal_var=False)``) and the interval with
    the Welch–Satterthwaite degrees of freedom. Without spread (every difference, or both groups,
    constant) the t statistic is undefined: equal means then give p = 1 (tied) and different means
    p = 0 (they differ), with a zero-width interval."""
    from scipy import stats

    a, b = [float(v) for v in values_a], [float(v) for v in values_b]
    n_a, n_b = len(a), len(b)
    diff = statistics.fmean(a) - statistics.fmean(b) if a and b else math.nan
    paired = seeds_a is not None and seeds_b is not None and len(seeds_a) == n_a and len(seeds_b) == n_b \
        and shared_seeds([seeds_a, seeds_b])
    if min(n_a, n_b) < 2 or not all(math.isfinite(v) for v in a + b):
        return Comparison(diff, math.nan, math.nan, math.nan, paired, n_a, n_b)
    quantile = 0.5 + level / 2
    if paired:
        by_seed = dict(zip(seeds_b, b))
        b = [by_seed[s] for s in seeds_a]  # B's runs in A's seed order
        d = [x - y for x, y in zip(a, b)]
        sd = statistics.stdev(d)
        if sd == 0:
            p, half = (1.0 if diff == 0 else 0.0), 0.0
        else:
            p = float(stats.ttest_rel(a, b).pvalue)
            half = float(stats.t.ppf(quantile, n_a - 1)) * sd / math.sqrt(n_a)
    else:
        va, vb = statistics.variance(a) / n_a, statistics.variance(b) / n_b  # squared standard errors
        if va + vb == 0:
            p, half = (1.0 if diff == 0 else 0.0), 0.0
        else:
            p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
            df = (va + vb) ** 2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1))  # Welch–Satterthwaite
            half = float(stats.t.ppf(quantile, df)) * math.sqrt(va + vb)
    return Comparison(diff, diff - half, diff + half, p, paired, n_a, n_b)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the order given.

    The step-down procedure over m tests: sort the p-values ascending, p_(0) ≤ … ≤ p_(m−1); then
    adjusted p_(i) = max over j ≤ i of min(1, (m − j) · p_(j)) (0-based j). The smallest p is
    multiplied by m (Bonferroni), the next by m − 1, and so on; the running maximum keeps the
    adjusted values in the order of the raw ones. "Adjusted p < α" is then Holm's test, which holds
    the family-wise error rate at α whatever the dependence between the tests (here they share the
    best group's runs), and rejects at least as much as Bonferroni."""
    m = len(pvalues)
    adjusted = [0.0] * m
    running = 0.0
    for j, i in enumerate(sorted(range(m), key=lambda k: pvalues[k])):
        running = max(running, min(1.0, (m - j) * pvalues[i]))
        adjusted[i] = running
    return adjusted


Status = Literal["best", "tied", "worse", "untested"]


@dataclass(frozen=True)
class Mark:
    """A group's standing on one metric: ``best``; ``tied`` with the best (Holm-adjusted p ≥ α: not
    distinguishable from it); ``worse`` (adjusted p < α); or ``untested`` (``reason``: fewer than two
    runs, or non-finite values). ``comparison`` is this group against the best (group − best), ``n``
    its runs. ``str()`` gives the CSV cell: ``best``, ``tied (p=0.43)``, ``worse (p=0.002)``,
    ``untested (n<2)``."""

    status: Status
    p_adjusted: float | None = None
    comparison: Comparison | None = None
    n: int = 0
    reason: str = ""

    @property
    def bold(self) -> bool:
        """Whether the report highlights the group: the best and those tied with it."""
        return self.status in ("best", "tied")

    def __str__(self) -> str:
        if self.status in ("tied", "worse"):
            return f"{self.status} (p={_p(self.p_adjusted)})"
        return f"untested ({self.reason})" if self.status == "untested" else "best"


def _p(p: float | None) -> str:
    return "-" if p is None or math.isnan(p) else f"{p:.2g}"


def significance(groups: Sequence[Group], column: str, alpha: float = ALPHA) -> dict[str, Mark]:
    """Each group's :class:`Mark` on ``column``, by label, in the groups' order.

    The best group (highest or lowest mean by :func:`direction`; the first one on a tie) among
    those with at least two finite runs is tested against every other such group with
    :func:`compare` — paired by seed when every group with runs holds exactly the same seeds, each
    once, else Welch — and the p-values are Holm-corrected (:func:`holm`) over these comparisons.
    Groups with fewer than two runs are ``untested``. Raises ``ValueError`` for a column that is
    not compared (``direction(column) is None``)."""
    sense = direction(column)
    if sense is None:
        raise ValueError(f"{column!r} is not a compared metric: which way is better is unknown")
    runs = {g.label: group_runs(g, column) for g in groups}
    marks: dict[str, Mark] = {}
    testable: dict[str, tuple[list[float], list[Seed]]] = {}
    for label, (values, seeds) in runs.items():
        if len(values) < 2:
            marks[label] = Mark("untested", n=len(values), reason="n<2")
        elif not all(math.isfinite(v) for v in values):
            marks[label] = Mark("untested", n=len(values), reason="not finite")
        else:
            testable[label] = (values, seeds)
    if testable:
        best = max(testable, key=lambda label: sense * statistics.fmean(testable[label][0]))
        paired = shared_seeds([seeds for values, seeds in runs.values() if values])
        best_values, best_seeds = testable[best]
        marks[best] = Mark("best", n=len(best_values))
        others = [label for label in testable if label != best]
        comparisons = [
            compare(testable[label][0], best_values, testable[label][1] if paired else None, best_seeds if paired else None)
            for label in others
        ]
        for label, comparison, p in zip(others, comparisons, holm([c.p for c in comparisons])):
            marks[label] = Mark("tied" if p >= alpha else "worse", p, comparison, comparison.n_a)
    return {g.label: marks[g.label] for g in groups}


def _compared_columns(groups: Sequence[Group]) -> list[str]:
    return [c for c in _columns(list(groups)) if direction(c) is not None]


def _significance_by_column(groups: Sequence[Group], alpha: float = ALPHA) -> dict[str, dict[str, Mark]]:
    """:func:`significance` of every compared column; empty unless two groups have runs to compare."""
    if sum(1 for g in groups if g.finished()) < 2:
        return {}
    return {c: significance(groups, c, alpha) for c in _compared_columns(groups)}


def _test_name(marks: dict[str, dict[str, Mark]]) -> str:
    paired = {m.comparison.paired for by_label in marks.values() for m in by_label.values() if m.comparison}
    if paired == {True}:
        return "paired t-test by seed, as all groups share seeds"
    if paired == {False}:
        return "Welch's t-test"
    return "Welch's t-test, or a paired t-test where all groups share seeds"


def _columns(groups: list[Group]) -> tuple[str, ...]:
    done = [j for g in groups for j in g.finished()]
    kinds = {j.kind for j in done}
    columns: list[str] = []
    if "cl" in kinds:
        columns += CL_COLUMNS
    if "train" in kinds:
        columns += [c for c in TRAIN_COLUMNS if c not in columns]
    for kind in ("cl", "train"):  # validation metrics only where some run measured them, before the timings
        present = [c for c in VALIDATION_COLUMNS[kind] if any(j.kind == kind and j.values(c) for j in done)]
        at = next((i for i, c in enumerate(columns) if c in ("samples_per_s", "wall_s")), len(columns))
        columns[at:at] = [c for c in present if c not in columns]
    if "experiment" in kinds:  # experiments report their own summary entries
        keys = {k for j in done if j.kind == "experiment" for k in j.metrics["summary"]}
        columns += sorted(keys) + ([] if "wall_s" in columns else ["wall_s"])
    return tuple(columns)


def _scale(column: str) -> float:
    return 100.0 if column in PERCENT else 1.0


def _title(column: str) -> str:
    return f"{column} (%)" if column in PERCENT else column


def summary_rows(
    groups: list[Group], marks: dict[str, dict[str, Mark]] | None = None
) -> tuple[tuple[str, ...], list[list[str]]]:
    """Header and rows of the summary table (percent for accuracy-type CL metrics; a group of one
    run shows its value, without a spread). With ``marks`` (column → group label → :class:`Mark`,
    as :func:`significance` gives), the cells of each column's best group and of the groups tied
    with it are bold (Markdown ``**…**``)."""
    columns = _columns(groups)
    main = columns[0] if columns else None
    header = ("group", "jobs", "failed", "runs", *(_title(c) for c in columns), *([f"{main} 95% CI"] if main else []))
    rows = []
    for group in groups:
        done = group.finished()
        cells = []
        for c in columns:
            cell = _stat([v for j in done for v in j.values(c)], _scale(c))
            mark = (marks or {}).get(c, {}).get(group.label)
            cells.append(f"**{cell}**" if mark is not None and mark.bold and cell != "-" else cell)
        ci = [_interval([v for j in done for v in j.values(main)], 100.0 if main in PERCENT else 1.0)] if main else []
        rows.append([group.label, str(len(group.jobs)), str(len(group.jobs) - len(done)), str(sum(j.runs for j in done)), *cells, *ci])
    return header, rows


def _mark_bars(ax, bars, tops: list[float], marks: list[Mark | None]) -> None:
    """Hatch the bars of the best group (★ above it) and of the groups tied with it (= above);
    ``tops``: the highest thing drawn on each bar (its error bar, its runs' dots), to stay clear of."""
    for bar, top, mark in zip(bars, tops, marks):
        if mark is None or not mark.bold:
            continue
        bar.set_hatch("//")
        bar.set_edgecolor("black")
        ax.annotate("★" if mark.status == "best" else "=", (bar.get_x() + bar.get_width() / 2, top),
                    xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=9)


def _plot(groups: list[Group], path: Path, marks: dict[str, dict[str, Mark]] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Patch

    cl_groups = [g for g in groups if any(j.kind == "cl" for j in g.finished())]
    if cl_groups:
        # A strategy x method grid has many groups: then one panel per row, slanted one-line labels
        # and the curves' legend beside its panel, so that nothing overlaps.
        wide = len(cl_groups) > 6
        if wide:
            fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(11.0, 0.55 * len(cl_groups)), 9))
            ax2.set_prop_cycle(color=plt.cm.tab20(np.arange(len(cl_groups)) % 20))  # 10 default colours repeat
        else:
            fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
        labels = [g.label.replace("strategy=", "").replace(" ", " " if wide else "\n") for g in cl_groups]
        handles = []  # drawn here: the legend would copy the first bar's hatch otherwise
        for offset, metric, color in ((-0.2, "ACC", "tab:green"), (0.2, "forgetting", "tab:red")):
            runs = [[v for j in g.finished() for v in j.values(metric)] for g in cl_groups]
            means = [100 * np.mean(r) for r in runs]
            stds = [100 * np.std(r, ddof=1) if len(r) > 1 else 0.0 for r in runs]
            bars = ax1.bar(np.arange(len(cl_groups)) + offset, means, 0.4, yerr=stds, color=color)
            _mark_bars(ax1, bars, [max(m + s, 0.0) for m, s in zip(means, stds)],
                       [(marks or {}).get(metric, {}).get(g.label) for g in cl_groups])
            handles.append(Patch(facecolor=color, label=metric))
        if marks:
            handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="best ★ / tied with it ="))
        ax1.set_xticks(range(len(cl_groups)), labels, fontsize=7, rotation=40 if wide else 0, ha="right" if wide else "center")
        title = "ACC and forgetting per group"
        ax1.set(ylabel="%", title=title + ("\nhatched: best (★) and tied with it (=), per metric" if marks else ""))
        ax1.legend(handles=handles, fontsize=7)
        for g in cl_groups:
            final = np.mean([np.asarray(j.metrics["acc_matrix"])[-1] for j in g.finished()], axis=0)
            ax2.plot(range(1, len(final) + 1), 100 * final, marker="o", label=g.label.replace("strategy=", ""))
        ax2.set(xlabel="task", ylabel="final accuracy (%)", title="last row of the accuracy matrix")
        if wide:
            ax2.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + len(cl_groups) // 16)
        else:
            ax2.legend(fontsize=6)
    else:
        fig, ax1 = plt.subplots(figsize=(7, 3.5))
        done = [g for g in groups if g.finished()]
        runs = [[v for j in g.finished() for v in j.values("test_error")] for g in done]
        means = [np.mean(r) for r in runs]
        stds = [np.std(r, ddof=1) if len(r) > 1 else 0.0 for r in runs]
        bars = ax1.bar(range(len(done)), means, yerr=stds)
        _mark_bars(ax1, bars, [max([m + s, *r]) for m, s, r in zip(means, stds, runs)],
                   [(marks or {}).get("test_error", {}).get(g.label) for g in done])
        for i, r in enumerate(runs):  # every run (seed or replica) as a dot: the spread, not just its summary
            ax1.scatter(np.full(len(r), i), r, color="black", s=8, zorder=3)
        wide = len(done) > 6  # slanted one-line labels, so that many groups do not overlap
        ax1.set_xticks(range(len(done)), [g.label.replace("strategy=", "").replace(" ", " " if wide else "\n") for g in done],
                       fontsize=7, rotation=40 if wide else 0, ha="right" if wide else "center")
        title = "test error per group"
        ax1.set(ylabel="test error (%)", title=title + ("\nhatched: best (★) and tied with it (=)" if marks else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run_seeds(jobs: list[Job]) -> list[Seed]:
    """The seeds of the sweep's runs (each replica's), and the seed a failed job was asked for."""
    seeds = {s for j in jobs for s in j.run_seeds()}
    seeds |= {_seed_key(j.overrides.get("seed", 0)) for j in jobs if j.metrics is None}
    return sorted(seeds, key=_seed_order)


def _significance_section(groups: list[Group], column: str, by_label: dict[str, Mark], alpha: float) -> str:
    """The main column's marks as a table: each group against the best, with the difference."""
    best = next((label for label, m in by_label.items() if m.status == "best"), None)
    if best is None:
        return f"\n## Significance: {_title(column)}\n\nNo group has two runs: nothing was tested.\n"
    tested = [m for m in by_label.values() if m.comparison is not None]
    scale = _scale(column)
    rows = []
    for group in groups:
        mark = by_label[group.label]
        values, _ = group_runs(group, column)
        c = mark.comparison
        diff = "-" if c is None else f"{c.diff * scale:+.2f} [{c.ci_low * scale:+.2f}, {c.ci_high * scale:+.2f}]"
        rows.append([group.label, str(len(values)), _stat(values, scale), mark.status + (f" ({mark.reason})" if mark.reason else ""),
                     _p(mark.p_adjusted), "-" if c is None else _p(c.p), diff])
    header = ("group", "n", _title(column), "vs best", "p (Holm)", "p (raw)", "difference to best [95% CI]")
    return (
        f"\n## Significance: {_title(column)}\n\nEach group against the best, `{best}`, by "
        f"{_test_name({column: by_label})} (two-sided); p Holm-corrected over the {len(tested)} comparison(s) with the "
        f"best; tied: adjusted p ≥ α = {alpha}, not distinguishable from the best; difference: group − best "
        f"with its 95 % interval; untested: fewer than two runs.\n\n{markdown_table(header, rows)}\n"
    )


def write_report(sweep_dir: Path, alpha: float = ALPHA) -> str:
    """Write ``summary.md``, ``summary.csv`` and ``summary.png``; return the Markdown text.

    Every compared metric's best group and the groups not distinguishable from it (at ``alpha``,
    see :func:`significance`) are bold in the table, listed in a Significance section (the main
    column) and in ``<metric> vs best`` CSV columns, and hatched in the plot."""
    jobs = collect_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir}: no Hydra job directories (.hydra/) found")
    groups = group_jobs(jobs)
    marks = _significance_by_column(groups, alpha)
    header, rows = summary_rows(groups, marks)
    common = sorted({(k, v) for j in jobs for k, v in j.overrides.items()} - {(k, v) for g in groups for k, v in g.key})
    common = [f"{k}={v}" for k, v in common if not k.startswith(IGNORED_KEYS) and all(j.overrides.get(k) == v for j in jobs)]
    seeds = [str(s) for s in _run_seeds(jobs)]
    text = (
        f"# Sweep report: {sweep_dir}\n\nCommon overrides: {' '.join(common) or '(none)'}; seeds: {', '.join(seeds) or '(none)'}; "
        f"mean ± std (sample) over runs (seeds and replicas).\n\n{markdown_table(header, rows)}\n"
    )
    if marks:
        text += (
            f"\nbold: the best group of each column and the groups not distinguishable from it ({_test_name(marks)}, "
            f"Holm-corrected over the comparisons with the best, α = {alpha}); n = runs per group.\n"
        )
        main = _columns(groups)[0]
        if main in marks:
            text += _significance_section(groups, main, marks[main], alpha)
    tuned = [(g, j) for g in groups for j in g.finished() if "tuned" in j.metrics]
    if tuned:
        text += ("\n## Tuned settings\n\nThe final runs of agentnet-tune studies: each group's best setting on its "
                 "validation data (`best.yaml`, `trials.csv` in the job's directory).\n\n"
                 + "\n".join(f"- {g.label}: " + " ".join(f"`{k}={v:.4g}`" if isinstance(v, float) else f"`{k}={v}`"
                                                         for k, v in j.metrics["tuned"].items())
                              + (f" — seed(s) {j.metrics['diverged_seeds']} diverged at this setting; the row is the others'"
                                 if j.metrics.get("diverged_seeds") else "") for g, j in tuned) + "\n")
    failed = [j for j in jobs if j.metrics is None]
    if failed:
        text += "\n## Failed jobs\n\n" + "\n".join(f"- `{j.directory.name}`: {j.error}" for j in failed) + "\n"
    (sweep_dir / "summary.md").write_text(text)
    with open(sweep_dir / "summary.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        plain_header, plain_rows = summary_rows(groups)  # no Markdown bold in the CSV: the marks get columns
        writer.writerow([*plain_header, *(f"{c} vs best" for c in marks)])
        writer.writerows([*row, *(str(marks[c][g.label]) for c in marks)] for g, row in zip(groups, plain_rows))
    if any(j.kind in ("cl", "train") for g in groups for j in g.finished()):
        _plot([g for g in groups if all(j.kind != "experiment" for j in g.finished())], sweep_dir / "summary.png", marks)
    return text


def select_group(groups: Sequence[Group], selector: str) -> Group:
    """The one group ``selector`` names: its label exactly, or the only group whose key holds every
    space-separated ``key=value`` token of it (``"strategy=bp"``, ``"strategy=bp cl=ewc"``).
    Raises ``LookupError`` naming the groups when none or several match."""
    exact = [g for g in groups if g.label == selector]
    if exact:
        return exact[0]
    tokens = selector.split()
    matches = [g for g in groups if tokens and set(tokens) <= {f"{k}={v}" for k, v in g.key}]
    if len(matches) == 1:
        return matches[0]
    labels = "; ".join(g.label for g in groups)
    if not matches:
        raise LookupError(f"{selector!r} matches no group; the groups are: {labels}")
    raise LookupError(f"{selector!r} matches {len(matches)} groups ({'; '.join(g.label for g in matches)}); "
                      f"add key=value tokens to pick one; the groups are: {labels}")


def _mean(values: list[float], scale: float) -> str:
    return f"{statistics.fmean(values) * scale:.2f}" if values else "-"


def compare_report(sweep_dir: Path, selector_a: str, selector_b: str) -> str:
    """Group A against group B (see :func:`select_group`) on every compared metric: both means, the
    difference A − B with its 95 % interval, the p-value (one comparison per metric: not corrected)
    and the test (paired by seed when the two groups hold the same seeds, each once, else Welch).
    Raises ``LookupError`` for a selector that names no group or several."""
    jobs = collect_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir}: no Hydra job directories (.hydra/) found")
    groups = group_jobs(jobs)
    a, b = select_group(groups, selector_a), select_group(groups, selector_b)
    rows = []
    for column in _compared_columns(groups):
        (va, sa), (vb, sb) = group_runs(a, column), group_runs(b, column)
        c = compare(va, vb, sa, sb)
        k = _scale(column)
        if c.tested:
            diff, ci, test = f"{c.diff * k:+.2f}", f"[{c.ci_low * k:+.2f}, {c.ci_high * k:+.2f}]", "paired" if c.paired else "Welch"
        else:
            diff, ci, test = ("-" if math.isnan(c.diff) else f"{c.diff * k:+.2f}"), "-", "untested (n<2)"
        rows.append([_title(column), f"{_mean(va, k)} (n={len(va)})", f"{_mean(vb, k)} (n={len(vb)})", diff, ci, _p(c.p), test])
    header = ("metric", "mean A", "mean B", "A − B", "95% CI", "p", "test")
    return (f"A: {a.label}\nB: {b.label}\n\n{markdown_table(header, rows)}\n\n"
            "p: two-sided t-test (paired by seed when A and B hold the same seeds, else Welch's), not corrected "
            "for multiple comparisons.\n")


REPORT_HELP = """\
agentnet-report: one table from every job of a sweep (agentnet -m ... or agentnet-tune -m ...).

Jobs that differ only in their seed form one group (a job's replicas count as seeds). Each group
gets mean ± std over its runs, the run count and a 95 % interval; the best group is tested against
every other one (Welch's or a paired t-test, Holm-corrected): bold in summary.md = best or not
significantly worse. Writes summary.md, summary.csv and summary.png into the sweep directory and
prints the table; failed jobs are listed with their error."""

REPORT_EXAMPLES = """\
examples:
  agentnet-report multirun/2026-12-06/10-00-00
  agentnet-report                        the newest sweep under multirun/
  agentnet-report SWEEP --compare strategy=bp strategy=lfnn
  agentnet-report tunes/study            the final runs of agentnet-tune studies"""


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``agentnet-report``."""
    parser = argparse.ArgumentParser(prog="agentnet-report", description=REPORT_HELP, epilog=REPORT_EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", nargs="?", default=None, help="a multirun directory (default: the newest under multirun/)")
    parser.add_argument(
        "--allow-failed",
        action="store_true",
        help="exit 0 even when the table lists failed jobs (by default such a report exits 1)",
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        help="print group A against group B (difference, 95%% interval, p-value) instead of writing the summary; "
        "a group is named by its label or by space-separated key=value tokens, e.g. --compare strategy=bp strategy=lfnn",
    )
    args = parser.parse_args(argv)
    if args.sweep_dir is None:
        candidates = sorted(p.parent for p in Path("multirun").glob("**/multirun.yaml"))
        if not candidates:
            print("error: no sweep directory given and none found under multirun/", file=sys.stderr)
            return 1
        sweep = max(candidates, key=lambda p: p.stat().st_mtime)
    else:
        sweep = Path(args.sweep_dir)
    if args.compare:
        try:
            print(compare_report(sweep, *args.compare))
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except LookupError as exc:
            print(f"error: --compare: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        print(write_report(sweep))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    failed = [j for j in collect_jobs(sweep) if j.metrics is None]
    if failed and not args.allow_failed:
        print(f"error: {len(failed)} of the sweep's jobs failed (listed above); --allow-failed exits 0", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
