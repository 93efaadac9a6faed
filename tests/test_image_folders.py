"""Tiny ImageNet and class-per-folder image datasets (decoded once with Pillow, cached beside the
files), and on-device augmentation (random crops of the zero-padded image, horizontal flips), on
miniature layouts generated here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agentnet.composition import to_run_config
from agentnet.config import ConfigError, DataConfig
from agentnet.data import CACHE_DIR, TINY_IMAGENET_DIR, TINY_IMAGENET_URL, DataError, ImageData, Split, load_dataset, load_image_folder, load_tiny_imagenet
from agentnet.recipes import train
from agentnet.session import build_session, prepare_run
from agentnet.training.augment import Augmentation, augmentation_seed, crop_flip
from tests.conftest import compose_config, without_timing

WNIDS = ["n02", "n01", "n03"]  # not sorted: the class index is the line order of wnids.txt
SIDE = 16


def _pixels(rng: np.random.Generator, side: int = SIDE, gray: bool = False) -> np.ndarray:
    # Smooth images (a gradient plus a little noise): JPEG keeps them close to what was written.
    base = np.add.outer(np.arange(side), np.arange(side)) * (200 // (2 * side))
    shape = (side, side) if gray else (side, side, 3)
    noise = rng.integers(0, 40, shape)
    return np.clip((base if gray else base[..., None]) + noise, 0, 255).astype(np.uint8)


def _save(path: Path, pixels: np.ndarray, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)


def make_tiny_imagenet(root: Path, per_class: int = 4, val: int = 6, seed: int = 0) -> Path:
    """A miniature ``tiny-imagenet-200``: its real layout, 3 classes, 16x16 JPEGs, one of them grayscale."""
    rng = np.random.default_rng(seed)
    directory = root / TINY_IMAGENET_DIR
    directory.mkdir(parents=True)
    (directory / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (directory / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in WNIDS))
    for wnid in WNIDS:
        for i in range(per_class):
            _save(directory / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", _pixels(rng, gray=(wnid, i) == ("n01", 1)), "JPEG")
        (directory / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    lines = []
    for i in range(val):
        _save(directory / "val" / "images" / f"val_{i}.JPEG", _pixels(rng), "JPEG")
        lines.append(f"val_{i}.JPEG\t{WNIDS[(i + 1) % 3]}\t0\t0\t15\t15")
    (directory / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    _save(directory / "test" / "images" / "test_0.JPEG", _pixels(rng), "JPEG")  # unlabelled: never read
    return directory


def make_image_folder(root: Path, name: str = "shapes", sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """``<root>/<name>/{train,test}/<class>/``: PNGs and JPEGs (one grayscale), test without one class."""
    rng = np.random.default_rng(seed)
    directory = root / name
    for split, classes in (("train", ("cat", "ant", "bee")), ("test", ("bee", "ant"))):
        for cls in classes:
            for i in range(3 if split == "train" else 2):
                fmt = "PNG" if i % 2 == 0 else "JPEG"
                side = (sizes or {}).get(f"{split}/{cls}/{i}", SIDE)
                _save(directory / split / cls / f"img{i}.{fmt.lower()}", _pixels(rng, side, gray=(cls, i) == ("bee", 1)), fmt)
    (directory / "train" / "cat" / "notes.txt").write_text("not an image: ignored")
    return directory


def _decoded(path: Path) -> torch.Tensor:
    """What Pillow decodes from ``path``, as RGB (C, H, W) values in [0, 1]."""
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).transpose(2, 0, 1).astype(np.float32) / 255)


# -- Tiny ImageNet ---------------------------------------------------------------------------------

def test_tiny_imagenet_loads_the_release_layout(tmp_path):
    directory = make_tiny_imagenet(tmp_path)
    data = load_tiny_imagenet(tmp_path, verify=False, normalize=False)
    assert (len(data.train), len(data.test), data.num_classes, data.channels, data.input_dim) == (12, 6, 3, 3, 3 * SIDE * SIDE)
    assert data.classes == tuple(WNIDS) and data.standardized is False and data.mean is None
    assert data.train.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # wnids.txt order, then sorted file names
    assert data.test.y.tolist() == [(i + 1) % 3 for i in range(6)]  # val_annotations.txt's labels, in its order
    first = data.train.x[0].view(3, SIDE, SIDE)
    torch.testing.assert_close(first, _decoded(directory / "train" / "n02" / "images" / "n02_0.JPEG"))
    gray = data.train.x[5].view(3, SIDE, SIDE)  # n01_1, a one-channel JPEG: converted to RGB
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    torch.testing.assert_close(data.test.x[2].view(3, SIDE, SIDE), _decoded(directory / "val" / "images" / "val_2.JPEG"))

    normed = load_tiny_imagenet(tmp_path, verify=False)
    pixels = data.train.x.view(12, 3, -1)
    mean, std = pixels.mean((0, 2)), pixels.permute(1, 0, 2).reshape(3, -1).std(1, unbiased=False)
    torch.testing.assert_close(torch.tensor(normed.mean, dtype=torch.float32), mean)
    torch.testing.assert_close(torch.tensor(normed.std, dtype=torch.float32), std)
    expected = (data.test.x.view(6, 3, -1) - mean.view(1, 3, 1)) / std.view(1, 3, 1)  # the training split's statistics
    torch.testing.assert_close(normed.test.x.view(6, 3, -1), expected, atol=1e-5, rtol=1e-5)
    black = torch.tensor(normed.black)
    torch.testing.assert_close(black, -mean / std)


def test_tiny_imagenet_verifies_the_release_counts_and_resizes(tmp_path):
    make_tiny_imagenet(tmp_path)
    with pytest.raises(DataError, match=r"incomplete: wnids.txt lists 3 classes, the release 200.*data.verify=false"):
        load_tiny_imagenet(tmp_path)
    data = load_dataset("tiny_imagenet", tmp_path, "cpu", verify=False, image_size=8, grayscale=True)
    assert (data.channels, data.input_dim, len(data.train)) == (1, 64, 12)


def _drop(path: Path) -> None:
    path.unlink() if path.is_file() else [p.unlink() for p in path.iterdir()]


@pytest.mark.parametrize("damage, message", [
    (lambda d: os.rename(d, d.with_name("elsewhere")), rf"Tiny ImageNet not found: .*{TINY_IMAGENET_DIR} does not exist.*{TINY_IMAGENET_URL}"),
    (lambda d: (d / "wnids.txt").unlink(), r"wnids.txt is missing.*tiny-imagenet-200.zip"),
    (lambda d: (d / "wnids.txt").write_text("n02\nn02\n"), r"wnids.txt lists 2 class ids \(1 distinct\)"),
    (lambda d: os.rename(d / "train" / "n01", d / "train" / "n09"), r"class n01 \(line 2 of wnids.txt\) has no folder .*train/n01/images"),
    (lambda d: _drop(d / "train" / "n03" / "images"), r"train/n03/images \(class n03\) holds no images"),
    (lambda d: (d / "val" / "val_annotations.txt").unlink(), r"val/val_annotations.txt is missing"),
    (lambda d: (d / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn07\t0\t0\t1\t1\n"),
     r"val_annotations.txt line 1 labels val_0.JPEG with class 'n07', which .*wnids.txt does not list"),
    (lambda d: (d / "val" / "images" / "val_3.JPEG").unlink(), r"val_annotations.txt line 4 names .*val/images/val_3.JPEG, which does not exist"),
    (lambda d: (d / "val" / "images" / "val_4.JPEG").write_bytes((d / "val" / "images" / "val_4.JPEG").read_bytes()[:200]),
     r"image .*val/images/val_4.JPEG cannot be decoded.*truncated"),
    (lambda d: (d / "train" / "n02" / "images" / "n02_2.JPEG").write_bytes(b"not a jpeg"), r"image .*n02_2.JPEG cannot be decoded"),
    (lambda d: _save(d / "train" / "n03" / "images" / "n03_1.JPEG", _pixels(np.random.default_rng(1), 12), "JPEG"),
     r"image .*n03_1.JPEG is 12x12, but .*n02_0.JPEG is 16x16: .*data.image_size"),
], ids=["root", "wnids", "duplicate-wnids", "class-folder", "empty-class", "annotations", "unknown-wnid", "missing-val-file",
        "truncated", "not-an-image", "size"])
def test_tiny_imagenet_layout_errors_name_the_file_and_the_fix(tmp_path, damage, message):
    directory = make_tiny_imagenet(tmp_path)
    damage(directory)
    with pytest.raises(DataError, match=message):
        load_tiny_imagenet(tmp_path, verify=False)


# -- image_folder ----------------------------------------------------------------------------------

def test_image_folder_labels_follow_sorted_training_folders(tmp_path):
    directory = make_image_folder(tmp_path)
    data = load_image_folder(tmp_path, folder="shapes", normalize=False)
    assert data.classes == ("ant", "bee", "cat") and data.num_classes == 3 and data.channels == 3
    assert data.train.y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert data.test.y.tolist() == [0, 0, 1, 1]  # test/ has ant and bee only: labelled as in train/
    torch.testing.assert_close(data.train.x[3].view(3, SIDE, SIDE), _decoded(directory / "train" / "bee" / "img0.png"))
    assert torch.equal(data.train.x[4].view(3, -1)[0], data.train.x[4].view(3, -1)[2])  # the grayscale JPEG, as RGB
    absolute = load_image_folder(tmp_path / "elsewhere", folder=str(directory), normalize=False)  # an absolute folder
    assert torch.equal(absolute.train.x, data.train.x)
    gray = load_image_folder(tmp_path, folder="shapes", grayscale=True, image_size=8)
    assert (gray.channels, gray.input_dim, len(gray.test)) == (1, 64, 4)


def test_image_folder_sizes_must_agree_unless_resized(tmp_path):
    make_image_folder(tmp_path, sizes={"train/cat/2": 20, "test/ant/0": 24})
    with pytest.raises(DataError, match=r"image .*train/cat/img2.png is 20x20, but .*img0.png is 16x16.*data.image_size=<side>"):
        load_image_folder(tmp_path, folder="shapes")
    data = load_image_folder(tmp_path, folder="shapes", image_size=12)
    assert data.input_dim == 3 * 12 * 12 and len(data.train) == 9
    wide = tmp_path / "wide"
    _save(wide / "train" / "a" / "x.png", np.zeros((10, 14, 3), np.uint8), "PNG")
    _save(wide / "test" / "a" / "x.png", np.zeros((10, 14, 3), np.uint8), "PNG")
    with pytest.raises(DataError, match=r"x.png is 14x10, not square: set data.image_size"):
        load_image_folder(tmp_path, folder="wide")
    # Shorter side to 6, then the centre 6x6 of the 8x6 result.
    assert load_image_folder(tmp_path, folder="wide", image_size=6, normalize=False).input_dim == 3 * 36


@pytest.mark.parametrize("damage, folder, error, message", [
    (lambda d: None, None, ConfigError, r"^data.folder=None: data.name=image_folder reads <data.root>/<data.folder>/train/<class>/"),
    (lambda d: None, "nowhere", DataError, r"image folder dataset not found: .*nowhere does not exist \(data.root / data.folder\)"),
    (lambda d: _drop_tree(d / "test"), "shapes", DataError, r"shapes has no test/ folder"),
    (lambda d: (d / "train" / "dog").mkdir(), "shapes", DataError, r"class folder .*train/dog holds no images"),
    (lambda d: (d / "test" / "eel").mkdir(), "shapes", DataError,
     r"test: class folder\(s\) \['eel'\] have no training folder .*the test classes must be among the training classes"),
    (lambda d: (d / "train" / "ant" / "img1.jpeg").write_bytes(b"\xff\xd8\xff broken"), "shapes", DataError, r"image .*ant/img1.jpeg cannot be decoded"),
], ids=["no-folder", "missing", "no-test", "empty-class", "unknown-test-class", "corrupt"])
def test_image_folder_errors_name_the_file_or_field(tmp_path, damage, folder, error, message):
    damage(make_image_folder(tmp_path))
    with pytest.raises(error, match=message):
        load_image_folder(tmp_path, folder=folder)


def _drop_tree(path: Path) -> None:
    for p in sorted(path.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    path.rmdir()


# -- the decoded-image cache -----------------------------------------------------------------------

def _caches(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (directory / CACHE_DIR).glob("*.npz")}


def test_images_are_decoded_once_and_again_when_a_file_changes(tmp_path):
    directory = make_image_folder(tmp_path)
    first = load_image_folder(tmp_path, folder="shapes", normalize=False)
    caches = _caches(directory)
    assert sorted(name.split("-")[0] for name in caches) == ["test", "train"]
    assert not list((directory / CACHE_DIR).glob("*.tmp"))  # written through a temporary file, renamed
    again = load_image_folder(tmp_path, folder="shapes", normalize=False)
    assert _caches(directory) == caches and torch.equal(again.train.x, first.train.x)  # read, not rewritten
    # A changed image (new pixels, new mtime) is decoded again; its stale cache goes, the test split's stays.
    changed = directory / "train" / "cat" / "img0.png"
    _save(changed, np.full((SIDE, SIDE, 3), 7, np.uint8), "PNG")
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    updated = load_image_folder(tmp_path, folder="shapes", normalize=False)
    assert torch.all(updated.train.x[6] == 7 / 255)
    now = _caches(directory)
    (old_train,), (new_train,) = [n for n in caches if n.startswith("train-")], [n for n in now if n.startswith("train-")]
    test_cache = next(n for n in caches if n.startswith("test-"))
    assert len(now) == 2 and new_train != old_train and now[test_cache] == caches[test_cache]
    # Another image size is another cache, kept beside the first (a sweep over sizes does not thrash).
    load_image_folder(tmp_path, folder="shapes", image_size=8)
    assert len(_caches(directory)) == 4


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_damaged_or_crafted_cache_is_decoded_again_and_runs_no_code(tmp_path, caplog):
    directory = make_tiny_imagenet(tmp_path)
    expected = load_tiny_imagenet(tmp_path, verify=False).train.x
    train_cache = next((directory / CACHE_DIR).glob("train-*.npz"))
    marker = tmp_path / "pwned"
    with open(train_cache, "wb") as fh:  # an object array: np.savez pickles it
        np.savez(fh, images=np.array([_RunsCode(marker)], dtype=object), labels=np.zeros(12, np.int64))
    with caplog.at_level("WARNING"):
        assert torch.equal(load_tiny_imagenet(tmp_path, verify=False).train.x, expected)
    assert not marker.exists() and "unreadable" in caplog.text
    train_cache.write_bytes(b"PK\x03\x04 truncated")
    assert torch.equal(load_tiny_imagenet(tmp_path, verify=False).train.x, expected)


def test_a_read_only_dataset_still_loads(tmp_path, caplog):
    directory = make_image_folder(tmp_path)
    (directory / CACHE_DIR).mkdir()
    (directory / CACHE_DIR).chmod(0o500)
    try:
        if os.access(directory / CACHE_DIR, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with caplog.at_level("WARNING"):
            assert len(load_image_folder(tmp_path, folder="shapes").train) == 9
        assert "could not write the decoded-image cache" in caplog.text
    finally:
        (directory / CACHE_DIR).chmod(0o700)


# -- config ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, field", [
    (["data.folder=x"], "data.folder"),
    (["data=cifar10", "data.image_size=16"], "data.image_size"),
    (["data.grayscale=true"], "data.grayscale"),
    (["data=tiny_imagenet", "data.image_size=0"], "data.image_size"),
    (["data=cifar10", "data.augment=mixup"], "data.augment"),
    (["data=cifar10", "data.augment=crop", "data.crop_padding=0"], "data.crop_padding"),
    (["data.augment=crop", "benchmark=pmnist_quick"], "data.augment"),
    (["data.augment=flip", "experiment=lfnn_table1_mnist"], "data.augment"),
], ids=["folder", "image-size", "grayscale", "zero-size", "kind", "padding", "permuted", "experiment"])
def test_bad_data_settings_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        to_run_config(compose_config(*overrides))
    assert str(err.value).startswith(field), str(err.value)


def test_new_fields_default_to_the_old_behaviour():
    cfg = DataConfig()
    assert (cfg.folder, cfg.image_size, cfg.grayscale, cfg.augment, cfg.crop_padding) == (None, None, False, "none", 4)
    assert to_run_config(compose_config("data=image_folder", "data.folder=mine", "data.augment=crop_flip")).data.folder == "mine"


# -- augmentation ----------------------------------------------------------------------------------

def _reference(image: torch.Tensor, dy: int, dx: int, flip: bool, padding: int, fill: torch.Tensor) -> torch.Tensor:
    """torchvision's RandomCrop(padding) then RandomHorizontalFlip, for one (C, H, W) image, written plainly."""
    C, H, W = image.shape
    padded = fill.view(C, 1, 1).expand(C, H + 2 * padding, W + 2 * padding).clone()
    padded[:, padding : padding + H, padding : padding + W] = image
    crop = padded[:, dy : dy + H, dx : dx + W]
    return crop.flip(-1) if flip else crop


