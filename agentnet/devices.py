"""Devices: which one a run uses, and moving host tensors onto it without stalling it.

A training step must not wait for the GPU (see ``tests/test_host_sync.py``): a blocking host-to-device
copy (``tensor.to("cuda")``) synchronises the stream, so indices drawn on the host inside a step
(replay slots, memory batches) travel through :func:`to_device`, from pinned memory and without
blocking. Host generators stay the source of randomness, so a run draws the same examples on the
CPU and on CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor

from agentnet.config import ConfigError

__all__ = ["resolve_device", "to_device"]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r}: CUDA is not available on this machine; use device=cpu or auto")
    return torch.device(name)


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` (on the host) on ``device`` without synchronising it: on CUDA copied from pinned
    memory with ``non_blocking=True`` (the copy is ordered on the current stream, so kernels queued
    after it see the data, and the host does not wait); on the CPU the tensor itself."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)  # the tensor itself when it is already there
