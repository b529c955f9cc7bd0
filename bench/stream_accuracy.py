"""Streamed against in-memory fine-tuning where full-resolution crops matter: Fashion-MNIST
items upscaled and placed at random on textured canvases of 256-400 px, fine-tuned on both ways
with the same recipe and number of steps, over several seeds.

    python bench/stream_accuracy.py --train 4000 --val 1000 --seeds 0 1 2

The photos are written once into --root as a folder with train/ and val/ (JPEG, quality 90;
class folders named "0-T-shirt-top" ... "9-Ankle boot", in the model's order). The model is
the shipped Fashion-MNIST hybrid ViT (trained on the 28-pixel originals), fine-tuned at 64 px
(its position embeddings resampled, the photos read as grey). In memory, each photo is decoded
once as its centre square at 64 px and the random resized crops are cut from that; streamed,
each crop is cut from the full-resolution file. The held-out photos are scored the same way
for both (centre square at 64 px).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vitkit.data import load_dataset
from vitkit.runtime import cpu_name
from vitkit.train import TrainConfig, train


def canvas_photo(item: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A 28x28 grey item, upscaled to a third to a half of a textured canvas and placed at
    random on it, tinted."""
    w, h = (int(n) for n in rng.integers(256, 401, 2))
    coarse = rng.integers(40, 200, (4, 4, 3)).astype(np.uint8)
    texture = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC))
    texture = texture.astype(np.float32) + rng.normal(0, 12, (h, w, 3))
    side = int(rng.uniform(0.33, 0.5) * min(w, h))
    big = Image.fromarray(item).resize((side, side), Image.Resampling.BICUBIC)
    alpha = np.asarray(big, dtype=np.float32)[..., None] / 255
    x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    tint = rng.uniform(200, 255, 3)
    patch = texture[y : y + side, x : x + side]
    texture[y : y + side, x : x + side] = patch * (1 - alpha) + tint * alpha
    return Image.fromarray(np.clip(texture, 0, 255).astype(np.uint8))


def write_photos(root: Path, n_train: int, n_val: int) -> Path:
    """train/<class>/ and val/<class>/ photos from Fashion-MNIST's train and test images."""
    folder = root / f"fashion-photos-{n_train}-{n_val}-v2"
    if (folder / ".complete").exists():
        return folder
    rng = np.random.default_rng(0)
    for split, source, n in (("train", "train", n_train), ("val", "test", n_val)):
        ds = load_dataset("fashion-mnist", source)
        for i in tqdm(range(n), desc=f"writing {split}", unit="img"):
            label = int(ds.labels[i])
            cls = f"{label}-{ds.classes[label].replace('/', '-')}"  # sorted as the model's
            (folder / split / cls).mkdir(parents=True, exist_ok=True)
            photo = canvas_photo(ds.images[i, 0].numpy(), rng)
            photo.save(folder / split / cls / f"{i:06d}.jpg", quality=90)
    (folder / ".complete").touch()
    return folder


def recipe(folder: Path, seed: int, epochs: int, stream: bool) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "data": str(folder),
            "init": "fashion-mnist",
            "model_overrides": {"image_size": 64},
            "stream": stream,
            "epochs": epochs,
            "batch_size": 64,
            "lr": 5e-4,
            "warmup_epochs": 0.5,
            "weight_decay": 0.05,
            "label_smoothing": 0.1,
            "grad_clip": 1.0,
            "precision": "fp32",
            "seed": seed,
            "augment": {"random_resized_crop": True, "crop_scale": [0.35, 1.0], "hflip": True},
        }
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=4000, help="training photos")
    p.add_argument("--val", type=int, default=1000, help="held-out photos")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "vitkit-photos")
    args = p.parse_args()
    folder = write_photos(args.root, args.train, args.val)
    print(f"CPU: {cpu_name()}; {args.train:,} training / {args.val:,} held-out photos")
    scores: dict[str, list[float]] = {"in memory": [], "streamed": []}
    for seed in args.seeds:
        for name, stream in (("in memory", False), ("streamed", True)):
            with tempfile.TemporaryDirectory() as out:
                start = time.perf_counter()
                result = train(recipe(folder, seed, args.epochs, stream), out, progress=False)
            assert result.val_acc is not None
            scores[name].append(result.val_acc)
            seconds = time.perf_counter() - start
            print(f"seed {seed}, {name}: {result.val_acc:.2%} in {seconds:.0f} s", flush=True)
    print("| path | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean ± sd |")
    print("|---|" + "---|" * (len(args.seeds) + 1))
    for name, accs in scores.items():
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        cells = " | ".join(f"{a:.2%}" for a in accs)
        print(f"| {name} | {cells} | {statistics.mean(accs):.2%} ± {sd:.2%} |")
    gap = statistics.mean(scores["streamed"]) - statistics.mean(scores["in memory"])
    print(f"streamed - in memory: {gap * 100:+.2f} points", file=sys.stderr)


if __name__ == "__main__":
    main()
