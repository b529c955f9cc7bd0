"""`vitkit data`: describe an image collection, or pack an image folder into WebDataset shards."""

from __future__ import annotations

import argparse
import re

# Decimal units as disks are sold, binary ones as memory is; a bare number is bytes.
_UNITS = {
    "": 1,
    "b": 1,
    **{f"{p}b": 1000**i for i, p in enumerate("kmgt", 1)},
    **{p: 1000**i for i, p in enumerate("kmgt", 1)},
    **{f"{p}ib": 1024**i for i, p in enumerate("kmgt", 1)},
}


def parse_size(text: str) -> int:
    """A byte count written like 1GB, 500MB, 2GiB or 1.5G (argparse's type for sizes)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match[2].lower() if match else None
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GB, 500MB, 2GiB)")
    size = int(float(match[1]) * _UNITS[unit])
    if size < 1:
        raise argparse.ArgumentTypeError(f"the size must be at least 1 byte, got {text!r}")
    return size


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def add_data_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "data", help="inspect a collection (folder, manifest, shards, HF dataset); pack a folder"
    )
    sub = p.add_subparsers(dest="data_command", required=True)
    inspect = sub.add_parser(
        "inspect",
        help="classes, images per class, sizes, formats and unreadable files of a source "
        "(exit status 1 if any file is unreadable)",
    )
    inspect.add_argument(
        "source",
        metavar="SOURCE",
        help="an image folder (one subfolder per class, or train/ and val/), a manifest "
        "(.csv or .jsonl of path,label), a folder with Hugging Face imagefolder metadata "
        "(metadata.csv or .jsonl of file_name,label), a shard set's folder or shards.json, "
        "a brace pattern like 'shards-{000000..000127}.tar' or a .tar, a Hugging Face dataset "
        "(save_to_disk folder, Parquet)",
    )
    inspect.set_defaults(func=cmd_inspect)
    pack = sub.add_parser(
        "pack",
        help="write an image folder as WebDataset tar shards and a shards.json; a rerun "
        "resumes an interrupted one, or checks a complete one and writes nothing",
    )
    pack.add_argument(
        "folder", metavar="FOLDER", help="one subfolder per class, or train/ and val/"
    )
    pack.add_argument("out", metavar="OUT", help="the output folder (train/ and val/ in it)")
    pack.add_argument(
        "--shard-size",
        type=parse_size,
        default=1 << 30,
        metavar="SIZE",
        help="about how large each shard is: 1GB, 500MB, 2GiB... (default: 1GiB)",
    )
    pack.add_argument(
        "--max-size",
        type=_positive,
        metavar="PIXELS",
        help="re-encode images whose shorter side is longer, to this shorter side",
    )
    pack.add_argument(
        "--seed", type=int, default=0, help="fixes the order of the samples (default: 0)"
    )
    pack.set_defaults(func=cmd_pack)
    return p


def cmd_inspect(args: argparse.Namespace) -> int:
    # Heavy (Pillow, webdataset): imported when the command runs, not at every start-up.
    from vitkit.data.inspect import inspect_source

    report = inspect_source(args.source)
    print(report.format())
    parts = report.splits.values() if report.splits else [report]
    return 1 if any(part.unreadable for part in parts) else 0


def cmd_pack(args: argparse.Namespace) -> int:
    from vitkit.data.shards import pack_folder

    for result in pack_folder(
        args.folder, args.out, args.shard_size, args.max_size, seed=args.seed
    ):
        print(result.format())
    return 0
