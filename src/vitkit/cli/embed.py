"""`vitkit embed`: the features of image files (pooled, L2-normalised) in a safetensors file,
with the files' names, for retrieval, clustering or k-NN classification."""

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
from vitkit.data.preprocess import centre_crop, load_image
from vitkit.files import atomic_write
from vitkit.infer.embed import PROGRESS_DELAY_S, embed_images
from vitkit.infer.predict import expand_inputs
from vitkit.weights.format import load_model

# The file's tensors, and the metadata entry that lists the files' names (a JSON list, row i
# naming the file of row i).
FEATURES, PATCH_TOKENS, NAMES = "features", "patch_tokens", "names"


def add_embed_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("embed", help="image files' features, to a safetensors file")
    p.add_argument("model", metavar="MODEL_DIR", help="model directory or shipped model name")
    p.add_argument(
        "inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files, or folders of them"
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="FILE",
        help=f"the safetensors file: {FEATURES!r} (N, D), and the files' names as a JSON list "
        f"in its metadata entry {NAMES!r}",
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
    paths = expand_inputs(args.inputs)
    if not paths:
        return fail("embed", f"no image files in {printable(', '.join(map(str, args.inputs)))}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    model = load_model(args.model).to(args.device)
    c = model.config
    crop = centre_crop(c.crop_pct)
    names: list[str] = []
    features, patches = [], []
    with tqdm(total=len(paths), desc="embed", unit="img", delay=PROGRESS_DELAY_S) as bar:
        for start in range(0, len(paths), args.batch_size):
            images = []
            for path in paths[start : start + args.batch_size]:
                try:
                    images.append(
                        load_image(path, c.in_channels, c.image_size, c.interpolation, crop=crop)
                    )
                except DatasetError as e:
                    note("embed", f"error: {printable(str(e))}")
                    continue
                names.append(str(path))
            bar.update(min(args.batch_size, len(paths) - start))
            if not images:
                continue
            batch = torch.stack(images)
            if args.patch_tokens:
                pooled, tokens = embed_images(model, batch, patch_features=True, progress=False)
                patches.append(tokens)
            else:
                pooled = embed_images(model, batch, progress=False)
            features.append(pooled)
    if not names:
        return fail("embed", "none of the files could be read; nothing written")
    tensors = {FEATURES: torch.cat(features)}
    if args.patch_tokens:
        tensors[PATCH_TOKENS] = torch.cat(patches)
    metadata = {"format": "pt", NAMES: json.dumps(names), "model": str(args.model)}
    atomic_write(args.out, save_safetensors(tensors, metadata=metadata))
    dims = " x ".join(map(str, tensors[FEATURES].shape))
    print(f"wrote {printable(str(args.out))}: features {dims} of {len(names):,} images")
    return 0 if len(names) == len(paths) else 1
