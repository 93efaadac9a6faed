"""Tuning throughput: trials per hour with populations against one process per trial.

For each rule, the same 8 learning rates (5-epoch trials of ``mlp_275k`` on a 10,000-example subset,
5,000 validation examples), three ways, side by side on this machine:

* ``population``: ``agentnet-tune`` asks the 8 trials at once and trains them as ONE population
  (one process, one batched model) — the process's whole time less its final stage;
* ``process``: one ``agentnet`` process per trial, as a launcher of one job per trial runs them
  (interpreter start, imports, data load and training, each time);
* ``sequential``: the 8 trials one after the other in one process (``tune.batch=1``), which
  separates what populations save from what a process start costs.

Prints a table of trials per hour and the population's speed-up over each; medians of ``--repeats``.
Target (issue: fair comparisons): population / process ≥ 2 for every rule, ≥ 3 for the local ones.

    python benchmarks/tune_throughput.py [--rules bp,lfnn,lfnn_local] [--repeats 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentnet.tables import markdown_table  # noqa: E402

BIN = Path(sys.executable).parent
TRIALS = 8
#: The 8 learning rates every way trains (a grid, so that all three do the same work).
RATES = [10 ** (-4 + 3 * i / (TRIALS - 1)) for i in range(TRIALS)]
PROTOCOL = ["model=mlp_275k", "data.subset=10000", "data.val_split=5000", "trainer.epochs=5", "trainer.progress=false",
            "trainer.loggers=[]", "trainer.checkpoint=false", "device=cpu"]


def tuned(rule: str, batch: int, threads: int, root: Path) -> float:
    out = root / f"{rule}-batch{batch}"
    grid = ",".join(f"{r:.6g}" for r in RATES)
    start = time.perf_counter()
    subprocess.run([str(BIN / "agentnet-tune"), f"strategy={rule}", *PROTOCOL, f"tune.trials={TRIALS}", f"tune.batch={batch}",
                    "tune.sampler=grid", f"tune.space={{trainer:{{lr:{{choice:[{grid}]}}}}}}", "tune.final_seeds=1",
                    f"threads={threads}", f"hydra.run.dir={out}"], check=True, capture_output=True)
    # the whole process (start, imports, data, study) less its final stage
    return time.perf_counter() - start - json.loads((out / "final" / "metrics.json").read_text())["wall_s"]


def processes(rule: str, threads: int, root: Path) -> float:
    start = time.perf_counter()
    for i, lr in enumerate(RATES):
        subprocess.run([str(BIN / "agentnet"), f"strategy={rule}", *PROTOCOL, f"trainer.lr={lr:.6g}", f"threads={threads}",
                        f"hydra.run.dir={root / f'{rule}-process-{i}'}"], check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", default="bp,lfnn,lfnn_local")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    rows = []
    for rule in args.rules.split(","):
        times: dict[str, list[float]] = {"population": [], "process": [], "sequential": []}
        for _ in range(args.repeats):
            root = Path(tempfile.mkdtemp(prefix="agentnet-throughput-"))
            try:
                times["population"].append(tuned(rule, TRIALS, args.threads, root))
                times["process"].append(processes(rule, args.threads, root))
                times["sequential"].append(tuned(rule, 1, args.threads, root))
            finally:
                shutil.rmtree(root, ignore_errors=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        per_hour = {k: 3600 * TRIALS / v for k, v in med.items()}
        target = 3.0 if rule != "bp" else 2.0
        ratio = med["process"] / med["population"]
        rows.append([rule, f"{per_hour['population']:.0f}", f"{per_hour['process']:.0f}", f"{per_hour['sequential']:.0f}",
                     f"{ratio:.2f}", f"{med['sequential'] / med['population']:.2f}", f"≥ {target:.0f}",
                     "yes" if ratio >= target else "**no**"])
        print(rule, {k: round(v, 1) for k, v in med.items()}, flush=True)
    header = ["rule", "trials/h population of 8", "trials/h one process per trial", "trials/h sequential, one process",
              "population / process", "population / sequential", "target", "met"]
    print(f"\nmachine: {platform.processor() or platform.machine()}, threads={args.threads}, repeats={args.repeats} (medians)")
    print(markdown_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
