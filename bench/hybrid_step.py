"""The hybrid recipe's training step alone: images/s of forward, backward and optimiser step at
the recipe's batch, with no data loading, and optionally the profile that explains it.

    python bench/hybrid_step.py                                  # the recipe as it trains
    python bench/hybrid_step.py --optimizer adamw --compile --profile

The model, batch, optimisers (AdamW, or Muon on the matrices and CNN kernels) and precision
(bf16 autocast where the CPU has fast bf16) are those `vitkit train --recipe` builds from
the recipe; the images are random (speed does not depend on them). Each variant runs in a
process of its own; the median of --steps timed steps after --warmup untimed ones is kept.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from vitkit.config import get_preset
from vitkit.model.vit import ViT
from vitkit.runtime import auto_bf16, cpu_name, reuse_freed_memory
from vitkit.train.config import load_recipe
from vitkit.train.optim import build_optimizers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="recipes/fashion_mnist_hybrid_15min.toml")
    p.add_argument("--optimizer", choices=["adamw", "muon"], help="default: the recipe's")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--profile", action="store_true", help="print the ops of 5 more steps")
    args = p.parse_args()

    reuse_freed_memory()
    torch.set_num_threads(args.threads)
    cfg = load_recipe(args.recipe).config
    optimizer = args.optimizer or cfg.optimizer
    config = get_preset(cfg.model).replace(**cfg.model_overrides, in_channels=1, num_classes=10)
    bf16 = auto_bf16(torch.device("cpu")) if args.precision == "auto" else args.precision == "bf16"
    torch.manual_seed(cfg.seed)
    model = ViT(config).train()
    net = torch.compile(model) if args.compile else model
    muon = optimizer == "muon"
    optimizers = build_optimizers(
        model,
        cfg.lr,
        cfg.weight_decay,
        fused=True,
        muon=muon,
        muon_kernels=muon and cfg.muon_kernels,
        muon_precision="bf16" if bf16 else "fp32",
    )
    size = config.image_size
    x = torch.randn(cfg.batch_size, 1, size, size)
    y = torch.randint(0, 10, (cfg.batch_size,))

    def step() -> None:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = net(x)
        F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for opt in optimizers:
            opt.step()

    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warmup = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    mode = f"{'bf16' if bf16 else 'fp32'}, {optimizer}{', compiled' if args.compile else ''}"
    print(
        f"{cpu_name()}, {args.threads} threads; {mode}, batch {cfg.batch_size}: "
        f"{cfg.batch_size / median:.0f} images/s ({median * 1000:.1f} ms a step; "
        f"first {args.warmup} steps {warmup:.1f} s)"
    )
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            for _ in range(5):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
