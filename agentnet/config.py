"""Typed configuration: one dataclass per Hydra config group, validated before any work starts.

The dataclasses are registered in Hydra's ConfigStore (``register_configs``), so a wrong type fails
at compose time with the field's name, and ``__post_init__`` checks ranges when the config becomes
objects (``OmegaConf.to_object``), raising :class:`ConfigError` with ``<group>.<field>``.
Strategy configs live beside their strategies (see :mod:`agentnet.registry`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

__all__ = [
    "ConfigError",
    "check",
    "DataConfig",
    "ConvLayerConfig",
    "ModelConfig",
    "TrainerConfig",
    "StrategyConfig",
    "BenchmarkConfig",
    "CLConfig",
    "ExperimentConfig",
    "RunConfig",
    "TuneConfig",
    "register_configs",
]

ACTIVATIONS = ("relu", "tanh", "sigmoid")
OUTPUT_ACTIVATIONS = ("softmax", "sigmoid")
WORKER_NORMS = ("none", "standardize")
NORMS = ("none", "batch", "group", "layer")
INITS = ("torch", "he_uniform")
OPTIMIZERS = ("adam", "sgd", "adamw")
LR_SCHEDULES = ("none", "cosine", "step")
SELECTIONS = ("last", "best_val")
DEVICES = ("auto", "cpu", "cuda")
DATASETS = ("mnist", "cifar10", "tiny_imagenet", "image_folder")
#: Datasets decoded from image files (Pillow): they take ``data.image_size`` and ``data.grayscale``.
FOLDER_DATASETS = ("tiny_imagenet", "image_folder")
AUGMENTATIONS = ("none", "crop", "flip", "crop_flip")
AMP_MODES = ("none", "bf16")


class ConfigError(ValueError):
    """An invalid configuration value; the message starts with the dotted field name."""


def check(condition: bool, key: str, value: Any, why: str) -> None:
    """Raise :class:`ConfigError` ``"<key>=<value>: <why>"`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{key}={value!r}: {why}")


@dataclass
class DataConfig:
    """Which dataset, how much of it, and how training batches are augmented."""

    name: str = "mnist"
    """Dataset: ``mnist``, ``cifar10`` (python-pickle batches), ``tiny_imagenet`` (the
    ``tiny-imagenet-200`` release: 200 classes, 64 x 64 RGB; its labelled ``val/`` is the test split)
    or ``image_folder`` (``<root>/<folder>/train/<class>/`` and ``test/<class>/``); see docs/data.md."""
    root: Optional[str] = None
    """Directory holding ``mnist/``, ``cifar-10-batches-py/``, ``tiny-imagenet-200/`` or the
    ``image_folder`` dataset's folder; ``None`` means ``$AGENTNET_DATA`` then ``~/.cache/agentnet/data``."""
    folder: Optional[str] = None
    """``image_folder`` only (required there): the dataset's directory, relative to ``root`` (or
    absolute), holding ``train/<class>/`` and ``test/<class>/`` image files; the class index is the
    position of the class folder's name among the sorted training folders."""
    image_size: Optional[int] = None
    """``tiny_imagenet`` and ``image_folder`` only: resize every image to ``image_size`` x
    ``image_size`` (shorter side to it, then a centre crop; bilinear). ``None``: keep the files' size,
    which must then be one square size (Tiny ImageNet: 64)."""
    grayscale: bool = False
    """``tiny_imagenet`` and ``image_folder`` only: decode every image to one channel (Pillow ``L``)
    instead of RGB (models then take ``model.in_channels=1``)."""
    subset: Optional[int] = None
    """Use only this many training examples (a fixed random choice, the same for every seed, so
    seeds and replicas differ only in initialisation and order); ``None`` uses all."""
    test_subset: Optional[int] = None
    """Use only the first this many test examples; ``None`` uses all."""
    val_split: float = 0
    """Hold out validation examples from the training split: a count (>= 1, whole) or a fraction
    (in (0, 1)) of the training examples used (``subset``'s, else the whole split). A fixed random
    choice, the same for every seed and replica, disjoint from the training examples and from
    ``subset``'s choice; evaluated at every epoch end (``val_error`` / ``val_acc``), while the test
    set is then evaluated once, at the end. 0: no validation split."""
    verify: bool = True
    """Check the files on load: MNIST the sha256 of every file's decompressed content, CIFAR-10 the
    published md5s, Tiny ImageNet the release's counts (200 classes of 500 training images, 10,000
    validation images), so that a partial extraction fails (``false`` accepts a partial or miniature
    copy). ``image_folder`` has nothing to verify."""
    normalize: bool = True
    """Standardise pixels per channel with the training-set mean and std (MNIST, CIFAR-10: the
    published statistics; folder datasets: computed from the decoded training split)."""
    augment: str = "none"
    """Augment training batches on the device (never evaluation): ``crop`` (a random crop of the
    image zero-padded by ``crop_padding``, black padding), ``flip`` (a horizontal flip with
    probability 1/2), ``crop_flip`` (both, crop first) or ``none``. Each replica draws from its own
    seed and the step, so a population trains as its separate runs would and a resumed run draws the
    same. Flat (MLP) inputs are augmented as the images they are, before the network flattens them."""
    crop_padding: int = 4
    """Pixels of zero padding on every side before a random crop (``augment`` with ``crop``): the
    crop shifts the image by up to this many pixels each way. Must be smaller than the image side."""

    def __post_init__(self) -> None:
        check(self.name in DATASETS, "data.name", self.name, f"choose one of {DATASETS}")
        check(self.folder is None or self.name == "image_folder", "data.folder", self.folder,
              f"only data.name=image_folder reads a folder (data.name={self.name})")
        check(self.folder is None or self.folder.strip() != "", "data.folder", self.folder, "name a directory or leave it null")
        check(self.image_size is None or self.image_size > 0, "data.image_size", self.image_size, "must be a positive side in pixels or null")
        for key, unset in (("image_size", None), ("grayscale", False)):
            check(getattr(self, key) == unset or self.name in FOLDER_DATASETS, f"data.{key}", getattr(self, key),
                  f"applies to images decoded from files ({', '.join(FOLDER_DATASETS)}); {self.name} comes as published")
        for key in ("subset", "test_subset"):
            value = getattr(self, key)
            check(value is None or value > 0, f"data.{key}", value, "must be a positive count or null")
        v = self.val_split
        check(math.isfinite(v) and v >= 0 and (v < 1 or float(v).is_integer()), "data.val_split", v,
              "a fraction in (0, 1), a whole count >= 1, or 0 for none")
        check(self.augment in AUGMENTATIONS, "data.augment", self.augment, f"choose one of {AUGMENTATIONS}")
        check(self.crop_padding >= 0, "data.crop_padding", self.crop_padding, "must be a count of pixels >= 0")
        check("crop" not in self.augment or self.crop_padding >= 1, "data.crop_padding", self.crop_padding,
              f"data.augment={self.augment} crops: with no padding the crop is the image itself; pad by >= 1 pixel")

    def val_count(self, available: int) -> int:
        """Validation examples for ``available`` training examples (those of ``subset``, else all)."""
        if self.val_split >= 1:
            return int(self.val_split)
        return round(self.val_split * available)


BLOCKS = ("none", "vgg", "residual", "basic")


@dataclass
class ConvLayerConfig:
    """One worker layer of the convolutional part: filter-wise (``block: none``) or block-wise."""

    channels: int = 30
    """Output channels. Filter-wise: ``channels / model.worker_size`` workers; block-wise: split
    evenly over ``workers`` blocks."""
    kernel_size: int = 3
    """Square kernel size (odd; padding keeps the spatial size at stride 1)."""
    stride: int = 1
    """Stride of the layer's (first) convolution (and of a block's projection shortcut)."""
    bias: bool = True
    """A bias per filter in the layer's convolutions (``false``: none, as in ResNet, where a batch
    norm right after every conv cancels any bias)."""
    pool: int = 1
    """Max-pool by this factor after the activation (1: no pooling)."""
    block: str = "none"
    """none (one conv of filter-wise workers), vgg (a block of ``depth`` convs), residual (plus a
    shortcut; ``norm`` then normalises the block's sum) or basic (ResNet's basic block: ``norm`` after
    every conv and after a projection shortcut, the sum activated as it is); a block is a block-wise
    worker."""
    workers: int = 1
    """Block-wise only: parallel blocks (workers) in this layer, run as grouped convolutions."""
    depth: int = 2
    """Block-wise only: conv layers per block."""
    width: Optional[int] = None
    """Block-wise only: inner channels per block (``None``: its output channels)."""
    plain: bool = False
    """A plain conv layer, not split into workers: it has no local loss of its own and belongs to
    the block of the next worker layer (or of the output layer), trained by that block's losses
    (docs/strategies/leader_follower.md, "Plain layers"). Filter-wise (``block: none``) only."""
    norm: str = "none"
    """Normalisation between the convolution and the activation: none, batch, group (one group per
    worker: a worker's statistics read only its own filters) or layer (all the layer's channels:
    plain layers only, since it would pass one worker's gradient into the others). In a ``basic``
    block it follows every conv inside the block instead (ResNet's placement)."""
    dropout: float = 0.0
    """Dropout probability after the activation and pooling (0: none)."""

    def __post_init__(self) -> None:
        check(self.channels > 0, "model.conv.channels", self.channels, "must be positive")
        check(self.kernel_size > 0 and self.kernel_size % 2 == 1, "model.conv.kernel_size", self.kernel_size, "must be odd and positive")
        check(self.stride > 0, "model.conv.stride", self.stride, "must be positive")
        check(self.pool > 0, "model.conv.pool", self.pool, "must be positive")
        check(self.block in BLOCKS, "model.conv.block", self.block, f"choose one of {BLOCKS}")
        check(self.workers > 0, "model.conv.workers", self.workers, "must be positive")
        check(self.depth > 0, "model.conv.depth", self.depth, "must be positive")
        check(self.width is None or self.width > 0, "model.conv.width", self.width, "must be positive or null")
        check(self.norm in NORMS, "model.conv.norm", self.norm, f"choose one of {NORMS}")
        check(0 <= self.dropout < 1, "model.conv.dropout", self.dropout, "must lie in [0, 1)")
        check(not (self.plain and self.block != "none"), "model.conv.plain", self.plain,
              f"a block layer (block={self.block}) is a worker; plain layers are single convolutions (block: none)")
        check(self.plain or self.norm != "layer", "model.conv.norm", self.norm,
              "layer normalisation mixes the workers of a layer; use batch or group on worker layers (layer on plain ones)")
        if self.block != "none":
            check(
                self.channels % self.workers == 0,
                "model.conv.workers",
                self.workers,
                f"must divide the block layer's {self.channels} channels",
            )


@dataclass
class ModelConfig:
    """A worker network: optional conv worker layers, then fully connected worker layers.

    Every hidden layer is split into workers (``worker_size`` units or filters each, or whole
    blocks); a final linear layer maps to the classes. With ``conv`` empty this is an MLP.
    """

    name: str = "mlp"
    """Preset name (informational; the numbers below define the network). The presets in
    ``configs/model/`` set their own values; these defaults are a plain 784-260-260-10 MLP of
    10-unit workers."""
    hidden: list[int] = field(default_factory=lambda: [260, 260])
    """Width of each fully connected hidden layer (after the conv layers, if any)."""
    conv: list[ConvLayerConfig] = field(default_factory=list)
    """Convolutional worker layers applied first, in order (empty: an MLP)."""
    in_channels: int = 1
    """Image channels (conv models): the flat input of ``D`` values is an ``in_channels`` x s x s image."""
    worker_head: bool = False
    """Predict through a small trained linear head per worker (extra parameters, trained only by
    local losses) instead of the parameter-free ``k = C`` read-out."""
    worker_size: int = 10
    """Units per worker ``k`` of every worker layer; ``k = C`` gives parameter-free predictions. It
    must divide the width of every worker layer for a rule that reads worker predictions (``lfnn``,
    ``lfnn_local``); for any other rule a layer it does not divide is one worker. Plain layers
    (``hidden_plain``, ``conv[*].plain``) may have any width."""
    activation: str = "relu"
    """Hidden activation: relu, tanh or sigmoid."""
    output_activation: str = "softmax"
    """Output (and worker prediction) activation: softmax (C-way) or sigmoid (binary, k = 1)."""
    predict_from: str = "activation"
    """Which worker output predicts (and is aligned): ``preactivation`` z or ``activation`` f(z)."""
    align_from: Optional[str] = None
    """Which worker output followers align to their best leader's: ``None`` (the one that predicts,
    ``predict_from``), ``preactivation`` or ``activation``. The LFNN paper's online nets predict from
    the logit z (BCE) but align the sigmoid outputs f(z) (MSE): ``predict_from=preactivation,
    align_from=activation``."""
    worker_projection: bool = False
    """For ``k != C``: predict through a fixed random k->C projection instead of failing."""
    hidden_plain: list[int] = field(default_factory=list)
    """Indices into ``hidden`` of fully connected layers that are plain (not split into workers;
    they belong to the block of the next worker layer, or of the output layer)."""
    hidden_norm: str = "none"
    """Normalisation of every fully connected hidden layer, between the linear map and the
    activation: none, batch, group (one group per worker) or layer (only if every FC layer is plain)."""
    hidden_dropout: float = 0.0
    """Dropout probability after every fully connected hidden layer's activation (0: none)."""
    worker_norm: str = "none"
    """How a worker's output is normalised before it predicts and is aligned: ``none``, or
    ``standardize`` (zero mean and unit variance over its ``k`` units, times ``worker_logit_scale``),
    which makes the local objectives blind to the output's scale, so they cannot be lowered by
    growing activations (docs/strategies/leader_follower.md, "Stability")."""
    worker_pool: int = 1
    """Conv workers: side of the grid their maps are average-pooled onto before they predict (1: the
    global average, ``k`` values; ``p``: ``k * p**2`` values, which need ``worker_projection`` or
    ``worker_head`` to become ``C`` logits). More spatial detail for a filter's local prediction."""
    worker_logit_scale: float = 1.0
    """With ``worker_norm=standardize``: the fixed scale of a worker's standardised output, i.e. the
    inverse softmax temperature of its prediction (bounds how confident a worker can be)."""
    global_pool: bool = False
    """Average the last conv layer's maps over their pixels before the fully connected layers (or
    the output layer), as ResNet's head does: those layers then read one value per channel at any
    input size. ``false``: the maps are flattened (``channels x side x side`` features)."""
    init: str = "torch"
    """Initial weights of every weight layer (plain, worker and output; not worker heads): ``torch``
    — uniform in ``±1/sqrt(fan_in)``, biases too (``nn.Linear``'s and ``nn.Conv2d``'s default);
    ``he_uniform`` — uniform in ``±sqrt(6/fan_in)`` (He et al. 2015; Keras' ``he_uniform``), biases
    zero, as the PEPITA authors' networks (``model=mlp_pepita``). The same draws, scaled: a population
    still equals its separate runs."""

    def units_per_worker(self, width: int, predictions: bool = True, where: str = "hidden width", rule: str = "") -> int:
        """Units (filters) per worker of a filter-wise or fully connected worker layer ``width``
        wide: ``worker_size`` where it divides the width; otherwise one worker of the whole layer if
        the rule reads no worker predictions (``predictions=False``), else a :class:`ConfigError`
        that says which setting to change."""
        if width % self.worker_size == 0:
            return self.worker_size
        check(not predictions, "model.worker_size", self.worker_size,
              f"must divide every worker layer's width ({where} {width} is not a multiple): {rule or 'the rule'} reads worker "
              "predictions, so each layer splits into workers of worker_size units; choose a worker_size that "
              "divides every width, or make the layer plain (model.hidden_plain / model.conv[*].plain)")
        return width

    def check_workers(self, predictions: bool, rule: str = "") -> None:
        """Refuse worker layers that cannot split into workers for a rule that reads worker
        predictions (``predictions``; ``rule`` names it in the message); any widths build for a rule
        that reads none."""
        for layer in self.conv:
            if layer.block == "none" and not layer.plain:
                self.units_per_worker(layer.channels, predictions, "conv channels", rule)
        for index, width in enumerate(self.hidden):
            if index not in self.hidden_plain:
                self.units_per_worker(width, predictions, rule=rule)

    def __post_init__(self) -> None:
        check(len(self.hidden) + len(self.conv) > 0, "model.hidden", self.hidden, "needs at least one hidden layer")
        check(self.worker_size > 0, "model.worker_size", self.worker_size, "must be positive")
        check(self.in_channels > 0, "model.in_channels", self.in_channels, "must be positive")
        for layer in self.conv:
            if layer.plain and layer.norm == "group":  # a plain layer's groups are worker_size filters
                check(layer.channels % self.worker_size == 0, "model.worker_size", self.worker_size,
                      f"must divide the channels of a plain conv layer with group norm; {layer.channels} is not a multiple")
        for index, width in enumerate(self.hidden):
            check(width > 0, "model.hidden", self.hidden, "widths must be positive")
            if index in self.hidden_plain and self.hidden_norm == "group":
                check(width % self.worker_size == 0, "model.worker_size", self.worker_size,
                      f"must divide the width of a plain layer with group norm; {width} is not a multiple")
        check(self.activation in ACTIVATIONS, "model.activation", self.activation, f"choose one of {ACTIVATIONS}")
        check(
            self.predict_from in ("preactivation", "activation"),
            "model.predict_from",
            self.predict_from,
            "choose preactivation or activation",
        )
        check(self.align_from in (None, "preactivation", "activation"), "model.align_from", self.align_from,
              "choose preactivation, activation or null (as predict_from)")
        for index in self.hidden_plain:
            check(0 <= index < len(self.hidden), "model.hidden_plain", self.hidden_plain,
                  f"indices into model.hidden (0..{len(self.hidden) - 1})")
        check(len(set(self.hidden_plain)) == len(self.hidden_plain), "model.hidden_plain", self.hidden_plain, "repeats an index")
        check(self.hidden_norm in NORMS, "model.hidden_norm", self.hidden_norm, f"choose one of {NORMS}")
        check(self.hidden_norm != "layer" or len(self.hidden_plain) == len(self.hidden), "model.hidden_norm", self.hidden_norm,
              "layer normalisation mixes the workers of a layer; use batch or group while FC worker layers exist")
        check(0 <= self.hidden_dropout < 1, "model.hidden_dropout", self.hidden_dropout, "must lie in [0, 1)")
        plain = [spec.plain for spec in self.conv] + [i in self.hidden_plain for i in range(len(self.hidden))]
        check(not all(plain), "model", "every hidden layer plain", "a worker network needs at least one worker layer")
        check(self.worker_norm in WORKER_NORMS, "model.worker_norm", self.worker_norm, f"choose one of {WORKER_NORMS}")
        check(self.worker_logit_scale > 0, "model.worker_logit_scale", self.worker_logit_scale, "must be positive")
        check(self.init in INITS, "model.init", self.init, f"choose one of {INITS}")
        check(self.worker_pool >= 1, "model.worker_pool", self.worker_pool, "must be >= 1")
        check(self.worker_pool == 1 or bool(self.conv), "model.worker_pool", self.worker_pool,
              "pools conv maps; an MLP has none (use 1)")
        check(not self.global_pool or bool(self.conv), "model.global_pool", self.global_pool,
              "pools conv maps; an MLP has none (use false)")
        check(
            self.output_activation in OUTPUT_ACTIVATIONS,
            "model.output_activation",
            self.output_activation,
            f"choose one of {OUTPUT_ACTIVATIONS}",
        )


@dataclass
class TrainerConfig:
    """Optimisation loop settings."""

    LOGGERS = ("tensorboard", "mlflow", "wandb")
    """The experiment trackers ``loggers`` may name (:mod:`agentnet.training.loggers`)."""

    epochs: int = 20
    """Passes over the training set."""
    max_steps: Optional[int] = None
    """Stop after this many optimiser steps in total (``None``: run all epochs)."""
    batch_size: int = 128
    """Mini-batch size; one step consumes one mini-batch."""
    optimizer: str = "adam"
    """adam, adamw or sgd."""
    lr: float = 1e-3
    """Learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    momentum: float = 0.0
    """SGD momentum."""
    weight_decay: float = 0.0
    """L2 penalty (decoupled for adamw)."""
    fused: bool = True
    """Use torch's fused optimiser kernels (several times faster Adam on CPU for large layers)."""
    lr_schedule: str = "cosine"
    """none, cosine (to 0 over the run) or step (x0.1 at 50 % and 75 % of the run)."""
    eval_batch_size: int = 2000
    """Batch size for evaluation passes."""
    log_every: int = 50
    """Steps between progress-bar updates and non-finite-loss checks."""
    progress: bool = True
    """Show a progress bar."""
    train_accuracy: bool = True
    """Measure the running training accuracy of every step (``train_acc_running`` in the history).
    ``false`` saves a rule whose prediction costs extra passes those passes (Forward-Forward: its
    per-class pass, most of a step); validation and test accuracy are measured as always."""
    record_activity: bool = False
    """Record per-step worker activity (mean |output change| from the update, LFNN paper Fig. 5)."""
    checkpoint: bool = True
    """Write ``checkpoint.pt`` atomically at the end of every epoch (and of every continual task)."""
    checkpoint_every: Optional[int] = None
    """Also checkpoint every this many optimiser steps, so ``resume=true`` continues mid-epoch or
    mid-task (``None``: only at epoch and task ends)."""
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers that record the run: any of ``tensorboard`` (``<output>/tensorboard``),
    ``mlflow`` and ``wandb`` (extras ``agentnet[mlflow]``, ``agentnet[wandb]``); ``[]`` for none.
    Each logs the resolved config, the per-epoch history, the final metrics and the PNG plots
    (``docs/trackers.md``). A selected tracker that is not installed is an error, except the
    default ``tensorboard``, which is then skipped with a warning."""
    tracking_uri: Optional[str] = None
    """MLflow's tracking URI (a server, or ``sqlite:///<file>``); ``None``: ``$MLFLOW_TRACKING_URI``
    if set, else ``sqlite:///<dir>/mlflow.db`` in the run's directory, or in the sweep's for the jobs
    of a multirun."""
    project: str = "agentnet"
    """The W&B project, and the MLflow experiment of a run outside a sweep (a multirun is one
    experiment of its own, and one W&B group)."""
    amp: str = "none"
    """Mixed precision: ``bf16`` runs forward passes under bf16 autocast (weights, optimiser state and
    the strategies' custom backward stay fp32-safe); ``none`` is full fp32. Meant for CUDA (Ampere+)."""
    channels_last: bool = False
    """Store conv weights and inputs channels-last (NHWC), the fast layout for conv models on CUDA."""
    compile: bool = False
    """Compile what a step computes (the strategy's forward and losses, and through them its
    backward) with ``torch.compile``: ``mode="reduce-overhead"`` (CUDA graphs) on CUDA, the default
    mode elsewhere. The first steps pay the compilation; graph breaks are logged with their reasons
    and a step that cannot compile runs eagerly after a warning. Updates, CL methods and evaluation
    stay eager."""
    test: bool = True
    """Evaluate the test set. ``agentnet-tune`` turns it off in its trials: they select on
    validation data and never look at the test set (nor pay for evaluating it)."""
    select: str = "last"
    """Which parameters the final evaluation uses: ``last`` (those after the last step) or
    ``best_val`` (per replica, those of the epoch with the lowest validation error; needs
    ``data.val_split``; the chosen epoch is recorded as ``selected_epoch``)."""

    def __post_init__(self) -> None:
        check(self.epochs > 0, "trainer.epochs", self.epochs, "must be positive")
        check(self.max_steps is None or self.max_steps > 0, "trainer.max_steps", self.max_steps, "must be positive or null")
        check(self.batch_size > 0, "trainer.batch_size", self.batch_size, "must be positive")
        check(self.optimizer in OPTIMIZERS, "trainer.optimizer", self.optimizer, f"choose one of {OPTIMIZERS}")
        check(math.isfinite(self.lr) and self.lr > 0, "trainer.lr", self.lr, "must be a positive number")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "trainer.betas", self.betas, "two values in [0, 1)")
        check(self.momentum >= 0, "trainer.momentum", self.momentum, "must be >= 0")
        check(self.weight_decay >= 0, "trainer.weight_decay", self.weight_decay, "must be >= 0")
        check(self.lr_schedule in LR_SCHEDULES, "trainer.lr_schedule", self.lr_schedule, f"choose one of {LR_SCHEDULES}")
        check(self.eval_batch_size > 0, "trainer.eval_batch_size", self.eval_batch_size, "must be positive")
        check(self.log_every > 0, "trainer.log_every", self.log_every, "must be positive")
        check(
            self.checkpoint_every is None or self.checkpoint_every > 0,
            "trainer.checkpoint_every",
            self.checkpoint_every,
            "must be positive or null",
        )
        check(self.amp in AMP_MODES, "trainer.amp", self.amp, f"choose one of {AMP_MODES}")
        check(self.select in SELECTIONS, "trainer.select", self.select, f"choose one of {SELECTIONS}")
        check(all(name in self.LOGGERS for name in self.loggers) and len(set(self.loggers)) == len(self.loggers),
              "trainer.loggers", self.loggers, f"a list of distinct names from {self.LOGGERS}")
        check(bool(self.project), "trainer.project", self.project, "must not be empty")


@dataclass
class StrategyConfig:
    """Base of every strategy's config; ``name`` selects the registered strategy."""

    name: str = MISSING
    """Registered strategy name (see ``agentnet.registry.STRATEGIES.names()``)."""


@dataclass
class BenchmarkConfig:
    """A continual-learning protocol: which task stream and how long each task trains."""

    name: str = "pmnist_quick"
    """Protocol name (informational)."""
    scenario: str = "permuted"
    """permuted (domain-IL), split_class (class-IL), split_task (task-IL, multi-head), rotated."""
    num_tasks: int = 10
    """Number of tasks in the sequence."""
    epochs_per_task: int = 1
    """Passes over each task's training set (its ``samples_per_task`` examples when that is set).
    Leave it at 1 when ``iterations_per_task`` is set, which fixes the length instead."""
    iterations_per_task: Optional[int] = None
    """Optimiser steps per task (the reference protocol's 5000); the task's training set (or its
    ``samples_per_task`` examples) is cycled through as often as that takes, reshuffled every pass."""
    samples_per_task: Optional[int] = None
    """Train each task on only this many of its training examples (GEM's online protocol: 1000).
    Per seed, a uniform random choice without replacement, drawn anew for every task from the seed's
    task generator (after the permutations, which therefore do not depend on it); replica ``r`` of a
    population trains on exactly the examples the run ``seed=<seed + r>`` would. Episodic memories,
    replay buffers and the EWC Fisher draw only from these examples; evaluation uses every task's
    whole test set. Must not exceed a task's training examples (after ``data.subset``; split tasks
    hold only their classes' examples). ``None``: every training example."""
    pad32: bool = False
    """Zero-pad images to 32x32 (the reference protocol)."""
    first_unpermuted: bool = False
    """Permuted MNIST: leave task 1 unpermuted."""
    max_angle: float = 180.0
    """Rotated MNIST: task t is rotated by ``max_angle * t / num_tasks`` degrees."""
    eval_every: Optional[int] = None
    """Also evaluate every task every this many steps (learning curves); ``None``: only at task ends."""

    def __post_init__(self) -> None:
        scenarios = ("permuted", "split_class", "split_task", "rotated")
        check(self.scenario in scenarios, "benchmark.scenario", self.scenario, f"choose one of {scenarios}")
        check(self.num_tasks > 0, "benchmark.num_tasks", self.num_tasks, "must be positive")
        if self.scenario.startswith("split"):
            check(10 % self.num_tasks == 0, "benchmark.num_tasks", self.num_tasks, "split MNIST needs a divisor of 10")
        check(self.epochs_per_task > 0, "benchmark.epochs_per_task", self.epochs_per_task, "must be positive")
        check(
            self.iterations_per_task is None or self.iterations_per_task > 0,
            "benchmark.iterations_per_task",
            self.iterations_per_task,
            "must be positive or null",
        )
        check(
            self.iterations_per_task is None or self.epochs_per_task == 1,
            "benchmark.epochs_per_task",
            self.epochs_per_task,
            f"benchmark.iterations_per_task={self.iterations_per_task} fixes each task's length; "
            "leave epochs_per_task at 1 or set iterations_per_task=null",
        )
        check(
            self.samples_per_task is None or self.samples_per_task > 0,
            "benchmark.samples_per_task",
            self.samples_per_task,
            "must be a positive count or null",
        )
        check(self.eval_every is None or self.eval_every > 0, "benchmark.eval_every", self.eval_every, "must be positive or null")


@dataclass
class CLConfig:
    """Base of every continual-learning method's config; ``name`` selects the registered method."""

    name: str = "none"
    """Registered method (see ``agentnet.continual.methods.CL_METHODS``)."""


@dataclass
class ExperimentConfig:
    """Base of every paper experiment's config; ``name`` selects the registered experiment."""

    name: str = MISSING
    """Registered experiment (see ``agentnet.experiments.EXPERIMENTS``)."""


SAMPLERS = ("tpe", "random", "grid")
DISTRIBUTIONS = ("log", "uniform", "int", "choice")


@dataclass
class TuneConfig:
    """A hyperparameter study of ``agentnet-tune`` (group ``tune``; ``docs/comparing.md``)."""

    name: str = "study"
    """Names the study's directory, ``tunes/<name>/<the command's overrides>``: the same command
    continues the same study."""
    space: Any = None
    """Config field -> distribution, one of ``{log: [low, high]}``, ``{uniform: [low, high]}``,
    ``{int: [low, high]}`` or ``{choice: [v1, v2, ...]}``; on the command line
    ``'tune.space={trainer:{lr:{log:[1e-5,1e-1]}},strategy:{delta:{uniform:[0.1,1]}}}'``.
    ``None``: the learning rate on a log scale (over [1e-5, 1e-1] for Adam/AdamW, [1e-4, 1] for SGD)
    plus the strategy's and the CL method's own ``search_space`` (e.g. lfnn's ``delta``, EWC's
    ``ewc_lambda``)."""
    trials: int = 16
    """Trials in the study (over every tuner that shares it)."""
    batch: int = 8
    """Trials asked at a time and trained as one population where the fields allow (numeric
    per-replica fields: the learning rate, a strategy's or CL method's ``replica_fields``)."""
    objective: str = "auto"
    """The validation metric to optimise: a key of the run's metrics that starts with ``val_``;
    ``auto``: ``val_error`` for single runs, ``val_ACC`` for continual ones."""
    direction: str = "auto"
    """``minimize``, ``maximize`` or ``auto`` (minimise errors, losses and forgetting; maximise the rest)."""
    sampler: str = "tpe"
    """tpe (Optuna's TPE, with a constant liar for the trials of a batch), random or grid (every
    entry of ``space`` a ``choice``)."""
    seed: int = 0
    """Seed of the sampler (the trials train with the run's ``seed``)."""
    seeds: int = 1
    """Seeds every trial trains on (``seed``, ``seed + 1``, ...; all trials share them): its objective
    is their mean, and a seed that diverges fails the trial. More than 1 makes the study prefer
    settings that are good on every seed, not on one (a population of trials x seeds)."""
    final_seeds: int = 5
    """Fresh seeds the best setting is retrained with (one population) for the test evaluation."""
    final: Any = None
    """Settings of the final stage only, as in ``tune.space`` a nested mapping of config fields to
    values: ``tune.final={trainer:{epochs:20},data:{subset:null}}`` tunes on a short schedule and
    retrains the best setting on the full one. ``None``: the trials' settings."""
    final_seed: int = 100
    """The first of the final seeds (``final_seed .. final_seed + final_seeds - 1``): not the tuning
    seed, and the same for every rule of a comparison, so the final runs pair by seed."""

    def __post_init__(self) -> None:
        check(self.space is None or isinstance(self.space, dict), "tune.space", self.space, "a mapping of config fields to distributions")
        check(self.final is None or isinstance(self.final, dict), "tune.final", self.final, "a mapping of config fields to values")
        check(self.trials > 0, "tune.trials", self.trials, "must be positive")
        check(self.batch > 0, "tune.batch", self.batch, "must be positive")
        check(self.final_seeds > 0, "tune.final_seeds", self.final_seeds, "must be positive")
        check(self.seeds > 0, "tune.seeds", self.seeds, "must be positive")
        check(self.objective == "auto" or self.objective.startswith("val_"), "tune.objective", self.objective,
              "must be a validation metric (val_error, val_loss, val_ACC, ...): choosing settings on test data is what tuning must not do")
        check(self.direction in ("auto", "minimize", "maximize"), "tune.direction", self.direction, "choose auto, minimize or maximize")
        check(self.sampler in SAMPLERS, "tune.sampler", self.sampler, f"choose one of {SAMPLERS}")
        check(bool(self.name) and "/" not in self.name, "tune.name", self.name, "a non-empty name without '/'")


@dataclass
class RunConfig:
    """One training run: the groups plus run-level settings."""

    strategy: Any = MISSING
    """The strategy group; validated against the registered strategy's own config class."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    benchmark: Optional[BenchmarkConfig] = None
    """A continual-learning protocol; ``None`` trains once on MNIST."""
    cl: Any = None
    """The continual-learning method (group ``cl``); validated by its registered class."""
    experiment: Any = None
    """A paper experiment (group ``experiment``); ``None`` runs training or the benchmark."""
    seed: int = 0
    """Seeds initialisation, shuffling and task permutations (replica ``r`` of a population uses
    ``seed + r``). The ``data.subset`` choice does not depend on it."""
    replicas: int = 1
    """Train this many independent networks as one batched model (a population): replica ``r`` is
    exactly the run ``seed=<seed + r>`` would be. Metrics report the mean, ``<key>_std`` and each
    replica's own metrics (``docs/populations.md``)."""
    vary: dict[str, Any] = field(default_factory=dict)
    """Per-replica values of numeric fields, one list entry per replica:
    ``vary.strategy.delta=[0.1,0.5,1.0]``, ``vary.trainer.lr=[...]``, ``vary.cl.ewc_lambda=[...]``,
    ``vary.seed=[0,0,0]`` (explicit seeds). Each list must have ``replicas`` values."""
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda."""
    resume: bool = False
    """Continue from ``checkpoint.pt`` in ``resume_from`` (or the run's output directory)."""
    resume_from: Optional[str] = None
    """Directory of an earlier run to continue; ``None`` means this run's output directory."""
    output_dir: Optional[str] = None
    """Where metrics and checkpoints go; ``None`` means Hydra's run directory (or the cwd)."""
    threads: int = 0
    """torch CPU threads for this run (0: torch's default); for parallel sweeps, cores / jobs."""
    tune: Any = None
    """``agentnet-tune``'s study (group ``tune``, :class:`TuneConfig`); ``agentnet`` itself refuses it."""

    def __post_init__(self) -> None:
        check(self.threads >= 0, "threads", self.threads, "must be >= 0")
        check(self.replicas > 0, "replicas", self.replicas, "must be positive")
        check(self.device in DEVICES or self.device.startswith("cuda:"), "device", self.device, f"choose one of {DEVICES}")


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig)
    cs.store(group="benchmark", name="benchmark_schema", node=BenchmarkConfig)
    cs.store(group="tune", name="tune_schema", node=TuneConfig)
