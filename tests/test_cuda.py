"""The GPU path (issue 32), marked ``cuda`` and skipped without a GPU: every strategy agrees on the
CPU and on CUDA (FC and conv, float64), populations, a continual run with CL methods, checkpoints
moved between the devices, ``trainer.amp=bf16`` and ``trainer.compile``, and no step that waits for
the GPU (PyTorch's own CUDA sync detector).

``benchmarks/gpu.py`` runs them on the device. ``AGENTNET_TEST_ACCELERATOR=cpu`` runs them with the
CPU in the accelerator's place (what ``benchmarks/gpu.py --device cpu --quick`` does in the default
suite, so the code cannot rot where no GPU is lent; the agreements are then trivial)."""

from __future__ import annotations

import os

import pytest
import torch

from agentnet.recipes import run_continual, train
from agentnet.data import ImageData, Split
from agentnet.session import build_session
from agentnet.composition import to_run_config
from tests.conftest import compose_config, data_root

ACCELERATOR = os.environ.get("AGENTNET_TEST_ACCELERATOR", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(ACCELERATOR.startswith("cuda") and not torch.cuda.is_available(), reason="no CUDA device"),
]

SMALL_CONV = "model.conv=[{channels:20,pool:2},{channels:20,block:vgg,workers:2,depth:2,pool:2}]"
FILTER_CONV = "model.conv=[{channels:20,pool:2},{channels:20,pool:2}]"  # FA, DFA, PEPITA: no block workers
#: Strategies whose randomness is drawn on the model's device (forward gradients' tangents): CUDA
#: and the CPU draw different numbers, so they are checked by learning, not by agreement.
DEVICE_RANDOM = {"fg_w", "fg_a", "lg_fg_w", "lg_fg_a"}
STRATEGIES = ["bp", "lfnn", "lfnn_local", "attention", "fa", "lg_bp", "fg_w", "fg_a", "lg_fg_w", "lg_fg_a", "dfa", "pepita", "predsim", "ff"]


