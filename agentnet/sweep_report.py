"""``agentnet-report <sweep dir>``: one table (and plots) from every job of a Hydra multirun.

Each job directory holds ``.hydra/overrides.yaml`` and, if it finished, ``metrics.json`` (a single
training run) or ``cl_metrics.json`` (a continual-learning run). Jobs are grouped by their overrides
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
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import yaml

from agentnet.tables import markdown_table

__all__ = ["Job", "collect_jobs", "group_jobs", "markdown_table", "write_report", "main"]

CL_COLUMNS = ("ACC", "BWT", "FWT", "forgetting", "wall_s")
TRAIN_COLUMNS = ("test_error", "train_error", "samples_per_s", "wall_s")
PERCENT = {"ACC", "BWT", "FWT", "forgetting"}
IGNORED_KEYS = ("seed", "output_dir", "hydra.", "trainer.progress")


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
        if self.metrics is None:
            return []
        replicas = self.metrics.get("replicas") or []
        per_run = [r.get(column) for r in replicas]
        if per_run and all(isinstance(v, (int, float)) for v in per_run):
            return [float(v) for v in per_run]
        value = self.value(column)
        return [] if value is None else [float(value)]

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
        for name in ("experiment.json", "cl_metrics.json", "metrics.json"):
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
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


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


def _columns(groups: list[Group]) -> tuple[str, ...]:
    done = [j for g in groups for j in g.finished()]
    kinds = {j.kind for j in done}
    columns: list[str] = []
    if "cl" in kinds:
        columns += CL_COLUMNS
    if "train" in kinds:
        columns += [c for c in TRAIN_COLUMNS if c not in columns]
    if "experiment" in kinds:  # experiments report their own summary entries
        keys = {k for j in done if j.kind == "experiment" for k in j.metrics["summary"]}
        columns += sorted(keys) + ([] if "wall_s" in columns else ["wall_s"])
    return tuple(columns)


def summary_rows(groups: list[Group]) -> tuple[tuple[str, ...], list[list[str]]]:
    """Header and rows of the summary table (percent for accuracy-type CL metrics)."""
    columns = _columns(groups)
    main = columns[0] if columns else None
    header = ("group", "jobs", "failed", "runs", *(f"{c} (%)" if c in PERCENT else c for c in columns),
              *([f"{main} 95% CI"] if main else []))
    rows = []
    for group in groups:
        done = group.finished()
        cells = [_stat([v for j in done for v in j.values(c)], 100.0 if c in PERCENT else 1.0) for c in columns]
        ci = [_interval([v for j in done for v in j.values(main)], 100.0 if main in PERCENT else 1.0)] if main else []
        rows.append([group.label, str(len(group.jobs)), str(len(group.jobs) - len(done)), str(sum(j.runs for j in done)), *cells, *ci])
    return header, rows


def _plot(groups: list[Group], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

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
        for offset, metric, color in ((-0.2, "ACC", "tab:green"), (0.2, "forgetting", "tab:red")):
            runs = [[v for j in g.finished() for v in j.values(metric)] for g in cl_groups]
            means = [100 * np.mean(r) for r in runs]
            stds = [100 * np.std(r, ddof=1) if len(r) > 1 else 0.0 for r in runs]
            ax1.bar(np.arange(len(cl_groups)) + offset, means, 0.4, yerr=stds, label=metric, color=color)
        ax1.set_xticks(range(len(cl_groups)), labels, fontsize=7, rotation=40 if wide else 0, ha="right" if wide else "center")
        ax1.set(ylabel="%", title="ACC and forgetting per group")
        ax1.legend()
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
        ax1.bar(range(len(done)), means, yerr=stds)
        for i, r in enumerate(runs):  # every run (seed or replica) as a dot: the spread, not just its summary
            ax1.scatter(np.full(len(r), i), r, color="black", s=8, zorder=3)
        ax1.set_xticks(range(len(done)), [g.label.replace(" ", "\n") for g in done], fontsize=7)
        ax1.set(ylabel="test error (%)", title="test error per group")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(sweep_dir: Path) -> str:
    """Write ``summary.md``, ``summary.csv`` and ``summary.png``; return the Markdown text."""
    jobs = collect_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir}: no Hydra job directories (.hydra/) found")
    groups = group_jobs(jobs)
    header, rows = summary_rows(groups)
    common = sorted({(k, v) for j in jobs for k, v in j.overrides.items()} - {(k, v) for g in groups for k, v in g.key})
    common = [f"{k}={v}" for k, v in common if not k.startswith(IGNORED_KEYS) and all(j.overrides.get(k) == v for j in jobs)]
    seeds = sorted({j.overrides.get("seed", "0") for j in jobs})
    text = (
        f"# Sweep report: {sweep_dir}\n\nCommon overrides: {' '.join(common) or '(none)'}; seeds: {', '.join(seeds)}; "
        f"mean ± std (sample) over runs (seeds and replicas).\n\n{markdown_table(header, rows)}\n"
    )
    failed = [j for j in jobs if j.metrics is None]
    if failed:
        text += "\n## Failed jobs\n\n" + "\n".join(f"- `{j.directory.name}`: {j.error}" for j in failed) + "\n"
    (sweep_dir / "summary.md").write_text(text)
    with open(sweep_dir / "summary.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    if any(j.kind in ("cl", "train") for g in groups for j in g.finished()):
        _plot([g for g in groups if all(j.kind != "experiment" for j in g.finished())], sweep_dir / "summary.png")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``agentnet-report``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", nargs="?", default=None, help="a multirun directory (default: the newest under multirun/)")
    parser.add_argument(
        "--allow-failed",
        action="store_true",
        help="exit 0 even when the table lists failed jobs (by default such a report exits 1)",
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
