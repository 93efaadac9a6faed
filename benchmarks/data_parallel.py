"""Data parallelism's cost on this machine: one run over 2 torchrun processes (gloo) against the same
run in one process, side by side (docs/benchmarks.md, "Data parallelism").

    python benchmarks/data_parallel.py                    # mlp_275k and cnn_mnist_275k, bp and lfnn
    python benchmarks/data_parallel.py --models mlp_275k --strategies bp --repeats 5

Each cell trains ``--steps`` optimiser steps at batch ``--batch`` (the global batch: 2 ranks take
half each) and reads the training throughput the run reports (``samples_per_s``: examples per
second of training, evaluation excluded); the median of ``--repeats`` runs. Three setups: one
process with one thread, one process with two threads (the same cores as 2 ranks), 2 ranks with one
thread each. The all-reduce volume is the gradient's size per step (float32, every parameter with a
gradient), which the ranks exchange once per step.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentnet.tables import markdown_table  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(model: str, strategy: str, steps: int, batch: int, ranks: int, threads: int, out: Path) -> dict:
    args = [f"model={model}", f"strategy={strategy}", f"trainer.max_steps={steps}", "trainer.epochs=100",
            f"trainer.batch_size={batch}", "data.test_subset=100", "trainer.progress=false", "trainer.loggers=[]",
            "trainer.checkpoint=false", f"threads={threads}", f"hydra.run.dir={out}"]
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={_port()}"]
                if ranks > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([*launcher, "-m", "agentnet", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    return json.loads((out / "metrics.json").read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp_275k,cnn_mnist_275k")
    parser.add_argument("--strategies", default="bp,lfnn")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    setups = [("1 process, 1 thread", 1, 1), ("1 process, 2 threads", 1, 2), ("2 ranks, 1 thread each", 2, 1)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for strategy in args.strategies.split(","):
                speed: dict[str, float] = {}
                params = 0
                for name, ranks, threads in setups:
                    runs = []
                    for i in range(args.repeats):
                        m = _run(model, strategy, args.steps, args.batch, ranks, threads, Path(tmp) / f"{model}-{strategy}-{ranks}-{threads}-{i}")
                        runs.append(m["samples_per_s"])
                        params = m["num_params"]
                    speed[name] = statistics.median(runs)
                    print(f"{model} {strategy} {name}: {speed[name]:.0f} examples/s (runs {[round(r) for r in runs]})", flush=True)
                base = speed[setups[0][0]]
                rows.append([model, strategy, *(f"{speed[n]:.0f} ({speed[n] / base:.2f}x)" for n, _, _ in setups),
                             f"{params * 4 / 2**20:.2f} MiB"])
    header = ["model", "strategy", *(f"{n} (examples/s, vs 1 thread)" for n, _, _ in setups), "all-reduce per step"]
    print(markdown_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
