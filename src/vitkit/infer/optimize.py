"""Fast inference: the same predictions in bf16 or int8 where the hardware runs them faster.

    fp32  the model as it is: exact.
    bf16  bf16 weights and activations (attention as plain matmuls on CPUs, see
          `explicit_attention`); on CPUs with AVX-512-bf16 or AMX, and on GPUs.
    int8  on x86 CPUs with VNNI or AMX: PyTorch 2 export quantisation with torchao's x86
          inductor quantiser: every encoder linear layer in int8 (weights per channel,
          activations per tensor, calibrated on sample images), attention maths in bf16,
          patch embedding and head unquantised; compiled with inductor. Where bf16 is fast
          too (AMX, AVX-512-bf16) everything between the int8 matmuls runs in bf16 (the
          quantised linears write bf16), else in fp32. On x86 CPUs with
          AVX2 only: ONNX Runtime's dynamic int8 (`infer/onnxrt.py`), no calibration needed.
    auto  int8 where the CPU runs it fast and, for oneDNN's, calibration images are at hand
          (a trained model carries them), else bf16 where supported, else fp32.

Measured accuracy and speed of each mode are in BENCHMARKS.md (`vitkit bench`,
`bench/precision_accuracy.py`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from vitkit.config import ViTConfig
from vitkit.data.dataset import CALIBRATION_IMAGES
from vitkit.data.preprocess import preprocess
from vitkit.infer.onnxrt import onnxruntime_net
from vitkit.model.encoder import Attention
from vitkit.model.vit import ViT
from vitkit.runtime import (
    Precision,
    fast_precisions,
    int8_backend,
    resolve_precision,
    reuse_freed_memory,
)

# Inductor's int8 lowering warns about its own tensor copies on every compile.
warnings.filterwarnings(
    "ignore", "To copy construct from a tensor", UserWarning, r"torch\._inductor\.mkldnn"
)

# int8 compiles each batch size (10-30 s for S/16 on 2 cores): fewer images than this are
# classified sooner in bf16.
INT8_MIN_IMAGES = 2000
# Largest batch one compiled int8 call takes; larger batches are split.
MAX_BATCH = 64


def int8_batch_sizes(max_batch: int) -> list[int]:
    """The batch sizes a compiled int8 model runs up to `max_batch` images as: powers of two."""
    top = 1 << (min(max_batch, MAX_BATCH) - 1).bit_length()
    return [1 << i for i in range(top.bit_length())]


class OptimizedViT(nn.Module):
    """A ViT for inference in one precision: normalised fp32 images in, fp32 logits out.

    It keeps the source model's `config` and `labels`, so it can stand in for a `ViT`
    wherever only predictions are needed.
    """

    def __init__(
        self,
        net: nn.Module,
        config: ViTConfig,
        labels: list[str] | None,
        precision: str,
        input_dtype: torch.dtype,
        device: torch.device,
        backend: str = "pytorch",
    ) -> None:
        super().__init__()
        self.net = net
        self.config, self.labels, self.precision = config, labels, precision
        self.input_dtype, self.device, self.backend = input_dtype, device, backend
        self.compile_seconds = 0.0

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.input_dtype)
        if self.precision != "int8" or self.backend == "onnxruntime":
            return self.net(x).float()
        return torch.cat([self._padded(chunk) for chunk in x.split(MAX_BATCH)])

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """The compiled int8 graph has static shapes (its prepacked weights need them): pad the
        batch to a power of two, so that at most log2(MAX_BATCH) + 1 sizes are ever compiled."""
        n = x.shape[0]
        size = int8_batch_sizes(n)[-1]
        if size > n:
            x = torch.cat([x, x.new_zeros(size - n, *x.shape[1:])])
        # Freezing folds the weights into prepacked int8 constants; it is read when each
        # batch size compiles (passing it in `torch.compile`'s options fails to prepack).
        with torch._inductor.config.patch(freezing=True):
            return self.net(x)[:n].float()

    def warm_up(self, batch_size: int) -> float:
        """Run one batch of this size (compiling for it, if compiled); returns the seconds."""
        c = self.config
        x = torch.zeros(batch_size, c.in_channels, c.image_size, c.image_size)
        start = time.perf_counter()
        self(x)
        return time.perf_counter() - start

    def input_spec(self) -> tuple[torch.device, torch.dtype]:
        """Normalised fp32 images on the model's device: it casts them itself."""
        return self.device, torch.float32

    def extra_repr(self) -> str:
        return f"precision={self.precision}, backend={self.backend}"


