"""Training: the one loop (:mod:`.engine`), its plugins (:mod:`.plugins`), safe checkpoints
(:mod:`.checkpoint`) and the single-run task (:mod:`.task`)."""

from agentnet.training.checkpoint import (
    CHECKPOINT,
    CheckpointError,
    RunDirectoryLockedError,
    RunLock,
    atomic_save,
    atomic_write_json,
    load_checkpoint,
)
from agentnet.training.engine import BatchStream, NonFiniteLossError, Trainer, build_optimizer, build_scheduler
from agentnet.training.plugins import BestValidation, StrategyTaskHooks, TensorBoardLogger, TrainerPlugin, WorkerActivity, progress_bar
from agentnet.training.task import load_run_data, prepare_run, resolve_device, seed_everything, standard_plugins, train

__all__ = [
    "BestValidation",
    "CHECKPOINT",
    "BatchStream",
    "CheckpointError",
    "NonFiniteLossError",
    "RunDirectoryLockedError",
    "RunLock",
    "TensorBoardLogger",
    "Trainer",
    "TrainerPlugin",
    "StrategyTaskHooks",
    "WorkerActivity",
    "atomic_save",
    "atomic_write_json",
    "build_optimizer",
    "build_scheduler",
    "load_checkpoint",
    "load_run_data",
    "prepare_run",
    "progress_bar",
    "resolve_device",
    "seed_everything",
    "standard_plugins",
    "train",
]
