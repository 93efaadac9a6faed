"""How far ``make main`` is from its floor: the floating-point work of its sweep at this machine's
plain-matmul rate.

The main job trains ``bp``, ``lfnn``, ``lfnn_local`` and ``attention`` on ``pmnist_quick`` (10 tasks,
1 epoch each, ``mlp_400x2``, batch 128), 3 replicas each, and evaluates the accuracy matrix (every
task's test set after every task, and before the first). The floor counts what *any* rule must do:
the network's matmuls — forward, and for training the two backward matmuls per layer (input and
weight gradients) — for every training example and every evaluated example. Rule-specific work
(worker predictions, local losses, attention scores) is left out, so the floor is the same for all
four and a lower bound for each. The rate is measured here on the same shapes (batch 128 training,
the evaluation batch for the matrix), one thread per job as ``make main`` runs (``threads=1``, two
jobs on two cores)::

    python benchmarks/main_floor.py [--sweep-seconds S]   # S: a measured `make main` sweep time

Prints the FLOP count, the matmul rate, the floor in seconds and, given ``--sweep-seconds``, the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentnet.composition import compose, to_run_config  # noqa: E402

STRATEGIES = 4
REPLICAS = 3


def layer_widths() -> list[int]:
    run = to_run_config(compose(["benchmark=pmnist_quick"]))
    return [784, *run.model.hidden, 10]


def matmul_seconds(m: int, k: int, n: int, repeats: int = 30) -> float:
    """Median seconds of one ``(m, k) @ (k, n)`` matmul on this thread count."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        times.append((time.perf_counter() - start) / 10)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep-seconds", type=float, default=None, help="a measured `make main` sweep time (s)")
    parser.add_argument("--jobs", type=int, default=2, help="jobs running side by side (make main: 2, one per core)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    run = to_run_config(compose(["benchmark=pmnist_quick"]))
    widths = layer_widths()
    batch, eval_batch = run.trainer.batch_size, run.trainer.eval_batch_size
    tasks = run.benchmark.num_tasks
    train_examples = 60000 * run.benchmark.epochs_per_task * tasks  # every task trains on all of MNIST's training split
    eval_examples = 10000 * tasks * (tasks + 1)  # the accuracy matrix: T test sets, before training and after each task
    pairs = list(zip(widths[:-1], widths[1:]))
    # Seconds per example: training = forward + input gradient + weight gradient, at batch 128.
    train_s = sum(matmul_seconds(batch, i, o) + matmul_seconds(batch, o, i) + matmul_seconds(o, batch, i) for i, o in pairs) / batch
    eval_s = sum(matmul_seconds(eval_batch, i, o) for i, o in pairs) / eval_batch
    flop_train = 3 * 2 * sum(i * o for i, o in pairs) * train_examples
    flop_eval = 2 * sum(i * o for i, o in pairs) * eval_examples
    runs = STRATEGIES * REPLICAS
    floor_cpu_s = runs * (train_s * train_examples + eval_s * eval_examples)
    floor_s = floor_cpu_s / args.jobs
    result = {"widths": widths, "train_examples_per_run": train_examples, "eval_examples_per_run": eval_examples, "runs": runs,
              "gflop": runs * (flop_train + flop_eval) / 1e9, "gflop_per_s_one_thread": (flop_train + flop_eval) / (train_s * train_examples + eval_s * eval_examples) / 1e9,
              "floor_s": floor_s}
    print(f"mlp {widths}: {runs} runs (4 strategies x 3 replicas), each {train_examples:,} training and {eval_examples:,} evaluated examples")
    print(f"work: {result['gflop']:.0f} GFLOP (training {runs * flop_train / 1e9:.0f}, accuracy matrix {runs * flop_eval / 1e9:.0f})")
    print(f"plain matmul rate at these shapes, one thread: {result['gflop_per_s_one_thread']:.1f} GFLOP/s")
    print(f"floor with {args.jobs} jobs side by side: {floor_s:.1f} s")
    if args.sweep_seconds:
        result["ratio"] = args.sweep_seconds / floor_s
        print(f"make main's sweep: {args.sweep_seconds:.1f} s = {result['ratio']:.2f} x the floor")
    return result


if __name__ == "__main__":
    main()
