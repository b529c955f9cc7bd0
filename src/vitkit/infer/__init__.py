"""Inference: classify images, evaluate on datasets, turn logits into labels, embed images and
classify them by their nearest neighbours."""

from vitkit.evaluate import EvalReport, evaluate
from vitkit.infer.embed import embed_dataset, embed_images
from vitkit.infer.knn import KnnReport, knn_evaluate, knn_scores
from vitkit.infer.labels import probabilities, top_k
from vitkit.infer.predict import Classifier, Prediction

__all__ = [
    "Classifier",
    "EvalReport",
    "KnnReport",
    "Prediction",
    "embed_dataset",
    "embed_images",
    "evaluate",
    "knn_evaluate",
    "knn_scores",
    "probabilities",
    "top_k",
]
