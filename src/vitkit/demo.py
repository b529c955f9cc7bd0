"""`make demo`: train a small ViT on Fashion-MNIST, evaluate it, classify sample images.

Each step is the `vitkit` command a user would type, printed before it runs.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from PIL import Image

from vitkit.cli import main as vitkit
from vitkit.data import load_dataset

RUN_DIR = Path("runs/demo")


def run(*argv: str) -> int:
    print(f"\n$ vitkit {shlex.join(argv)}", flush=True)
    return vitkit(list(argv))


def write_samples(out: Path, per_class: int = 1) -> list[Path]:
    """A few Fashion-MNIST test images as PNG files, named after their true class."""
    test = load_dataset("fashion-mnist", "test")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for c, name in enumerate(test.classes):
        for k in (test.labels == c).nonzero().flatten()[:per_class].tolist():
            path = out / f"{name.replace('/', '-').replace(' ', '-').lower()}-{k}.png"
            Image.fromarray(test.images[k, 0].numpy(), mode="L").save(path)
            paths.append(path)
    return paths


def main() -> int:
    # One epoch of the 15-minute recipe: about a minute on 2 cores.
    recipe = Path("recipes/fashion_mnist_15min.toml")
    steps = [
        ("train", "--recipe", str(recipe), "--epochs", "1", "--out", str(RUN_DIR)),
        ("eval", str(RUN_DIR), "--data", "fashion-mnist"),
    ]
    for argv in steps:
        if run(*argv) != 0:
            return 1
    samples = write_samples(RUN_DIR / "samples")
    print(f"\nwrote {len(samples)} sample images to {RUN_DIR / 'samples'}")
    rc = run("predict", "fashion-mnist", str(RUN_DIR / "samples"), "--top-k", "2")
    rc |= run("predict", str(RUN_DIR), str(RUN_DIR / "samples"), "--top-k", "2")
    return rc


if __name__ == "__main__":
    sys.exit(main())
