"""The GPU readiness run (issue 32): one command on a device machine, one JSON and one Markdown table.

    python benchmarks/gpu.py                         # on the GPU machine (about 8 minutes on one H100)
    python benchmarks/gpu.py --device cpu --quick    # the same script in seconds on the CPU (the test suite runs it)

Sections, each bounded by ``--budget-s`` (cells left when it is spent are listed as skipped):

1. **tests** — ``pytest -m cuda tests/test_cuda.py`` (CPU-vs-device agreement of every strategy on FC
   and conv models, populations, continual runs with CL methods, checkpoints moved between the
   devices, bf16 and compiled steps, PyTorch's CUDA sync detector over every strategy x CL method).
2. **steps** — milliseconds per training step *per replica* for populations of R = 1, 8, 32, 128
   replicas (batch 128 per replica) of every strategy on ``mlp_275k`` and ``cnn_mnist_438k``, eager and
   compiled (``trainer.compile``), fp32 and bf16 (``trainer.amp=bf16``, channels-last for conv
   models), against a hand-written PyTorch loop of the same layers (one network, fused Adam), with
   each cell's compile time and peak device memory. Medians of ``--repeats`` timed runs of ``--steps``.
3. **main job** — the protocol of ``make main`` (``bp``, ``lfnn``, ``lfnn_local``, ``attention`` on
   ``pmnist_quick``, 3 replicas each) in this process, one strategy after the other: its wall time
   (target: <= 60 s on one H100) and peak memory.

Results: ``<out>/gpu.json`` and ``<out>/gpu.md`` (default ``--out gpu_results``), written after every
section so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from agentnet.composition import compose, to_run_config  # noqa: E402
from agentnet.config import ConfigError  # noqa: E402
from agentnet.data import ImageData, load_mnist  # noqa: E402
from agentnet.devices import resolve_device  # noqa: E402
from agentnet.recipes import run_continual  # noqa: E402
from agentnet.session import build_session  # noqa: E402
from agentnet.tables import markdown_table  # noqa: E402
from step_time import raw_torch_step  # noqa: E402

STRATEGIES = ["bp", "lfnn", "lfnn_local", "attention", "fa", "lg_bp", "fg_w", "lg_fg_w", "fg_a", "lg_fg_a",
              "dfa", "pepita", "predsim", "ff"]
MODELS = ["mlp_275k", "cnn_mnist_438k"]
MAIN_JOB = ["bp", "lfnn", "lfnn_local", "attention"]


class Budget:
    """Seconds left for a section; a cell that would start after it is spent is skipped."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    @property
    def spent(self) -> bool:
        return time.perf_counter() >= self.end


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    """Peak device memory since the last :func:`reset_peak` (``None`` on the CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def machine(device: torch.device) -> dict[str, Any]:
    """What ran the benchmark."""
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                            "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


# -- 1. tests -----------------------------------------------------------------------------------
def run_tests(device: torch.device, quick: bool, budget_s: float) -> dict[str, Any]:
    """``pytest -m cuda tests/test_cuda.py`` with this device as the accelerator."""
    selection = ["-k", "agrees_on_the_cpu_and_the_accelerator and bp-fc"] if quick else []
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", str(REPO / "tests" / "test_cuda.py"), *selection]
    env = {**os.environ, "AGENTNET_TEST_ACCELERATOR": str(device)}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=budget_s)
        tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
        return {"ok": done.returncode == 0, "returncode": done.returncode, "summary": tail, "seconds": round(time.perf_counter() - start, 1),
                "failures": [line for line in done.stdout.splitlines() if line.startswith("FAILED")]}
    except subprocess.TimeoutExpired:
        return {"ok": False, "returncode": None, "summary": f"cut off after {budget_s:.0f} s", "seconds": budget_s, "failures": []}


# -- 2. steps -----------------------------------------------------------------------------------
def framework_step(strategy: str, model: str, replicas: int, data: ImageData, compiled: bool, bf16: bool) -> Callable:
    """A population's ``train_step`` (x ``(R, B, D)``)."""
    overrides = [f"strategy={strategy}", f"model={model}", f"replicas={replicas}", "trainer.lr_schedule=none", "trainer.checkpoint=false",
                 f"trainer.compile={str(compiled).lower()}", f"trainer.amp={'bf16' if bf16 else 'none'}",
                 f"trainer.channels_last={str(bf16 and model.startswith('cnn')).lower()}"]
    return build_session(to_run_config(compose(overrides)), data).trainer.train_step


def time_cell(step: Callable, batches: list, device: torch.device, repeats: int) -> tuple[float, float]:
    """``(first step s, median ms per step)``: the first step (which compiles a compiled step) then ``repeats`` timed passes."""
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    step(*batches[0])
    sync(device)
    first = time.perf_counter() - start
    for x, y in batches[1:3]:
        step(x, y)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for x, y in batches:
            step(x, y)
        sync(device)
        times.append(1000 * (time.perf_counter() - start) / len(batches))
    return first, statistics.median(times)


