"""A 224 px model whose predictions are not flat, to guard the accuracy of the fast modes on
the very architecture `vitkit bench` times (random weights give near-uniform probabilities,
on which any mode "agrees").

    python bench/guard_model.py S/16 runs/guard-s16
    python bench/precision_accuracy.py runs/guard-s16 --limit 500 --compiled

The preset as it is (3 channels, 224 px, 10 classes) is trained from scratch on Fashion-MNIST's
training images with the model's own preprocessing (grey repeated to RGB, upsampled), as the
paper does: first at a low resolution (112 px, 7x7 patches: 4x fewer FLOPs an image), then,
position embeddings resampled, fine-tuned at 224 px. Each stage runs AdamW (lr 5e-4, 20
warm-up steps, cosine to the stage's time budget, label smoothing 0.1) for a fixed number of
minutes. The model is saved as a vitkit model directory with labels and calibration images,
so every mode of `vitkit.optimize` and `vitkit serve` can run it. The test split stays held
out: the guard measures on it.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

import vitkit
from vitkit.data import ImageDataset, load_dataset
from vitkit.data.dataset import calibration_sample
from vitkit.data.preprocess import preprocess
from vitkit.model.vit import ViT, count_params
from vitkit.runtime import auto_bf16, reuse_freed_memory


def train_for(model: ViT, train: ImageDataset, minutes: float, args: argparse.Namespace) -> None:
    """AdamW on `train` at the model's image size for `minutes` (warm-up, then cosine)."""
    c = model.config
    bf16 = auto_bf16(torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05, fused=True)
    order = torch.randperm(
        len(train), generator=torch.Generator().manual_seed(args.seed + c.image_size)
    )
    budget, start, step, seen = minutes * 60, time.perf_counter(), 0, 0
    print(f"{c.image_size} px, bf16 autocast {bf16}, {minutes} min", flush=True)
    model.train()
    while (elapsed := time.perf_counter() - start) < budget:
        lr = args.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = order[seen % len(order) :][: args.batch_size]
        x = preprocess(train.images[idx], c)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), train.labels[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step, seen = step + 1, seen + len(idx)
        if step % 20 == 0:
            rate = seen / (time.perf_counter() - start)
            print(f"  step {step}  loss {loss.item():.3f}  {rate:.1f} img/s", flush=True)
    model.eval()
    print(f"  {seen} images in {step} steps", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("preset", help="e.g. S/16 or B/16")
    p.add_argument("out", help="model directory to write")
    p.add_argument("--pretrain-size", type=int, default=112, help="image size of the first stage")
    p.add_argument("--pretrain-minutes", type=float, default=6.0)
    p.add_argument("--minutes", type=float, default=4.0, help="at the preset's image size")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    reuse_freed_memory()
    train = load_dataset("fashion-mnist", "train", channels=3)
    model = vitkit.create_model(args.preset, num_classes=len(train.classes), seed=args.seed)
    size = model.config.image_size
    print(f"{args.preset}: {count_params(model):,} parameters")
    model.set_image_size(args.pretrain_size)
    train_for(model, train, args.pretrain_minutes, args)
    model.set_image_size(size)
    train_for(model, train, args.minutes, args)
    model.calibration = calibration_sample(train.images)
    vitkit.save_model(model, args.out, labels=list(train.classes))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
