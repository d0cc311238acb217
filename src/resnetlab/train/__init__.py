"""Training and evaluation: ``train(config)``, recipes, checkpoints, metrics and torchrun support."""

from resnetlab.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from resnetlab.train.config import TrainConfig, load_recipe, recipe_names
from resnetlab.train.engine import (
    StepInfo,
    TrainHooks,
    TrainingDiverged,
    TrainingInterrupted,
    TrainResult,
    TrainRun,
    train,
)
from resnetlab.train.evaluation import evaluate
from resnetlab.train.rundir import RunDir, RunDirBusy

__all__ = [
    "CheckpointError", "RunDir", "RunDirBusy", "StepInfo", "TrainConfig", "TrainHooks", "TrainResult", "TrainRun",
    "TrainingDiverged", "TrainingInterrupted", "evaluate", "load_checkpoint", "load_recipe", "recipe_names",
    "save_checkpoint", "train",
]  # fmt: skip
