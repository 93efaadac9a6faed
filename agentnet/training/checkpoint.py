"""Checkpoint files that never execute code, written atomically, guarded by a run-directory lock.

* :func:`atomic_save` / :func:`atomic_write_json`: a unique temporary file per writer, then a rename,
  so readers and concurrent writers never see half a file.
* :func:`save_checkpoint` / :func:`load_verified`: two generations (``checkpoint.pt`` and the one
  before it, ``checkpoint.prev.pt``), each with its SHA-256 beside it (``<file>.sha256``, in
  ``sha256sum`` format); loading verifies size, checksum and structure and falls back to the previous
  generation, with a warning, when the newest is damaged (a node dying mid-copy, a bit flip).
* :func:`load_checkpoint`: ``torch.load(weights_only=True)``; state is tensors and plain containers.
* :func:`config_differences`: the keys that would change training, checkpoint vs current config.
* :class:`RunLock`: a run refuses a directory that a live run holds (an ``flock``; the file names its PID).
* :func:`rng_state` / :func:`set_rng_state`: Python, NumPy and torch generators as plain values.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import pickle
import random
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agentnet.config import ConfigError

__all__ = [
    "CHECKPOINT",
    "PREVIOUS",
    "CheckpointError",
    "RunDirectoryLockedError",
    "atomic_save",
    "atomic_write_json",
    "load_checkpoint",
    "save_checkpoint",
    "load_verified",
    "remove_checkpoints",
    "config_differences",
    "RunLock",
    "rng_state",
    "set_rng_state",
]

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
"""The generation before ``checkpoint.pt``, kept so a damaged newest one loses one interval, not the run."""
LOCK = ".agentnet.lock"
#: The checkpoint format this version writes and reads.
FORMAT = 4

log = logging.getLogger(__name__)

#: Config keys that may differ on resume: they do not change what is trained, or only extend it.
RESUMABLE_KEYS = {
    "trainer.epochs",
    "trainer.compile",  # the same step, compiled or not
    "trainer.max_steps",
    "trainer.progress",
    "trainer.log_every",
    "trainer.checkpoint",
    "trainer.checkpoint_every",
    "trainer.loggers",
    "trainer.tracking_uri",
    "trainer.project",
    "trainer.tensorboard",  # replaced by trainer.loggers; kept so that runs written before it still resume
    "trainer.record_activity",
    "trainer.train_accuracy",  # only whether the running accuracy is measured (counted over the steps that measured it)
    "trainer.eval_batch_size",
    "data.root",
    "data.verify",
    "benchmark.eval_every",
}
#: Top-level groups and keys compared on resume (device, threads, paths, experiment are free).
COMPARED = ("strategy", "model", "data", "trainer", "benchmark", "cl", "seed")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, unsafe to unpickle, or from another config."""


class RunDirectoryLockedError(RuntimeError):
    """Another live run holds the output directory."""


def _temporary(path: Path) -> Path:
    return path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file unique to this writer, then rename over ``path``."""
    tmp = _temporary(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(obj: Any, path: Path) -> None:
    """Write JSON via a temporary file and a rename, so readers never see half a file."""
    atomic_write_text(json.dumps(obj, indent=2), path)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``: a file that would run code is refused."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: refused to load — it holds objects other than tensors and plain containers "
            f"(a checkpoint never executes code; {first})"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable agentnet checkpoint ({exc})") from None


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(state: dict, directory: Path, rotate: bool = True) -> Path:
    """Write ``state`` as ``<directory>/checkpoint.pt`` with its checksum, keeping the generation
    before as ``checkpoint.prev.pt`` (``rotate=False``: replace the current one, keeping the
    previous generation — a second save of the same step, e.g. at a task's end after its epoch's).

    The new file is written and synced under a temporary name first, so a failed write (a full disk)
    raises with both generations untouched; only then does the current one become the previous one
    and the new one take its place. A crash between those renames leaves a verifiable previous one.
    """
    path, previous = directory / CHECKPOINT, directory / PREVIOUS
    tmp = _temporary(path)
    try:
        buffer = io.BytesIO()  # serialised in memory, so a failed write is the OS's own error (ENOSPC, EIO, EFBIG)
        torch.save(state, buffer)
        try:
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            kept = "the previous checkpoints are intact" if path.exists() else "no earlier checkpoint exists"
            raise CheckpointError(f"{path}: could not be written ({exc.strerror or exc}); {kept}. Free space (or fix the disk) "
                                  "and continue with resume=true") from None
        line = f"{hashlib.sha256(buffer.getbuffer()).hexdigest()}  {CHECKPOINT}\n"
        if rotate and path.exists():
            os.replace(path, previous)
            digest = _digest_path(path)
            if digest.exists():
                atomic_write_text(digest.read_text().replace(f"  {CHECKPOINT}", f"  {PREVIOUS}"), _digest_path(previous))
            else:
                _digest_path(previous).unlink(missing_ok=True)
        os.replace(tmp, path)
        atomic_write_text(line, _digest_path(path))
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(text: str, path: Path) -> None:
    """Write text via a temporary file and a rename, so readers never see half a file."""
    tmp = _temporary(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _verify(path: Path) -> dict:
    """Load ``path`` if its size, checksum and structure verify; :class:`CheckpointError` saying why not."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty (0 bytes)")
    digest = _digest_path(path)
    if digest.is_file():
        expected = (digest.read_text().split() or [""])[0]
        actual = _sha256(path)
        if expected != actual:
            raise CheckpointError(f"{path}: checksum mismatch (recorded {expected[:12]}..., the file has {actual[:12]}...; "
                                  f"{size} bytes): damaged or truncated")
    state = load_checkpoint(path, "cpu")  # generator states must stay on the CPU; tensors move on load
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an agentnet checkpoint of this version (no format {FORMAT} marker)")
    return state


