"""Tuned comparisons: every rule tuned with the same budget on validation data, then retrained with
fresh seeds and tested once, beside the same rules at today's shared defaults (docs/benchmarks.md,
"Tuned comparisons"; the protocol in docs/comparing.md).

One command per comparison::

    python benchmarks/tuned_comparison.py table1_mlp       # Table 1 rules on mlp_275k (10k examples, 4 epochs)
    python benchmarks/tuned_comparison.py table1_mlp_full  # bp, lfnn, lfnn_local tuned as above, final on 20 epochs
    python benchmarks/tuned_comparison.py table1_cnn       # bp, lfnn, lfnn_local on cnn_mnist_275k
    python benchmarks/tuned_comparison.py pmnist_online    # bp, lfnn, lfnn_local, attention x none, ewc, si, agem

Each runs two Hydra multiruns and joins them into one Markdown table:

* ``agentnet-tune -m strategy=...`` (one study per rule: ``--trials`` trials asked ``--batch`` at a
  time, each batch one population, on the same validation split; the learning rate and the rule's
  and method's own ``search_space``), whose final stage retrains the best setting with seeds
  ``100 ..`` and evaluates the test set once;
* ``agentnet -m strategy=... seed=100 replicas=N``: the same protocol at the shared defaults, the
  same seeds (so the two pair by seed).

The table gives mean ± std over the final seeds, the significance of every tuned rule against
``bp`` and ``lfnn_local`` (paired t-tests on the shared seeds, Holm-corrected per reference) and
the best setting. Sweeps go to ``outputs/tuned/<comparison>/{tuned,untuned}``; running the command
again continues the studies (finished trials are kept).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentnet.sweep_report import collect_jobs, compare, group_jobs, group_runs, holm  # noqa: E402
from agentnet.tables import markdown_table  # noqa: E402

BIN = Path(sys.executable).parent
#: The LFNN paper's Table 1 (test error %, MNIST, about 275K parameters).
PAPER = {"bp": 2.01, "lfnn": 1.18, "lfnn_local": 1.49, "fa": 2.82, "lg_bp": 2.43, "fg_w": 9.25, "lg_fg_w": 9.25,
         "fg_a": 3.24, "lg_fg_a": 3.24}

#: Every rule with its own update (attention's default `exact` mode is bp's update bit for bit).
FORGET_RULES = "bp,lfnn,lfnn_local,fa,dfa,lg_bp,predsim,pepita,ff,fg_w,fg_a,lg_fg_w,lg_fg_a"

#: name -> swept overrides, shared overrides, agentnet-tune's own, the untuned runs' own, the metric
COMPARISONS = {
    "table1_mlp": dict(
        swept=["strategy=bp,lfnn,lfnn_local,attention,fa,lg_bp,fg_w,fg_a,lg_fg_w,lg_fg_a"],
        shared=["model=mlp_275k", "data.subset=10000", "data.val_split=5000", "trainer.epochs=4"],
        tune=[], untuned=[], metric="test_error",
    ),
    # Tuned on the short schedule above (10,000 examples, 4 epochs), then the paper's full schedule
    # (20 epochs, every training example but the 5,000 held out) for the final seeds and the untuned runs.
    # Issue 35's rules beside bp and fa on the same protocol, seeds and sampler as table1_mlp.
    "new_rules_mlp": dict(
        swept=["strategy=bp,fa,dfa,pepita,predsim,ff"],
        shared=["model=mlp_275k", "data.subset=10000", "data.val_split=5000", "trainer.epochs=4"],
        tune=[], untuned=[], metric="test_error",
    ),
    # Each new rule beside bp on the rule's own paper network (same short protocol; ``paper``: the
    # paper's test error on that network at its full schedule).
    **{f"paper_{rule}": dict(
        swept=[f"strategy=bp,{rule}"],
        shared=[f"model={preset}", "data.subset=10000", "data.val_split=5000", f"trainer.epochs={epochs}", *extra],
        tune=[], untuned=[], metric="test_error", paper=paper,
    ) for rule, preset, epochs, paper, extra in (
        ("dfa", "mlp_dfa", 4, {"dfa": 1.45}, []),          # 2 x 800 tanh, with dropout in the paper
        ("pepita", "mlp_pepita", 4, {"pepita": 2.0}, []),  # "about 98 %" accuracy, 100 epochs
        ("predsim", "mlp_predsim", 4, {"predsim": 0.62, "bp": 0.75}, []),  # 100 epochs, jitter
        # 60 epochs in the paper; 13.6 M parameters. FF's running training accuracy is a pass per class
        # (3x its step here): every rule of the comparison skips it alike (nothing learned changes).
        ("ff", "mlp_ff", 4, {"ff": 1.36}, ["trainer.train_accuracy=false"]),
    )},
    "table1_mlp_full": dict(
        swept=["strategy=bp,lfnn,lfnn_local"],
        shared=["model=mlp_275k", "data.val_split=5000"],
        tune=["data.subset=10000", "trainer.epochs=4", "tune.final={trainer:{epochs:20},data:{subset:null}}"],
        untuned=["trainer.epochs=20"], metric="test_error",
    ),
    "table1_cnn": dict(
        swept=["strategy=bp,lfnn,lfnn_local"],
        shared=["model=cnn_mnist_275k", "data.subset=5000", "data.val_split=2000", "trainer.epochs=3"],
        tune=[], untuned=[], metric="test_error",
    ),
    # Which rules forget less (issue 35 item 3): every rule without a CL method, tuned with the same
    # budget on the continual validation ACC; the table adds forgetting, BWT and learning accuracy.
    # attention (`exact` mode) is left out: bit-identical to bp. No untuned runs (None).
    "forget_pmnist": dict(
        swept=[f"strategy={FORGET_RULES}", "cl=none"],
        shared=["benchmark=pmnist_quick", "data.subset=10000", "data.val_split=5000"],
        tune=[], untuned=None, metric="ACC", paper={}, forgetting=True,
    ),
    "forget_split": dict(
        swept=[f"strategy={FORGET_RULES}", "cl=none"],
        shared=["benchmark=split_mnist", "data.val_split=5000"],
        tune=[], untuned=None, metric="ACC", paper={}, forgetting=True,
    ),
    "pmnist_online": dict(
        swept=["strategy=bp,lfnn,lfnn_local,attention", "cl=none,ewc,si,agem"],
        shared=["benchmark=pmnist_online", "data.val_split=2000"],
        tune=[], untuned=[], metric="ACC", paper={},
    ),
}


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=False)  # failed jobs are listed in the table, not fatal


def label_of(group) -> str:
    """``<strategy> <the other swept values>``: the rule first, then what it is combined with."""
    values = dict(group.key)
    return " ".join([values.pop("strategy", "-"), *values.values()])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("comparison", choices=sorted(COMPARISONS))
    parser.add_argument("--trials", type=int, default=16, help="trials per rule (the tuning budget)")
    parser.add_argument("--batch", type=int, default=8, help="trials per population")
    parser.add_argument("--seeds", type=int, default=3, help="final seeds (100, 101, ...)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel Hydra jobs (threads: 1 each)")
    parser.add_argument("--out", default="outputs/tuned")
    parser.add_argument("--report-only", action="store_true", help="only join the sweeps already run")
    parser.add_argument("--rules", help="train only these strategies (comma-separated) into the comparison's sweeps, "
                        "e.g. to add a rule or redo a failed one; the table joins every rule trained so far")
    args = parser.parse_args(argv)
    spec = dict(COMPARISONS[args.comparison])
    if args.rules:
        spec["swept"] = [f"strategy={args.rules}" if s.startswith("strategy=") else s for s in spec["swept"]]
    metric = spec["metric"]
    out = Path(args.out) / args.comparison
    common = [*spec["swept"], *spec["shared"], "trainer.progress=false", "threads=1", f"hydra.launcher.n_jobs={args.jobs}"]
    if not args.report_only:
        run([str(BIN / "agentnet-tune"), "-m", *common, *spec["tune"], f"tune.trials={args.trials}", f"tune.batch={args.batch}",
             f"tune.final_seeds={args.seeds}", f"hydra.sweep.dir={out / 'tuned'}"])
        if spec["untuned"] is not None:
            run([str(BIN / "agentnet"), "-m", *common, *spec["untuned"], "seed=100", f"replicas={args.seeds}",
                 f"hydra.sweep.dir={out / 'untuned'}"])
    table = join(out, metric, args, spec)
    if spec.get("forgetting"):
        table += "\n" + forgetting_table(out / "tuned", out / "forgetting.png", args.comparison)
    print(table)
    (out / "table.md").write_text(table)
    return 0


def _groups(directory: Path):
    jobs = collect_jobs(directory) if directory.is_dir() else []
    return {label_of(g): g for g in group_jobs(jobs)} if jobs else {}


def _cell(values: list[float], scale: float) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    return f"{mean:.2f} ± {statistics.stdev(values) * scale:.2f}" if len(values) > 1 else f"{mean:.2f}"


def _failure(group) -> str:
    """Why a group has no runs: a diverged loss, or the last line of its error."""
    errors = [j.error or "" for j in group.jobs if j.metrics is None]
    if any("non-finite" in e for e in errors):
        return "diverged (non-finite loss)"
    return "failed: " + (errors[0].splitlines()[-1][:60] if errors and errors[0] else "no metrics")


def join(out: Path, metric: str, args, spec: dict) -> str:
    """The table of one comparison from its two sweeps."""
    tuned, untuned = _groups(out / "tuned"), _groups(out / "untuned")
    scale = 100.0 if metric == "ACC" else 1.0
    unit = f"{metric} (%)"
    refs = [r for r in ("bp", "lfnn_local") if any(label.split()[0] == r for label in tuned)]
    # Holm over the rules compared with one reference, per reference and combination (e.g. cl method).
    tests: dict[tuple[str, str], tuple[float, float]] = {}
    for ref in refs:
        for label, group in tuned.items():
            ref_label = " ".join([ref, *label.split()[1:]])
            if label == ref_label or ref_label not in tuned:
                continue
            a, sa = group_runs(group, metric)
            b, sb = group_runs(tuned[ref_label], metric)
            c = compare(a, b, sa, sb)
            if c.tested:  # a failed job or a single run is not tested (and not in Holm's family)
                tests[(label, ref)] = (c.p, c.diff * scale)
    for ref in refs:
        for rest in {tuple(k[0].split()[1:]) for k in tests if k[1] == ref}:
            keys = [k for k in tests if k[1] == ref and tuple(k[0].split()[1:]) == rest]
            for k, adjusted in zip(keys, holm([tests[k][0] for k in keys])):
                tests[k] = (adjusted, tests[k][1])
    paper = spec.get("paper", PAPER)
    both = bool(untuned)  # without an untuned sweep (a study of tuned rules only) its columns are left out
    header = ["rule", *(["paper"] if paper else []), *([f"untuned {unit}"] if both else []), f"tuned {unit}",
              *(["tuned − untuned (p)"] if both else []), *(f"vs {r} (Holm p)" for r in refs), "best setting (validation)"]
    rows = []
    order = ["bp", "lfnn", "lfnn_local", "attention"]
    for label in sorted(set(tuned) | set(untuned),
                        key=lambda l: (l.split()[1:], order.index(l.split()[0]) if l.split()[0] in order else 9, l)):
        t = tuned.get(label)
        u = untuned.get(label)
        tv, ts = group_runs(t, metric) if t else ([], [])
        uv, us = group_runs(u, metric) if u else ([], [])
        effect = compare(tv, uv, ts, us) if tv and uv else None
        eff = "-" if effect is None or not effect.tested else f"{effect.diff * scale:+.2f} (p={effect.p:.3g})"
        sig = []
        for ref in refs:
            if (label, ref) in tests:
                p, d = tests[(label, ref)]
                sig.append(f"{d:+.2f} ({'p=' + format(p, '.3g') if p == p else 'untested'}{', tied' if p == p and p >= 0.05 else ''})")
            elif label.split()[0] == ref:
                sig.append("—")
            else:
                sig.append("untested")
        tuned_setting = ""
        if t:
            done = [j for j in t.finished() if "tuned" in j.metrics]
            if done:
                tuned_setting = " ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                                         for k, v in done[0].metrics["tuned"].items())
                diverged = done[0].metrics.get("diverged_seeds")
                if diverged:
                    tuned_setting += f"; seed(s) {diverged} diverged (mean of the others)"
            failed = [j for j in t.jobs if j.metrics is None]
            if failed:
                tuned_setting += f" FAILED: {failed[0].error.splitlines()[-1][:80]}"
        rule = label.split()[0]
        untuned_cells = [_cell(uv, scale) if uv or u is None else _failure(u)] if both else []
        rows.append([label, *([f"{paper[rule]:.2f}" if rule in paper else "-"] if paper else []),
                     *untuned_cells, _cell(tv, scale), *([eff] if both else []), *sig, tuned_setting])
    budget = (f"Budget per rule: {args.trials} trials ({args.batch} per population) on the validation split, "
              f"then {args.seeds} fresh seeds (100..{99 + args.seeds}) at the best setting; untuned: the same seeds "
              "at the shared defaults. Significance: paired t-tests on the shared seeds, Holm-corrected over the rules "
              "compared with each reference; 'tied' = not distinguishable at α = 0.05.")
    return f"{markdown_table(header, rows)}\n\n{budget}\n"


#: The forgetting table's columns: the metric (``learning``: mean learning accuracy) -> its title.
FORGET_COLUMNS = {"ACC": "ACC", "forgetting": "forgetting", "learning": "learning accuracy", "BWT": "BWT"}


def _replica_values(group, column: str) -> tuple[list[float], list]:
    """Each final run's value of ``column`` and its seed; ``learning`` is the mean over tasks of
    ``learning_acc`` (each task's accuracy right after it was learned)."""
    values, seeds = [], []
    for job in group.finished():
        replicas = job.metrics.get("replicas") or [job.metrics]
        for seed, r in zip(job.run_seeds(), replicas):
            v = statistics.fmean(r["learning_acc"]) if column == "learning" else r.get(column)
            if isinstance(v, (int, float)):
                values.append(float(v))
                seeds.append(seed)
    return values, seeds


def forgetting_table(sweep: Path, plot: Path, title: str) -> str:
    """Which rules forget less than bp, and why: ACC, forgetting, learning accuracy and BWT of each
    tuned rule's final seeds, each rule against bp (paired by seed, Holm-corrected over the rules per
    column), and a plot of forgetting against learning accuracy (``plot``)."""
    groups = {label.split()[0]: g for label, g in _groups(sweep).items()}
    if "bp" not in groups:
        return "(no bp row: nothing to compare with)\n"
    data = {rule: {c: _replica_values(g, c) for c in FORGET_COLUMNS} for rule, g in groups.items()}
    tests: dict[tuple[str, str], tuple[float, float]] = {}
    for column in FORGET_COLUMNS:
        keys, ps = [], []
        for rule in data:
            if rule == "bp":
                continue
            (a, sa), (b, sb) = data[rule][column], data["bp"][column]
            c = compare(a, b, sa, sb)
            if c.tested:
                keys.append(rule)
                ps.append(c.p)
                tests[(rule, column)] = (c.p, c.diff)
        for rule, adjusted in zip(keys, holm(ps)):
            tests[(rule, column)] = (adjusted, tests[(rule, column)][1])
    header = ["rule", *(f"{t} (%)" for t in FORGET_COLUMNS.values()), "forgetting vs bp (Holm p)",
              "learning accuracy vs bp (Holm p)", "ACC vs bp (Holm p)"]
    rows = []
    for rule in sorted(data, key=lambda r: statistics.fmean(data[r]["forgetting"][0]) if data[r]["forgetting"][0] else 1e9):
        cells = [_cell(data[rule][c][0], 100.0) for c in FORGET_COLUMNS]
        sig = []
        for column in ("forgetting", "learning", "ACC"):
            if rule == "bp":
                sig.append("—")
            elif (rule, column) in tests:
                p, d = tests[(rule, column)]
                sig.append(f"{100 * d:+.2f} (p={p:.3g}{', tied' if p >= 0.05 else ''})")
            else:
                sig.append("untested")
        rows.append([rule, *cells, *sig])
    _forgetting_plot(data, tests, plot, title)
    return (f"{markdown_table(header, rows)}\n\nForgetting: the mean over the earlier tasks of (best accuracy a task had) − "
            "(its final accuracy); learning accuracy: the mean over tasks of each task's accuracy right after it was "
            f"learned; rows sorted by forgetting. Plot: {plot}\n")


def _forgetting_plot(data: dict, tests: dict, path: Path, title: str) -> None:
    """Forgetting against learning accuracy, one point per rule (mean ± std over seeds); a rule whose
    forgetting differs significantly from bp's is drawn filled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for rule, columns in data.items():
        (fx, _), (lx, _) = columns["forgetting"], columns["learning"]
        if not fx or not lx:
            continue
        sig = rule == "bp" or tests.get((rule, "forgetting"), (1.0, 0.0))[0] < 0.05
        x, y = 100 * statistics.fmean(lx), 100 * statistics.fmean(fx)
        ax.errorbar(x, y, xerr=100 * statistics.pstdev(lx), yerr=100 * statistics.pstdev(fx), fmt="o",
                    color="black" if rule == "bp" else None, mfc=None if sig else "white", capsize=2)
        ax.annotate(rule, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("learning accuracy (%): each task right after it was learned")
    ax.set_ylabel("forgetting (%)")
    ax.set_title(f"{title}: forgetting vs learning (filled: differs from bp, Holm p < 0.05)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
