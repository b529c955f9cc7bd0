"""Export a model to ONNX (fp32, or with int8 weights) and check it against PyTorch.

The ONNX file takes normalised images (B, C, H, W) float32 at the model's `image_size` and
returns logits (B, num_classes). It is usable alone: the preprocessing it expects (size,
channels, mean, std, resampling filter), the class names and the whole config travel in its
`metadata_props` as JSON (`read_metadata`).

    export_onnx(model, "m.onnx")              one file, written atomically
    quantize_onnx_int8("m.onnx", "m.int8.onnx")    int8 weights, dynamic int8 activations
    check_onnx(model, "m.onnx", x)            max |logit difference| on the inputs x
    compare_precisions(model, dataset, ...)   accuracy of PyTorch fp32 / bf16 and ONNX files
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

from vitkit.config import ViTConfig
from vitkit.data import ImageDataset
from vitkit.data.preprocess import preprocess
from vitkit.evaluate import class_order
from vitkit.model.vit import ViT
from vitkit.weights.format import atomic_write

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
# metadata_props keys; each value is JSON.
PREPROCESSING_KEY = "vitkit.preprocessing"
LABELS_KEY = "vitkit.labels"
CONFIG_KEY = "vitkit.config"
QUANTIZATION_KEY = "vitkit.quantization"
# One protobuf message cannot exceed 2 GiB, so larger models would need external data files,
# and the file would no longer be usable alone.
MAX_ONNX_BYTES = 2**31 - 2**26
# What int8 quantisation touches. Not "Attention": onnxruntime's quantiser takes opset 23's
# Attention for its own contrib op of that name and writes an invalid QAttention node.
INT8_OPS = ("MatMul", "Gemm", "Conv")


@contextmanager
def _eval_fp32_cpu(model: ViT) -> Iterator[ViT]:
    """The model in eval mode, in float32 on the CPU (a copy if it is not there already)."""
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:
        yield copy.deepcopy(model).to("cpu", torch.float32).eval()
        return
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def export_onnx(
    model: ViT, path: str | Path, dynamic_batch: bool = False, opset: int | None = None
) -> Path:
    """Write `model` as one ONNX file; the batch size is 1 unless `dynamic_batch`.

    `opset` defaults to the exporter's own choice. Returns `path`.
    """
    path = Path(path)
    c = model.config
    size = sum(p.numel() * 4 for p in model.parameters())
    if size > MAX_ONNX_BYTES:
        raise ValueError(
            f"the model's fp32 weights take {size / 2**30:.1f} GiB; a single ONNX file holds "
            "under 2 GiB"
        )
    # A dynamic batch is traced with 2 images: torch.export specialises a size of 1.
    example = torch.zeros(2 if dynamic_batch else 1, c.in_channels, c.image_size, c.image_size)
    with _eval_fp32_cpu(model) as m, torch.no_grad(), warnings.catch_warnings():
        # Raised inside torch.export's own pytree code, nothing the caller can act on.
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)`", FutureWarning)
        # The torch.export-based exporter (dynamo=True): the TorchScript tracer is deprecated
        # since torch 2.9 and warns that it will be removed, and torch.export turns the
        # batch size into a checked symbolic dimension instead of a traced constant.
        program = torch.onnx.export(
            m,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: "batch"},) if dynamic_batch else None,
            opset_version=opset,
            verbose=False,
        )
    proto = program.model_proto
    proto.doc_string = (
        f"vitkit ViT: {INPUT_NAME} (batch, {c.in_channels}, {c.image_size}, {c.image_size}) "
        f"float32, normalised as {PREPROCESSING_KEY} says -> {OUTPUT_NAME} "
        f"(batch, {c.num_classes})"
    )
    _set_metadata(proto, _metadata(c, model.labels))
    atomic_write(path, proto.SerializeToString())
    return path


def _metadata(config: ViTConfig, labels: list[str] | None) -> dict[str, str]:
    preprocessing = {
        "image_size": config.image_size,
        "in_channels": config.in_channels,
        "mean": list(config.mean),
        "std": list(config.std),
        "interpolation": config.interpolation,
        # Shorter side resized to image_size / crop_pct, then image_size cut from the centre.
        "crop_pct": config.crop_pct,
        "normalize": "(pixel / 255 - mean) / std, per channel, after resizing",
    }
    return {
        PREPROCESSING_KEY: json.dumps(preprocessing),
        LABELS_KEY: json.dumps(labels),
        CONFIG_KEY: config.to_json(),
    }


def _set_metadata(proto: onnx.ModelProto, values: Mapping[str, str]) -> None:
    """Set `values` in `metadata_props`, replacing entries of the same keys."""
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    for key, value in [*kept, *values.items()]:
        proto.metadata_props.add(key=key, value=value)


def read_metadata(path: str | Path) -> dict:
    """An exported file's `preprocessing`, `labels` (None if unnamed), `config` (a ViTConfig)
    and `quantization` (None for fp32)."""
    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    if CONFIG_KEY not in props:
        raise ValueError(f"{path}: not an ONNX file exported by vitkit (no {CONFIG_KEY})")
    return {
        "preprocessing": json.loads(props[PREPROCESSING_KEY]),
        "labels": json.loads(props[LABELS_KEY]),
        "config": ViTConfig.from_dict(json.loads(props[CONFIG_KEY])),
        "quantization": json.loads(props.get(QUANTIZATION_KEY, "null")),
    }


# -- int8 ------------------------------------------------------------------------------------
@contextmanager
def _without_preprocess_advice() -> Iterator[None]:
    """Drop onnxruntime's "consider pre-processing" log line: on these exports its
    pre-processing quantises the same nodes to the same results (tried on the shipped model)."""

    def keep(record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def quantize_onnx_int8(
    onnx_path: str | Path, out_path: str | Path, per_channel: bool = False
) -> Path:
    """Dynamic int8 quantisation of an exported file: weights of the linear layers and the
    patch convolution stored as int8, activations quantised at run time.

    Each activation gets one scale per batch, so an image's logits depend slightly on the
    images batched with it. Per-channel weight scales measured no more accurate on the
    shipped model (bench/export_accuracy.py), hence off by default. The metadata is kept,
    plus a `vitkit.quantization` entry. Returns `out_path`.
    """
    out_path = Path(out_path)
    source = onnx.load(str(onnx_path))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quantize.") as tmp:
        raw = Path(tmp) / "int8.onnx"
        with _without_preprocess_advice():
            quantize_dynamic(
                source,
                raw,
                op_types_to_quantize=list(INT8_OPS),
                per_channel=per_channel,
                weight_type=QuantType.QInt8,
            )
        proto = onnx.load(str(raw))
    mode = {"method": "onnxruntime dynamic", "weights": "int8", "per_channel": per_channel}
    _set_metadata(proto, {QUANTIZATION_KEY: json.dumps(mode)})
    atomic_write(out_path, proto.SerializeToString())
    return out_path


# -- running and checking --------------------------------------------------------------------
def onnx_session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session; `threads` defaults to PyTorch's, so that timings compare like for like."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session: ort.InferenceSession, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits for normalised inputs `x` (N, C, H, W), in batches the file accepts."""
    fixed = session.get_inputs()[0].shape[0]
    if isinstance(fixed, int) and len(x) % fixed:
        raise ValueError(f"the ONNX file takes batches of {fixed}; got {len(x)} inputs")
    step = fixed if isinstance(fixed, int) else batch_size
    name = session.get_inputs()[0].name
    x = x.detach().to("cpu", torch.float32)
    outputs = [
        torch.from_numpy(session.run(None, {name: x[i : i + step].numpy()})[0])
        for i in range(0, len(x), step)
    ]
    return torch.cat(outputs)


