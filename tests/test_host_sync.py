"""No host synchronisation inside a training step (issue 32): every strategy with every CL method
but GEM (whose QP is solved on the host by design) steps without reading a device value on the
host, sizing a tensor by its values or copying host memory in with a blocking copy — the step of a
GPU run never waits for the GPU. Counted on the CPU by :class:`tests.host_sync.HostSyncCounter`."""

from __future__ import annotations

import pytest
import torch

from agentnet.devices import to_device
from agentnet.registry import STRATEGIES
from agentnet.session import build_session, prepare_run
from agentnet.training.engine import BatchStream
from tests.conftest import REPO, compose_config
from tests.host_sync import HostSyncCounter

#: Every shipped strategy (its config group's options).
STRATEGY_NAMES = sorted(p.stem for p in (REPO / "configs" / "strategy").glob("*.yaml"))
METHODS = {
    "none": [],
    "ewc": [],
    "si": [],
    # Memories larger than a memory batch / a full reservoir, so the sampling and replacement paths run.
    "agem": ["cl.memory_per_task=64", "cl.memory_batch=16"],
    "replay": ["cl.buffer_size=48", "cl.replay_batch=16"],
}


def _synchronisations(mnist, *overrides: str, log_every: int = 1000) -> tuple[HostSyncCounter, int]:
    """Train a short continual run; count synchronisations inside every step and every batch drawn."""
    # Two tasks (the second steps with a memory, a reservoir, a Fisher penalty) of 3 steps each.
    cfg = compose_config("benchmark=pmnist_quick", "benchmark.num_tasks=2", "benchmark.samples_per_task=96",
                         "trainer.batch_size=32", "trainer.progress=false", "trainer.checkpoint=false", f"trainer.log_every={log_every}",
                         "device=cpu", "data.test_subset=50", "output_dir=null", *overrides)
    run, _, _, data = prepare_run(cfg, mnist)
    counter = HostSyncCounter()
    next_batch = BatchStream.next

    def watched_next(stream: BatchStream):
        with counter.watching():
            return next_batch(stream)

    with counter, pytest.MonkeyPatch.context() as patch:
        patch.setattr(BatchStream, "next", watched_next)
        session = build_session(run, data)
        step = session.trainer.train_step

        def watched_step(x, y):
            with counter.watching():
                return step(x, y)

        session.trainer.train_step = watched_step
        session.run_all()
    return counter, session.trainer.step


#: The main job's rules run in the default suite; the other Table 1 rules with the slow tests.
CORE = ("bp", "lfnn", "lfnn_local", "attention")


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("strategy", [s if s in CORE else pytest.param(s, marks=pytest.mark.slow) for s in STRATEGY_NAMES])
def test_a_step_never_waits_for_the_device(mnist, strategy, method):
    if method == "ewc" and not STRATEGIES.get(strategy).predicts_with_model:
        pytest.skip(f"cl=ewc is refused with strategy={strategy} (it reads model(x), which {strategy} does not predict with)")
    counter, steps = _synchronisations(mnist, f"strategy={strategy}", f"cl={method}", "model.hidden=[40,40]", *METHODS[method])
    assert steps == 6
    assert not counter.events, f"{strategy}+{method}: host synchronisations inside the step:\n{counter.report()}"


@pytest.mark.parametrize("strategy", ["bp", "lfnn", *[pytest.param(s, marks=pytest.mark.slow) for s in ("lfnn_local", "fa", "lg_bp")]])
def test_a_conv_step_never_waits_for_the_device(mnist, strategy):
    counter, _ = _synchronisations(mnist, f"strategy={strategy}", "model=cnn_mnist_275k", "data.subset=2000", "benchmark.num_tasks=2")
    assert not counter.events, counter.report()


@pytest.mark.parametrize("overrides", [
    ["benchmark=split_mnist", "benchmark.num_tasks=2", "cl=agem", "cl.memory_per_task=64", "cl.memory_batch=16"],  # task-head masks of memories
    ["cl=joint"],  # cumulative stages gather across tasks
    ["replicas=2", "cl=replay", "cl.buffer_size=64", "cl.replay_batch=16", "strategy=lfnn"],
    # crops and flips drawn on the host per replica, moved without blocking, of fresh and replayed examples
    ["benchmark=split_mnist", "benchmark.num_tasks=2", "replicas=2", "data.augment=crop_flip", "cl=replay",
     "cl.buffer_size=48", "cl.replay_batch=16"],
], ids=["split-agem", "joint", "population-replay", "population-augment-replay"])
def test_masks_stages_and_populations_never_wait_for_the_device(mnist, overrides):
    extra = ["benchmark.samples_per_task=96"] if "benchmark=split_mnist" in overrides else []
    counter, _ = _synchronisations(mnist, "model.hidden=[40,40]", *overrides, *extra)
    assert not counter.events, counter.report()


def test_the_loss_is_read_only_at_logging_boundaries(mnist):
    """The watch covers the whole loop at ``log_every`` = 4: the only synchronisations are the
    non-finite checks every 4 steps (the counter does see them)."""
    counter, steps = _synchronisations(mnist, "strategy=lfnn", "model.hidden=[40,40]", log_every=4)
    assert not counter.events  # the check runs in Trainer.train, outside the step
    cfg = compose_config("benchmark=pmnist_quick", "benchmark.num_tasks=1", "benchmark.samples_per_task=256", "strategy=lfnn",
                         "model.hidden=[40,40]", "trainer.batch_size=32", "trainer.progress=false", "trainer.checkpoint=false",
                         "trainer.log_every=4", "device=cpu", "data.test_subset=100", "output_dir=null")
    run, _, _, data = prepare_run(cfg, mnist)
    counter = HostSyncCounter()
    with counter:
        session = build_session(run, data)
        session.begin()
        stream = session.trainer.make_stream(256, session.stream.stage_gather(session.stream.tasks[:1]))
        with counter.watching():
            session.trainer.train(stream, 7)
    checks = sum(n for (kind, where), n in counter.events.items() if "check_finite" in where or "finite.all" in where)
    assert checks == 1 and sum(counter.events.values()) == checks, counter.report()  # step 4 only; no bar


def test_the_counter_sees_every_kind_of_synchronisation():
    device_tensor = torch.randn(10)
    cpu = torch.device("cpu")
    counter = HostSyncCounter()
    with counter, counter.watching():
        device_tensor.sum().item()
        bool((device_tensor > 0).any())
        device_tensor[device_tensor > 0]
        device_tensor.tolist()
        device_tensor[torch.randperm(10)]  # a host index: a blocking copy on CUDA
        torch.randperm(10).to(cpu)
        torch.nonzero(device_tensor)
        device_tensor.cpu()
        # None of these synchronise:
        device_tensor[to_device(torch.randperm(10), cpu)]
        host = torch.arange(10)
        host[host > 2].tolist()
        torch.unique(host)
        device_tensor * torch.tensor(2.0)  # a 0-dim host scalar is passed by value
        device_tensor.repeat_interleave(2)  # sized by an int, not by values
    kinds = sorted(kind for (kind, _), n in counter.events.items() for _ in range(n))
    assert kinds == sorted(["item()", "_local_scalar_dense", "_local_scalar_dense", "index with a boolean mask", "tolist()",
                            "index: host tensor used on the device", "blocking host-to-device copy", "nonzero", "cpu()"]), counter.report()