def test_crop_flip_matches_padding_cropping_and_mirroring():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(12, 3, 8, 8, generator=gen)
    shifts = torch.randint(0, 9, (12, 2), generator=gen)
    flips = torch.rand(12, generator=gen) < 0.5
    fill = torch.tensor([-1.0, -2.0, -3.0])
    out = crop_flip(images, shifts, flips, 4, fill)
    assert out.shape == images.shape and out.dtype == images.dtype
    for n in range(12):
        assert torch.equal(out[n], _reference(images[n], int(shifts[n, 0]), int(shifts[n, 1]), bool(flips[n]), 4, fill))
    centre = torch.full((12, 2), 4)
    assert torch.equal(crop_flip(images, centre, torch.zeros(12, dtype=torch.bool), 4, fill), images)  # no shift, no flip
    mirrored = crop_flip(images, centre, torch.ones(12, dtype=torch.bool), 4, fill)
    assert torch.equal(mirrored, images.flip(-1))
    corner = crop_flip(images, torch.zeros(12, 2, dtype=torch.long), torch.zeros(12, dtype=torch.bool), 4, fill)
    assert torch.equal(corner[:, :, 4:, 4:], images[:, :, :4, :4]) and torch.all(corner[:, 1, :4] == -2.0)


def _mini_data(channels: int = 3, side: int = 8) -> ImageData:
    x = torch.randn(20, channels * side * side, generator=torch.Generator().manual_seed(1))
    split = Split(x, torch.arange(20) % 3)
    return ImageData(train=split, test=split, num_classes=3, channels=channels, mean=(0.5,) * channels, std=(0.25,) * channels)


