"""The MNIST rows of the LFNN paper's Table 1: bp, lfnn, lfnn_local on mlp_275k and mlp_438k.

Trains every (model, strategy, seed) with the app's configs (plus any Hydra overrides given), and
prints mean test and train error beside the paper's numbers::

    python benchmarks/table1_mnist.py [--seeds 0,1] [--models mlp_275k,mlp_438k] [override ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentnet.cli import CONFIG_DIR  # noqa: E402
from agentnet.data import load_mnist  # noqa: E402
from agentnet.trainer import resolve_device, to_run_config, train  # noqa: E402

#: Test / train error (%) in the paper's Table 1 (MNIST columns: ~275K and ~438K parameters).
PAPER = {
    ("mlp_275k", "bp"): (2.01, 0.00),
    ("mlp_275k", "lfnn"): (1.18, 1.15),
    ("mlp_275k", "lfnn_local"): (1.49, 0.04),
    ("mlp_438k", "bp"): (1.88, 0.00),
    ("mlp_438k", "lfnn"): (2.14, 1.49),
    ("mlp_438k", "lfnn_local"): (1.20, 1.15),
}
TARGETS = {("mlp_275k", "lfnn_local"): 1.5, ("mlp_275k", "lfnn"): 1.3, ("mlp_275k", "bp"): 2.0}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp_275k,mlp_438k")
    parser.add_argument("--strategies", default="bp,lfnn,lfnn_local")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", default="outputs/table1")
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    rows = []
    data = None
    for model in args.models.split(","):
        for strategy in args.strategies.split(","):
            runs = []
            for seed in args.seeds.split(","):
                out = Path(args.out) / f"{model}_{strategy}_s{seed}"
                with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
                    cfg = compose("config", overrides=[f"model={model}", f"strategy={strategy}", f"seed={seed}",
                                                       "trainer.progress=false", f"output_dir={out}", *args.overrides])
                run = to_run_config(cfg)
                if data is None:
                    data = load_mnist(run.data.root, resolve_device(run.device))
                runs.append(train(run, data=data))
                print(f"{model} {strategy} seed {seed}: test {runs[-1]['test_error']:.2f} train {runs[-1]['train_error']:.2f}", flush=True)
            test = [r["test_error"] for r in runs]
            rows.append({
                "model": model, "strategy": strategy, "seeds": len(runs),
                "test_error": statistics.mean(test), "test_std": statistics.pstdev(test),
                "train_error": statistics.mean(r["train_error"] for r in runs),
                "params": runs[0]["num_params"], "paper": PAPER.get((model, strategy)),
                "target": TARGETS.get((model, strategy)),
            })
    print(f"\nMNIST test / train error (%), mean over seeds; overrides: {' '.join(args.overrides) or '(none)'}\n")
    print("| model | params | strategy | test err | train err | paper test / train | target | met |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        paper = "{:.2f} / {:.2f}".format(*r["paper"]) if r["paper"] else "-"
        target = f"≤ {r['target']}" if r["target"] else "-"
        met = "-" if not r["target"] else ("yes" if r["test_error"] <= r["target"] else "no")
        print(f"| {r['model']} | {r['params']:,} | {r['strategy']} | {r['test_error']:.2f} ± {r['test_std']:.2f} | "
              f"{r['train_error']:.2f} | {paper} | {target} | {met} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
