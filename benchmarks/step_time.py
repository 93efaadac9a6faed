"""Median milliseconds per training step (batch 128): a hand-written PyTorch loop vs the framework.

All variants run side by side in one process, interleaved round-robin (so drift in machine load hits
them alike), each repeat timing ``--steps`` optimiser steps on real MNIST batches; the table shows
medians over ``--repeats`` and the ratios the targets are stated in::

    python benchmarks/step_time.py [--models mlp_275k,mlp_400x2,cnn_mnist_438k] [--variants bp,fa,fg_w] [--json out.json] [--device cpu]
        [--amp bf16 --channels-last]   # the GPU path options (CUDA)
        [--compile]                     # also time every variant with trainer.compile=true ("<variant>+c")

With ``--compile`` the table also gives each compiled variant's compile time (its first step, s)
and its ratio to the eager one.

Conv models get a hand-written ``nn.Sequential`` reference of the same layers (none for block-wise
models, whose grouped blocks have no plain-PyTorch twin here); attention, pepita and ff rows are MLP-only.
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
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentnet.data import load_mnist  # noqa: E402
from agentnet.composition import compose, to_run_config  # noqa: E402
from agentnet.devices import resolve_device  # noqa: E402
from agentnet.session import build_session  # noqa: E402

#: label -> strategy overrides
VARIANTS = {
    "bp": ["strategy=bp"],
    "lfnn": ["strategy=lfnn"],
    "lfnn_local": ["strategy=lfnn_local"],
    "attention_exact": ["strategy=attention", "strategy.mode=exact"],
    "attention_normalized": ["strategy=attention", "strategy.mode=normalized"],
    "attention_topk": ["strategy=attention", "strategy.mode=topk"],
    # The LFNN paper's other Table 1 rules.
    "fa": ["strategy=fa"],
    "lg_bp": ["strategy=lg_bp"],
    "fg_w": ["strategy=fg_w"],
    "lg_fg_w": ["strategy=lg_fg_w"],
    "fg_a": ["strategy=fg_a"],
    "lg_fg_a": ["strategy=lg_fg_a"],
    # Issue 35's local rules.
    "dfa": ["strategy=dfa"],
    "pepita": ["strategy=pepita"],
    "predsim": ["strategy=predsim"],
    "ff": ["strategy=ff"],
    "ff_no_acc": ["strategy=ff", "trainer.train_accuracy=false"],  # without the running accuracy's B·C-row pass
}


def raw_torch_step(model_cfg, device, channels_last: bool = False, amp: bool = False):
    """The reference: an nn.Sequential of the same layers with (fused) Adam, written by hand.

    ``None`` for block-wise models (no plain twin of the grouped blocks).
    """
    if any(spec.block != "none" for spec in model_cfg.conv):
        return None
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    features = 784
    if model_cfg.conv:
        channels, side = 1, 28
        layers.append(nn.Unflatten(1, (1, 28, 28)))
        for spec in model_cfg.conv:
            layers += [nn.Conv2d(channels, spec.channels, spec.kernel_size, spec.stride, spec.kernel_size // 2), nn.ReLU()]
            side = (side - 1) // spec.stride + 1
            if spec.pool > 1:
                layers.append(nn.MaxPool2d(spec.pool))
                side //= spec.pool
            channels = spec.channels
        layers.append(nn.Flatten())
        features = channels * side * side
    for width in model_cfg.hidden:
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    net = nn.Sequential(*layers, nn.Linear(features, 10)).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()

    return step


def framework_step(strategy_overrides: list[str], model: str, device, data, gpu_overrides: list[str]):
    cfg = compose([*strategy_overrides, f"model={model}", "trainer.lr_schedule=none", "trainer.checkpoint=false", *gpu_overrides])
    run = to_run_config(cfg)
    session = build_session(run, data)
    return session.trainer.train_step, run.model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp_275k,mlp_400x2,cnn_mnist_438k")
    parser.add_argument("--steps", type=int, default=50, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--amp", default="none", choices=["none", "bf16"], help="trainer.amp for every variant")
    parser.add_argument("--channels-last", action="store_true", help="trainer.channels_last for every variant")
    parser.add_argument("--compile", action="store_true", help="also time each framework variant with trainer.compile=true")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"which of {', '.join(VARIANTS)} (bp is always timed)")
    parser.add_argument("--json", default=None, help='write {"<model>": {"raw_torch": ms, "bp": ms, ...}} here')
    args = parser.parse_args(argv)
    chosen = ["bp", *[v for v in args.variants.split(",") if v != "bp"]]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = load_mnist(None, device)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(data.train), (args.steps, args.batch), generator=gen).to(device)
    batches = [(data.train.x[i], data.train.y[i]) for i in idx]

    gpu_overrides = [f"trainer.amp={args.amp}", f"trainer.channels_last={str(args.channels_last).lower()}"]
    results: dict[str, dict[str, float]] = {}
    compile_s: dict[str, float] = {}
    for model in args.models.split(","):
        variants = {}
        for label in chosen:
            overrides = VARIANTS[label]
            if label.startswith("attention") and not model.startswith("mlp"):
                continue  # message passing is defined for fully connected layers
            if label == "pepita" and not model.startswith("mlp"):
                continue  # the conv presets are batch-normalised, for which PEPITA defines no update
            if label.startswith("ff") and not model.startswith("mlp"):
                continue  # Forward-Forward is implemented for fully connected layers only
            step, model_cfg = framework_step(overrides, model, device, data, gpu_overrides)
            variants[label] = step
            if args.compile:
                variants[f"{label}+c"] = framework_step(overrides, model, device, data, [*gpu_overrides, "trainer.compile=true"])[0]
        raw = raw_torch_step(model_cfg, device, args.channels_last, args.amp == "bf16")
        variants = {**({"raw_torch": raw} if raw is not None else {}), **variants}
        times: dict[str, list[float]] = {k: [] for k in variants}
        for name, step in variants.items():  # warm-up (a compiled variant's first step compiles it)
            sync(device)
            start = time.perf_counter()
            step(*batches[0])
            sync(device)
            if name.endswith("+c"):
                compile_s[f"{model}/{name}"] = time.perf_counter() - start
            for x, y in batches[1:10]:
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
          f"amp {args.amp}, channels_last {args.channels_last}, {args.repeats} repeats x {args.steps} steps\n")
    names = ["raw_torch", *[v for k in VARIANTS for v in (k, f"{k}+c")]]
    labels = [k for k in names if any(k in r for r in results.values())]
    ratios = [("bp", "raw_torch"), *[(k, "bp") for k in labels if k not in ("raw_torch", "bp") and not k.endswith("+c")],
              *[(k, "raw_torch") for k in labels if k == "bp+c"],
              *[(f"{k}+c", "bp+c") for k in labels if k not in ("raw_torch", "bp") and not k.endswith("+c") and f"{k}+c" in labels],
              *[(k, k[:-2]) for k in labels if k.endswith("+c")]]
    print("| model | " + " | ".join(labels) + " | " + " | ".join(f"{a}/{b}" for a, b in ratios) + " |")
    print("|---" * (len(labels) + len(ratios) + 1) + "|")
    for model, r in results.items():
        cells = " | ".join(f"{r[k]:.3f}" if k in r else "-" for k in labels)
        quotients = " | ".join(f"{r[a] / r[b]:.3f}" if a in r and b in r else "-" for a, b in ratios)
        print(f"| {model} | {cells} | {quotients} |")
    if compile_s:
        print("\ncompile time (first step, s): " + ", ".join(f"{k} {v:.1f}" for k, v in compile_s.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({**results, **({"compile_s": compile_s} if compile_s else {})}, indent=2))
    return results


if __name__ == "__main__":
    main()
