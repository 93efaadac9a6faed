"""The main job: train every chosen strategy on MNIST with the same settings and print one table.

``agentnet-compare [--strategies bp,lfnn,lfnn_local,attention] [hydra overrides...]`` composes the same
configuration as ``agentnet`` for each strategy (overrides apply to all), loads MNIST once, runs
:func:`agentnet.trainer.train` for each, and writes ``summary.md`` and ``summary.json`` beside the
runs' own output directories.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir

from agentnet.cli import CONFIG_DIR
from agentnet.config import ConfigError
from agentnet.data import DataError, load_mnist
from agentnet.trainer import NonFiniteLossError, resolve_device, to_run_config, train

__all__ = ["QUICK_OVERRIDES", "compare", "format_table", "main"]

#: The quick protocol of the README's main command (minutes on 2 CPU cores).
QUICK_OVERRIDES = ("trainer.epochs=3",)

COLUMNS = (
    ("strategy", "strategy", "{}"),
    ("test err %", "test_error", "{:.2f}"),
    ("train err %", "train_error", "{:.2f}"),
    ("params", "num_params", "{:,}"),
    ("samples/s", "samples_per_s", "{:,.0f}"),
    ("wall s", "wall_s", "{:.1f}"),
)


def format_table(rows: Sequence[dict]) -> str:
    """A Markdown table of the comparison columns."""
    header = "| " + " | ".join(c[0] for c in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [header, rule]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) for _, key, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def compare(strategies: Sequence[str], overrides: Sequence[str], out_dir: Path) -> list[dict]:
    """Run each strategy with the same overrides; return their metrics in order."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfgs = [compose("config", overrides=[f"strategy={s}", *overrides, f"output_dir={out_dir / s}"]) for s in strategies]
    runs = [to_run_config(c) for c in cfgs]  # validate all before any work starts
    data = load_mnist(runs[0].data.root, resolve_device(runs[0].device), verify=runs[0].data.verify, normalize=runs[0].data.normalize)
    results = []
    for name, run in zip(strategies, runs):
        print(f"== {name}", flush=True)
        results.append(train(run, data=data))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``agentnet-compare``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", default="bp,lfnn,lfnn_local,attention", help="comma-separated strategy names")
    parser.add_argument("--out", default=None, help="output directory (default outputs/compare/<timestamp>)")
    parser.add_argument("--full", action="store_true", help="use the configs' full settings instead of the quick protocol")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
    args = parser.parse_args(argv)
    out = Path(args.out or f"outputs/compare/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    overrides = [*(() if args.full else QUICK_OVERRIDES), *args.overrides]
    try:
        rows = compare([s for s in args.strategies.split(",") if s], overrides, out)
    except (ConfigError, DataError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    table = format_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(f"Overrides: {' '.join(overrides) or '(none)'}\n\n{table}\n")
    (out / "summary.json").write_text(json.dumps([{k: r[k] for _, k, _ in COLUMNS} for r in rows], indent=2))
    print(f"\nMNIST strategy comparison ({' '.join(overrides)}); runs in {out}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
