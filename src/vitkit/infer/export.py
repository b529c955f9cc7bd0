"""Deprecated: ONNX export moved to `vitkit.export` (and `quantize_int8` is now
`quantize_onnx_int8`); this path keeps working until the next release."""

import warnings

from vitkit import export
from vitkit.export import *  # noqa: F403 - the same names as before

quantize_int8 = export.quantize_onnx_int8

warnings.warn(
    "vitkit.infer.export moved to vitkit.export (quantize_int8 is quantize_onnx_int8 there)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [*export.__all__, "quantize_int8"]
