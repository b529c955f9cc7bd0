"""Export: a model as an ONNX file (fp32, or int8 by ONNX Runtime's quantiser) that carries
its preprocessing and labels, checked against PyTorch; a CLIP's text tower as a second file
that carries its tokenizer."""

from vitkit.export.onnx import (
    Parity,
    TextParity,
    check_onnx,
    check_text_onnx,
    compare_precisions,
    export_onnx,
    export_text_onnx,
    onnx_session,
    quantize_onnx_int8,
    read_metadata,
    read_text_metadata,
    run_onnx,
    run_text_onnx,
)

__all__ = [
    "Parity",
    "TextParity",
    "check_onnx",
    "check_text_onnx",
    "compare_precisions",
    "export_onnx",
    "export_text_onnx",
    "onnx_session",
    "quantize_onnx_int8",
    "read_metadata",
    "read_text_metadata",
    "run_onnx",
    "run_text_onnx",
]
