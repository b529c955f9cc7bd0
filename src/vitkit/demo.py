"""`make demo`: build a small ViT, save it, load it back and classify a generated image."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import vitkit


def main() -> int:
    model = vitkit.create_model("Ti/4@28", seed=0)
    torch.nn.init.normal_(model.head.weight, std=0.02)  # untrained: any non-uniform head
    with tempfile.TemporaryDirectory() as tmp:
        path = vitkit.save_model(model, Path(tmp) / "model", labels=[f"c{i}" for i in range(10)])
        model = vitkit.load_model(path)
    image = torch.linspace(-1, 1, 28 * 28).reshape(1, 1, 28, 28)  # a generated gradient image
    with torch.no_grad():
        logits = model(image)
    for label, p in vitkit.top_k(logits, k=3, labels=model.labels)[0]:
        print(f"{label:>6}  {p:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