class _AtStep:
    def __init__(self, step: int) -> None:
        self.step = step


def test_augmentation_is_seeded_per_replica_and_step():
    data = _mini_data()
    cfg = DataConfig(name="cifar10", augment="crop_flip", crop_padding=2)
    assert Augmentation.for_run(DataConfig(), data, [0]) is None  # augment=none: no plugin at all
    pair = Augmentation.for_run(cfg, data, [5, 6])
    assert pair.fill.tolist() == [-2.0, -2.0, -2.0]  # black: (0 - 0.5) / 0.25
    shifts, flips = pair.draw(3, 10)
    assert shifts.shape == (2, 10, 2) and flips.shape == (2, 10) and 0 <= shifts.min() and shifts.max() <= 4
    # A population draws what its replicas' own runs would: replica r from seed r alone.
    for r, seed in enumerate([5, 6]):
        own = Augmentation.for_run(cfg, data, [seed]).draw(3, 10)
        assert torch.equal(own[0][0], shifts[r]) and torch.equal(own[1][0], flips[r])
    assert not torch.equal(shifts[0], shifts[1])  # different replicas, different crops
    assert torch.equal(pair.draw(3, 10)[0], shifts) and not torch.equal(pair.draw(4, 10)[0], shifts)  # (seed, step) decides
    assert augmentation_seed(5, 3) != augmentation_seed(3, 5)
    x = data.train.x[:10].unsqueeze(0).expand(2, 10, -1)
    out, y = pair.adapt_batch(_AtStep(3), x, data.train.y[:10].expand(2, -1))
    assert out.shape == x.shape and torch.equal(y[0], data.train.y[:10])
    again, _ = pair.adapt_batch(_AtStep(3), x, y)
    assert torch.equal(out, again) and not torch.equal(out[0], out[1])
    flip_only = Augmentation.for_run(DataConfig(name="cifar10", augment="flip"), data, [5])
    mirrored, _ = flip_only.adapt_batch(_AtStep(0), x[:1], y[:1])
    images, result = x[0].view(10, 3, 8, 8), mirrored[0].view(10, 3, 8, 8)
    flipped = flip_only.draw(0, 10)[1][0]
    assert 0 < int(flipped.sum()) < 10  # some flipped, some not
    assert torch.equal(result[flipped], images[flipped].flip(-1)) and torch.equal(result[~flipped], images[~flipped])
    with pytest.raises(ConfigError, match="data.crop_padding=8: must be smaller than the 8-pixel image side"):
        Augmentation.for_run(DataConfig(name="cifar10", augment="crop", crop_padding=8), data, [0])


