"""Export a model to ONNX (fp32, or with int8 weights) and check it against PyTorch.

The ONNX file takes normalised images (B, C, H, W) float32 at the model's `image_size` and
returns logits (B, num_classes). It is usable alone: the preprocessing it expects (size,
channels, mean, std, resampling filter), the class names and the whole config travel in its
`metadata_props` as JSON (`read_metadata`). A CLIP's image tower is such a ViT: its "logits"
are the image embeddings, unnormalised.

A CLIP's text tower exports to a file of its own that takes token ids (B, context_length)
int64 (any batch size) and returns the text embeddings (B, embed_dim), unnormalised like the
image tower's; its tokenizer (tokenizer.json) and the id layout travel in its metadata
(`read_text_metadata`).

    export_onnx(model, "m.onnx")              one file, written atomically
    export_text_onnx(clip.text, "m.text.onnx", tokenizer)    the text tower
    quantize_onnx_int8("m.onnx", "m.int8.onnx")    int8 weights, dynamic int8 activations
    check_onnx(model, "m.onnx", x)            max |logit difference| on the inputs x
    check_text_onnx(clip.text, "m.text.onnx", ids)   max |embedding difference| on ids
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
from typing import TypeVar

import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from torch import nn

from vitkit.config import TextConfig, ViTConfig
from vitkit.data import ImageDataset
from vitkit.data.preprocess import preprocess
from vitkit.data.text import Tokenizer
from vitkit.evaluate import class_order
from vitkit.model.text import TextTransformer
from vitkit.model.vit import ViT
from vitkit.weights.format import atomic_write

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
# metadata_props keys; each value is JSON.
PREPROCESSING_KEY = "vitkit.preprocessing"
LABELS_KEY = "vitkit.labels"
CONFIG_KEY = "vitkit.config"
QUANTIZATION_KEY = "vitkit.quantization"
# The text tower's file: its input and output, and its metadata_props keys (JSON values, but
# the tokenizer's, which is the tokenizer.json text itself).
TEXT_INPUT_NAME = "input_ids"
TEXT_OUTPUT_NAME = "text_embeds"
TEXT_CONFIG_KEY = "vitkit.text_config"
TEXT_INPUT_KEY = "vitkit.text_input"
TOKENIZER_KEY = "vitkit.tokenizer"
# One protobuf message cannot exceed 2 GiB, so larger models would need external data files,
# and the file would no longer be usable alone.
MAX_ONNX_BYTES = 2**31 - 2**26
# What int8 quantisation touches. Not "Attention": onnxruntime's quantiser takes opset 23's
# Attention for its own contrib op of that name and writes an invalid QAttention node.
INT8_OPS = ("MatMul", "Gemm", "Conv")

M = TypeVar("M", bound=nn.Module)


@contextmanager
def _eval_fp32_cpu(model: M) -> Iterator[M]:
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
    # A dynamic batch is traced with 2 images: torch.export specialises a size of 1.
    example = torch.zeros(2 if dynamic_batch else 1, c.in_channels, c.image_size, c.image_size)
    proto = _to_onnx(model, example, INPUT_NAME, OUTPUT_NAME, dynamic_batch, opset)
    proto.doc_string = (
        f"vitkit ViT: {INPUT_NAME} (batch, {c.in_channels}, {c.image_size}, {c.image_size}) "
        f"float32, normalised as {PREPROCESSING_KEY} says -> {OUTPUT_NAME} "
        f"(batch, {c.num_classes})"
    )
    _set_metadata(proto, _metadata(c, model.labels))
    atomic_write(path, proto.SerializeToString())
    return path


def _to_onnx(
    model: nn.Module,
    example: torch.Tensor,
    input_name: str,
    output_name: str,
    dynamic_batch: bool,
    opset: int | None,
) -> onnx.ModelProto:
    """`model` (float32, eval mode, on the CPU) traced on `example` as an ONNX graph."""
    size = sum(p.numel() * 4 for p in model.parameters())
    if size > MAX_ONNX_BYTES:
        raise ValueError(
            f"the model's fp32 weights take {size / 2**30:.1f} GiB; a single ONNX file holds "
            "under 2 GiB"
        )
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
            input_names=[input_name],
            output_names=[output_name],
            dynamic_shapes=({0: "batch"},) if dynamic_batch else None,
            opset_version=opset,
            verbose=False,
        )
    return program.model_proto


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


# -- a CLIP's text tower ------------------------------------------------------------------
def export_text_onnx(
    text: TextTransformer,
    path: str | Path,
    tokenizer: Tokenizer | None = None,
    opset: int | None = None,
) -> Path:
    """Write a CLIP's text tower as one ONNX file: token ids (batch, context_length) int64, any
    batch size -> unnormalised text embeddings (batch, embed_dim) float32, as
    `TextTransformer.forward` (and `CLIP.encode_text(ids, normalize=False)`) gives them.

    The ids are the tokenizer's layout: start-of-text, the tokens, end-of-text, padding; the
    embedding is read at the first end-of-text token, so the padding's ids change nothing.
    With `tokenizer`, its tokenizer.json travels in the metadata. Returns `path`.
    """
    path = Path(path)
    c = text.config
    if tokenizer is not None and (
        tokenizer.context_length != c.context_length
        or tokenizer.eot_id != c.eot_id
        or tokenizer.vocab_size > c.vocab_size
    ):
        raise ValueError(f"{tokenizer!r} does not fit the text tower ({c})")
    # Two texts (torch.export specialises a batch of 1), each ending where a real one would.
    example = torch.zeros(2, c.context_length, dtype=torch.int64)
    example[:, -1] = c.eot_id
    proto = _to_onnx(text, example, TEXT_INPUT_NAME, TEXT_OUTPUT_NAME, True, opset)
    proto.doc_string = (
        f"vitkit CLIP text tower: {TEXT_INPUT_NAME} (batch, {c.context_length}) int64, laid "
        f"out as {TEXT_INPUT_KEY} says -> {TEXT_OUTPUT_NAME} (batch, {c.embed_dim}) float32, "
        "not normalised (L2-normalise it, and the image tower's output, for cosine similarity)"
    )
    layout = {
        "context_length": c.context_length,
        "vocab_size": c.vocab_size,
        "eot_id": c.eot_id,
        "sot_id": None if tokenizer is None else tokenizer.sot_id,
        "pad_id": None if tokenizer is None else tokenizer.pad_id,
        "layout": "start-of-text, the text's tokens (cut to context_length - 2), end-of-text, "
        "padding; the embedding is read at the first end-of-text",
        "output": "unnormalised text embeddings, in the space of the image tower's outputs",
    }
    values = {TEXT_CONFIG_KEY: c.to_json(), TEXT_INPUT_KEY: json.dumps(layout)}
    if tokenizer is not None:
        values[TOKENIZER_KEY] = tokenizer.to_json()
    _set_metadata(proto, values)
    atomic_write(path, proto.SerializeToString())
    return path


def read_text_metadata(path: str | Path) -> dict:
    """A text tower file's `text_config` (a TextConfig), `input` (the id layout), `tokenizer`
    (the tokenizer.json text, or None) and `quantization` (None for fp32)."""
    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    if TEXT_CONFIG_KEY not in props:
        raise ValueError(f"{path}: not a text tower exported by vitkit (no {TEXT_CONFIG_KEY})")
    return {
        "text_config": TextConfig.from_dict(json.loads(props[TEXT_CONFIG_KEY])),
        "input": json.loads(props.get(TEXT_INPUT_KEY, "null")),
        "tokenizer": props.get(TOKENIZER_KEY),
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


def run_text_onnx(
    session: ort.InferenceSession, ids: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Text embeddings (N, E), unnormalised, of token ids (N, context_length), in batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    name = session.get_inputs()[0].name
    ids = ids.detach().to("cpu", torch.int64)
    outputs = [
        torch.from_numpy(session.run(None, {name: ids[i : i + batch_size].numpy()})[0])
        for i in range(0, len(ids), batch_size)
    ]
    return torch.cat(outputs)


@dataclass
class TextParity:
    """How closely a text tower file's embeddings follow PyTorch's on the same token ids, run
    in one batch and one text at a time."""

    max_abs_diff: float  # over every embedding, unnormalised
    min_cosine: float  # the worst text's cosine similarity between the two
    num_inputs: int


def check_text_onnx(text: TextTransformer, path: str | Path, ids: torch.Tensor) -> TextParity:
    """Run the text tower file with onnxruntime on token ids `ids` (N, context_length), all
    at once and one by one, and compare with `text`."""
    if ids.ndim != 2 or len(ids) == 0:
        raise ValueError(f"expected token ids (N, context_length), got {tuple(ids.shape)}")
    with _eval_fp32_cpu(text) as m, torch.no_grad():
        expected = m(ids.to("cpu", torch.int64))
    session = onnx_session(path)
    diffs, cosines = [], []
    for batch_size in (len(ids), 1):
        got = run_text_onnx(session, ids, batch_size)
        diffs.append((got - expected).abs().max().item())
        cosines.append(torch.nn.functional.cosine_similarity(got, expected, dim=-1).min().item())
    return TextParity(max_abs_diff=max(diffs), min_cosine=min(cosines), num_inputs=len(ids))


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
