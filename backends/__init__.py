"""Deployment targets, one package per format; installed as moeexport.backends.

Each target package defines one `Target` (backends/target.py: name,
extension, weight types, tolerances, strict options, check, export, runner,
profile, finish) as its module attribute `TARGET`. `target_for(name)` imports
only the package asked for, so a missing runtime of another target never
matters.
"""

import importlib

from moeexport.errors import MoeExportError

PACKAGES = {"gguf": "moeexport.backends.gguf", "onnx": "moeexport.backends.onnx", "tensorrt": "moeexport.backends.tensorrt"}
TARGETS = tuple(PACKAGES)
RUNNABLE = {".gguf": "gguf", ".onnx": "onnx"}  # artifact suffix -> the target whose runner loads it


def target_for(name: str):
    """The Target for a name, or a one-line error listing the targets."""
    if name not in PACKAGES:
        raise MoeExportError(f"unknown target {name!r}; targets: {', '.join(TARGETS)}")
    return importlib.import_module(PACKAGES[name]).TARGET


def target_of_file(path) -> str:
    """The target that runs an artifact file, from its suffix."""
    from pathlib import Path

    suffix = Path(path).suffix
    if suffix not in RUNNABLE:
        raise MoeExportError(f"{path}: this command runs {' and '.join(RUNNABLE)} artifacts")
    return RUNNABLE[suffix]
