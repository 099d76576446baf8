"""The TensorRT target: a TensorRT-safe ONNX, a device bundle, and engines built on the device.

Installed as moeexport.backends.tensorrt. `tensorrt` itself is imported only
when an engine is built or run (runtime.py), so everything up to the bundle
works on a machine without a GPU:

- support.py: the TensorRT ONNX parser's operator table (onnx_support_trt10.json)
  and the checks of a graph against it;
- bundle.py: `write_bundle` (plain-ops ONNX, validated in ONNX Runtime here,
  torch reference logits, manifest) and `Bundle` (reading it back on the device);
- builder.py: engine build for TensorRT 10.x (precision flags) and 11.x (strongly typed);
- runner.py: `TensorRTRunner`, the engine behind the common runner interface;
- device.py: `finish_on_device`, what `moeexport trt-build` runs.
"""

from moeexport.backends.tensorrt.bundle import ENGINE_TOLERANCES, ArrayReference, Bundle, BundleResult, write_bundle
from moeexport.backends.tensorrt.device import finish_on_device
from moeexport.backends.tensorrt.runner import TensorRTRunner
from moeexport.backends.tensorrt.runtime import Status, import_tensorrt, status
from moeexport.backends.tensorrt.support import check_decoder_io, check_onnx, decoder_io, support_table

EXTENSION = "plan"
# Weight types of the bundled ONNX; the engine's precision is chosen on the device (trt-build --precision).
QUANT_TYPES = ("f32", "f16")
Runner = TensorRTRunner


def check(model, quant: str, **options) -> None:
    """Everything that would stop the plain-ops ONNX export, raised before any file is written."""
    from moeexport.backends import onnx as onnx_backend

    onnx_backend.check(model, quant, moe_ops="plain")


__all__ = ["ENGINE_TOLERANCES", "EXTENSION", "QUANT_TYPES", "ArrayReference", "Bundle", "BundleResult", "Runner", "Status",
           "TensorRTRunner",
           "check", "check_decoder_io", "check_onnx", "decoder_io", "finish_on_device", "import_tensorrt", "status",
           "support_table", "write_bundle"]
