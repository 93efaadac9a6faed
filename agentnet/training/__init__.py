"""Training: the one loop (:mod:`.engine`), its plugins (:mod:`.plugins`) and safe checkpoints
(:mod:`.checkpoint`)."""

from agentnet.training.checkpoint import (
    CHECKPOINT,
    PREVIOUS,
    CheckpointError,
    RunDirectoryLockedError,
    RunLock,
    atomic_save,
    atomic_write_json,
    load_checkpoint,
    load_verified,
    remove_checkpoints,
    save_checkpoint,
)
from agentnet.training.engine import (
    BatchStream,
    ExternalUpdate,
    NonFiniteLossError,
    ScaledUpdate,
    Trainer,
    Update,
    build_optimizer,
    build_scheduler,
)
from agentnet.training.loggers import MLflowLogger, RunLogger, TensorBoardLogger, WandbLogger, build_loggers
from agentnet.training.plugins import (
    BestValidation,
    Checkpointing,
    EpochEvaluation,
    StrategyTaskHooks,
    TrainerPlugin,
    WorkerActivity,
)
from agentnet.training.console import progress_bar
from agentnet.training.parallel import GradientAveraging

__all__ = [
    "BatchStream",
    "BestValidation",
    "CHECKPOINT",
    "PREVIOUS",
    "CheckpointError",
    "Checkpointing",
    "EpochEvaluation",
    "MLflowLogger",
    "ExternalUpdate",
    "GradientAveraging",
    "NonFiniteLossError",
    "RunDirectoryLockedError",
    "RunLock",
    "RunLogger",
    "ScaledUpdate",
    "StrategyTaskHooks",
    "TensorBoardLogger",
    "Trainer",
    "TrainerPlugin",
    "Update",
    "WandbLogger",
    "WorkerActivity",
    "atomic_save",
    "atomic_write_json",
    "build_loggers",
    "build_optimizer",
    "build_scheduler",
    "load_checkpoint",
    "load_verified",
    "progress_bar",
    "remove_checkpoints",
    "save_checkpoint",
]
