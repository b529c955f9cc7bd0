"""Zero-shot classification: a CLIP classifies images into labels written as text.

Each label is put into prompt templates ("a photo of a {}."), optionally joined by sentences
that describe it (a dictionary's definition, "a kind of footwear"), the text tower embeds every
prompt, and a label's embeddings are averaged (CLIP's prompt ensembling). The image tower
with those embeddings as its head (`ZeroShotHead`) is an ordinary vitkit classifier: it
predicts, serves, evaluates, explains and optimises like any trained model.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from vitkit.data.captions import label_prompts
from vitkit.data.text import Tokenizer
from vitkit.model.clip import CLIP, ZeroShotHead
from vitkit.model.vit import ViT
from vitkit.weights.clip import load_clip
from vitkit.weights.format import CheckpointError, read_json

DEFAULT_TEMPLATES = ("a photo of a {}.",)
# Bounds on what a request or a command line may ask for.
MAX_LABELS = 10_000
MAX_LABEL_CHARS = 500
MAX_TEMPLATES = 100
MAX_DESCRIPTIONS = 100  # per label
MAX_LABELS_FILE_BYTES = 4 * 2**20
# Prompts embedded per call of the text tower.
TEXT_BATCH = 256


def check_labels(labels: Sequence[str]) -> list[str]:
    """Labels stripped of surrounding spaces: at least two, distinct, each one short line."""
    if isinstance(labels, str) or not all(isinstance(label, str) for label in labels):
        raise ValueError("labels must be a list of strings")
    out = [label.strip() for label in labels]
    if len(out) < 2:
        raise ValueError(f"zero-shot classification needs at least 2 labels, got {len(out)}")
    if len(out) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS:,} labels, got {len(out):,}")
    for label in out:
        if not label or len(label) > MAX_LABEL_CHARS or not label.isprintable():
            raise ValueError(
                f"each label must be one printable line of 1 to {MAX_LABEL_CHARS} characters, "
                f"got {label[:40]!r}"
            )
    repeated = sorted({label for label in out if out.count(label) > 1})
    if repeated:
        raise ValueError(f"labels must be distinct; repeated: {', '.join(repeated[:5])}")
    return out


def check_templates(templates: Sequence[str]) -> list[str]:
    """Prompt templates, each with one "{}" where the label goes."""
    if isinstance(templates, str) or not all(isinstance(t, str) for t in templates):
        raise ValueError("templates must be a list of strings")
    if not 0 < len(templates) <= MAX_TEMPLATES:
        raise ValueError(f"give 1 to {MAX_TEMPLATES} templates, got {len(templates)}")
    for template in templates:
        if template.count("{}") != 1 or len(template) > MAX_LABEL_CHARS:
            raise ValueError(
                f'each template needs exactly one "{{}}" for the label, got {template[:60]!r}'
            )
    return list(templates)


def check_descriptions(descriptions: object) -> dict[str, list[str]]:
    """Descriptions by label: a mapping of label to a list of sentences, each one short line."""
    if not isinstance(descriptions, Mapping):
        raise ValueError("descriptions must map each label to a list of sentences")
    out = {}
    for label, texts in descriptions.items():
        if not isinstance(label, str) or not isinstance(texts, list):
            raise ValueError(f"descriptions of {label!r}: expected a list of sentences")
        if len(texts) > MAX_DESCRIPTIONS:
            raise ValueError(f"{label!r} has {len(texts)} descriptions, over {MAX_DESCRIPTIONS}")
        for text in texts:
            if not isinstance(text, str) or not 0 < len(text) <= MAX_LABEL_CHARS:
                raise ValueError(
                    f"descriptions of {label!r}: each must be a string of 1 to "
                    f"{MAX_LABEL_CHARS} characters"
                )
        out[label.strip()] = list(texts)
    return out


def read_descriptions(path: str | Path) -> dict[str, list[str]]:
    """A JSON file mapping labels to sentences describing them (`check_descriptions`)."""
    path = Path(path)
    try:
        return check_descriptions(read_json(path))
    except OSError as e:
        raise CheckpointError(f"{path}: {e.strerror or e}") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def split_labels(text: str) -> list[str]:
    """`--labels "cat,dog,a red car"`: comma-separated, blanks around them dropped."""
    return [part for part in (p.strip() for p in text.split(",")) if part]


def read_labels_file(path: str | Path) -> list[str]:
    """Labels one per line (blank lines skipped), or a JSON list of strings."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"{path}: {e.strerror or e}") from None
    if size > MAX_LABELS_FILE_BYTES:
        raise CheckpointError(f"{path}: {size:,} bytes, more than {MAX_LABELS_FILE_BYTES:,}")
    if path.suffix == ".json":
        labels = read_json(path)
        if not isinstance(labels, list) or not all(isinstance(s, str) for s in labels):
            raise CheckpointError(f"{path}: expected a JSON list of labels")
        return labels
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a UTF-8 text file: {e}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


@torch.no_grad()
def class_embeddings(
    clip: CLIP,
    tokenizer: Tokenizer,
    labels: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    descriptions: Mapping[str, Sequence[str]] | None = None,
) -> torch.Tensor:
    """(labels, E): each label's prompts (templates, then its `descriptions`) embedded,
    normalised, averaged, normalised again."""
    labels, templates = check_labels(labels), check_templates(templates)
    per_label = label_prompts(labels, templates, descriptions)
    prompts = [p for texts in per_label for p in texts]
    device = next(clip.text.parameters()).device
    chunks = [
        clip.encode_text(tokenizer(prompts[i : i + TEXT_BATCH]).to(device))
        for i in range(0, len(prompts), TEXT_BATCH)
    ]
    per_prompt = torch.cat(chunks).float().split([len(texts) for texts in per_label])
    return F.normalize(torch.stack([e.mean(dim=0) for e in per_prompt]), dim=-1)


def zero_shot_model(
    clip: CLIP,
    tokenizer: Tokenizer,
    labels: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    descriptions: Mapping[str, Sequence[str]] | None = None,
) -> ViT:
    """The image tower as a classifier of `labels` (a copy; `clip` is left as it is)."""
    classes = class_embeddings(clip, tokenizer, labels, templates, descriptions)
    with torch.no_grad():
        scale = clip.scale.item()
    model = copy.deepcopy(clip.visual).float()
    model.head = ZeroShotHead(model.head, classes, scale)
    model.config = model.config.replace(num_classes=len(classes))
    model.labels = check_labels(labels)
    return model.eval()


def load_zero_shot(
    src: str | Path,
    labels: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    descriptions: Mapping[str, Sequence[str]] | None = None,
) -> ViT:
    """`zero_shot_model` of the CLIP in `src` (vitkit, Hugging Face or OpenCLIP directory)."""
    clip, tokenizer_file = load_clip(src)
    tokenizer = load_tokenizer(clip, tokenizer_file)
    return zero_shot_model(clip, tokenizer, labels, templates, descriptions)


def load_tokenizer(clip: CLIP, path: Path) -> Tokenizer:
    """The CLIP's tokenizer, its ids checked against the text tower's vocabulary."""
    tokenizer = Tokenizer.from_file(path, context_length=clip.text.config.context_length)
    vocab = clip.text.config.vocab_size
    if tokenizer.vocab_size > vocab or tokenizer.eot_id != clip.text.config.eot_id:
        raise CheckpointError(
            f"{path}: a tokenizer of {tokenizer.vocab_size:,} tokens ending texts with id "
            f"{tokenizer.eot_id}, for a text tower of {vocab:,} ending them with "
            f"{clip.text.config.eot_id}"
        )
    return tokenizer
