"""The networks a user would otherwise train on Fashion-MNIST, under the same time budget, data,
hold-out and augmentation as vitkit's recipes: the peers of the time-to-accuracy table.

    python bench/peer_training.py resnet18 runs/peers/resnet18 --minutes 15
    python bench/peer_training.py timm-vit runs/peers/timm-vit --minutes 15
    python bench/time_to_accuracy.py "ResNet-18=runs/peers/resnet18" \\
        "timm ViT=runs/peers/timm-vit" "vitkit hybrid=runs/levers/muon-kernels-e4-s0"

- resnet18: timm's ResNet-18 (basic blocks 2-2-2-2, 11.2 M parameters) with the stem CIFAR
  ResNets use for small images, one 3x3 stride-1 convolution and no max-pool (ImageNet's
  7x7/2 convolution and pool would shrink a 28-px image to 7x7 before the first block).
- timm-vit: timm's VisionTransformer in the shape of `recipes/fashion_mnist_15min.toml`
  (7x7 patches, width 96, 6 blocks, 3 heads, stochastic depth 0.05) on 1-channel 28-px input.

Both train with AdamW (lr 2e-3, weight decay 0.05, batch 128: the recipes' settings), linear
warm-up over the budget's first 5% then cosine to the budget's end (a schedule over minutes,
as nothing fixes the epochs), label smoothing 0.1 and the recipes' augmentation (2-px random
crop, flip) through vitkit's own `TrainTransform`. They validate on the 5,000 training images
`--holdout 5000` holds out at each epoch's end and when the budget runs out, and meet the
10,000 test images once, at the end. The run directory's metrics.jsonl has the lines vitkit's
runs write, so `time_to_accuracy.py` draws them beside vitkit's.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.benchmark import import_timm
from vitkit.data import ImageDataset, load_dataset
from vitkit.data.preprocess import normalize, to_float
from vitkit.data.transforms import AugmentConfig, TrainTransform
from vitkit.rundir import METRICS_FILE
from vitkit.runtime import cpu_name
from vitkit.train.setup import holdout_indices

MEAN, STD = (0.5,), (0.5,)  # vitkit's recipes normalise the same way


def build(name: str) -> nn.Module:
    """The peer network `name`, 1 input channel, 10 classes."""
    timm = import_timm()
    if name == "resnet18":
        net = timm.create_model("resnet18", in_chans=1, num_classes=10)
        net.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        return net
    if name == "timm-vit":
        return timm.models.vision_transformer.VisionTransformer(
            img_size=28,
            patch_size=7,
            in_chans=1,
            num_classes=10,
            embed_dim=96,
            depth=6,
            num_heads=3,
            drop_path_rate=0.05,
        )
    raise ValueError(f"unknown peer {name!r}: resnet18 or timm-vit")


@torch.no_grad()
def accuracy(net: nn.Module, data: ImageDataset) -> tuple[float, float]:
    """(top-1, mean cross-entropy) of `net` on `data`."""
    net.eval()
    hits, loss = 0, 0.0
    for i in range(0, len(data), 500):
        x = normalize(to_float(data.images[i : i + 500]), MEAN, STD)
        y = data.labels[i : i + 500]
        logits = net(x)
        hits += int((logits.argmax(1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
    net.train()
    return hits / len(data), loss / len(data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("peer", choices=("resnet18", "timm-vit"))
    p.add_argument("out", type=Path, help="run directory to write (metrics.jsonl)")
    p.add_argument("--minutes", type=float, default=15.0, help="training time budget")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--channels-last", action="store_true", help="NHWC weights and batches (CNNs on oneDNN)"
    )
    args = p.parse_args()

    torch.manual_seed(args.seed)
    full, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    kept, held = holdout_indices(full.labels, 5000)
    train, val = full.subset(kept), full.subset(held)
    net = build(args.peer)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    net = net.to(memory_format=layout)
    params = sum(p.numel() for p in net.parameters())
    print(f"{cpu_name()}, {torch.get_num_threads()} threads; {args.peer}: {params:,} parameters")
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.05, fused=True)
    transform = TrainTransform(AugmentConfig(crop_padding=2, hflip=True), MEAN, STD)
    gen = torch.Generator().manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    metrics = (args.out / METRICS_FILE).open("w")
    per_epoch = len(train) // args.batch_size
    budget, trained, step, seen = args.minutes * 60, 0.0, 0, 0
    while trained < budget:
        order = torch.randperm(len(train), generator=gen)
        sums = [0, 0, 0.0]  # images, correct, loss: this epoch's
        epoch_start = trained
        for i in range(per_epoch):
            tick = time.perf_counter()
            progress = trained / budget
            warm = min(1.0, progress / 0.05)
            lr = args.lr * warm * 0.5 * (1 + math.cos(math.pi * progress))
            for group in opt.param_groups:
                group["lr"] = lr
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            x, y = transform(train.images[idx], train.labels[idx], gen)
            logits = net(x.contiguous(memory_format=layout))
            loss = F.cross_entropy(logits, y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums[0] += len(y)
            sums[1] += int((logits.argmax(1) == y).sum())
            sums[2] += loss.item() * len(y)
            step, seen = step + 1, seen + len(y)
            trained += time.perf_counter() - tick
            if trained >= budget:
                break
        val_acc, val_loss = accuracy(net, val)
        line = {
            "epoch": round(seen / len(train), 3),
            "step": step,
            "train_loss": sums[2] / sums[0],
            "train_acc": sums[1] / sums[0],
            "images_per_second": sums[0] / (trained - epoch_start),
            "elapsed_s": trained,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "val_images": len(val),
        }
        if trained >= budget:
            line["test_acc"], line["test_loss"] = accuracy(net, test)
        metrics.write(json.dumps(line) + "\n")
        metrics.flush()
        shown = f"  test {100 * line['test_acc']:.2f}%" if "test_acc" in line else ""
        print(
            f"epoch {line['epoch']:.2f}  {trained / 60:.1f} min  "
            f"{line['images_per_second']:.0f} img/s  val {100 * val_acc:.2f}%{shown}",
            flush=True,
        )
    metrics.close()


if __name__ == "__main__":
    main()
