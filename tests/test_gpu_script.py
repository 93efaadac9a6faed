"""``benchmarks/gpu.py --device cpu --quick``: the device script runs end to end on the CPU, so it is
ready whenever a GPU machine is lent (issue 32)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def test_the_gpu_script_runs_every_section_on_the_cpu(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--device", "cpu", "--quick", "--out", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert results["tests"]["ok"], results["tests"]
    cells = results["steps"]
    timed = [c for c in cells if "ms_per_replica" in c]
    assert {(c["strategy"], c["compiled"], c["precision"], c["replicas"]) for c in timed} >= {
        ("hand loop", False, "fp32", 1), ("bp", False, "fp32", 2), ("lfnn_local", False, "bf16", 2), ("bp", True, "fp32", 1)}
    assert all(c["ms_per_replica"] > 0 for c in timed)
    assert set(results["main_job"]["per_strategy"]) == {"bp", "lfnn", "lfnn_local", "attention"}
    assert all(0 <= v["acc"] <= 1 for v in results["main_job"]["per_strategy"].values())
    table = (tmp_path / "gpu.md").read_text()
    assert "**mlp_275k, fp32**" in table and "bp (compiled)" in table and "**Main job**" in table
