"""`vitkit embed`: the features of image files (pooled, L2-normalised) in a safetensors file,
with the files' names, for retrieval (`vitkit search`), clustering or k-NN classification;
for a CLIP, image and text embeddings in the space the two towers share."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

from vitkit.cli.common import fail, note
from vitkit.data.dataset import DatasetError
from vitkit.data.folder import printable
from vitkit.data.preprocess import centre_crop, load_image, open_regular
from vitkit.files import atomic_write
from vitkit.infer.embed import (
    CLIP_SPACE,
    EMBEDDING,
    FEATURES,
    FINGERPRINT,
    MODEL,
    MODEL_DIR,
    NAMES,
    PATCH_TOKENS,
    POOLED,
    PROGRESS_DELAY_S,
    TEXT_FEATURES,
    TEXTS,
    check_texts,
    embed_images,
    embed_texts,
    model_fingerprint,
)
from vitkit.infer.predict import expand_inputs
from vitkit.infer.zero_shot import load_tokenizer
from vitkit.model.vit import ViT
from vitkit.weights.clip import is_clip, load_clip
from vitkit.weights.format import load_model, resolve_model_dir

# A --text-file's bound (texts are also bounded in number and length: infer/embed.py).
MAX_TEXT_FILE_BYTES = 16 * 2**20


def add_embed_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "embed",
        help="image files' features (and a CLIP's texts' embeddings), to a safetensors file",
        description="Embeds image files (and, for a CLIP, texts) into a safetensors file that "
        "`vitkit search` reads. Each row has unit length. For a CLIP the image rows are its "
        "image embeddings, in the space its texts share; for other models the pooled "
        "features (the head's input).",
    )
    p.add_argument("model", metavar="MODEL_DIR", help="model directory or shipped model name")
    p.add_argument(
        "inputs", nargs="*", metavar="IMAGE_OR_DIR", help="image files, or folders of them"
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="FILE",
        help=f"the safetensors file: tensors {FEATURES!r} (N, D) for the images, "
        f"{TEXT_FEATURES!r} (M, E) for the texts, float32; metadata entries {NAMES!r} and "
        f"{TEXTS!r} (JSON lists: the images' paths, the texts, in the rows' order), {MODEL!r} "
        f"(as given), {MODEL_DIR!r} (its directory, absolute), {FINGERPRINT!r} (a digest of "
        f"its image weights) and {EMBEDDING!r} ({CLIP_SPACE!r}: a CLIP's image embeddings; "
        f"{POOLED!r}: pooled features)",
    )
    p.add_argument(
        "--text",
        action="append",
        metavar="TEXT",
        help=f"a text to embed with a CLIP's text tower, into {TEXT_FEATURES!r} (repeatable)",
    )
    p.add_argument(
        "--text-file",
        type=Path,
        metavar="FILE",
        help="texts to embed, one a line (UTF-8; blank lines skipped), after any --text",
    )
    p.add_argument(
        "--pooled",
        action="store_true",
        help="for a CLIP: the pooled features (the input of its projection) instead of its "
        "image embeddings; texts cannot be compared with them",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--patch-tokens",
        action="store_true",
        help=f"also the patch tokens, unpooled, as {PATCH_TOKENS!r} (N, P, D)",
    )
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_embed)
    return p


def cmd_embed(args: argparse.Namespace) -> int:
    """Files are decoded a batch at a time, so memory holds one batch of images; an unreadable
    file is named on stderr and left out (exit status 1), the others written."""
    texts = _texts(args.text, args.text_file)
    paths = expand_inputs(args.inputs)
    if args.inputs and not paths:
        return fail("embed", f"no image files in {printable(', '.join(map(str, args.inputs)))}")
    if not paths and not texts:
        return fail("embed", "nothing to embed: give image files or folders, or --text")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    clip = is_clip(args.model)
    if texts and not clip:
        return fail(
            "embed", f"{printable(str(args.model))}: not a CLIP (no text tower): --text needs one"
        )
    if texts and args.pooled:
        return fail("embed", "--pooled features are not in the space of the texts: drop one")
    directory = resolve_model_dir(args.model).resolve()
    if clip:
        clip_model, tokenizer_file = load_clip(directory)
        clip_model.to(args.device)
        model = clip_model.visual
        tokenizer = load_tokenizer(clip_model, tokenizer_file) if texts else None
    else:
        model = load_model(directory).to(args.device)
    projected = clip and not args.pooled
    tensors: dict[str, torch.Tensor] = {}
    names: list[str] = []
    if paths:
        names, tensors = _embed_files(model, paths, args.batch_size, args.patch_tokens, projected)
        if not names:
            return fail("embed", "none of the files could be read; nothing written")
    if texts:
        tensors[TEXT_FEATURES] = embed_texts(clip_model, tokenizer, texts)
    metadata = {
        "format": "pt",
        NAMES: json.dumps(names),
        MODEL: str(args.model),
        MODEL_DIR: str(directory),
        EMBEDDING: CLIP_SPACE if projected else POOLED,
        FINGERPRINT: model_fingerprint(model),
    }
    if texts:
        metadata[TEXTS] = json.dumps(texts)
    atomic_write(args.out, save_safetensors(tensors, metadata=metadata))
    parts = []
    if names:
        dims = " x ".join(map(str, tensors[FEATURES].shape))
        parts.append(f"features {dims} of {len(names):,} images")
    if texts:
        dims = " x ".join(map(str, tensors[TEXT_FEATURES].shape))
        parts.append(f"text_features {dims} of {len(texts):,} texts")
    print(f"wrote {printable(str(args.out))}: {', '.join(parts)}")
    return 0 if len(names) == len(paths) else 1


def _embed_files(
    model: ViT, paths: list[Path], batch_size: int, patch_tokens: bool, projected: bool
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The readable files' names and their tensors (FEATURES, and PATCH_TOKENS if asked)."""
    c = model.config
    crop = centre_crop(c.crop_pct)
    names: list[str] = []
    features, patches = [], []
    with tqdm(total=len(paths), desc="embed", unit="img", delay=PROGRESS_DELAY_S) as bar:
        for start in range(0, len(paths), batch_size):
            images = []
            for path in paths[start : start + batch_size]:
                try:
                    images.append(
                        load_image(path, c.in_channels, c.image_size, c.interpolation, crop=crop)
                    )
                except DatasetError as e:
                    note("embed", f"error: {printable(str(e))}")
                    continue
                names.append(str(path))
            bar.update(min(batch_size, len(paths) - start))
            if not images:
                continue
            batch = torch.stack(images)
            if patch_tokens:
                pooled, tokens = embed_images(
                    model, batch, patch_features=True, progress=False, projected=projected
                )
                patches.append(tokens)
            else:
                pooled = embed_images(model, batch, progress=False, projected=projected)
            features.append(pooled)
    if not names:
        return names, {}
    tensors = {FEATURES: torch.cat(features)}
    if patch_tokens:
        tensors[PATCH_TOKENS] = torch.cat(patches)
    return names, tensors


def _texts(given: list[str] | None, path: Path | None) -> list[str]:
    """The --text texts, then the --text-file's lines, bounded in number and length."""
    texts = list(given or [])
    if path is not None:
        name = printable(str(path))
        try:
            with open_regular(path) as f:
                data = f.read(MAX_TEXT_FILE_BYTES + 1)
        except OSError as e:
            raise ValueError(f"{name}: {e.strerror or e}") from None
        if len(data) > MAX_TEXT_FILE_BYTES:
            raise ValueError(f"{name}: larger than the limit of {MAX_TEXT_FILE_BYTES:,} bytes")
        try:
            lines = data.decode("utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"{name}: not a UTF-8 text file: {e}") from None
        texts += [line.strip() for line in lines if line.strip()]
    if texts:
        check_texts(texts)
    return texts