def run_steps(device: torch.device, data: ImageData, args: argparse.Namespace) -> list[dict[str, Any]]:
    budget = Budget(args.budget_s)
    gen = torch.Generator().manual_seed(0)
    rows: list[dict[str, Any]] = []
    for model in args.models.split(","):
        for bf16 in (False, True) if args.bf16 else (False,):
            model_cfg = to_run_config(compose([f"model={model}"])).model
            hand = raw_torch_step(model_cfg, device, channels_last=bf16 and model.startswith("cnn"), amp=bf16)
            idx = torch.randint(0, len(data.train), (args.steps, args.batch), generator=gen).to(device)
            single = [(data.train.x[i], data.train.y[i]) for i in idx]
            first, ms = time_cell(hand, single, device, args.repeats)
            rows.append({"model": model, "precision": "bf16" if bf16 else "fp32", "strategy": "hand loop", "compiled": False, "replicas": 1,
                         "ms_per_replica": ms, "first_step_s": first, "peak_mib": peak_mib(device)})
            hand_ms = ms
            for compiled in (False, True) if args.compile else (False,):
                for strategy in args.strategies.split(","):
                    if strategy == "attention" and not model.startswith("mlp"):
                        continue  # message passing is defined for fully connected layers
                    if compiled and strategy not in args.compile_strategies.split(","):
                        continue
                    if compiled and bf16 and args.quick:
                        continue  # the smoke run compiles once (fp32)
                    for R in [int(r) for r in args.replicas.split(",")]:
                        if compiled and args.compile_replicas and str(R) not in args.compile_replicas.split(","):
                            continue
                        row = {"model": model, "precision": "bf16" if bf16 else "fp32", "strategy": strategy, "compiled": compiled, "replicas": R}
                        if budget.spent:
                            rows.append({**row, "skipped": "budget spent"})
                            continue
                        try:
                            step = framework_step(strategy, model, R, data, compiled, bf16)
                            idx = torch.randint(0, len(data.train), (args.steps, R, args.batch), generator=gen).to(device)
                            batches = [(data.train.x[i], data.train.y[i]) for i in idx]
                            first, ms = time_cell(step, batches, device, args.repeats)
                            rows.append({**row, "ms_per_replica": ms / R, "vs_hand_loop": ms / R / hand_ms, "first_step_s": first,
                                         "peak_mib": peak_mib(device)})
                        except torch.OutOfMemoryError:
                            rows.append({**row, "skipped": "out of memory"})
                        except ConfigError as error:  # a rule not defined for this network (pepita, ff: no conv / batch norm)
                            rows.append({**row, "skipped": f"unsupported: {str(error).split(':')[0]}"})
                        finally:
                            step = batches = None  # noqa: F841  (free the population before the next cell)
                            if device.type == "cuda":
                                torch.cuda.empty_cache()
                        print(_row_line(rows[-1]), flush=True)
    return rows


def _row_line(row: dict[str, Any]) -> str:
    what = f"{row['model']} {row['precision']} {row['strategy']}{' compiled' if row['compiled'] else ''} R={row['replicas']}"
    if "skipped" in row:
        return f"{what}: skipped ({row['skipped']})"
    return f"{what}: {row['ms_per_replica']:.3f} ms/replica ({row.get('vs_hand_loop', 1):.2f} x hand loop), first step {row['first_step_s']:.1f} s"


# -- 3. the main job ----------------------------------------------------------------------------
def run_main_job(device: torch.device, data: ImageData, quick: bool, out: Path) -> dict[str, Any]:
    """``make main``'s protocol in this process: every strategy of :data:`MAIN_JOB` on ``pmnist_quick``, 3 replicas."""
    reset_peak(device)
    extra = ["benchmark.num_tasks=2", "benchmark.samples_per_task=128", "data.test_subset=200"] if quick else []
    per_strategy = {}
    start = time.perf_counter()
    for strategy in MAIN_JOB:
        began = time.perf_counter()
        metrics = run_continual(compose(["benchmark=pmnist_quick", f"strategy={strategy}", "replicas=3", f"device={device}",
                                         "trainer.progress=false", "trainer.checkpoint=false", f"output_dir={out / 'main' / strategy}", *extra]),
                                data)
        per_strategy[strategy] = {"seconds": round(time.perf_counter() - began, 2), "acc": metrics.get("ACC")}
    return {"seconds": round(time.perf_counter() - start, 2), "target_s": 60, "per_strategy": per_strategy, "peak_mib": peak_mib(device),
            "protocol": "quick (2 tasks x 128 examples)" if quick else "pmnist_quick (10 tasks, 1 epoch each), 3 replicas"}


