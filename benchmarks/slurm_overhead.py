"""What a SLURM submission costs against a local run, and what populations save on a cluster.

Needs a running SLURM cluster (``sudo examples/slurm_local.sh start`` gives a one-node one) and is
run from the repository root::

    python benchmarks/slurm_overhead.py [--repeats 3] [--json out.json]

Part 1, one job: the same tiny training run (``--run-args``) started three ways, interleaved
round-robin over ``--repeats``, medians shown —

- ``local``: ``agentnet <run args>`` (one process, no launcher);
- ``slurm``: ``agentnet -m hydra/launcher=slurm <run args>`` (one job through sbatch, submitit
  waiting for it), with the job's own ``wall_s`` from its ``metrics.json`` beside the command's;

the overhead is the difference of the commands' wall times.

Part 2, a strategies x seeds sweep through SLURM: ``strategy=bp,lfnn_local`` x 3 seeds as 6 jobs
(``seed=0,1,2``) against 2 jobs each training a 3-replica population (``replicas=3``) — the
same 6 trained networks (replica r of a population equals a single run with seed+r).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agentnet.tables import markdown_table  # noqa: E402

RUN_ARGS = "data.subset=5000 data.test_subset=1000 trainer.epochs=1 trainer.loggers=[] trainer.progress=false threads=1 device=cpu"
SLURM_ARGS = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=20"]


def _agentnet(args: list[str], cwd: Path) -> float:
    """Run ``python -m agentnet <args>`` in ``cwd``; return its wall time (raises with its output on failure)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "agentnet", *args], cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"agentnet {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return elapsed


def _job_wall(sweep: Path) -> list[float]:
    return [json.loads(p.read_text())["wall_s"] for p in sorted(sweep.glob("*/metrics.json"))]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run-args", default=RUN_ARGS, help="overrides of the timed training run")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if shutil.which("sbatch") is None or subprocess.run(["sinfo", "-h"], capture_output=True).returncode != 0:
        sys.exit("slurm_overhead: no SLURM cluster answers (sinfo failed); start one with: sudo examples/slurm_local.sh start")
    run_args = args.run_args.split()
    times: dict[str, list[float]] = {"local": [], "slurm": [], "slurm job's own wall_s": []}
    sweeps: dict[str, list[float]] = {"6 jobs (seed=0,1,2)": [], "2 jobs (replicas=3)": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for repeat in range(args.repeats):
            out = work / f"local{repeat}"
            times["local"].append(_agentnet([*run_args, f"output_dir={out}", f"hydra.run.dir={out}"], work))
            sweep = work / f"slurm{repeat}"
            times["slurm"].append(_agentnet(["-m", *SLURM_ARGS, *run_args, f"hydra.sweep.dir={sweep}"], work))
            times["slurm job's own wall_s"].extend(_job_wall(sweep))
            for label, extra in (("6 jobs (seed=0,1,2)", ["seed=0,1,2"]), ("2 jobs (replicas=3)", ["replicas=3"])):
                sweep = work / f"sweep{repeat}_{label.split()[0]}"
                sweeps[label].append(_agentnet(["-m", *SLURM_ARGS, *run_args, "strategy=bp,lfnn_local", *extra,
                                                f"hydra.sweep.dir={sweep}"], work))
            print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    rows = [[name, f"{m:.1f}"] for name, m in median.items()]
    rows.append(["overhead (slurm - local)", f"{median['slurm'] - median['local']:.1f}"])
    print(f"One job ({' '.join(run_args)}), medians of {args.repeats}:")
    print(markdown_table(["command", "wall s"], rows))
    sweep_median = {k: statistics.median(v) for k, v in sweeps.items()}
    print("\nstrategy=bp,lfnn_local x 3 seeds through SLURM:")
    print(markdown_table(["sweep", "wall s"], [[k, f"{v:.1f}"] for k, v in sweep_median.items()]))
    result = {"one_job": median, "sweep": sweep_median, "raw": {**times, **sweeps}, "run_args": run_args}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
