"""A learned plasticity policy against the fixed rule on held-out continual task sequences (issue #14).

For every policy seed, ``examples/learned_plasticity.py`` trains one parameter-shared PPO policy that
sets each worker's step multiplier on permuted-MNIST task sequences (cooperative reward: the mean
accuracy over the tasks seen, at every task end). Each trained policy and the fixed rule (every
action 1: the strategy's own updates) then run the same held-out sequences — episode seeds no
training episode had, so new permutations, initialisations and batch orders. Reported: ACC, BWT,
forgetting and learning accuracy, mean ± std over policy seeds (each seed's mean over the held-out
sequences; the fixed rule's spread is over sequences), and the paired difference learned − fixed on
each sequence::

    python benchmarks/learned_plasticity.py [--policy-seeds 0,1,2] [--timesteps 200000] [--eval-sequences 10]
        [--strategy bp] [--json out.json] [--plot docs/img/learned_plasticity.png]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agentnet.tables import markdown_table  # noqa: E402


def load_example():
    """``examples/learned_plasticity.py`` as a module (``examples/`` is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("learned_plasticity", ROOT / "examples" / "learned_plasticity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


EX = load_example()
# The table's metrics and format live with the example's evaluation (examples/marl_torchrl.py prints the same table).
METRICS, SCALE, HEADER, _pm = EX.METRICS, EX.SCALE, EX.HEADER, EX.mean_std


def plot(report: dict, path: Path) -> None:
    """Bars: each metric for the fixed rule and every policy seed (mean over sequences, with their spread)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = report.get("return_curves", {})
    fig, axes = plt.subplots(1, len(METRICS) + 1, figsize=(3.2 * (len(METRICS) + 1), 3.2), dpi=100)
    fixed_return = np.mean([r["return"] for r in report["fixed"]])
    for s, points in curves.items():
        if points:
            axes[-1].plot(*zip(*points), label=f"PPO s{s}")
    axes[-1].axhline(fixed_return, color="tab:gray", ls="--", label="fixed rule (held-out)")
    axes[-1].set_title("training episode return")
    axes[-1].set_xlabel("agent-steps")
    axes[-1].legend(fontsize=7)
    names = ["fixed"] + [f"PPO s{s}" for s in report["policy_seeds"]]
    runs = [report["fixed"]] + [report["learned"][str(s)] for s in report["policy_seeds"]]
    for ax, metric in zip(axes, METRICS):
        means = [SCALE[metric] * np.mean([r[metric] for r in rs]) for rs in runs]
        stds = [SCALE[metric] * np.std([r[metric] for r in rs]) for rs in runs]
        ax.bar(range(len(names)), means, yerr=stds, color=["tab:gray"] + ["tab:blue"] * (len(names) - 1), capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        ax.set_title(f"{metric} (%)" if SCALE[metric] == 100 else metric)
    fig.suptitle(f"learned plasticity vs fixed rule: {report['strategy']}, {len(report['held_out_seeds'])} held-out sequences")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy-seeds", default="0,1,2")
    parser.add_argument("--timesteps", type=int, default=None, help="PPO agent-steps per policy (default: the example's)")
    parser.add_argument("--eval-sequences", type=int, default=10)
    parser.add_argument("--strategy", default=None)
    parser.add_argument("--constants", default="0.5,1.5,2.0",
                        help="also run these constant multipliers on the same sequences (is the policy more than a tuned step size?)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    ex = EX
    changes = {k: v for k, v in (("timesteps", args.timesteps), ("strategy", args.strategy)) if v is not None}
    cfg = dataclasses.replace(ex.PlasticityConfig(), **changes)
    seeds = ex.held_out_seeds(args.eval_sequences)
    policy_seeds = [int(s) for s in args.policy_seeds.split(",") if s.strip()]  # "": the fixed and constant rows only
    fixed = ex.evaluate(cfg, ex.fixed_rule, seeds)
    constants = {c: ex.evaluate(cfg, ex.constant_multiplier(c, cfg), seeds) for c in
                 ([float(c) for c in args.constants.split(",")] if args.constants else [])}
    report = {"config": dataclasses.asdict(cfg), "strategy": cfg.strategy, "held_out_seeds": seeds,
              "policy_seeds": policy_seeds, "fixed": fixed, "constants": {str(c): r for c, r in constants.items()},
              "learned": {}, "train_s": {}}
    for s in policy_seeds:
        start = time.perf_counter()
        model, trained_on = ex.train_policy(cfg, s)
        report["train_s"][str(s)] = time.perf_counter() - start
        report["learned"][str(s)] = ex.evaluate(cfg, ex.ppo_policy(model), seeds, trained_on)
        report.setdefault("return_curves", {})[str(s)] = model.return_curve
        r = report["learned"][str(s)]
        print(f"policy seed {s}: trained in {report['train_s'][str(s)]:.0f} s on {len(trained_on)} episodes; "
              f"held-out ACC {100 * np.mean([x['ACC'] for x in r]):.2f} (fixed {100 * np.mean([x['ACC'] for x in fixed]):.2f})", flush=True)
        if args.json:  # after every seed, so a long run leaves what it has
            Path(args.json).write_text(json.dumps(report, indent=2))
    if not policy_seeds:
        print(markdown_table(HEADER, [
            [name, f"{len(seeds)} sequences"] + [_pm([r[m] for r in runs], SCALE[m]) for m in METRICS]
            for name, runs in [("fixed rule (every multiplier 1)", fixed)] + [(f"constant multiplier {c:g}", r) for c, r in constants.items()]]))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, default=float))
        return report
    per_seed = {m: [float(np.mean([x[m] for x in report["learned"][str(s)]])) for s in policy_seeds] for m in METRICS}
    paired = {m: [x[m] - f[m] for s in policy_seeds for x, f in zip(report["learned"][str(s)], fixed)] for m in METRICS}
    rows = [
        ["fixed rule (every multiplier 1)", f"{len(seeds)} sequences"] + [_pm([r[m] for r in fixed], SCALE[m]) for m in METRICS],
        *[[f"constant multiplier {c:g}", f"{len(seeds)} sequences"] + [_pm([r[m] for r in runs], SCALE[m]) for m in METRICS]
          for c, runs in constants.items()],
        ["learned (PPO)", f"{len(policy_seeds)} policy seeds"] + [_pm(per_seed[m], SCALE[m]) for m in METRICS],
        ["learned − fixed, paired", f"{len(paired['ACC'])} (seed, sequence) pairs"] + [_pm(paired[m], SCALE[m]) for m in METRICS],
    ]
    print(f"\n{cfg.strategy}, {cfg.num_tasks} permuted-MNIST tasks of {cfg.data_subset} examples, "
          f"PPO {cfg.timesteps} agent-steps per policy, held-out seeds {seeds[0]}..{seeds[-1]}\n")
    print(markdown_table(HEADER, rows))
    for m in ("ACC", "return"):
        wins = sum(d > 0 for d in paired[m])
        print(f"learned > fixed on {m}: {wins} of {len(paired[m])} (seed, sequence) pairs")
    layers = sorted(report["learned"][str(policy_seeds[0])][0]["multiplier_by_layer"])
    multipliers = {l: [np.mean([x["multiplier_by_layer"][l] for x in report["learned"][str(s)]]) for s in policy_seeds] for l in layers}
    print("\nlearned mean multiplier per layer (mean ± std over policy seeds): "
          + ", ".join(f"layer {l}: {np.mean(v):.3f} ± {np.std(v):.3f}" for l, v in multipliers.items()))
    report["summary"] = {"per_seed": per_seed, "paired": paired, "multiplier_by_layer": {str(l): v for l, v in multipliers.items()}}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=float))
    if args.plot:
        plot(report, Path(args.plot))
    return report


if __name__ == "__main__":
    main()
