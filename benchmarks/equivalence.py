"""Nothing moved: the same runs, before and after a refactoring, give bit-identical results.

Runs a fixed set of short jobs of one checkout (``--repo``, default this one) through its own CLI —
the main job's protocol with ``bp``, short continual runs with ``ewc`` and with ``replay``, a 1-epoch
``lfnn_local`` conv run, the env's all-ones episode against the trainer — and writes each result,
stripped of wall-clock fields, to ``<out>/<case>.json``. ``--compare A B`` then says, case by case,
whether two such directories are identical (and where they first differ).

    python benchmarks/equivalence.py --repo /tmp/before --out /tmp/eq/before
    python benchmarks/equivalence.py --out /tmp/eq/after
    python benchmarks/equivalence.py --compare /tmp/eq/before /tmp/eq/after [--new-fields model.align_from]

Exact figures differ between CPU models: compare two directories written on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: case -> (CLI overrides, the result file it writes)
CASES: dict[str, tuple[list[str], str]] = {
    "pmnist_quick_bp": (["benchmark=pmnist_quick", "strategy=bp", "replicas=3"], "cl_metrics.json"),
    "continual_ewc": (["benchmark=pmnist_quick", "benchmark.num_tasks=3", "data.subset=3000", "strategy=lfnn", "cl=ewc"],
                      "cl_metrics.json"),
    "continual_replay": (["benchmark=pmnist_quick", "benchmark.num_tasks=3", "data.subset=3000", "strategy=lfnn_local",
                          "cl=replay"], "cl_metrics.json"),
    "cnn_lfnn_local": (["strategy=lfnn_local", "model=cnn_mnist_275k", "trainer.epochs=1", "data.subset=2000",
                        "data.test_subset=2000"], "metrics.json"),
    "val_best_lfnn": (["strategy=lfnn", "model=mlp_100x2", "trainer.epochs=3", "data.subset=3000", "data.val_split=500",
                       "trainer.select=best_val", "replicas=2"], "metrics.json"),
}

#: The env's all-ones episode and the trainer on the same data: parameters and test evaluation of both.
ENV_CASE = r"""
import hashlib, json, sys
import numpy as np, torch
from envs import neural_collective_v0 as nc
out = {}
for strategy in ["bp", "lfnn", "lfnn_local", "attention", "fa"]:
    par = nc.parallel_env(strategy=strategy, hidden=(20, 20), data_subset=640, batch_size=64, max_cycles=10_000,
                          data_root=sys.argv[1])
    par.reset(seed=3)
    while par.agents:
        par.step({a: np.ones(1, np.float32) for a in par.agents})
    digest = hashlib.sha256()
    for p in par.model.parameters():
        digest.update(p.detach().cpu().numpy().tobytes())
    out[strategy] = {"params": digest.hexdigest(), "test": par.trainer.evaluate(par.data.test)}
print(json.dumps(out))
"""

#: Keys whose values are wall-clock measurements (or where a run happened), not results.
TIMING = {"wall_s", "samples_per_s", "epoch_s", "task_seconds", "train_seconds", "seconds", "task_s", "output_dir"}


def strip(value):
    """``value`` without wall-clock fields, recursively."""
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in TIMING and not k.endswith("_seconds")}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def run_cases(repo: Path, out: Path, data: str, only: list[str] | None) -> None:
    """Run every case of ``repo`` and write its stripped result to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(repo), "AGENTNET_DATA": data}
    for name, (overrides, result) in CASES.items():
        if only and name not in only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "agentnet", *overrides, "threads=1", "trainer.progress=false",
                   f"data.root={data}", f"hydra.run.dir={tmp}/run"]
            print(name, ":", " ".join(cmd[3:]), flush=True)
            subprocess.run(cmd, cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL)
            metrics = json.loads((Path(tmp) / "run" / result).read_text())
        (out / f"{name}.json").write_text(json.dumps(strip(metrics), indent=1, sort_keys=True))
    if not only or "env_all_ones" in only:
        print("env_all_ones", flush=True)
        proc = subprocess.run([sys.executable, "-c", ENV_CASE, data], cwd=repo, env={**env, "OMP_NUM_THREADS": "1"},
                              check=True, capture_output=True, text=True)
        (out / "env_all_ones.json").write_text(json.dumps(json.loads(proc.stdout.splitlines()[-1]), indent=1, sort_keys=True))


def differences(a, b, path: str = "") -> list[str]:
    """Every place two JSON values differ (empty when equal)."""
    if type(a) is not type(b):
        return [f"{path}: {a!r} vs {b!r}"]
    if isinstance(a, dict):
        found = []
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                found.append(f"{path}.{key}: only {'after' if key in b else 'before'}")
            else:
                found += differences(a[key], b[key], f"{path}.{key}")
        return found
    if isinstance(a, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b or (a != a and b != b) else [f"{path}: {a!r} vs {b!r}"]


def compare(before: Path, after: Path, new_fields: list[str] = ()) -> bool:
    """Print one line per case; ``True`` when every case is identical, apart from the config echo of
    ``new_fields`` (e.g. ``model.align_from``: a field added with a default that changes nothing)."""
    same = True
    print(f"| case | {before} vs {after} |\n|---|---|")
    for path in sorted(before.glob("*.json")):
        other = after / path.name
        if not other.exists():
            print(f"| {path.stem} | missing after |")
            same = False
            continue
        found = [d for d in differences(json.loads(path.read_text()), json.loads(other.read_text()))
                 if not any(d.startswith(f".config.{field}:") for field in new_fields)]
        ignored = f" (config fields new after: {', '.join(new_fields)})" if new_fields else ""
        shown = "; ".join(found[:3]) + (f" (+{len(found) - 3} more)" if len(found) > 3 else "")
        print(f"| {path.stem} | {'identical' + ignored if not found else 'DIFFERS at ' + shown} |")
        same &= not found
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose code runs (default: this one)")
    parser.add_argument("--out", type=Path, help="directory for the stripped results")
    parser.add_argument("--data", default=os.environ.get("AGENTNET_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--only", nargs="*", help="run only these cases")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--new-fields", nargs="*", default=[], help="config fields added after BEFORE (e.g. model.align_from)")
    args = parser.parse_args()
    if args.compare:
        sys.exit(0 if compare(*args.compare, args.new_fields) else 1)
    if args.out is None:
        parser.error("--out is required unless --compare is given")
    run_cases(args.repo.resolve(), args.out, args.data, args.only)


if __name__ == "__main__":
    main()
