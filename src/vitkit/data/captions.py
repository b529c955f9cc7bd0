"""Image-caption pairs for contrastive (CLIP, LiT) training, in memory.

Three sources: a folder of images with a caption file beside each (`photo.jpg` + `photo.txt`,
one caption per line; images without one are left out and counted), WebDataset shards whose
samples pair an image with a `txt` member (`0001.jpg` + `0001.txt`), or a labelled dataset
whose class names become captions through prompt templates ("a photo of a {}.") and, where
given, sentences that describe each class (e.g. a dictionary's definition of the word).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from braceexpand import braceexpand
from tqdm import tqdm

from vitkit.data.dataset import DatasetError, ImageDataset
from vitkit.data.preprocess import centre_crop, image_extensions, load_image
from vitkit.data.shards import MAX_MEMBER_BYTES

# A caption file is a few lines of text; anything larger is not one.
MAX_CAPTION_BYTES = 64 * 2**10
MAX_CAPTIONS_PER_IMAGE = 100
MAX_PAIRS = 10_000_000
# Members of one WebDataset sample (an image, its caption, a few more); more are no sample.
MAX_MEMBERS_PER_SAMPLE = 16


@dataclass
class CaptionedImages:
    """uint8 images (N, C, H, W), each with one or more captions (and its class, if any)."""

    images: torch.Tensor
    captions: list[list[str]]
    name: str = ""
    labels: torch.Tensor | None = None
    classes: list[str] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.images) != len(self.captions) or not all(self.captions):
            raise ValueError("every image needs at least one caption")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: torch.Tensor) -> CaptionedImages:
        labels = None if self.labels is None else self.labels[indices]
        captions = [self.captions[i] for i in indices.tolist()]
        return CaptionedImages(self.images[indices], captions, self.name, labels, self.classes)


def label_prompts(
    labels: Sequence[str],
    templates: Sequence[str],
    descriptions: Mapping[str, Sequence[str]] | None = None,
) -> list[list[str]]:
    """Each label's texts: the label in every template, then the label's descriptions (none
    for a label the mapping lacks). Training captions and zero-shot prompts are both made
    here, so a class is described the same way to the text tower in both."""
    descriptions = descriptions or {}
    return [
        [t.replace("{}", label) for t in templates] + list(descriptions.get(label, ()))
        for label in labels
    ]


def captions_from_labels(
    dataset: ImageDataset,
    templates: Sequence[str],
    classes: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    descriptions: Mapping[str, Sequence[str]] | None = None,
) -> CaptionedImages:
    """Each image captioned by its class name in every template, and by its class's
    `descriptions` (keyed by name); with `classes`, only the images of those classes are kept
    (their labels stay the dataset's indices). `names` replaces the dataset's class names in
    the captions, in its class order."""
    names = list(names) if names is not None else dataset.classes
    if len(names) != len(dataset.classes):
        raise ValueError(f"{len(names)} names for {len(dataset.classes)} classes")
    keep = torch.ones(len(dataset), dtype=torch.bool)
    if classes is not None:
        unknown = [c for c in classes if c not in dataset.classes]
        if unknown:
            raise ValueError(
                f"no class {unknown[0]!r} in {dataset.name or 'the dataset'}; its classes: "
                f"{', '.join(dataset.classes)}"
            )
        wanted = torch.tensor([dataset.classes.index(c) for c in classes])
        keep = torch.isin(dataset.labels, wanted)
    index = keep.nonzero().flatten()
    per_class = label_prompts(names, templates, descriptions)
    captions = [per_class[i] for i in dataset.labels[index].tolist()]
    return CaptionedImages(
        dataset.images[index], captions, dataset.name, dataset.labels[index], dataset.classes
    )


def load_captioned_folder(
    directory: str | Path, image_size: int, channels: int, crop_pct: float = 1.0
) -> CaptionedImages:
    """The images under `directory` that have a caption file beside them, decoded and cropped
    to `image_size`; unreadable images and caption files are skipped with their reason."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"{directory}: not a directory")
    extensions = image_extensions()
    files = sorted(
        f
        for f in directory.rglob("*")
        if f.suffix.lower() in extensions
        and not any(p.startswith(".") for p in f.relative_to(directory).parts)
    )
    if len(files) > MAX_PAIRS:
        raise DatasetError(f"{directory}: {len(files):,} images, more than {MAX_PAIRS:,}")
    images, captions, skipped = [], [], []
    crop = centre_crop(crop_pct)
    for path in tqdm(files, desc="captioned images", unit="img", delay=2.0):
        try:
            lines = read_captions(path.with_suffix(".txt"))
            image = load_image(path, channels, image_size, "bicubic", crop=crop)
        except DatasetError as e:
            skipped.append((str(path), str(e)))
            continue
        images.append(image)
        captions.append(lines)
    if not images:
        first = f": {skipped[0][1]}" if skipped else ""
        raise DatasetError(f"{directory}: no image with a caption file beside it{first}")
    batch = torch.stack(images)
    return CaptionedImages(batch, captions, directory.name, skipped=skipped)


def shard_paths(spec: str | Path) -> list[Path] | None:
    """The .tar files `spec` names (one file, a directory of them, a brace pattern such as
    "pairs-{000..009}.tar"), or None when it names none."""
    text = str(spec)
    if text.endswith(".tar") and "{" in text:
        return [Path(p) for p in braceexpand(text)]
    path = Path(spec)
    if path.is_file() and path.suffix == ".tar":
        return [path]
    if path.is_dir():
        tars = sorted(path.glob("*.tar"))
        return tars or None
    return None


def load_captioned_shards(
    paths: Sequence[Path], image_size: int, channels: int, crop_pct: float = 1.0
) -> CaptionedImages:
    """The samples of WebDataset shards that have an image and a `txt` caption member, read
    front to back (no member is extracted to disk; each is bounded in size); samples without
    one of the two, or unreadable, are skipped with their reason."""
    images, captions, skipped = [], [], []
    crop = centre_crop(crop_pct)
    bar = tqdm(desc="captioned samples", unit="img", delay=2.0)
    for key, members in _samples(paths, skipped):
        image_ext = next((e for e in members if f".{e}" in image_extensions()), None)
        where = f"{key}.{image_ext or 'txt'}"
        if image_ext is None or "txt" not in members:
            skipped.append((where, "a sample without both an image and a txt caption"))
            continue
        try:
            lines = _caption_lines(members["txt"], f"{key}.txt")
            image = io.BytesIO(members[image_ext])
            image.name = where
            images.append(load_image(image, channels, image_size, "bicubic", crop=crop))
        except DatasetError as e:
            skipped.append((where, str(e)))
            continue
        captions.append(lines)
        bar.update()
        if len(images) > MAX_PAIRS:
            raise DatasetError(f"{paths[0]}: more than {MAX_PAIRS:,} samples")
    bar.close()
    if not images:
        first = f": {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise DatasetError(f"{paths[0]}: no sample with an image and a caption{first}")
    name = paths[0].stem.split("-")[0]
    return CaptionedImages(torch.stack(images), captions, name, skipped=skipped)


def _samples(
    paths: Sequence[Path], skipped: list[tuple[str, str]]
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(shard:key, {extension: bytes}) for each sample, members grouped by their key (the
    name up to its first dot, as WebDataset groups them)."""
    for path in paths:
        try:
            with tarfile.open(path, "r:") as tar:
                key, members = None, {}
                for info in tar:
                    if not info.isfile():
                        continue
                    stem, _, ext = info.name.partition(".")
                    if stem != key:
                        if key is not None:
                            yield f"{path}:{key}", members
                        key, members = stem, {}
                    if info.size > MAX_MEMBER_BYTES or len(members) >= MAX_MEMBERS_PER_SAMPLE:
                        skipped.append((f"{path}:{info.name}", "too large, or too many members"))
                        continue
                    member = tar.extractfile(info)
                    if member is not None:
                        members[ext.lower()] = member.read(info.size)
                if key is not None:
                    yield f"{path}:{key}", members
        except (OSError, tarfile.TarError) as e:
            skipped.append((str(path), f"not a readable tar shard: {e}"))


def _caption_lines(data: bytes, where: str) -> list[str]:
    if len(data) > MAX_CAPTION_BYTES:
        raise DatasetError(f"{where}: {len(data):,} bytes, more than {MAX_CAPTION_BYTES:,}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{where}: a caption that is not UTF-8: {e}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise DatasetError(f"{where}: an empty caption")
    return lines[:MAX_CAPTIONS_PER_IMAGE]


def read_captions(path: Path) -> list[str]:
    """The non-blank lines of a caption file, bounded in size and count."""
    try:
        size = path.stat().st_size
        if size > MAX_CAPTION_BYTES:
            raise DatasetError(f"{path}: {size:,} bytes, more than {MAX_CAPTION_BYTES:,}")
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no caption file") from None
    except OSError as e:
        raise DatasetError(f"{path}: unreadable caption file: {e}") from None
    return _caption_lines(data, str(path))
