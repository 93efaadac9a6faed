"""Two generations of checkpoints with checksums (issue 33, item 3): a damaged ``checkpoint.pt``
(truncated, bit-flipped, empty) is reported with its path and reason and the run resumes from
``checkpoint.prev.pt`` to the metrics of an uninterrupted run; when none verifies, it refuses."""

from __future__ import annotations

import hashlib
import logging

import pytest

from agentnet.recipes import train
from agentnet.training import CHECKPOINT, PREVIOUS, CheckpointError, load_checkpoint
from tests.conftest import compose_config, without_timing

BASE = ["strategy=lfnn", "model=mlp_400x2", "model.hidden=[40,40]", "data.subset=600", "data.test_subset=300", "trainer.batch_size=100",
        "trainer.progress=false", "trainer.lr_schedule=none", "device=cpu"]


def _run(mnist, out, epochs: int, *extra: str) -> dict:
    return train(compose_config(*BASE, f"trainer.epochs={epochs}", f"output_dir={out}", *extra), data=mnist)


def _damage(path, kind: str) -> None:
    data = bytearray(path.read_bytes())
    if kind == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif kind == "bit-flipped":
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(b"")


def test_each_generation_is_kept_with_its_checksum(mnist, tmp_path):
    _run(mnist, tmp_path, 2)
    for name in (CHECKPOINT, PREVIOUS):
        digest, recorded_name = (tmp_path / f"{name}.sha256").read_text().split()
        assert recorded_name == name and digest == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()  # `sha256sum -c` format
    assert load_checkpoint(tmp_path / CHECKPOINT)["epoch"] == 2 and load_checkpoint(tmp_path / PREVIOUS)["epoch"] == 1


@pytest.mark.parametrize("kind", [pytest.param("truncated", marks=pytest.mark.slow), "bit-flipped", pytest.param("empty", marks=pytest.mark.slow)])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(mnist, tmp_path, kind, caplog):
    whole = _run(mnist, tmp_path / "whole", 3)
    _run(mnist, tmp_path / "cut", 2)
    _damage(tmp_path / "cut" / CHECKPOINT, kind)
    with caplog.at_level(logging.WARNING):
        resumed = _run(mnist, tmp_path / "cut", 3, "resume=true")
    reason = {"truncated": "checksum mismatch", "bit-flipped": "checksum mismatch", "empty": "empty (0 bytes)"}[kind]
    assert f"{tmp_path / 'cut' / CHECKPOINT}: {reason}" in caplog.text
    assert f"resuming from the previous checkpoint {tmp_path / 'cut' / PREVIOUS}" in caplog.text
    assert resumed["resumed"]["from"] == str(tmp_path / "cut" / PREVIOUS) and resumed["resumed"]["epoch"] == 1
    assert without_timing(resumed["history"]) == without_timing(whole["history"])
    assert without_timing({k: v for k, v in resumed.items() if k != "resumed"}) == without_timing(whole)
    # The damaged file is kept aside; the generations are good again (epochs 3 and 2).
    assert (tmp_path / "cut" / f"{CHECKPOINT}.damaged").exists()
    assert load_checkpoint(tmp_path / "cut" / CHECKPOINT)["epoch"] == 3 and load_checkpoint(tmp_path / "cut" / PREVIOUS)["epoch"] == 2


def test_no_verifying_checkpoint_is_refused_naming_each(mnist, tmp_path):
    _run(mnist, tmp_path, 2)
    _damage(tmp_path / CHECKPOINT, "bit-flipped")
    _damage(tmp_path / PREVIOUS, "truncated")
    with pytest.raises(CheckpointError, match="no checkpoint verifies") as caught:
        _run(mnist, tmp_path, 3, "resume=true")
    assert str(tmp_path / CHECKPOINT) in str(caught.value) and str(tmp_path / PREVIOUS) in str(caught.value)


def test_a_checkpoint_without_its_checksum_is_verified_by_structure(mnist, tmp_path):
    """Written by an earlier version, or cut off between the rename and the checksum: it loads."""
    whole = _run(mnist, tmp_path / "whole", 3)
    _run(mnist, tmp_path / "cut", 2)
    (tmp_path / "cut" / f"{CHECKPOINT}.sha256").unlink()
    resumed = _run(mnist, tmp_path / "cut", 3, "resume=true")
    assert resumed["resumed"]["epoch"] == 2
    assert without_timing(resumed["history"]) == without_timing(whole["history"])
