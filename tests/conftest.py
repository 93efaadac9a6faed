"""Shared fixtures: real MNIST from ../shared/data (or $AGENTNET_DATA) and Hydra compose."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from agentnet.composition import compose
from agentnet.data import ImageData, load_mnist

REPO = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    """$AGENTNET_DATA, else ../shared/data beside the repository (what CI provides)."""
    env = os.environ.get("AGENTNET_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


# Code under test that resolves the data directory itself (envs, the CLI) finds the same data.
os.environ.setdefault("AGENTNET_DATA", str(data_root()))


@pytest.fixture(scope="session")
def mnist() -> ImageData:
    """Full real MNIST on the CPU, loaded once per session (checksums verified)."""
    return load_mnist(data_root(), "cpu")


@pytest.fixture(scope="session")
def mnist_pixels() -> ImageData:
    """Full real MNIST with pixels in [0, 1] (``data.normalize=false``: pmnist_vdv, pmnist_online)."""
    return load_mnist(data_root(), "cpu", normalize=False)


def experiment_presets() -> tuple[list[str], list[str]]:
    """The ``configs/experiment`` options: those that select a registered experiment (an
    ``experiment:`` node), and the sweep presets (settings plus ``hydra.sweeper.params``: every job
    an ordinary run)."""
    import yaml

    paths = sorted((REPO / "configs" / "experiment").glob("*.yaml"))
    registered = [p.stem for p in paths if "experiment" in (yaml.safe_load(p.read_text()) or {})]
    return registered, [p.stem for p in paths if p.stem not in registered]


def compose_config(*overrides: str):
    """Compose the app's config with Hydra's compose API, exactly as the CLI would."""
    return compose(overrides)


@pytest.fixture
def quick_overrides(tmp_path) -> list[str]:
    """A short real-MNIST run: small subsets, no progress bar, output in tmp."""
    return [
        f"data.root={data_root()}",
        "data.subset=5000",
        "trainer.lr_schedule=none",
        "data.test_subset=1000",
        "trainer.epochs=2",
        "trainer.progress=false",
        "device=cpu",
        f"output_dir={tmp_path}",
    ]


@pytest.fixture
def one_thread():
    """One torch thread for a test of tiny tensors: a second thread only adds synchronisation (tens
    of ms per step on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: Torch threads per test: 2, or 1 in each of several pytest-xdist workers (``make test`` runs one
#: per core), whose threads would otherwise outnumber the cores and wait on each other.
TEST_THREADS = 1 if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1 else 2


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(TEST_THREADS)
    yield


#: Keys that measure time, not training: they legitimately differ between two identical runs.
TIMING_KEYS = {"wall_s", "samples_per_s", "epoch_s", "task_seconds", "resumed"}


def without_timing(node):
    """A metrics tree without its timing keys (and without ``resumed``), to compare two runs."""
    if isinstance(node, dict):
        return {k: without_timing(v) for k, v in node.items() if k not in TIMING_KEYS}
    if isinstance(node, list):
        return [without_timing(v) for v in node]
    return node
