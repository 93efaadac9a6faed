"""Milliseconds per training step *per replica* of a population (``replicas=R``) against single runs.

For each model and strategy, populations of R = 1, 4, 8, 16 replicas and the single-run ``bp`` step
are timed side by side in one process, interleaved round-robin (so drift in machine load hits them
alike); each repeat times ``--steps`` optimiser steps on real MNIST batches (batch 128 per replica)
and the table shows medians over ``--repeats``::

    python benchmarks/population.py [--models mlp_275k,mlp_1000x2,cnn_mnist_438k] [--replicas 1,4,8,16]
        [--strategies bp,lfnn,lfnn_local,attention] [--device cpu] [--json out.json]

Targets (issue "Populations"): at R = 8 every strategy's per-replica step <= 1.15 x the single-run
``bp`` step, and ``bp``'s per-replica step <= 1.05 x its single step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentnet.data import load_mnist  # noqa: E402
from agentnet.composition import compose, to_run_config  # noqa: E402
from agentnet.devices import resolve_device  # noqa: E402
from agentnet.session import build_session  # noqa: E402
from agentnet.tables import markdown_table  # noqa: E402


def population_step(strategy: str, model: str, replicas: int, device, data, extra: list[str]):
    """``step(x, y)`` of a ``replicas``-replica population (x ``(R, B, D)``)."""
    run = to_run_config(compose([f"strategy={strategy}", f"model={model}", f"replicas={replicas}", "trainer.lr_schedule=none",
                                 "trainer.checkpoint=false", *extra]))
    return build_session(run, data).trainer.train_step


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp_275k,mlp_1000x2,cnn_mnist_438k")
    parser.add_argument("--strategies", default="bp,lfnn,lfnn_local,attention")
    parser.add_argument("--replicas", default="1,4,8,16")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    data = load_mnist(None, device)
    counts = [int(r) for r in args.replicas.split(",")]
    strategies = args.strategies.split(",")
    results: dict = {}
    for model in args.models.split(","):
        conv = model.startswith("cnn")
        gen = torch.Generator().manual_seed(0)
        steps = {
            (s, R): population_step(s, model, R, device, data, [])
            for s in strategies
            for R in counts
            if not (conv and s == "attention")  # attention is MLP-only
        }
        batches = {
            R: [(data.train.x[i], data.train.y[i]) for i in torch.randint(0, len(data.train), (args.steps, R, args.batch), generator=gen).to(device)]
            for R in counts
        }
        times: dict = {key: [] for key in steps}
        for key, step in steps.items():  # warm-up
            for x, y in batches[key[1]][:2]:
                step(x, y)
        for _ in range(args.repeats):
            for key, step in steps.items():
                sync(device)
                start = time.perf_counter()
                for x, y in batches[key[1]]:
                    step(x, y)
                sync(device)
                times[key].append((time.perf_counter() - start) * 1000 / args.steps)
        per_replica = {f"{s}@{R}": statistics.median(times[(s, R)]) / R for (s, R) in steps}
        results[model] = per_replica
        bp1 = per_replica.get("bp@1")
        header = ["strategy", *[f"R={R} ms/replica" for R in counts], *[f"R={R} / bp single" for R in counts if R > 1]]
        rows = []
        for s in strategies:
            if (s, counts[0]) not in steps:
                continue
            ms = [per_replica[f"{s}@{R}"] for R in counts]
            rows.append([s, *[f"{m:.2f}" for m in ms], *[f"{per_replica[f'{s}@{R}'] / bp1:.2f}" for R in counts if R > 1]])
        print(f"\n## {model} (batch {args.batch} per replica, {device}, {torch.get_num_threads()} threads)\n")
        print(markdown_table(header, rows))
        sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