@dataclass
class Parity:
    """How closely an ONNX file's logits follow the PyTorch model's on the same inputs."""

    max_abs_diff: float
    top1_agreement: float  # fraction of inputs whose predicted class is the same
    num_inputs: int


def check_onnx(model: ViT, path: str | Path, x: torch.Tensor) -> Parity:
    """Run the ONNX file with onnxruntime on normalised inputs `x` and compare with `model`."""
    with _eval_fp32_cpu(model) as m, torch.no_grad():
        expected = m(x.to("cpu", torch.float32))
    got = run_onnx(onnx_session(path), x)
    return Parity(
        max_abs_diff=(got - expected).abs().max().item(),
        top1_agreement=(got.argmax(-1) == expected.argmax(-1)).float().mean().item(),
        num_inputs=len(x),
    )


# -- accuracy of each precision ----------------------------------------------------------------
@dataclass
class PrecisionScore:
    """One way of running the model, scored on a dataset against PyTorch fp32."""

    name: str
    top1: float
    max_abs_diff: float  # largest |logit - fp32 logit| over all images and classes
    top1_agreement: float  # fraction of images predicted as fp32 predicts them


def compare_precisions(
    model: ViT,
    dataset: ImageDataset,
    onnx_files: Mapping[str, str | Path] | None = None,
    batch_size: int = 256,
) -> list[PrecisionScore]:
    """Top-1 of PyTorch fp32, PyTorch bf16 autocast and each named ONNX file on `dataset`.

    ONNX files with a fixed batch size are run one image at a time (slow on big datasets).
    """
    c = model.config
    if len(dataset.classes) != c.num_classes:
        raise ValueError(
            f"dataset {dataset.name!r} has {len(dataset.classes)} classes, the model "
            f"{c.num_classes}"
        )
    order = class_order(model.labels, dataset.classes)
    with _eval_fp32_cpu(model) as m:
        runners: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "PyTorch fp32": m,
            "PyTorch bf16": lambda x: _bf16(m, x),
        }
        for name, path in (onnx_files or {}).items():
            runners[name] = partial(run_onnx, onnx_session(path), batch_size=batch_size)
        logits = {name: [] for name in runners}
        with torch.no_grad():
            for i in range(0, len(dataset), batch_size):
                x = preprocess(dataset.images[i : i + batch_size], c)
                for name, run in runners.items():
                    logits[name].append(run(x).float())
    all_logits = {name: torch.cat(parts) for name, parts in logits.items()}
    if order is not None:
        all_logits = {name: out[:, order] for name, out in all_logits.items()}
    reference = all_logits["PyTorch fp32"]
    return [
        PrecisionScore(
            name=name,
            top1=(out.argmax(-1) == dataset.labels).float().mean().item(),
            max_abs_diff=(out - reference).abs().max().item(),
            top1_agreement=(out.argmax(-1) == reference.argmax(-1)).float().mean().item(),
        )
        for name, out in all_logits.items()
    ]


def _bf16(model: ViT, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(x).float()
