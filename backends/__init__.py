"""Deployment targets, one package per format; installed as moeexport.backends.

Each target will provide `export(model, out_dir, options) -> artifact` and a
runner with `logits(token_ids)` / `generate(...)` behind one interface. The
targets are named here so that `moeexport build --target` has its final shape;
their exporters are not part of this release yet.
"""

from moeexport.errors import MoeExportError

TARGETS = ("gguf", "onnx", "tensorrt")


def require_target(target: str) -> None:
    """Raise a clear error for a target this release cannot export to."""
    if target not in TARGETS:
        raise MoeExportError(f"unknown target {target!r}; targets: {', '.join(TARGETS)}")
    raise MoeExportError(
        f"the {target} exporter is not in this release yet; run `moeexport compress` to write the "
        "compressed checkpoint, which the exporters will take as MODEL"
    )
