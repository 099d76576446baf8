"""The ONNX target: decoder graphs with a KV cache for ONNX Runtime (MoE ops) or any runtime (plain ops).

Installed as moeexport.backends.onnx.
"""

from functools import partial

from moeexport.backends.onnx.runner import OnnxRunner
from moeexport.backends.onnx.writer import (
    DEFAULT_BLOCK_SIZE,
    MOE_OPS,
    QUANT_TYPES,
    TOLERANCES,
    ONNXExport,
    check,
    export,
    require_moe_kernels,
)
from moeexport.backends.profile import profile_in_subprocess

EXTENSION = "onnx"
Runner = OnnxRunner
PROFILE_RUNNER_OPTIONS: dict = {}
profile = partial(profile_in_subprocess, "onnx")

__all__ = ["DEFAULT_BLOCK_SIZE", "MOE_OPS", "ONNXExport", "OnnxRunner", "QUANT_TYPES", "TOLERANCES", "check",
           "export", "profile", "require_moe_kernels"]