# -- report -------------------------------------------------------------------------------------
def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown: machine, tests, the step table per model and precision, the main job."""
    lines = ["# GPU readiness (`benchmarks/gpu.py`)", "", "Machine: " + ", ".join(f"{k} {v}" for k, v in results["machine"].items()), ""]
    tests = results.get("tests")
    if tests:
        lines += [f"**Tests** (`pytest -m cuda`): {'passed' if tests['ok'] else 'FAILED'} — {tests['summary']} ({tests['seconds']} s)", ""]
        lines += [f"- {f}" for f in tests["failures"]] + ([""] if tests["failures"] else [])
    rows = results.get("steps", [])
    groups = sorted({(r["model"], r["precision"]) for r in rows}, key=lambda g: (MODELS.index(g[0]) if g[0] in MODELS else 9, g[1]))
    for model, precision in groups:
        cells = [r for r in rows if r["model"] == model and r["precision"] == precision]
        Rs = sorted({r["replicas"] for r in cells if r["strategy"] != "hand loop"})
        hand = next((r for r in cells if r["strategy"] == "hand loop"), None)
        lines += [f"**{model}, {precision}**: ms per step per replica (x hand loop); hand loop "
                  f"{hand['ms_per_replica']:.3f} ms" if hand else f"**{model}, {precision}**", ""]
        table = []
        for strategy in dict.fromkeys(r["strategy"] for r in cells if r["strategy"] != "hand loop"):
            for compiled in (False, True):
                mine = {r["replicas"]: r for r in cells if r["strategy"] == strategy and r["compiled"] == compiled}
                if not mine:
                    continue
                row = [strategy + (" (compiled)" if compiled else "")]
                for R in Rs:
                    r = mine.get(R)
                    row.append("-" if r is None else r.get("skipped") or f"{r['ms_per_replica']:.3f} ({r['vs_hand_loop']:.2f})")
                peaks = [r["peak_mib"] for r in mine.values() if r.get("peak_mib") is not None]
                firsts = [r["first_step_s"] for r in mine.values() if "first_step_s" in r]
                row += [f"{max(firsts):.1f}" if firsts else "-", f"{max(peaks):.0f}" if peaks else "-"]
                table.append(row)
        lines += [markdown_table(["strategy", *[f"R={R}" for R in Rs], "first step s (max)", "peak MiB (max)"], table), ""]
    job = results.get("main_job")
    if job:
        lines += [f"**Main job** ({job['protocol']}): {job['seconds']} s (target <= {job['target_s']} s on one H100)"
                  + (f", peak {job['peak_mib']:.0f} MiB" if job.get("peak_mib") else ""), "",
                  markdown_table(["strategy", "seconds", "ACC"], [[s, str(v["seconds"]), f"{v['acc']:.4f}" if v["acc"] is not None else "-"]
                                                                  for s, v in job["per_strategy"].items()]), ""]
    return "\n".join(lines)


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(results, indent=2))
    (out / "gpu.md").write_text(markdown(results))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a few steps of each section (the test suite's smoke run)")
    parser.add_argument("--out", default="gpu_results", help="directory for gpu.json and gpu.md")
    parser.add_argument("--sections", default="tests,steps,main", help="which of tests, steps, main")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--replicas", default="1,8,32,128")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled cells")
    parser.add_argument("--compile-strategies", default=",".join(STRATEGIES), help="which strategies get compiled cells")
    parser.add_argument("--compile-replicas", default="", help="population sizes that get compiled cells (default: all of --replicas)")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="skip the bf16 cells")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128, help="batch per replica")
    parser.add_argument("--budget-s", type=float, default=240, help="seconds for the step section (cells after it are skipped)")
    parser.add_argument("--tests-budget-s", type=float, default=150, help="seconds for the test section")
    args = parser.parse_args(argv)
    if args.quick:
        args.replicas, args.steps, args.repeats, args.batch = "1,2", 2, 1, 16
        args.strategies = "bp,lfnn_local" if args.strategies == ",".join(STRATEGIES) else args.strategies
        args.models = "mlp_275k" if args.models == ",".join(MODELS) else args.models
        args.compile_replicas = "1"
        args.compile_strategies = "bp" if args.compile_strategies == ",".join(STRATEGIES) else args.compile_strategies
    device = resolve_device(args.device)
    out = Path(args.out)
    sections = args.sections.split(",")
    results: dict[str, Any] = {"machine": machine(device), "args": vars(args)}
    started = time.perf_counter()
    if "tests" in sections:
        results["tests"] = run_tests(device, args.quick, args.tests_budget_s)
        print(f"tests: {results['tests']['summary']}", flush=True)
        write(results, out)
    data = load_mnist(None, device)
    if "steps" in sections:
        results["steps"] = run_steps(device, data, args)
        write(results, out)
    if "main" in sections:
        results["main_job"] = run_main_job(device, data, args.quick, out)
        print(f"main job: {results['main_job']['seconds']} s", flush=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    write(results, out)
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
