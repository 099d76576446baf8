"""Deployment targets, one package per format; installed as moeexport.backends.

A target package provides `check(model, quant)` (raises before anything is
written), `export(model, out_path, quant=..., overwrite=..., tensor_types=...)`,
a `Runner` class with `logits(token_ids)` (so validation is written once, in
moeexport.validate), `profile(artifact, prompt, new_tokens)` (speed and peak memory), its weight types (`QUANT_TYPES`) and the fidelity each
type must reach (`TOLERANCES`).
"""

import importlib

from moeexport.errors import MoeExportError

TARGETS = ("gguf", "onnx", "tensorrt")
IMPLEMENTED = {"gguf": "moeexport.backends.gguf", "onnx": "moeexport.backends.onnx", "tensorrt": "moeexport.backends.tensorrt"}


def backend_for(target: str):
    """The backend module for a target, or a clear error for one this release cannot export to."""
    if target not in TARGETS:
        raise MoeExportError(f"unknown target {target!r}; targets: {', '.join(TARGETS)}")
    if target not in IMPLEMENTED:
        raise MoeExportError(
            f"the {target} exporter is not in this release yet (available: {', '.join(IMPLEMENTED)}); "
            "`moeexport compress` writes the compressed checkpoint it will take as MODEL"
        )
    return importlib.import_module(IMPLEMENTED[target])
