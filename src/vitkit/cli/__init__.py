"""The `vitkit` command line: one subcommand per job."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from vitkit.cli.bench import add_bench_command
from vitkit.cli.convert import add_convert_command
from vitkit.cli.create import add_create_command
from vitkit.cli.data import add_data_command
from vitkit.cli.embed import add_embed_command
from vitkit.cli.eval import add_eval_command
from vitkit.cli.explain import add_explain_command
from vitkit.cli.export import add_export_command
from vitkit.cli.info import add_info_command
from vitkit.cli.inspect import add_inspect_command
from vitkit.cli.models import add_models_command
from vitkit.cli.optimize import add_optimize_command
from vitkit.cli.predict import add_predict_command
from vitkit.cli.search import add_search_command
from vitkit.cli.serve import add_serve_command
from vitkit.cli.train import add_train_commands
from vitkit.cli.train_clip import add_train_clip_command
from vitkit.runtime import reuse_freed_memory
from vitkit.weights.format import CheckpointError, one_line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitkit", description=__doc__)
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on an error, show the traceback too (or set VITKIT_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    # In the order `vitkit --help` lists them.
    add_models_command(sub)
    add_create_command(sub)
    add_train_commands(sub)
    add_train_clip_command(sub)
    add_eval_command(sub)
    add_predict_command(sub)
    add_embed_command(sub)
    add_search_command(sub)
    add_explain_command(sub)
    add_inspect_command(sub)
    add_export_command(sub)
    add_optimize_command(sub)
    add_serve_command(sub)
    add_bench_command(sub)
    add_convert_command(sub)
    add_data_command(sub)
    add_info_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reuse_freed_memory()
    debug = args.debug or os.environ.get("VITKIT_DEBUG", "0") not in ("", "0")
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader is gone (`vitkit predict ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # for the final flush
        return 128 + 13  # as if killed by SIGPIPE
    except Exception as e:  # one line naming the problem; the traceback only when asked
        expected = isinstance(e, (CheckpointError, ValueError, FileNotFoundError))
        if debug:
            traceback.print_exc()
        what = "" if expected else f"{type(e).__name__}: "
        hint = "" if expected or debug else " (run with --debug for the traceback)"
        print(f"vitkit {args.command}: error: {what}{one_line(str(e))}{hint}", file=sys.stderr)
        return 2 if expected else 1