def test_flat_mlp_inputs_are_augmented_as_images(mnist):
    """MNIST (one channel, 28 x 28 flat rows) crops as the images the rows are."""
    aug = Augmentation.for_run(DataConfig(augment="crop", crop_padding=3), mnist, [0])
    x = mnist.train.x[:4].unsqueeze(0)
    out, _ = aug.adapt_batch(_AtStep(0), x, mnist.train.y[:4].unsqueeze(0))
    shifts = aug.draw(0, 4)[0][0]
    black = torch.tensor(mnist.black)
    for n in range(4):
        expected = _reference(x[0, n].view(1, 28, 28), int(shifts[n, 0]), int(shifts[n, 1]), False, 3, black)
        assert torch.equal(out[0, n].view(1, 28, 28), expected)
    assert black.item() == mnist.train.x.min().item()  # padding is exactly MNIST's black background


# -- runs ------------------------------------------------------------------------------------------

def _tiny_run(root: Path, out: Path, *extra: str):
    return compose_config(
        "data=tiny_imagenet", f"data.root={root}", "data.verify=false", "data.augment=crop_flip", "data.crop_padding=2",
        "model=cnn_mnist_275k", "model.in_channels=3", "model.hidden=[30]", "strategy=bp", "trainer.batch_size=4",
        "trainer.lr_schedule=none", "trainer.progress=false", "trainer.loggers=[]", "device=cpu", "threads=1",
        f"output_dir={out}", *extra,
    )


