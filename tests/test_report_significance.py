"""``agentnet-report`` significance: best group, tied / worse / untested marks (Welch or paired t-test,
Holm-corrected), ``--compare``, and the header's seeds, on sweep directories built as Hydra writes them."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from agentnet.sweep_report import (
    collect_jobs,
    compare,
    direction,
    group_jobs,
    holm,
    main,
    select_group,
    significance,
    write_report,
)


def _job(sweep: Path, num: int, overrides: list[str], metrics: dict, name: str = "metrics.json") -> None:
    """One job directory as a Hydra multirun leaves it: ``.hydra/overrides.yaml`` and the metrics file."""
    job = sweep / f"{num}_job"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / name).write_text(json.dumps(metrics))


def _train_metrics(errors: list[float], seeds: list[int], **extra: float) -> dict:
    """A single-run job's metrics.json: a population of ``len(errors)`` replicas (one seed each)."""
    replicas = [{"seed": s, "test_error": e, "train_error": e / 2} for s, e in zip(seeds, errors)]
    mean = float(np.mean(errors))
    return {"test_error": mean, "train_error": mean / 2, "wall_s": 318.44, "samples_per_s": 1000.0,
            "seed": seeds[0], "seeds": seeds, "replicas": replicas, **extra}


def _train_sweep(sweep: Path, groups: dict[str, list[float]], seeds: dict[str, list[int]] | None = None,
                 per_seed_jobs: bool = False) -> Path:
    """Groups ``strategy=<name>``, each either one job whose replicas are the runs, or (``per_seed_jobs``)
    one job per seed (``seed=<s>`` override, one run each), as ``seed=0,1,2`` sweeps make them."""
    num = 0
    for name, errors in groups.items():
        group_seeds = (seeds or {}).get(name, list(range(len(errors))))
        if per_seed_jobs:
            for s, e in zip(group_seeds, errors):
                _job(sweep, num, [f"strategy={name}", f"seed={s}"], _train_metrics([e], [s]))
                num += 1
        else:
            _job(sweep, num, [f"strategy={name}"], _train_metrics(errors, group_seeds))
            num += 1
    return sweep


def _marks(sweep: Path, column: str = "test_error"):
    return significance(group_jobs(collect_jobs(sweep)), column)


def _csv(sweep: Path) -> dict[str, dict[str, str]]:
    with open(sweep / "summary.csv", newline="") as fh:
        return {row["group"]: row for row in csv.DictReader(fh)}


