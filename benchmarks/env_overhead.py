"""Cost of driving training through the PettingZoo environment instead of the trainer.

Three figures, each a median over repeats, variants interleaved in one process:

1. dict-API overhead per agent: the time of ``env.step(dict)`` with the batched step replaced by its
   cached result (the adapter alone: actions in, numpy dicts out) / agents, µs (target ≤ 5 µs per
   agent, PettingZoo's own dict floor);
2. env-driven training time / trainer time on ``mlp_275k`` (52 workers + the output agent),
   every action 1 (target ≤ 1.5);
3. the same through ``step_batched`` for a network of ≥ 1000 agents (two hidden layers of 1000
   units, workers of 2 with a fixed projection to the 10 classes)::

    python benchmarks/env_overhead.py [--steps 30] [--repeats 7] [--strategy lfnn]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envs import neural_collective_v0  # noqa: E402


def timed(fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def measure(strategy: str, hidden, worker_size: int, projection: bool, steps: int, repeats: int, dict_api: bool) -> dict:
    kwargs = dict(strategy=strategy, hidden=hidden, worker_size=worker_size, worker_projection=projection,
                  batch_size=128, data_subset=None, max_cycles=10**9, epochs=100)
    env = neural_collective_v0.parallel_env(**kwargs)
    env.reset(seed=0)
    ones_dict = {a: np.ones(1, np.float32) for a in env.agents}
    ones = torch.ones(env.num_workers)
    trainer = env.trainer
    batches = [trainer.stream.next() for _ in range(4)]

    def trainer_step():
        x, y = batches[trainer.step % 4]
        trainer.train_step(x, y)

    variants = {"trainer": trainer_step, "step_batched": lambda: env.step_batched(ones)}
    if dict_api:
        variants["step_dict"] = lambda: env.step(ones_dict)
    for fn in variants.values():
        timed(fn, 3)
    times = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn, steps))
    result = {k: statistics.median(v) * 1000 for k, v in times.items()}
    result["agents"] = env.num_workers
    if dict_api:
        # The adapter alone: the validated batched step replaced by its cached outputs, so only the
        # dict work (per-agent checks against the spaces, conversions) is timed.
        cached = env.step_batched(ones)
        env._step_validated = lambda actions: cached
        adapter = [timed(lambda: env.step(ones_dict), steps * 20) for _ in range(repeats)]
        result["adapter"] = statistics.median(adapter) * 1000
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--strategy", default="lfnn")
    args = parser.parse_args(argv)
    small = measure(args.strategy, (260, 260), 10, False, args.steps, args.repeats, dict_api=True)
    large = measure(args.strategy, (1000, 1000), 2, True, max(5, args.steps // 3), args.repeats, dict_api=False)
    per_agent_us = small["adapter"] * 1000 / small["agents"]
    print(f"\nstrategy {args.strategy}, batch 128, torch threads {torch.get_num_threads()}, medians of {args.repeats} repeats (ms/step)\n")
    print("| network | agents | trainer | env step_batched | env dict step | env/trainer | dict overhead per agent |")
    print("|---|---|---|---|---|---|---|")
    print(f"| mlp_275k | {small['agents']} | {small['trainer']:.3f} | {small['step_batched']:.3f} | {small['step_dict']:.3f} | "
          f"{small['step_dict'] / small['trainer']:.3f} | {per_agent_us:.2f} µs |")
    print(f"| 2x1000, k=2 | {large['agents']} | {large['trainer']:.3f} | {large['step_batched']:.3f} | - | "
          f"{large['step_batched'] / large['trainer']:.3f} | - |")


if __name__ == "__main__":
    main()
