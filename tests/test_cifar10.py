"""CIFAR-10 python-pickle loader and fetch step, on small generated files in the official format."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from agentnet.data import CIFAR10_DIR, CIFAR10_MEAN, CIFAR10_STD, DataError, load_cifar10
from agentnet.fetch import fetch_cifar10
from agentnet.recipes import train
from tests.conftest import compose_config
from tests.test_data import _Server

NAMES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")


def batch_bytes(n: int, seed: int) -> bytes:
    """A batch exactly as the official release pickles it: bytes keys, uint8 (n, 3072), list labels."""
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": f"batch {seed}".encode(),
        b"labels": rng.integers(0, 10, n).tolist(),
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    return pickle.dumps(batch, protocol=2)


def tiny_cifar(n: int = 8) -> dict[str, bytes]:
    return {name: batch_bytes(n, i) for i, name in enumerate(NAMES)}


def md5s(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.md5(raw).hexdigest() for name, raw in files.items()}


def write_cifar(root: Path, files: dict[str, bytes]) -> None:
    (root / CIFAR10_DIR).mkdir(parents=True, exist_ok=True)
    for name, raw in files.items():
        (root / CIFAR10_DIR / name).write_bytes(raw)


def test_loads_generated_batches_channel_major(tmp_path):
    files = tiny_cifar()
    write_cifar(tmp_path, files)
    data = load_cifar10(tmp_path, checksums=md5s(files), normalize=False)
    assert (len(data.train), len(data.test), data.channels, data.num_classes) == (40, 8, 3, 10)
    first = pickle.loads(files["data_batch_1"])
    torch.testing.assert_close(data.train.x[0], torch.from_numpy(first[b"data"][0].astype(np.float32) / 255))
    assert data.train.y[:8].tolist() == first[b"labels"]
    normed = load_cifar10(tmp_path, checksums=md5s(files))
    # Channel-major rows: values 0..1023 are red, normalised with the red statistics.
    red = (data.train.x[:, :1024] - CIFAR10_MEAN[0]) / CIFAR10_STD[0]
    torch.testing.assert_close(normed.train.x[:, :1024], red)


def test_missing_and_corrupt_cifar_say_how_to_fetch(tmp_path):
    with pytest.raises(DataError, match="agentnet-fetch-cifar10"):
        load_cifar10(tmp_path)
    files = tiny_cifar()
    write_cifar(tmp_path, files)
    with pytest.raises(DataError, match="corrupt.*agentnet-fetch-cifar10"):
        load_cifar10(tmp_path)  # the real release's md5s do not match generated files
    (tmp_path / CIFAR10_DIR / "test_batch").unlink()
    with pytest.raises(DataError, match="test_batch not found"):
        load_cifar10(tmp_path, checksums=md5s(files))


def test_batch_files_cannot_run_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    files = tiny_cifar()
    files["test_batch"] = pickle.dumps({b"data": Exploit(), b"labels": []})
    write_cifar(tmp_path, files)
    with pytest.raises(DataError, match="disallowed"):
        load_cifar10(tmp_path, verify=False)


def archive_bytes(files: dict[str, bytes], extra: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, raw in {**{f"{CIFAR10_DIR}/{n}": r for n, r in files.items()}, **(extra or {})}.items():
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return buf.getvalue()


def test_fetch_cifar10_from_mirror_verifies_archive_and_batches(tmp_path):
    files = tiny_cifar()
    good = archive_bytes(files, extra={"README": b"not extracted"})
    served = tmp_path / "served"
    (served / "bad").mkdir(parents=True)
    (served / "good").mkdir()
    (served / "bad" / "cifar-10-python.tar.gz").write_bytes(good[:-10])  # truncated download
    (served / "good" / "cifar-10-python.tar.gz").write_bytes(good)
    server = _Server(served)
    try:
        dest = tmp_path / "data"
        out = fetch_cifar10(
            dest,
            mirrors=[f"{server.url}/missing/", f"{server.url}/bad/", f"{server.url}/good/"],
            archive_md5=hashlib.md5(good).hexdigest(),
            checksums=md5s(files),
            progress=False,
        )
        assert out == dest / CIFAR10_DIR and sorted(p.name for p in out.iterdir()) == sorted(NAMES)
        assert [p.name for p in dest.iterdir()] == [CIFAR10_DIR]  # no archive or temp files left, README not extracted
        assert len(load_cifar10(dest, checksums=md5s(files)).train) == 40
        with pytest.raises(DataError) as err:
            fetch_cifar10(tmp_path / "other", mirrors=[f"{server.url}/bad/"], archive_md5=hashlib.md5(good).hexdigest(),
                          checksums=md5s(files), progress=False)
        assert "checksum mismatch" in str(err.value)
    finally:
        server.close()


def test_cnn_trains_on_cifar10_format(tmp_path):
    files = tiny_cifar(n=16)
    write_cifar(tmp_path, files)
    # The shipped checksums are the real release's; generated files need verify=false.
    cfg = compose_config(
        "data=cifar10", f"data.root={tmp_path}", "data.verify=false", "model=cnn_cifar10_900k", "strategy=lfnn_local",
        "trainer.epochs=1", "trainer.batch_size=16", "trainer.progress=false", "trainer.loggers=[]",
        "device=cpu", f"output_dir={tmp_path / 'run'}",
    )
    metrics = train(cfg)
    assert metrics["num_params"] == 900_430 and metrics["steps"] == 5
    with pytest.raises(Exception, match="model.in_channels"):
        train(compose_config("data=cifar10", f"data.root={tmp_path}", "data.verify=false", "model=cnn_mnist_438k",
                             "strategy=bp", "device=cpu", f"output_dir={tmp_path / 'run2'}"))