@pytest.fixture(autouse=True)
def _exact_math():
    """Full-precision matmuls and convolutions on CUDA (no TF32), so agreement is a float64 question."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _data(mnist: ImageData, device: str, dtype: torch.dtype = torch.float64) -> ImageData:
    def move(split: Split, n: int) -> Split:
        return Split(split.x[:n].to(device, dtype), split.y[:n].to(device))
    return ImageData(train=move(mnist.train, 320), test=move(mnist.test, 200), num_classes=10, channels=1)


def _session(mnist, device: str, *overrides: str, steps: int = 6):
    run = to_run_config(compose_config("model=mlp_400x2", "model.hidden=[40,40]", "trainer.batch_size=32", f"trainer.max_steps={steps}",
                                       "trainer.progress=false", "trainer.checkpoint=false", f"device={device}", *overrides))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        session = build_session(run, _data(mnist, device))
    finally:
        torch.set_default_dtype(previous)
    session.run_all()
    return session


def _max_relative_difference(a, b) -> float:
    return max(((p.cpu() - q.cpu()).abs().max() / q.abs().max().cpu().clamp_min(1e-12)).item()
               for p, q in zip(a.model.parameters(), b.model.parameters()))


@pytest.mark.parametrize("conv", [False, True], ids=["fc", "conv"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_agrees_on_the_cpu_and_the_accelerator(mnist, strategy, conv):
    if conv and strategy in ("attention", "ff"):
        pytest.skip(f"{strategy} is defined here for fully connected layers")
    overrides = [f"strategy={strategy}", *([FILTER_CONV if strategy in ("fa", "dfa", "pepita") else SMALL_CONV] if conv else []), "replicas=2"]
    device = _session(mnist, ACCELERATOR, *overrides)
    if strategy in DEVICE_RANDOM:
        start = _session(mnist, ACCELERATOR, *overrides, steps=1)
        assert device.trainer.history[-1]["train_loss"] < start.trainer.history[-1]["train_loss"] + 0.5
        assert all(torch.isfinite(p).all() for p in device.model.parameters())
        return
    cpu = _session(mnist, "cpu", *overrides)
    assert _max_relative_difference(device, cpu) < 1e-8, strategy


@pytest.mark.parametrize("method", ["ewc", "si", "agem", "replay"])
def test_a_continual_run_agrees_on_the_cpu_and_the_accelerator(mnist, tmp_path, method):
    def run(device: str) -> dict:
        cfg = compose_config("benchmark=pmnist_quick", "benchmark.num_tasks=2", "benchmark.samples_per_task=256", "model.hidden=[40,40]",
                             "strategy=lfnn", f"cl={method}", "replicas=2", "trainer.batch_size=32", "trainer.progress=false",
                             "data.test_subset=500", f"device={device}", f"data.root={data_root()}", f"output_dir={tmp_path / device}")
        return run_continual(cfg)
    device, cpu = run(ACCELERATOR), run("cpu")
    flat = [[a for row in m["acc_matrix"] for a in row] for m in (device, cpu)]
    assert flat[0] == pytest.approx(flat[1], abs=0.01)  # float32: a few test examples may flip


@pytest.mark.parametrize("first,second", [(ACCELERATOR, "cpu"), ("cpu", ACCELERATOR)], ids=["device-to-cpu", "cpu-to-device"])
def test_a_checkpoint_moves_between_the_devices(tmp_path, first, second):
    base = ["strategy=lfnn", "model=mlp_400x2", "model.hidden=[40,40]", "data.subset=1000", "data.test_subset=500", "trainer.batch_size=50",
            "trainer.progress=false", "trainer.lr_schedule=none", f"data.root={data_root()}"]
    whole = train(compose_config(*base, "trainer.epochs=2", f"device={second}", f"output_dir={tmp_path / 'whole'}"))
    train(compose_config(*base, "trainer.epochs=1", f"device={first}", f"output_dir={tmp_path / 'split'}"))
    resumed = train(compose_config(*base, "trainer.epochs=2", f"device={second}", f"output_dir={tmp_path / 'split'}", "resume=true"))
    assert resumed["resumed"]
    assert resumed["history"][-1]["test_acc"] == pytest.approx(whole["history"][-1]["test_acc"], abs=0.01)


@pytest.mark.parametrize("strategy", ["bp", "lfnn", "lfnn_local"])
def test_bf16_and_compiled_steps_learn(mnist, tmp_path, strategy):
    base = [f"strategy={strategy}", "model=cnn_mnist_275k", "data.subset=2000", "data.test_subset=500", "trainer.epochs=1",
            "trainer.progress=false", f"device={ACCELERATOR}", f"data.root={data_root()}"]
    for i, extra in enumerate((["trainer.amp=bf16", "trainer.channels_last=true"], ["trainer.compile=true"])):
        metrics = train(compose_config(*base, *extra, f"output_dir={tmp_path / str(i)}"))
        assert metrics["test_acc"] > 0.6, (strategy, extra)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("method", ["none", "ewc", "si", "agem", "replay"])
def test_no_step_waits_for_the_gpu(mnist, strategy, method):
    """PyTorch's CUDA sync detector raises on every synchronising call inside a step."""
    if not ACCELERATOR.startswith("cuda"):
        pytest.skip("the CUDA sync detector needs CUDA (tests/test_host_sync.py counts on the CPU)")
    run = to_run_config(compose_config(
        "benchmark=pmnist_quick", "benchmark.num_tasks=2", "benchmark.samples_per_task=96", "model.hidden=[40,40]",
        f"strategy={strategy}", f"cl={method}", *(["cl.memory_per_task=64", "cl.memory_batch=16"] if method == "agem" else []),
        "trainer.batch_size=32", "trainer.progress=false", "trainer.checkpoint=false", "trainer.log_every=1000",
        "data.test_subset=50", f"device={ACCELERATOR}"))
    session = build_session(run, _data(mnist, ACCELERATOR, torch.float32))
    step = session.trainer.train_step

    def watched(x, y):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(x, y)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    session.trainer.train_step = watched
    session.run_all()
    assert session.trainer.step == 6