def load_verified(directory: Path) -> tuple[dict, Path] | None:
    """The newest checkpoint in ``directory`` that verifies, and its path; ``None`` when there is none.

    A damaged ``checkpoint.pt`` is reported (path and reason) and ``checkpoint.prev.pt`` used
    instead; when checkpoints exist but none verifies, :class:`CheckpointError` lists each and why.
    """
    problems = []
    for path in (directory / CHECKPOINT, directory / PREVIOUS):
        if not path.is_file():
            continue
        try:
            state = _verify(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            log.warning("%s; trying the previous checkpoint", exc)
            continue
        if problems:
            log.warning("resuming from the previous checkpoint %s (one interval of training is redone)", path)
        return state, path
    if problems:
        raise CheckpointError("no checkpoint verifies: " + "; ".join(problems))
    return None


def remove_checkpoints(directory: Path) -> None:
    """Delete both generations and their checksums (a run that must start over)."""
    for name in (CHECKPOINT, PREVIOUS):
        (directory / name).unlink(missing_ok=True)
        _digest_path(directory / name).unlink(missing_ok=True)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): node}


def config_differences(saved: dict, current: dict) -> list[str]:
    """``key: checkpoint=<a>, this run=<b>`` for every training-relevant key that differs.

    A key the checkpoint lacks whose value here is ``None`` is no difference: it is an optional field
    added after the checkpoint was written, left off (``null`` is every optional feature's off value,
    e.g. ``benchmark.samples_per_task``), so the run trains as the one that wrote the checkpoint.
    """
    diffs = []
    a = {k: v for g in COMPARED for k, v in _flatten(saved.get(g), f"{g}.").items()}
    b = {k: v for g in COMPARED for k, v in _flatten(current.get(g), f"{g}.").items()}
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_KEYS:
            continue
        if key not in a and b[key] is None:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: checkpoint={a.get(key, '<absent>')!r}, this run={b.get(key, '<absent>')!r}")
    return diffs


def check_resumable(saved: dict, current: dict, path: Path) -> None:
    """Refuse a checkpoint whose config differs in a key that changes training."""
    diffs = config_differences(saved, current)
    if diffs:
        raise ConfigError(
            f"resume=true: {path} was written by a run with a different config; resuming would mix both. "
            "Differences:\n  " + "\n  ".join(diffs) + "\nStart a fresh run (another output directory) or restore these values."
        )


class RunLock:
    """Exclusive hold on a run directory for this process: an ``flock`` on ``.agentnet.lock``
    (which also records the holder's PID for the error message).

    The operating system drops the lock when its process dies, ``kill -9`` included, so a crashed
    run never blocks its directory; a live holder makes a second run fail with a clear error. Taking
    the lock also removes an ``error.txt`` a failed earlier attempt left there.
    """

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirectoryLockedError(
                f"{self.path.parent} is in use by a live run (PID {holder}, lock file {self.path}); "
                "wait for it, or give this run another output directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        (self.path.parent / "error.txt").unlink(missing_ok=True)
        return self

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def rng_state() -> dict:
    """Python's, NumPy's and torch's global generator states as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
        "python_gauss": random.getstate()[2],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    values = state["python"]
    random.setstate((values[-1], tuple(values[:-1]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
