"""Export: a model as an ONNX file (fp32, or int8 by ONNX Runtime's quantiser) that carries
its preprocessing and labels, checked against PyTorch."""

from vitkit.export.onnx import (
    Parity,
    check_onnx,
    compare_precisions,
    export_onnx,
    onnx_session,
    quantize_onnx_int8,
    read_metadata,
    run_onnx,
)

__all__ = [
    "Parity",
    "check_onnx",
    "compare_precisions",
    "export_onnx",
    "onnx_session",
    "quantize_onnx_int8",
    "read_metadata",
    "run_onnx",
]
