"""Deprecated: ONNX export moved to `vitkit.export` (and `quantize_int8` is now
`quantize_onnx_int8`); this path keeps working until the next release."""

import warnings

from vitkit.export import (
    Parity,
    check_onnx,
    compare_precisions,
    export_onnx,
    onnx_session,
    quantize_onnx_int8,
    read_metadata,
    run_onnx,
)

quantize_int8 = quantize_onnx_int8

warnings.warn(
    "vitkit.infer.export moved to vitkit.export (quantize_int8 is quantize_onnx_int8 there)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "Parity",
    "check_onnx",
    "compare_precisions",
    "export_onnx",
    "onnx_session",
    "quantize_int8",
    "read_metadata",
    "run_onnx",
]
