"""Cost of driving training through the PettingZoo environment instead of the trainer.

Three figures, each a median over repeats, variants interleaved in one process:

1. dict-API overhead per agent: the time of ``env.step(dict)`` with the batched step replaced by its
   cached result (the adapter alone: actions in, numpy dicts out) / agents, µs (target ≤ 5 µs per
   agent, PettingZoo's own dict floor);
2. env-driven training time / trainer time on ``mlp_275k`` (52 workers + the output agent),
   every action 1 (target ≤ 1.5). "The trainer" is one step of the trainer's own loop
   (``Trainer.train``: the batch drawn from the stream, running loss and accuracy, epoch bookkeeping),
   which is what ``agentnet`` trains with and what the env calls once per step; the bare optimiser
   step on cached batches (``train_step``, the baseline of earlier rounds) is shown beside it;
3. the same through ``step_batched`` for a network of ≥ 1000 agents (two hidden layers of 1000
   units, workers of 2 with a fixed projection to the 10 classes);
4. vectorised throughput through SuperSuit (``pettingzoo_env_to_vec_env_v1`` then
   ``concat_vec_envs_v1`` with 1 and 4 copies, ``num_cpus=0``: the copies live in this process and
   step one after another, which is what 2 shared cores allow; ``base_class="stable_baselines3"``),
   every action 1, on ``mlp_275k``: env steps per second (one env step = one mini-batch of one copy,
   i.e. ``copies`` env steps per ``vec.step``) beside the bare env's dict ``step``, and the memory
   per copy: the process's resident set (RSS, from ``/proc/self/statm``) grown by building the
   vector env, resetting and stepping it once, divided by the copies (tracemalloc would miss
   torch's tensor storage, allocated outside Python's allocator). Each copy count is measured in a
   fresh child process (RSS does not shrink when memory is freed, so a second measurement in one
   process would reuse the first's pages). The dataset is loaded once per process before that and
   shared by the copies, so it is not in the figure::

    python benchmarks/env_overhead.py [--steps 30] [--repeats 7] [--strategy lfnn] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
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
    train = env.data.train
    stream = trainer.make_stream(len(train), lambda idx: (train.x[idx], train.y[idx]))
    batches = [stream.next() for _ in range(4)]

    def trainer_step():
        x, y = batches[trainer.step % 4]
        trainer.train_step(x, y)

    # "trainer": the bare optimiser step on cached batches; "trainer_loop": one step of the trainer's
    # own loop (Trainer.train, what `agentnet` trains with: the batch drawn from the stream, the running
    # loss/accuracy, epoch bookkeeping), which is exactly what the env calls once per env step.
    variants = {"trainer": trainer_step, "trainer_loop": lambda: trainer.train(stream, 1),
                "step_batched": lambda: env.step_batched(ones)}
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


def rss_mb() -> float:
    """The process's resident set size, MB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def vector_throughput(strategy: str, copies: int, steps: int, repeats: int) -> dict:
    """SuperSuit's vector env over ``copies`` copies of the mlp_275k env: env steps/s and RSS per copy."""
    import supersuit as ss

    kwargs = dict(strategy=strategy, hidden=(260, 260), worker_size=10, batch_size=128, data_subset=None,
                  max_cycles=10**9, epochs=100)
    import stable_baselines3  # noqa: F401  (imported by base_class="stable_baselines3"; not a copy's memory)

    par = neural_collective_v0.parallel_env(**kwargs)
    warm = neural_collective_v0.parallel_env(**kwargs)  # one step first: torch's lazy one-time allocations
    warm.reset(seed=0)
    warm.step({a: np.ones(1, np.float32) for a in warm.agents})
    del warm
    gc.collect()
    before = rss_mb()
    vec = ss.concat_vec_envs_v1(ss.pettingzoo_env_to_vec_env_v1(par), copies, num_cpus=0, base_class="stable_baselines3")
    vec.venv.reset(seed=0)
    actions = np.ones((vec.num_envs, 1), np.float32)
    vec.step(actions)
    gc.collect()
    per_copy = (rss_mb() - before) / copies
    timed(lambda: vec.step(actions), 3)
    per_vec_step = statistics.median(timed(lambda: vec.step(actions), steps) for _ in range(repeats))
    vec.close()
    bare = neural_collective_v0.parallel_env(**kwargs)
    bare.reset(seed=0)
    ones_dict = {a: np.ones(1, np.float32) for a in bare.agents}
    timed(lambda: bare.step(ones_dict), 3)
    bare_step = statistics.median(timed(lambda: bare.step(ones_dict), steps) for _ in range(repeats))
    return {"copies": copies, "slots": vec.num_envs, "env_steps_per_s": copies / per_vec_step,
            "bare_steps_per_s": 1 / bare_step, "rss_per_copy_mb": per_copy}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--strategy", default="lfnn")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--no-vector", action="store_true", help="skip the SuperSuit figures")
    parser.add_argument("--vector-child", type=int, default=0, help=argparse.SUPPRESS)  # one copy count, JSON out
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.vector_child:
        print(json.dumps(vector_throughput(args.strategy, args.vector_child, args.steps, args.repeats)))
        return
    small = measure(args.strategy, (260, 260), 10, False, args.steps, args.repeats, dict_api=True)
    large = measure(args.strategy, (1000, 1000), 2, True, max(5, args.steps // 3), args.repeats, dict_api=False)
    per_agent_us = small["adapter"] * 1000 / small["agents"]
    print(f"\nstrategy {args.strategy}, batch 128, torch threads {torch.get_num_threads()}, medians of {args.repeats} repeats (ms/step)\n")
    print("| network | agents | trainer step | trainer loop | env step_batched | env dict step | env / trainer loop | env / trainer step | dict overhead per agent |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| mlp_275k | {small['agents']} | {small['trainer']:.3f} | {small['trainer_loop']:.3f} | {small['step_batched']:.3f} | "
          f"{small['step_dict']:.3f} | {small['step_dict'] / small['trainer_loop']:.3f} | {small['step_dict'] / small['trainer']:.3f} | "
          f"{per_agent_us:.2f} µs |")
    print(f"| 2x1000, k=2 | {large['agents']} | {large['trainer']:.3f} | {large['trainer_loop']:.3f} | {large['step_batched']:.3f} | - | "
          f"{large['step_batched'] / large['trainer_loop']:.3f} | {large['step_batched'] / large['trainer']:.3f} | - |")
    ratio = small["step_dict"] / small["trainer_loop"]
    print(f"\ntargets: dict adapter <= 5 µs per agent: {per_agent_us:.2f} µs, {'met' if per_agent_us <= 5 else 'NOT met'}; "
          f"env-driven training <= 1.5x the trainer's loop: {ratio:.3f}, {'met' if ratio <= 1.5 else 'NOT met'} "
          f"(against the bare optimiser step: {small['step_dict'] / small['trainer']:.3f})")
    if args.no_vector:
        return
    rows = []
    for n in (1, 4):
        child = [sys.executable, __file__, "--vector-child", str(n), "--steps", str(args.steps), "--repeats",
                 str(args.repeats), "--strategy", args.strategy, "--threads", str(args.threads)]
        rows.append(json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]))
    print("\nSuperSuit pettingzoo_env_to_vec_env_v1 + concat_vec_envs_v1 (num_cpus=0, SB3 base), mlp_275k, every action 1\n")
    print("| copies | vector slots (agents x copies) | env steps/s | bare env dict steps/s | vector / bare per env step | RSS per copy |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['copies']} | {r['slots']} | {r['env_steps_per_s']:.1f} | {r['bare_steps_per_s']:.1f} | "
              f"{r['env_steps_per_s'] / r['bare_steps_per_s']:.3f} | {r['rss_per_copy_mb']:.1f} MB |")


if __name__ == "__main__":
    main()
