"""`vitkit optimize`: compile a model ahead of time (an AOTInductor package), for `vitkit serve`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from vitkit.cli.common import add_precision_argument, note

DEFAULT_MAX_BATCH = 32  # `vitkit serve`'s default --max-batch


def add_optimize_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "optimize",
        help="compile a model for fast serving on this CPU (once; `vitkit serve` loads it)",
        description="Compile MODEL with inductor for batches of 1 to --max-batch images and "
        "write the package (and its signature: model, precision, torch, CPU). Without --out "
        "it goes to vitkit's cache, where `vitkit serve MODEL` finds it; with --out, pass "
        "the package to `vitkit serve --compiled`. auto builds each precision that may be "
        "fast here, measures them, and keeps the fastest (int8 only where it pays).",
    )
    p.add_argument("model", metavar="MODEL_DIR", help="model directory or shipped model name")
    add_precision_argument(p, "auto")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="largest batch")
    p.add_argument("--out", type=Path, help="directory for the package (default: the cache)")
    # For `vitkit serve`'s background build: yield the CPU to the service.
    p.add_argument("--background", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_optimize)
    return p


def cmd_optimize(args: argparse.Namespace) -> int:
    # Heavy (torch, and inductor when it compiles): imported when this command runs.
    from vitkit.infer.compiled import build_compiled, cache_dir, private_dir
    from vitkit.weights.format import load_model

    if not 1 <= args.max_batch <= 1024:
        raise ValueError(f"--max-batch must be between 1 and 1024, got {args.max_batch}")
    if args.background:
        os.nice(19)
    model = load_model(args.model)
    if args.out is None:
        out = private_dir(cache_dir())
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        out = args.out
    compiled = build_compiled(
        model, args.precision, args.max_batch, out, lambda line: note("optimize", line)
    )
    print(compiled.path, flush=True)
    return 0
