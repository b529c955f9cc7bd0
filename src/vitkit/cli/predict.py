"""`vitkit predict`: the top classes of image files, as text or JSON lines."""

from __future__ import annotations

import argparse
import json

from vitkit.cli.common import (
    add_precision_argument,
    add_zero_shot_arguments,
    descriptions,
    fail,
    note,
    templates,
    zero_shot_labels,
)
from vitkit.data.folder import printable
from vitkit.infer.predict import Classifier, expand_inputs


def add_predict_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("predict", help="classify image files")
    p.add_argument("model", metavar="MODEL_DIR", help="model directory or shipped model name")
    p.add_argument(
        "inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files, or folders of them"
    )
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print JSON lines, one object per image")
    add_precision_argument(p, "auto")
    add_zero_shot_arguments(p)
    p.set_defaults(func=cmd_predict)
    return p


def cmd_predict(args: argparse.Namespace) -> int:
    """Each result printed as soon as its batch is classified, so that an interrupted run has
    shown what it did; file names are escaped in text, exact in JSON."""
    paths = expand_inputs(args.inputs)
    if not paths:
        return fail("predict", f"no image files in {printable(', '.join(args.inputs))}")
    classifier = Classifier(
        args.model,
        device=args.device,
        batch_size=args.batch_size,
        precision=args.precision,
        num_images=len(paths),
        labels=zero_shot_labels(args),
        templates=templates(args),
        descriptions=descriptions(args),
    )
    failed = False
    for p in classifier.predict_iter(paths, top_k=args.top_k):
        if p.error is not None:
            failed = True
            note("predict", f"error: {printable(p.error)}")
        if args.json:
            row = {
                "path": p.source,
                "predictions": [{"label": lb, "probability": pr} for lb, pr in p.labels],
                "error": p.error,
            }
            print(json.dumps(row), flush=True)
        elif p.error is None:
            labels = ", ".join(f"{lb} ({pr:.1%})" for lb, pr in p.labels)
            print(f"{printable(p.source)}: {labels}", flush=True)
    return 1 if failed else 0
