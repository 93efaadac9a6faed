"""On-device augmentation of training batches (``data.augment``): random crops of the zero-padded
image and horizontal flips, as torchvision's ``RandomCrop(s, padding=p)`` then
``RandomHorizontalFlip()`` do to one image — for a whole ``(R, B, D)`` batch in two gathers on its device.

:class:`Augmentation` is a trainer plugin: its ``adapt_batch`` changes every training batch and
nothing else (evaluation never sees it). It runs after the CL method's ``adapt_batch``, so replayed
examples are augmented afresh each time they are drawn while the memory keeps the images as they
are. Flat inputs (an MLP's) are augmented as the images they are — ``data.channels`` x s x s,
channel-major — before the network reads them.

Randomness: replica ``r`` draws its crops and flips at step ``t`` from a host generator seeded with
``(seeds[r], t)`` alone (:func:`augmentation_seed`). So a population augments each replica exactly
as its own run with that seed would, the draws are the same on the CPU and on CUDA, and a resumed
run draws what the uninterrupted one did without any state in the checkpoint (``trainer.step`` is
in it). The draws go to the device without blocking (:func:`agentnet.devices.to_device`).
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from agentnet.config import ConfigError, DataConfig
from agentnet.data import ImageData
from agentnet.devices import to_device
from agentnet.training.plugins import TrainerPlugin

if TYPE_CHECKING:  # the engine imports the plugins, not the other way round
    from agentnet.training.engine import Trainer

__all__ = ["Augmentation", "augmentation_seed", "crop_flip"]


def augmentation_seed(seed: int, step: int) -> int:
    """The seed of a replica's augmentation draws at ``step``: a hash of ``(seed, step)``, so that
    nearby seeds and steps give unrelated streams (and none equals the replica's shuffle stream)."""
    digest = hashlib.blake2b(f"agentnet.augment:{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def crop_flip(images: Tensor, shifts: Tensor, flips: Tensor, padding: int, fill: Tensor) -> Tensor:
    """Crop every image of ``images`` ``(N, C, H, W)`` out of its copy padded by ``padding`` pixels of
    ``fill`` (per channel, ``(C,)``) on every side, then mirror it left-right where ``flips`` ``(N,)``
    is true. ``shifts`` ``(N, 2)`` holds each crop's top-left corner (row, column) in the padded
    image, in ``[0, 2 * padding]``: ``padding`` is the image itself. Two gathers and a select, no
    padded copy; the output has the input's shape and dtype."""
    N, C, H, W = images.shape
    rows = shifts[:, :1] - padding + torch.arange(H, device=images.device)  # (N, H) source rows
    columns = torch.arange(W, device=images.device)
    columns = shifts[:, 1:] - padding + torch.where(flips[:, None], W - 1 - columns, columns)  # crop, then mirror
    out = images.gather(2, rows.clamp(0, H - 1).view(N, 1, H, 1).expand(N, C, H, W))
    out = out.gather(3, columns.clamp(0, W - 1).view(N, 1, 1, W).expand(N, C, H, W))
    inside = ((rows >= 0) & (rows < H)).view(N, 1, H, 1) & ((columns >= 0) & (columns < W)).view(N, 1, 1, W)
    return torch.where(inside, out, fill.to(images.dtype).view(1, C, 1, 1))


class Augmentation(TrainerPlugin):
    """Random crops and/or flips of every training batch, per replica from ``(seed, step)``.

    ``kind``: ``crop``, ``flip`` or ``crop_flip``; ``padding``: pixels padded on every side before a
    crop; images are ``channels`` x ``side`` x ``side``; padding is ``fill`` ``(C,)`` (on the batches'
    device: the value of a black pixel in the data, :attr:`agentnet.data.ImageData.black`).
    """

    def __init__(self, kind: str, padding: int, channels: int, side: int, fill: Tensor, seeds: Sequence[int]) -> None:
        self.crop, self.flip = "crop" in kind, "flip" in kind
        self.padding = padding if self.crop else 0
        self.channels, self.side = channels, side
        self.fill = fill
        self.seeds = list(seeds)

    @classmethod
    def for_run(cls, cfg: DataConfig, data: ImageData, seeds: Sequence[int]) -> "Augmentation | None":
        """The augmentation ``cfg.augment`` asks for on ``data``'s images (``None`` for ``none``); a
        flat row that is not a square image, or a padding as large as the image, is refused."""
        if cfg.augment == "none":
            return None
        side = math.isqrt(data.input_dim // data.channels)
        if data.channels * side * side != data.input_dim:
            raise ConfigError(f"data.augment={cfg.augment}: {data.input_dim} inputs are not {data.channels}-channel square images")
        if "crop" in cfg.augment and cfg.crop_padding >= side:
            raise ConfigError(f"data.crop_padding={cfg.crop_padding}: must be smaller than the {side}-pixel image side")
        x = data.train.x
        return cls(cfg.augment, cfg.crop_padding, data.channels, side, torch.tensor(data.black, dtype=x.dtype, device=x.device), seeds)

    def draw(self, step: int, batch: int) -> tuple[Tensor, Tensor]:
        """The host draws of ``step`` for a batch of ``batch`` per replica: crop corners ``(R, batch, 2)``
        and flips ``(R, batch)``; replica ``r``'s come from its own seed alone."""
        shifts, flips = [], []
        for seed in self.seeds:
            gen = torch.Generator().manual_seed(augmentation_seed(seed, step))
            shifts.append(torch.randint(0, 2 * self.padding + 1, (batch, 2), generator=gen))
            flips.append(torch.rand(batch, generator=gen) < 0.5 if self.flip else torch.zeros(batch, dtype=torch.bool))
        return torch.stack(shifts), torch.stack(flips)

    def adapt_batch(self, trainer: "Trainer", x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        R, B, D = x.shape
        shifts, flips = self.draw(trainer.step, B)
        images = x.reshape(R * B, self.channels, self.side, self.side)
        out = crop_flip(images, to_device(shifts.view(R * B, 2), x.device), to_device(flips.view(R * B), x.device), self.padding, self.fill)
        return out.view(R, B, D), y