def test_a_conv_net_trains_on_tiny_imagenet_with_augmentation_and_resumes_exactly(tmp_path, one_thread):
    root = tmp_path / "data"
    make_tiny_imagenet(root)
    metrics = train(_tiny_run(root, tmp_path / "one", "trainer.epochs=1"))
    assert metrics["steps"] == 3 and 0 <= metrics["test_acc"] <= 1
    assert json.loads((tmp_path / "one" / "metrics.json").read_text())["steps"] == 3
    # Two epochs straight, and one epoch then a resumed second: the same crops and flips, the same results.
    straight = train(_tiny_run(root, tmp_path / "straight", "trainer.epochs=2"))
    train(_tiny_run(root, tmp_path / "resumed", "trainer.epochs=1"))
    resumed = train(_tiny_run(root, tmp_path / "resumed", "trainer.epochs=2", "resume=true"))
    assert resumed["resumed"]["from"] and without_timing(resumed) == without_timing(straight)
    # Augmentation changes training: without it the same run ends elsewhere.
    plain = train(_tiny_run(root, tmp_path / "plain", "trainer.epochs=2", "data.augment=none"))
    assert plain["final_train_loss"] != straight["final_train_loss"]


def test_image_folder_population_with_validation_split(tmp_path, one_thread):
    make_image_folder(tmp_path)
    cfg = compose_config("data=image_folder", f"data.root={tmp_path}", "data.folder=shapes", "data.val_split=3",
                         "data.augment=flip", "model=mlp_100x2", "strategy=bp", "replicas=2", "trainer.epochs=1",
                         "trainer.batch_size=3", "trainer.progress=false", "trainer.loggers=[]", "device=cpu",
                         f"output_dir={tmp_path / 'run'}")
    run, _, _, data = prepare_run(cfg)
    assert (len(data.train), len(data.val), len(data.test), data.input_dim) == (6, 3, 4, 3 * SIDE * SIDE)
    session = build_session(run, data)
    assert [type(p).__name__ for p in session.plugins].count("Augmentation") == 1
    metrics = train(cfg)
    assert metrics["steps"] == 2 and len(metrics["replicas"]) == 2


def test_mnist_runs_have_no_augmentation_by_default(mnist, quick_overrides):
    run, _, _, data = prepare_run(compose_config("strategy=bp", *quick_overrides), mnist)
    assert not any(isinstance(p, Augmentation) for p in build_session(run, data).plugins)
