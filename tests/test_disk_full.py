"""A full disk (issue 33, item 1), for real: a run whose output directory is a small tmpfs stops at
the checkpoint that no longer fits, with an error naming the file and the cause, both earlier
checkpoints intact; after space is freed, ``resume=true`` continues to the uninterrupted run's metrics."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from agentnet.training import CHECKPOINT, PREVIOUS, load_verified
from tests.conftest import REPO, without_timing
from tests.test_resume import _cli, _run

OVERRIDES = ["strategy=lfnn", "model=mlp_400x2", "data.subset=2000", "data.test_subset=500", "trainer.epochs=4",
             "trainer.loggers=[]", "trainer.lr_schedule=none"]


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mount point (root only); yields a function that mounts or resizes it to ``size`` bytes."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = []

    def size_to(size: int) -> None:
        options = f"{'remount,' if mounted else ''}size={size}"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): needs root")
        mounted.append(True)

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount, size_to
    if mounted:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_full_disk_stops_the_run_and_loses_nothing(tmp_path, small_disk):
    mount, size_to = small_disk
    _run(_cli(tmp_path / "straight", *OVERRIDES))
    checkpoint = (tmp_path / "straight" / CHECKPOINT).stat().st_size
    # Room for two generations and a little more, not for the third file a rotation writes first.
    size_to(int(2.6 * checkpoint))
    out = mount / "run"
    failed = subprocess.run(_cli(out, *OVERRIDES), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert failed.returncode == 1
    assert f"{out / CHECKPOINT}: could not be written (No space left on device); the previous checkpoints are intact" in failed.stdout + failed.stderr
    state, path = load_verified(out)  # both generations verify: nothing was damaged
    assert path == out / CHECKPOINT and state["epoch"] == 2 and load_verified(out) is not None
    assert (out / PREVIOUS).is_file() and not list(out.glob("*.tmp"))
    size_to(64 * checkpoint)  # space freed
    _run(_cli(out, *OVERRIDES, "resume=true"))
    a = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert b["resumed"]["epoch"] == 2
    assert without_timing(a) == without_timing(b)
