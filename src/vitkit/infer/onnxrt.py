"""ONNX Runtime as one of vitkit's inference backends: the model exported to ONNX (`vitkit
export`'s file, fp32 or with dynamic int8) and run by onnxruntime on the CPU.

Where a CPU has no int8 dot products (AVX2 without VNNI), PyTorch's int8 graph runs slower
than fp32 while ONNX Runtime's dynamic int8 runs S/16 and B/16 1.4-2.2x faster than PyTorch's
fp32; its fp32 also beats PyTorch eager on single images there. vitkit runs the model through
it rather than lose to it (`runtime.int8_backend`, `auto` in `infer/compiled.py`).

Dynamic int8 quantises activations with one scale per call, so int8 runs one image per
call: an image's answer never depends on the images batched with it (measured on S/16 at
batch 32, 6% slower than batching; on B/16 no slower: BENCHMARKS.md). onnxruntime releases
Python's interpreter lock while it runs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from vitkit.export.onnx import export_onnx, onnx_session, quantize_onnx_int8
from vitkit.model.vit import ViT

PRECISIONS = ("fp32", "int8")


def write_onnx(model: ViT, precision: str, path: Path) -> Path:
    """`model` as an ONNX file for any batch size, in `precision` (fp32 or dynamic int8),
    written atomically to `path`."""
    if precision not in PRECISIONS:
        raise ValueError(f"ONNX Runtime runs {' or '.join(PRECISIONS)}, not {precision!r}")
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".onnx.") as tmp:
        fp32 = export_onnx(model, Path(tmp) / "model.onnx", dynamic_batch=True)
        if precision == "int8":
            quantize_onnx_int8(fp32, path)
        else:
            os.replace(fp32, path)
    return path


class OnnxRuntimeNet(nn.Module):
    """An ONNX file run by onnxruntime: normalised fp32 images in, fp32 logits out."""

    def __init__(self, path: Path, precision: str) -> None:
        super().__init__()
        self.session = onnx_session(path)  # reads the whole file: it may be deleted now
        self.input_name = self.session.get_inputs()[0].name
        self.per_image = precision == "int8"  # see the module's docstring

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32).contiguous()
        chunks = x.split(1) if self.per_image else [x]
        return torch.cat([self._run(chunk) for chunk in chunks])

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.numpy()})[0])


def onnxruntime_net(model: ViT, precision: str) -> OnnxRuntimeNet:
    """`model` exported and loaded into onnxruntime, in `precision` (no file is kept)."""
    with tempfile.TemporaryDirectory(prefix="vitkit-onnx-") as tmp:
        path = write_onnx(model, precision, Path(tmp) / f"model.{precision}.onnx")
        return OnnxRuntimeNet(path, precision)
