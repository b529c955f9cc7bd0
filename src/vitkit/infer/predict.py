"""Classify images with a trained model: files, PIL images or tensors in, top-k labels out.

Inputs are batched and results come batch by batch (`Classifier.predict_iter`); an unreadable
file gives a `Prediction` with `error` set and never stops the others from being classified.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from vitkit.config import ViTConfig
from vitkit.data.dataset import DatasetError
from vitkit.data.preprocess import centre_crop, image_extensions, load_image, preprocess
from vitkit.infer.labels import top_k as top_k_labels
from vitkit.infer.optimize import optimize
from vitkit.infer.zero_shot import DEFAULT_TEMPLATES, load_zero_shot
from vitkit.model.vit import ViT
from vitkit.weights.format import load_model

ImageInput = str | Path | Image.Image | torch.Tensor


@dataclass
class Prediction:
    """One input's top-k `(label, probability)` pairs, or the reason it has none."""

    source: str
    labels: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None


def expand_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Paths as given, each directory replaced by the image files under it (sorted).

    Image files are those with an extension of `IMAGE_FORMATS`. Hidden files and folders
    inside a directory are skipped; a file named explicitly is kept whatever its extension or
    kind, so that a missing or unreadable one is reported, not ignored.
    """
    extensions = image_extensions()
    out: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            out.append(path)
            continue
        out.extend(
            sorted(
                f
                for f in path.rglob("*")
                if f.suffix.lower() in extensions
                and not any(part.startswith(".") for part in f.relative_to(path).parts)
                and f.is_file()
            )
        )
    return out


class Classifier:
    """A model ready to classify: `Classifier("runs/mnist").predict(["a.png", "photos/"])`;
    with a CLIP, into labels written as text: `Classifier(clip_dir, labels=["cat", "dog"])`."""

    def __init__(
        self,
        model_or_dir: ViT | str | Path,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        precision: str = "fp32",
        num_images: int | None = None,
        labels: Sequence[str] | None = None,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        descriptions: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """`precision`: "fp32" (exact), "bf16", "int8" or "auto", as in `vitkit.optimize`
        (`num_images`: how many images are expected, which "auto" weighs). `labels` (a CLIP
        directory only) classifies zero-shot, each label put into the prompt `templates` and
        averaged with its `descriptions`, if any."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if labels is not None:
            if isinstance(model_or_dir, ViT):
                raise TypeError(
                    "labels= takes a CLIP directory; for a loaded CLIP, build the classifier "
                    "with vitkit.infer.zero_shot.zero_shot_model(clip, tokenizer, labels)"
                )
            model = load_zero_shot(model_or_dir, labels, templates, descriptions)
        elif isinstance(model_or_dir, ViT):
            model = model_or_dir
        else:
            model = load_model(model_or_dir)
        self.device = torch.device(device)
        self.model = optimize(model.to(self.device).eval(), precision, num_images=num_images)
        self.batch_size = batch_size

    @property
    def config(self) -> ViTConfig:
        return self.model.config

    def predict(
        self, images: Iterable[ImageInput] | ImageInput, top_k: int = 5
    ) -> list[Prediction]:
        """One `Prediction` per input, in order; a 4-D tensor counts as a batch of images.

        Files and PIL images are cropped as the model was evaluated (`config.crop_pct`);
        tensors are taken as decoded pixels, floats as values in [0, 1], uint8 as 0-255, and
        only centre-cropped to a square. Files that cannot be read get `error` set instead of
        labels.
        """
        return list(self.predict_iter(images, top_k))

    def predict_iter(
        self, images: Iterable[ImageInput] | ImageInput, top_k: int = 5
    ) -> Iterator[Prediction]:
        """`predict`, lazily: each batch's results as soon as it is classified, reading only
        as many inputs as one batch holds before that."""
        batch: list[tuple[str, ImageInput]] = []
        for item in _sources(images):
            batch.append(item)
            if len(batch) == self.batch_size:
                yield from self._predict_batch(batch, top_k)
                batch = []
        if batch:
            yield from self._predict_batch(batch, top_k)

    def _predict_batch(self, items: list[tuple[str, ImageInput]], k: int) -> list[Prediction]:
        results = [Prediction(source) for source, _ in items]
        inputs, ok = [], []
        for i, (source, item) in enumerate(items):
            try:
                inputs.append(self._load(item))
            except DatasetError as e:
                results[i].error = str(e)
                continue
            except OSError as e:  # a missing file or a directory, before any decoding
                results[i].error = f"{source}: {e.strerror or e}"
                continue
            ok.append(i)
        if not ok:
            return results
        with torch.inference_mode():
            logits = self.model(torch.cat(inputs))
        for i, labels in zip(ok, top_k_labels(logits, k, self.model.labels), strict=True):
            results[i].labels = labels
        return results

    def _load(self, item: ImageInput) -> torch.Tensor:
        """One input as a normalised (1, C, H, W) model input on the model's device."""
        c = self.config
        if isinstance(item, torch.Tensor):
            if item.ndim not in (2, 3):
                raise ValueError(f"expected an image (C, H, W) or (H, W), got {tuple(item.shape)}")
            x = item.reshape(1, -1, *item.shape[-2:])
        else:
            crop = centre_crop(c.crop_pct)
            x = load_image(item, c.in_channels, c.image_size, c.interpolation, crop=crop)[None]
        return preprocess(x.to(self.device), c)


def _sources(images: Iterable[ImageInput] | ImageInput) -> Iterator[tuple[str, ImageInput]]:
    """(name, image) for each input, a folder's images for a folder; names are paths, a PIL
    file name, or the position."""
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    elif isinstance(images, torch.Tensor):
        images = list(images) if images.ndim == 4 else [images]
    for i, item in enumerate(images):
        if isinstance(item, (str, Path)) and Path(item).is_dir():
            yield from ((str(f), f) for f in expand_inputs([item]))
        elif isinstance(item, (str, Path)):
            yield str(item), item
        elif isinstance(item, Image.Image):
            yield getattr(item, "filename", "") or f"<image {i}>", item
        elif isinstance(item, torch.Tensor):
            yield f"<tensor {i}>", item
        else:
            raise TypeError(
                f"cannot classify a {type(item).__name__}; give a path, image or tensor"
            )
