"""The MNIST columns of the LFNN paper's Table 1: every rule (bp, lfnn, lfnn_local, lg_bp, fa, fg_w,
fg_a, lg_fg_w, lg_fg_a) on mlp_275k, mlp_438k, cnn_mnist_275k, cnn_mnist_438k, beside the published figures.

A thin wrapper over the ``lfnn_table1_mnist`` experiment (``agentnet experiment=lfnn_table1_mnist``)
that adds the LFNN targets to its table. Seeds are separate runs, or one population per cell with
``replicas=N`` (then ``--seeds 0`` gives seeds 0..N-1)::

    python benchmarks/table1_mnist.py [--seeds 0,1] [--models mlp_275k,cnn_mnist_438k] [--strategies bp,lfnn,lfnn_local]
        [--out outputs/table1] [overrides ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentnet.experiments import run_experiment  # noqa: E402
from agentnet.composition import compose, to_run_config  # noqa: E402

#: Targets: test error (%) per (model, strategy).
TARGETS = {
    ("mlp_275k", "lfnn_local"): 1.5,
    ("mlp_275k", "lfnn"): 1.3,
    ("mlp_275k", "bp"): 2.01,
    ("cnn_mnist_275k", "lfnn_local"): 1.5,
    ("cnn_mnist_275k", "lfnn"): 1.3,
    ("cnn_mnist_275k", "bp"): 2.01,
    ("cnn_mnist_438k", "lfnn_local"): 1.25,
    ("cnn_mnist_438k", "bp"): 1.88,
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--models", default="mlp_275k,mlp_438k,cnn_mnist_275k,cnn_mnist_438k")
    parser.add_argument("--strategies", default="bp,lfnn,lfnn_local,lg_bp,fa,fg_w,fg_a,lg_fg_w,lg_fg_a")
    parser.add_argument("--out", default="outputs/table1")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = compose(["experiment=lfnn_table1_mnist", f"experiment.seeds=[{args.seeds}]", f"experiment.models=[{args.models}]",
                   f"experiment.strategies=[{args.strategies}]",
                   "trainer.progress=false", *args.overrides])
    result = run_experiment(to_run_config(cfg), Path(args.out))
    print("\ntargets:")
    for (model, strategy), target in TARGETS.items():
        value = result["summary"].get(f"test_error_{model}_{strategy}")
        if value is not None:
            print(f"  {model:15s} {strategy:10s} {value:.2f} % (target ≤ {target}) {'met' if value <= target else 'NOT met'}")
    return result


if __name__ == "__main__":
    main()
