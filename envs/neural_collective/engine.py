"""The engine objects an episode drives, built in one place: the run config, the data, and a task
sequence (a continual benchmark's :class:`~agentnet.continual.runner.TaskSequence`, or a plain run
as a one-task sequence).
"""

from __future__ import annotations

import functools
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from agentnet.config import BenchmarkConfig, ConfigError, ConvLayerConfig, DataConfig, ModelConfig, RunConfig, TrainerConfig, check
from agentnet.continual.runner import TaskSequence
from agentnet.data import ImageData, load_dataset
from agentnet.network import build_model
from agentnet.registry import CL_METHODS, STRATEGIES, benchmark_config, build_strategy, check_combinations, compose
from agentnet.strategy import StepResult
from agentnet.training import Trainer, TrainerPlugin, seed_everything

__all__ = ["SingleRun", "TEST_SUBSET", "build", "dataset", "model_config", "run_config"]

#: Test examples the env evaluates on (every task's test set, with a benchmark).
TEST_SUBSET = 2000


@functools.lru_cache(maxsize=4)
def dataset(name: str, root: str | None, device: str, verify: bool, normalize: bool) -> ImageData:
    """A dataset is loaded once per process, as ``run.data`` asks; envs are built often (tests, seeding)."""
    return load_dataset(name, root, device, verify=verify, normalize=normalize)


def model_config(node: str | dict | ModelConfig) -> ModelConfig:
    """A model preset: a name (``"cnn_mnist_275k"``: the ``model`` node ``agentnet model=<name>``
    composes), a dict naming one with fields overridden (``{"name": "cnn_mnist_275k", "hidden": [30]}``)
    or a :class:`ModelConfig` (used as is)."""
    if isinstance(node, ModelConfig):
        return node
    if isinstance(node, str):
        node = {"name": node}
    check(isinstance(node, dict) and isinstance(node.get("name"), str), "model", node,
          "give a preset name (e.g. 'cnn_mnist_275k'), a dict with a 'name', or a ModelConfig")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), _preset(node["name"]), node)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"model.{getattr(exc, 'full_key', None) or node['name']}: {getattr(exc, 'msg', exc)}") from None


@functools.lru_cache(maxsize=None)
def _preset(name: str) -> dict:
    """The ``model`` node ``agentnet model=<name>`` composes (cached: composing takes ~0.1 s)."""
    from hydra.errors import MissingConfigException

    try:
        return OmegaConf.to_container(compose([f"model={name}"]).model, resolve=True)
    except MissingConfigException:
        raise ConfigError(f"model={name!r}: no such preset (configs/model/*.yaml)") from None


def run_config(
    strategy: str | dict = "lfnn",
    hidden: tuple[int, ...] | list[int] = (40, 40),
    worker_size: int = 10,
    activation: str = "relu",
    batch_size: int = 64,
    data_subset: int | None = 2000,
    epochs: int = 1,
    data_root: str | None = None,
    data_normalize: bool = True,
    device: str = "cpu",
    lr: float = 1e-3,
    optimizer: str = "adam",
    seed: int = 0,
    worker_projection: bool = False,
    conv: list[dict | ConvLayerConfig] | tuple = (),
    benchmark: str | dict | BenchmarkConfig | None = None,
    cl: str | dict | None = None,
    model: str | dict | ModelConfig | None = None,
) -> RunConfig:
    """The :class:`RunConfig` an env with these arguments trains under (also for an equivalent Trainer).

    ``conv``: conv worker layers in front of ``hidden`` (each a :class:`ConvLayerConfig` or its
    fields as a dict, e.g. ``{"channels": 20, "pool": 2}``). ``model``: a shipped preset instead
    (:func:`model_config`; then ``hidden``, ``worker_size``, ``activation``, ``worker_projection``
    and ``conv`` are the preset's). ``benchmark``: a continual-learning protocol
    (:func:`agentnet.registry.benchmark_config`); then :func:`agentnet.continual.runner.run_continual`
    on this config (with an ``output_dir``) is the run an episode with every action 1 reproduces.
    ``cl``: a CL method (needs a benchmark).
    """
    if model is None:
        specs = [c if isinstance(c, ConvLayerConfig) else ConvLayerConfig(**c) for c in conv]
        model = ModelConfig(name="env", hidden=list(hidden), worker_size=worker_size, activation=activation,
                            worker_projection=worker_projection, conv=specs)
    else:
        model = model_config(model)
    run = RunConfig(
        strategy=STRATEGIES.config(strategy),  # a bare name gets exactly what `agentnet strategy=<name>` trains
        model=model,
        data=DataConfig(root=data_root, subset=data_subset, test_subset=TEST_SUBSET, normalize=data_normalize),
        trainer=TrainerConfig(
            epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, lr_schedule="none", progress=False, checkpoint=False
        ),
        seed=seed,
        device=device,
    )
    if benchmark is not None:
        run.benchmark = benchmark_config(benchmark)
    if cl is not None:
        run.cl = CL_METHODS.config(cl)
    check_combinations(run)  # a CL method without a task sequence is refused
    return run


class SingleRun:
    """A plain run as a one-task sequence: :class:`TaskSequence`'s interface over a
    :class:`Trainer` on ``data``'s training split (``epochs`` passes), built as ``train`` builds it."""

    num_tasks = 1

    def __init__(self, run: RunConfig, data: ImageData, plugins: list[TrainerPlugin]) -> None:
        seed_everything(run.seed)  # what train() does; the env's stream continues from here
        self.model = build_model(run.model, data.input_dim, data.num_classes, run.seed).to(data.train.x.device)
        self.strategy = build_strategy(run.strategy, self.model)
        self.trainer = Trainer(run, self.model, self.strategy, data, output_dir=None, plugins=plugins)
        self.total_steps = run.trainer.epochs * self.trainer.steps_per_epoch
        """Optimiser steps of the whole run."""

    @property
    def done(self) -> bool:
        """The run's steps are all taken."""
        return self.trainer.step >= self.total_steps

    @property
    def task(self) -> int:
        """0 while training, 1 once done (as a one-task :class:`TaskSequence` counts)."""
        return int(self.done)

    def begin(self) -> None:
        """Fire ``before_run``."""
        self.trainer.begin_run()

    def advance(self, steps: int | None = None, **update: Any) -> StepResult | None:
        """Train up to ``steps`` steps (``None``: the rest); ``update`` is :meth:`Trainer.run`'s."""
        if self.done:
            raise RuntimeError("the run is over")
        remaining = self.total_steps - self.trainer.step
        return self.trainer.run(self.trainer.stream, remaining if steps is None else min(steps, remaining), **update)

    def end(self) -> None:
        """Fire ``after_run``."""
        self.trainer.end_run()


def build(run: RunConfig, data: ImageData, plugins: list[TrainerPlugin]) -> TaskSequence | SingleRun:
    """The task sequence an episode advances: the continual runner's own :class:`TaskSequence`
    (built exactly as ``agentnet benchmark=...`` builds it) with a benchmark, else a plain run as a
    one-task sequence. ``plugins`` join the trainer's (after the run's own)."""
    if run.benchmark is not None:
        return TaskSequence(run, data, None, extra_plugins=plugins)
    return SingleRun(run, data, plugins)
