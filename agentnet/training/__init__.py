"""Training: the one loop (:mod:`.engine`), its plugins (:mod:`.plugins`) and safe checkpoints
(:mod:`.checkpoint`)."""

from agentnet.training.checkpoint import (
    CHECKPOINT,
    CheckpointError,
    RunDirectoryLockedError,
    RunLock,
    atomic_save,
    atomic_write_json,
    load_checkpoint,
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
from agentnet.training.plugins import (
    BestValidation,
    Checkpointing,
    EpochEvaluation,
    StrategyTaskHooks,
    TensorBoardLogger,
    TrainerPlugin,
    WorkerActivity,
    progress_bar,
)

__all__ = [
    "BatchStream",
    "BestValidation",
    "CHECKPOINT",
    "CheckpointError",
    "Checkpointing",
    "EpochEvaluation",
    "ExternalUpdate",
    "NonFiniteLossError",
    "RunDirectoryLockedError",
    "RunLock",
    "ScaledUpdate",
    "StrategyTaskHooks",
    "TensorBoardLogger",
    "Trainer",
    "TrainerPlugin",
    "Update",
    "WorkerActivity",
    "atomic_save",
    "atomic_write_json",
    "build_optimizer",
    "build_scheduler",
    "load_checkpoint",
    "progress_bar",
]
