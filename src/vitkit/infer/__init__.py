"""Inference: classify images, evaluate on datasets, and turn logits into labels."""

from vitkit.evaluate import EvalReport, evaluate
from vitkit.infer.labels import probabilities, top_k
from vitkit.infer.predict import Classifier, Prediction

__all__ = ["Classifier", "EvalReport", "Prediction", "evaluate", "probabilities", "top_k"]