def optimize(
    model: ViT,
    precision: Precision | str = "auto",
    calibration: torch.Tensor | None = None,
    num_images: int | None = None,
) -> OptimizedViT:
    """`model` for fast inference in `precision` on the device it lives on.

    `calibration`: sample images for oneDNN's int8, uint8 (0-255) or float in [0, 1],
    (N, C, H, W) at any size; defaults to the images a trained model carries
    (`model.calibration`). ONNX Runtime's int8 (CPUs without VNNI) needs none.
    `num_images`, if known, is how many images will be classified: "auto" skips int8 when
    fewer than INT8_MIN_IMAGES would not repay its compilation. The source model is left as
    it is.
    """
    if not isinstance(model, ViT):
        raise TypeError(f"optimize takes a vitkit ViT, got {type(model).__name__}")
    reuse_freed_memory()
    device = next(model.parameters()).device
    if calibration is None:
        calibration = model.calibration
    worth_compiling = num_images is None or num_images >= INT8_MIN_IMAGES
    backend = int8_backend() if device.type == "cpu" else None
    calibrated = calibration is not None or backend == "onnxruntime"
    mode = resolve_precision(precision, device, calibrated and worth_compiling)
    if mode == "fp32":
        net, dtype = model.eval(), torch.float32
    elif mode == "bf16":
        net, dtype = copy.deepcopy(model).eval().to(torch.bfloat16), torch.bfloat16
    elif backend == "onnxruntime":
        start = time.perf_counter()
        fast = OptimizedViT(
            onnxruntime_net(model, "int8"),
            model.config,
            model.labels,
            mode,
            torch.float32,
            device,
            backend,
        )
        fast.compile_seconds = time.perf_counter() - start
        return fast
    else:
        if calibration is None:
            raise ValueError(
                "int8 needs calibration images: pass calibration=(N, C, H, W) images, or use "
                "a model trained with vitkit (it carries them)"
            )
        net, dtype = compile_int8(model, calibration), torch.float32
    backend = "onednn" if mode == "int8" else "pytorch"
    fast = OptimizedViT(net, model.config, model.labels, mode, dtype, device, backend)
    if mode == "int8":  # compile now, not inside the first prediction
        fast.compile_seconds = fast.warm_up(1)
    return fast


def compile_int8(model: ViT, calibration: torch.Tensor) -> nn.Module:
    """Static int8 quantisation (PT2E, x86 inductor quantiser), compiled with inductor."""
    graph = quantized_graph(model, calibration)
    if "bf16" in fast_precisions("cpu"):
        graph = BF16Between(graph)
    return torch.compile(graph, dynamic=False)


class BF16Between(nn.Module):
    """An int8 graph whose work between the int8 matmuls runs in bf16 (oneDNN's
    "int8-mixed-bf16"): the quantised linears write bf16, and LayerNorm, softmax, GELU and
    the unquantised patch embedding and head read half the bytes. Measured on a 2-core AMX
    Xeon, S/16 batch 32: 161 against 122 images/s with fp32 between them (BENCHMARKS.md)."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        # Export asserts each cast's fp32 result, which autocast changes to bf16.
        for node in list(graph.graph.nodes):
            if node.target is torch.ops.aten._assert_tensor_metadata.default:
                graph.graph.erase_node(node)
        graph.recompile()
        self.graph = graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.graph(x).float()


def quantized_graph(model: ViT, calibration: torch.Tensor) -> nn.Module:
    """The model as an exported graph with int8 encoder linears, calibrated on `calibration`
    (see the module's docstring); it runs as it is, and fast once inductor compiles it."""
    with _quiet_loggers("torchao", "torch.utils._pytree"):  # CUDA-only parts, deprecations
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    images = preprocess(calibration[:CALIBRATION_IMAGES].cpu(), model.config)
    net = copy.deepcopy(model).cpu().float().eval()
    if "bf16" in fast_precisions("cpu"):
        for m in net.modules():
            if isinstance(m, Attention):
                m.compute_dtype = torch.bfloat16
    batch = torch.export.Dim.DYNAMIC
    graph = torch.export.export(net, (images[:2],), dynamic_shapes=({0: batch},)).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    # The first and last layers are small and the most sensitive to rounding.
    for name in ("patch_embed", "head", "head_dist"):
        quantizer.set_module_name_qconfig(name, None)
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for chunk in images.split(32):
            prepared(chunk)
    return convert_pt2e(prepared)


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)
