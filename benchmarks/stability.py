"""Does every shipped model x strategy pair train at its defaults without collapsing?

For each model preset and strategy, one population of ``--seeds`` replicas trains at the preset's
and the strategy's defaults (only the data subset and epochs are set here) and the table shows the
training objective per epoch — first, largest, last — and the test error, mean ± std over seeds::

    python benchmarks/stability.py [--models ...] [--strategies bp,lfnn,lfnn_local] [--subset 10000]
        [--epochs 20] [--seeds 2] [--json out.json]

Two verdicts per run (every seed must pass): **bounded** — no epoch's training objective exceeds
1.5 x the first epoch's (the collapses this guards against grew 2.5-100 fold); **falling** — the last
epoch's objective is at most the first's. The objective is what the strategy minimises (for
``lfnn*`` the sum of the local terms over workers plus the output loss), so the figures compare
epochs of one run, not strategies. ``attention`` runs only on MLPs. Every MNIST preset is in the
default list; ``cnn_cifar10_900k`` needs CIFAR-10 (``data=cifar10`` as an override, with
``--models cnn_cifar10_900k``), or runs its layers on MNIST with ``model.in_channels=1``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentnet.composition import compose  # noqa: E402
from agentnet.tables import markdown_table  # noqa: E402
from agentnet.recipes import train  # noqa: E402

MODELS = "mlp_275k,mlp_438k,mlp_100x2,mlp_400x2,mlp_1000x2,cnn_mnist_275k,cnn_mnist_438k,resnet_blocks"


def bounded(losses: list[float]) -> bool:
    """The run did not blow up: no epoch's objective rose above 1.5 x the first epoch's."""
    return max(losses) <= 1.5 * losses[0]


def falling(losses: list[float]) -> bool:
    """The run ended no higher than it started."""
    return losses[-1] <= losses[0]


def row(result: dict) -> list[str]:
    """A table row of one model x strategy result (``losses`` per seed, ``test_error`` per seed)."""
    losses, errors = result["losses"], result["test_error"]
    first = statistics.mean(run[0] for run in losses)
    peak = statistics.mean(max(run) for run in losses)
    last = statistics.mean(run[-1] for run in losses)
    spread = statistics.stdev(errors) if len(errors) > 1 else 0.0
    return [result["model"], result["strategy"], f"{first:.3g}", f"{peak:.3g}", f"{last:.3g}",
            f"{statistics.mean(errors):.2f} ± {spread:.2f}", "yes" if all(map(bounded, losses)) else "**no**",
            "yes" if all(map(falling, losses)) else "no"]


HEADER = ["model", "strategy", "objective epoch 1", "largest", "last", "test err %", "bounded", "falling"]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--strategies", default="bp,lfnn,lfnn_local")
    parser.add_argument("--subset", type=int, default=10000, help="training examples (the same ones for every seed)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=2, help="replicas (seeds 0..n-1) per run")
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = parser.parse_args(argv)
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for strategy in args.strategies.split(","):
                cfg = compose([f"model={model}", f"strategy={strategy}", f"data.subset={args.subset}", f"trainer.epochs={args.epochs}",
                               f"replicas={args.seeds}", "trainer.progress=false", "trainer.loggers=[]",
                               "trainer.checkpoint=false", f"output_dir={tmp}/{model}_{strategy}", *args.overrides])
                if strategy == "attention" and cfg.model.conv:
                    continue
                start = time.perf_counter()
                metrics = train(cfg)
                losses = [[h["train_loss"] for h in r["history"]] for r in metrics["replicas"]]
                errors = [r["test_error"] for r in metrics["replicas"]]
                result = {"model": model, "strategy": strategy, "losses": losses, "test_error": errors,
                          "bounded": all(map(bounded, losses)), "seconds": time.perf_counter() - start}
                results.append(result)
                rows.append(row(result))
                print(" | ".join(rows[-1]), f"({result['seconds']:.0f} s)", file=sys.stderr, flush=True)
    print(f"{args.subset} training examples, {args.epochs} epochs, {args.seeds} seeds, defaults otherwise:")
    print(markdown_table(HEADER, rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
