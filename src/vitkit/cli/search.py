"""`vitkit search`: the images of an embeddings file (`vitkit embed`) most like a query image
or, with a CLIP, a text."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vitkit.cli.common import fail, note
from vitkit.data.folder import printable
from vitkit.data.preprocess import centre_crop, image_extensions, load_image
from vitkit.infer.embed import (
    CLIP_SPACE,
    MAX_TEXT_CHARS,
    embed_images,
    embed_texts,
    model_fingerprint,
)
from vitkit.infer.search import Index, load_index, top_matches
from vitkit.infer.zero_shot import load_tokenizer
from vitkit.model.vit import ViT
from vitkit.weights.clip import is_clip, load_clip
from vitkit.weights.format import CheckpointError, load_model, resolve_model_dir

DEFAULT_TOP_K = 10


def add_search_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "search",
        help="the embedded images most like an image or, with a CLIP, a text",
        description="Ranks the images of an embeddings file written by `vitkit embed` by cosine "
        "similarity to QUERY, embedded by the model the file records (or --model): an image "
        "file by its image tower, any other text by a CLIP's text tower. Prints one line per "
        "match, the similarity then the image's path.",
    )
    p.add_argument(
        "index",
        metavar="INDEX",
        help="an embeddings file (`vitkit embed ... --out FILE`), or a folder of them: every "
        "*.safetensors directly in it, all from one model, searched together",
    )
    p.add_argument(
        "query",
        metavar="QUERY",
        help="an image file, or (for a CLIP's embeddings) a text: whatever is not an existing "
        "file is read as text",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=DEFAULT_TOP_K,
        metavar="K",
        help=f"how many matches (default {DEFAULT_TOP_K}; all of them if the index has fewer)",
    )
    p.add_argument(
        "--text",
        action="store_true",
        help="read QUERY as text even if a file of that name exists",
    )
    p.add_argument(
        "--model",
        metavar="MODEL_DIR",
        help="the model that embedded the index (default: the directory the index records)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='one JSON object a line: {"rank", "path", "similarity"}',
    )
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_search)
    return p


def cmd_search(args: argparse.Namespace) -> int:
    try:
        return _search(args)
    except (CheckpointError, ValueError, OSError) as e:  # IndexFileError, DatasetError too
        return fail("search", printable(" ".join(str(e).split())))


def _search(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    index = load_index(args.index)
    where = printable(str(args.index))
    model_dir = _model_dir(args.model, index, where)
    clip = is_clip(model_dir)
    as_text = args.text or not Path(args.query).exists()
    if as_text:
        query = _text_query(args.query, args.text, model_dir, clip, index, where, args.device)
    else:
        query = _image_query(Path(args.query), model_dir, clip, index, where, args.device)
    dims = index.features.shape[1]
    if query.shape[-1] != dims:
        raise ValueError(
            f"{where} holds {dims}-dimensional embeddings, and {printable(str(model_dir))} "
            f"gives {query.shape[-1]}: it is not the model the index was embedded with"
        )
    for match in top_matches(index, query[0], args.top_k):
        if args.json:
            row = {"rank": match.rank, "path": match.name, "similarity": match.similarity}
            print(json.dumps(row), flush=True)
        else:
            print(f"{match.similarity:.4f}  {printable(match.name)}", flush=True)
    return 0


def _model_dir(given: str | None, index: Index, where: str) -> Path:
    """The model to embed the query with: --model, or the one the index records."""
    if given is not None:
        return resolve_model_dir(given)
    if index.model_dir is None:
        raise ValueError(f"{where} does not record the model that embedded it; pass --model")
    try:
        return resolve_model_dir(index.model_dir)
    except CheckpointError as e:
        raise ValueError(
            f"{where} was embedded with {printable(index.model_dir)}, which cannot be read "
            f"({e}); pass --model"
        ) from None


def _text_query(
    text: str, forced: bool, model_dir: Path, clip: bool, index: Index, where: str, device: str
) -> torch.Tensor:
    """A text's CLIP embedding (1, E), refused where the index could not be compared with it."""
    if not clip:
        shown = printable(text[:80]) + ("..." if len(text) > 80 else "")
        why = "--text needs one" if forced else f"{shown!r} can only be an image file, and is not"
        raise ValueError(f"{printable(str(model_dir))} is not a CLIP (no text tower): {why}")
    if index.embedding != CLIP_SPACE:
        raise ValueError(
            f"{where} holds pooled image features, which texts cannot be compared with; embed "
            f"the images again without --pooled to search them by text"
        )
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"a text query of {len(text):,} characters; at most {MAX_TEXT_CHARS:,}")
    if Path(text).suffix.lower() in image_extensions():
        note("search", f"no file {printable(text)}: searching for it as text")
    clip_model, tokenizer_file = load_clip(model_dir)
    _check_same_model(clip_model.visual, model_dir, index, where)
    clip_model.to(device)
    return embed_texts(clip_model, load_tokenizer(clip_model, tokenizer_file), [text])


def _image_query(
    path: Path, model_dir: Path, clip: bool, index: Index, where: str, device: str
) -> torch.Tensor:
    """An image file's embedding (1, D), made as the index's images' were."""
    projected = index.embedding == CLIP_SPACE
    if projected and not clip:
        raise ValueError(
            f"{printable(str(model_dir))} is not a CLIP, and the index holds CLIP embeddings"
        )
    model = load_clip(model_dir)[0].visual if clip else load_model(model_dir)
    _check_same_model(model, model_dir, index, where)
    c = model.config
    image = load_image(
        path, c.in_channels, c.image_size, c.interpolation, crop=centre_crop(c.crop_pct)
    )
    return embed_images(model.to(device), image[None], progress=False, projected=projected)


def _check_same_model(model: ViT, model_dir: Path, index: Index, where: str) -> None:
    """Refuse a model whose image weights are not those that embedded the index (when the
    index records them: files from before the fingerprint are checked by size alone)."""
    if index.fingerprint is not None and model_fingerprint(model) != index.fingerprint:
        raise ValueError(
            f"{where} was embedded by another model than {printable(str(model_dir))} (its "
            "image weights differ): it is not the model the index was embedded with; embed "
            "again, or pass the right one with --model"
        )
