"""vitkit: the Vision Transformer of "An image is worth 16x16 words", correct, fast, easy."""

from vitkit.config import PRESETS, ViTConfig
from vitkit.infer import Classifier, Prediction, evaluate, probabilities, top_k
from vitkit.infer.optimize import OptimizedViT, optimize
from vitkit.model import ViT
from vitkit.model.factory import create_model
from vitkit.weights import CheckpointError, load_model, load_pretrained, save_model

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CheckpointError",
    "Classifier",
    "OptimizedViT",
    "Prediction",
    "ViT",
    "ViTConfig",
    "create_model",
    "evaluate",
    "load_model",
    "load_pretrained",
    "optimize",
    "probabilities",
    "save_model",
    "top_k",
]
