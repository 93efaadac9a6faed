"""The engine objects an episode drives, built in one place: the run config, the data, and the run
itself (:func:`agentnet.session.build_session`: a continual benchmark's task stream, or a plain run
as a stream of one task).
"""

from __future__ import annotations

import functools

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from agentnet.config import BenchmarkConfig, ConfigError, ConvLayerConfig, DataConfig, ModelConfig, RunConfig, TrainerConfig, check
from agentnet.data import ImageData, load_dataset
from agentnet.composition import benchmark_config, check_combinations, compose
from agentnet.registry import CL_METHODS, STRATEGIES
from agentnet.session import Session, build_session
from agentnet.training import TrainerPlugin

__all__ = ["TEST_SUBSET", "build", "dataset", "model_config", "run_config"]

#: Test examples the env evaluates on (every task's test set, with a benchmark).
TEST_SUBSET = 2000


@functools.lru_cache(maxsize=4)
def dataset(name: str, root: str | None, device: str, verify: bool, normalize: bool, folder: str | None = None,
            image_size: int | None = None, grayscale: bool = False) -> ImageData:
    """A dataset is loaded once per process, as ``run.data`` asks; envs are built often (tests, seeding)."""
    return load_dataset(name, root, device, verify=verify, normalize=normalize, folder=folder, image_size=image_size,
                        grayscale=grayscale)


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
    try:
        return OmegaConf.to_container(compose([f"model={name}"]).model, resolve=True)
    except ConfigError:
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
    (:func:`agentnet.composition.benchmark_config`); then :func:`agentnet.recipes.run_continual`
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


def build(run: RunConfig, data: ImageData, plugins: list[TrainerPlugin]) -> Session:
    """The run an episode advances, built exactly as ``agentnet`` builds it
    (:func:`agentnet.session.build_session`; a plain run is a stream of one task), with no output
    directory. ``plugins`` join the run's own."""
    return build_session(run, data, None, plugins)