def _table(text: str) -> dict[str, list[str]]:
    """The cells of the report's summary table (its first table), by group label."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| group |"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


def _normals(mean: float, seed: int, n: int = 5, sd: float = 0.1) -> list[float]:
    return [float(v) for v in np.random.default_rng(seed).normal(mean, sd, n)]


def test_direction_of_each_metric():
    assert [direction(c) for c in ("ACC", "BWT", "FWT", "val_ACC", "val_acc", "test_acc")] == [1] * 6
    assert [direction(c) for c in ("forgetting", "test_error", "train_error", "val_error", "train_loss")] == [-1] * 5
    assert direction("wall_s") is None and direction("samples_per_s") is None


def test_a_real_difference_is_detected_and_marked(tmp_path):
    """Means 1.0 and 2.0 (sd 0.1, 5 seeds): the lower test error is best, the other worse with p < 0.05,
    bold only for the best in summary.md, and spelled out in summary.csv."""
    sweep = _train_sweep(tmp_path / "sweep", {"bp": _normals(1.0, 1), "lfnn": _normals(2.0, 2)})
    marks = _marks(sweep)
    assert marks["strategy=bp"].status == "best"
    worse = marks["strategy=lfnn"]
    assert worse.status == "worse" and worse.p_adjusted < 0.05
    assert worse.comparison.diff == pytest.approx(np.mean(_normals(2.0, 2)) - np.mean(_normals(1.0, 1)))
    assert worse.comparison.ci_low > 0  # lfnn − bp: the interval excludes 0, as p < 0.05 says

    text = write_report(sweep)
    rows = _table(text)  # group, jobs, failed, runs, test_error, train_error, ...
    assert rows["strategy=bp"][4].startswith("**") and rows["strategy=bp"][4].endswith("**")
    assert "**" not in rows["strategy=lfnn"][4]
    assert "bold: the best group of each column and the groups not distinguishable from it" in text
    assert "Holm-corrected over the comparisons with the best, α = 0.05); n = runs per group" in text
    assert "## Significance: test_error" in text
    table = _csv(sweep)
    assert table["strategy=bp"]["test_error vs best"] == "best"
    assert table["strategy=lfnn"]["test_error vs best"].startswith("worse (p=")
    assert "**" not in (sweep / "summary.csv").read_text()  # bold is Markdown only
    assert "wall_s vs best" not in table["strategy=bp"] and "samples_per_s vs best" not in table["strategy=bp"]


def test_identical_groups_are_tied(tmp_path):
    values = [1.0, 1.1, 0.9, 1.05, 0.95]
    sweep = _train_sweep(tmp_path / "sweep", {"bp": values, "lfnn": list(values)})
    marks = _marks(sweep)
    assert marks["strategy=bp"].status == "best"  # a tie for best goes to the first group
    assert marks["strategy=lfnn"].status == "tied" and marks["strategy=lfnn"].p_adjusted == pytest.approx(1.0)
    write_report(sweep)
    assert _csv(sweep)["strategy=lfnn"]["test_error vs best"] == "tied (p=1)"


def test_constant_groups_tie_when_equal_and_differ_otherwise(tmp_path):
    """No spread at all leaves the t statistic undefined: equal constants are tied, different ones differ."""
    sweep = _train_sweep(tmp_path / "sweep", {"bp": [1.0] * 3, "same": [1.0] * 3, "other": [2.0] * 3})
    marks = _marks(sweep)
    assert (marks["strategy=bp"].status, marks["strategy=same"].status, marks["strategy=other"].status) == ("best", "tied", "worse")
    c = compare([1.0] * 3, [2.0] * 3)
    assert (c.diff, c.ci_low, c.ci_high, c.p, c.paired) == (-1.0, -1.0, -1.0, 0.0, False)


def test_close_group_tied_far_group_worse(tmp_path):
    sweep = _train_sweep(tmp_path / "sweep", {"bp": _normals(1.0, 3), "close": _normals(1.02, 4), "far": _normals(2.0, 5)})
    marks = _marks(sweep)
    assert marks["strategy=bp"].status == "best"
    assert marks["strategy=close"].status == "tied" and marks["strategy=close"].p_adjusted >= 0.05
    assert marks["strategy=far"].status == "worse" and marks["strategy=far"].p_adjusted < 0.05
    text = write_report(sweep)
    assert [label for label, cells in _table(text).items() if "**" in cells[4]] == ["strategy=bp", "strategy=close"]


def test_paired_when_groups_share_seeds_welch_otherwise(tmp_path):
    """Same seeds, each once: pairs by seed (the second group's jobs are written in another seed order,
    so pairing by position would give another p); different seeds: Welch."""
    a = {0: 1.00, 1: 1.20, 2: 0.90, 3: 1.10}
    b = {0: 1.05, 1: 1.22, 2: 0.97, 3: 1.12}  # each seed a little worse: clear only when paired
    order_b = [2, 0, 3, 1]
    sweep = _train_sweep(tmp_path / "paired", {"bp": list(a.values()), "lfnn": [b[s] for s in order_b]},
                         seeds={"bp": list(a), "lfnn": order_b}, per_seed_jobs=True)
    mark = _marks(sweep)["strategy=lfnn"]
    assert mark.comparison.paired
    expected = stats.ttest_rel([b[s] for s in a], list(a.values())).pvalue
    assert mark.comparison.p == pytest.approx(expected)
    assert mark.status == "worse"
    assert stats.ttest_ind(list(b.values()), list(a.values()), equal_var=False).pvalue > 0.05  # Welch would not see it
    assert "paired t-test" in write_report(sweep)

    sweep = _train_sweep(tmp_path / "welch", {"bp": list(a.values()), "lfnn": list(b.values())},
                         seeds={"bp": [0, 1, 2, 3], "lfnn": [4, 5, 6, 7]}, per_seed_jobs=True)
    mark = _marks(sweep)["strategy=lfnn"]
    assert not mark.comparison.paired
    assert mark.comparison.p == pytest.approx(stats.ttest_ind(list(b.values()), list(a.values()), equal_var=False).pvalue)
    assert mark.status == "tied"
    text = write_report(sweep)
    assert "Welch's t-test" in text and "paired t-test" not in text


def test_a_repeated_seed_is_not_paired():
    c = compare([1.0, 1.1, 1.2], [1.3, 1.4, 1.6], seeds_a=[0, 0, 1], seeds_b=[0, 0, 1])
    assert not c.paired


def test_holm_matches_a_hand_computed_example():
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> running max 0.06)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1, and kept monotone
    assert holm([0.2]) == [0.2] and holm([]) == []


def test_significance_applies_holm_over_the_comparisons_with_the_best(tmp_path):
    sweep = _train_sweep(tmp_path / "sweep", {"bp": _normals(1.0, 6), "a": _normals(1.1, 7), "b": _normals(1.3, 8),
                                              "c": _normals(1.05, 9)})
    marks = _marks(sweep)
    others = [label for label, m in marks.items() if m.status != "best"]
    raw = [marks[label].comparison.p for label in others]
    assert [marks[label].p_adjusted for label in others] == pytest.approx(holm(raw))
    assert len(others) == 3 and max(marks[label].p_adjusted for label in others) <= 1.0
    assert sorted(marks[label].p_adjusted for label in others)[0] == pytest.approx(3 * min(raw))


def test_compare_welch_interval_by_hand():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0]
    c = compare(a, b)
    va, vb = (5 / 3) / 4, 4.0 / 3  # sample variances 5/3 and 4, over n
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert (c.n_a, c.n_b, c.paired) == (4, 3, False)
    assert c.diff == pytest.approx(-1.5)
    assert (c.ci_low, c.ci_high) == pytest.approx((-1.5 - half, -1.5 + half))
    assert c.p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)


def test_compare_paired_interval_by_hand():
    a, b = [1.0, 2.0, 3.0], [1.5, 2.1, 3.7]
    c = compare(a, b, [0, 1, 2], [0, 1, 2])
    d = [-0.5, -0.1, -0.7]
    half = stats.t.ppf(0.975, 2) * np.std(d, ddof=1) / math.sqrt(3)
    assert c.paired and c.diff == pytest.approx(np.mean(d))
    assert (c.ci_low, c.ci_high) == pytest.approx((np.mean(d) - half, np.mean(d) + half))
    assert c.p == pytest.approx(stats.ttest_rel(a, b).pvalue)
    untested = compare([1.0], [2.0, 3.0])
    assert not untested.tested and math.isnan(untested.ci_low)


def test_compare_cli_prints_difference_and_interval(tmp_path, capsys):
    sweep = _train_sweep(tmp_path / "sweep", {"bp": _normals(1.0, 1), "lfnn": _normals(2.0, 2)})
    assert main([str(sweep), "--compare", "strategy=bp", "strategy=lfnn"]) == 0
    out = capsys.readouterr().out
    c = compare(_normals(1.0, 1), _normals(2.0, 2), list(range(5)), list(range(5)))
    line = next(line for line in out.splitlines() if line.startswith("| test_error"))
    assert f"{c.diff:+.2f}" in line and f"[{c.ci_low:+.2f}, {c.ci_high:+.2f}]" in line and "paired" in line
    assert "A: strategy=bp" in out and "B: strategy=lfnn" in out
    assert any(line.startswith("| train_error") for line in out.splitlines())
    assert not any(line.startswith(("| wall_s", "| samples_per_s")) for line in out.splitlines())
    assert not (sweep / "summary.md").exists()  # --compare only prints


def test_compare_cli_errors_on_unknown_or_ambiguous_group(tmp_path):
    sweep = tmp_path / "sweep"
    for num, (strategy, method) in enumerate((s, m) for s in ("bp", "lfnn") for m in ("ewc", "si")):
        _job(sweep, num, [f"strategy={strategy}", f"cl={method}"], {
            "ACC": 0.5 + 0.01 * num, "BWT": -0.1, "FWT": 0.0, "forgetting": 0.1, "wall_s": 1.0,
            "acc_matrix": [[0.1, 0.1], [0.9, 0.1], [0.8, 0.9]]}, name="cl_metrics.json")

    def run(*selectors: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "agentnet.sweep_report", str(sweep), "--compare", *selectors],
                              capture_output=True, text=True, timeout=120)

    proc = run("cl=ewc strategy=bp", "strategy=attention")
    assert proc.returncode == 2 and "'strategy=attention' matches no group" in proc.stderr
    assert "cl=ewc strategy=bp" in proc.stderr and "cl=si strategy=lfnn" in proc.stderr  # the labels to choose from
    proc = run("strategy=bp", "strategy=lfnn")  # each names two groups here
    assert proc.returncode == 2 and "matches 2 groups" in proc.stderr
    proc = run("strategy=bp cl=ewc", "cl=ewc strategy=lfnn")  # tokens in any order, or the label itself
    assert proc.returncode == 0, proc.stderr
    assert "A: cl=ewc strategy=bp" in proc.stdout and "ACC (%)" in proc.stdout and "untested (n<2)" in proc.stdout
    groups = group_jobs(collect_jobs(sweep))
    assert select_group(groups, "cl=si strategy=lfnn").label == "cl=si strategy=lfnn"


def test_one_run_group_is_untested_and_shows_no_spread(tmp_path):
    sweep = _train_sweep(tmp_path / "sweep", {"bp": _normals(1.0, 1), "lfnn": _normals(1.5, 2), "solo": [1.2]})
    marks = _marks(sweep)
    assert marks["strategy=solo"].status == "untested" and str(marks["strategy=solo"]) == "untested (n<2)"
    text = write_report(sweep)
    solo = _table(text)["strategy=solo"]
    assert "± 0.00" not in text
    assert solo[4] == "1.20" and "318.44" in solo and not any("**" in c for c in solo)
    assert _csv(sweep)["strategy=solo"]["test_error vs best"] == "untested (n<2)"
    # a sweep where every group has one run: nothing is tested, nothing crashes or is bold
    single = _train_sweep(tmp_path / "single", {"bp": [1.0], "lfnn": [2.0]})
    text = write_report(single)
    assert "**" not in text and "nothing was tested" in text
    assert {row["test_error vs best"] for row in _csv(single).values()} == {"untested (n<2)"}


def test_header_lists_the_seeds_of_the_replicas(tmp_path):
    """Jobs run as populations of seeds 0, 1, 2 (their own ``seed`` is 0, no seed override)."""
    sweep = _train_sweep(tmp_path / "sweep", {"bp": [1.0, 1.1, 0.9], "lfnn": [1.3, 1.2, 1.4]})
    assert "seeds: 0, 1, 2;" in write_report(sweep)
    per_seed = _train_sweep(tmp_path / "per_seed", {"bp": [1.0, 1.1], "lfnn": [1.3, 1.2]},
                            seeds={"bp": [3, 10], "lfnn": [3, 10]}, per_seed_jobs=True)
    assert "seeds: 3, 10;" in write_report(per_seed)  # numeric order, from the runs


def test_cl_sweep_marks_acc_higher_is_better_and_validation_when_present(tmp_path):
    sweep = tmp_path / "sweep"
    for num, (strategy, acc) in enumerate((("bp", 0.9), ("lfnn", 0.6))):
        reps = [{"seed": s, "ACC": acc + 0.01 * s, "BWT": -0.1 - 0.01 * s, "FWT": 0.0, "forgetting": 0.1 + 0.02 * s,
                 "val_ACC": acc - 0.01 * s} for s in range(3)]
        _job(sweep, num, [f"strategy={strategy}"], {
            "ACC": acc + 0.01, "BWT": -0.11, "FWT": 0.0, "forgetting": 0.12, "val_ACC": acc - 0.01, "wall_s": 1.0,
            "seed": 0, "acc_matrix": [[0.1, 0.1], [0.9, 0.1], [0.8, acc]], "replicas": reps}, name="cl_metrics.json")
    text = write_report(sweep)
    table = _csv(sweep)
    assert table["strategy=bp"]["ACC vs best"] == "best" and table["strategy=lfnn"]["ACC vs best"].startswith("worse")
    assert table["strategy=bp"]["val_ACC vs best"] == "best"
    assert "## Significance: ACC (%)" in text and "**91.00 ± 1.00**" in text
    assert (sweep / "summary.png").is_file()
    # without validation metrics the column is simply absent
    plain = _train_sweep(tmp_path / "plain", {"bp": [1.0, 1.1], "lfnn": [1.3, 1.2]})
    write_report(plain)
    assert "val_error vs best" not in _csv(plain)["strategy=bp"]


def test_plot_hatches_the_best_and_tied_bars():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from agentnet.sweep_report import Mark, _mark_bars

    fig, ax = plt.subplots()
    bars = ax.bar(range(4), [1.0, 1.1, 2.0, 1.5])
    _mark_bars(ax, bars, [1.1, 1.2, 2.1, 1.6],
               [Mark("best"), Mark("tied", 0.4), Mark("worse", 0.001), Mark("untested", reason="n<2")])
    assert [b.get_hatch() for b in bars] == ["//", "//", None, None]
    assert sorted(t.get_text() for t in ax.texts) == ["=", "★"]
    plt.close(fig)
