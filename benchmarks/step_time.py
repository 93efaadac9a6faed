"""Median milliseconds per training step (batch 128): a hand-written PyTorch loop vs the framework.

All variants run side by side in one process, interleaved round-robin (so drift in machine load hits
them alike), each repeat timing ``--steps`` optimiser steps on real MNIST batches; the table shows
medians over ``--repeats`` and the ratios the targets are stated in::

    python benchmarks/step_time.py [--models mlp_275k,mlp_400x2] [--json out.json] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentnet.cli import CONFIG_DIR  # noqa: E402
from agentnet.data import load_mnist  # noqa: E402
from agentnet.network import build_model  # noqa: E402
from agentnet.registry import build_strategy  # noqa: E402
from agentnet.trainer import Trainer, resolve_device, to_run_config  # noqa: E402

#: label -> strategy overrides
VARIANTS = {
    "bp": ["strategy=bp"],
    "lfnn": ["strategy=lfnn"],
    "lfnn_local": ["strategy=lfnn_local"],
    "attention_exact": ["strategy=attention", "strategy.mode=exact"],
    "attention_normalized": ["strategy=attention", "strategy.mode=normalized"],
    "attention_topk": ["strategy=attention", "strategy.mode=topk"],
}


def raw_torch_step(model_cfg, device):
    """The reference: an nn.Sequential MLP of the same shape with (fused) Adam, written by hand."""
    torch.manual_seed(0)
    widths = [784, *model_cfg.hidden]
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    net = nn.Sequential(*layers, nn.Linear(widths[-1], 10)).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    return step


def framework_step(strategy_overrides: list[str], model: str, device, data):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*strategy_overrides, f"model={model}", "trainer.lr_schedule=none", "trainer.checkpoint=false"])
    run = to_run_config(cfg)
    torch.manual_seed(0)
    net = build_model(run.model, 784, 10).to(device)
    trainer = Trainer(run, net, build_strategy(run.strategy, net), data, Path("."))
    return trainer.train_step, run.model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp_275k,mlp_400x2")
    parser.add_argument("--steps", type=int, default=50, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--json", default=None, help='write {"<model>": {"raw_torch": ms, "bp": ms, ...}} here')
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = load_mnist(None, device)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(data.train), (args.steps, args.batch), generator=gen).to(device)
    batches = [(data.train.x[i], data.train.y[i]) for i in idx]

    results: dict[str, dict[str, float]] = {}
    for model in args.models.split(","):
        variants = {}
        for label, overrides in VARIANTS.items():
            step, model_cfg = framework_step(overrides, model, device, data)
            variants[label] = step
        variants = {"raw_torch": raw_torch_step(model_cfg, device), **variants}
        times: dict[str, list[float]] = {k: [] for k in variants}
        for name, step in variants.items():  # warm-up
            for x, y in batches[:10]:
                step(x, y)
        for _ in range(args.repeats):
            for name, step in variants.items():
                sync(device)
                start = time.perf_counter()
                for x, y in batches:
                    step(x, y)
                sync(device)
                times[name].append(1000 * (time.perf_counter() - start) / len(batches))
        results[model] = {k: statistics.median(v) for k, v in times.items()}

    print(f"\nmedian ms/step, batch {args.batch}, device {device}, torch threads {torch.get_num_threads()}, "
          f"{args.repeats} repeats x {args.steps} steps\n")
    labels = ["raw_torch", *VARIANTS]
    print("| model | " + " | ".join(labels) + " | bp/raw | lfnn/bp | lfnn_local/bp | attention_exact/bp |")
    print("|---" * (len(labels) + 5) + "|")
    for model, r in results.items():
        cells = " | ".join(f"{r[k]:.3f}" for k in labels)
        print(f"| {model} | {cells} | {r['bp'] / r['raw_torch']:.3f} | {r['lfnn'] / r['bp']:.3f} | "
              f"{r['lfnn_local'] / r['bp']:.3f} | {r['attention_exact'] / r['bp']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
