"""Training: the loop, optimiser and schedule, checkpoints and resume, recipes."""

from vitkit.train.config import Recipe, TrainConfig, load_recipe
from vitkit.train.loop import TrainResult, train

__all__ = ["Recipe", "TrainConfig", "TrainResult", "load_recipe", "train"]
