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

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from moeexport.backends.target import ExportInputs, Finished, Target, TargetOptions
from moeexport.backends.tensorrt.bundle import (
    DEFAULT_CONTEXT,
    DEFAULT_MAX_PROMPT,
    ENGINE_TOLERANCES,
    Bundle,
    BundleArtifact,
    BundleResult,
    export_bundle_onnx,
    finish_bundle,
    profile_sizes,
    write_bundle,
)
from moeexport.backends.tensorrt.device import DeviceResult, finish_on_device
from moeexport.backends.tensorrt.runner import TensorRTRunner
from moeexport.backends.tensorrt.runtime import Status, import_tensorrt, status
from moeexport.backends.tensorrt.support import check_decoder_io, check_onnx, decoder_io, support_table
from moeexport.errors import MoeExportError

EXTENSION = "plan"
# Weight types of the bundled ONNX; the engine's precision is chosen on the device (trt-build --precision).
QUANT_TYPES = ("f32", "f16")
Runner = TensorRTRunner
BUNDLE_DIR = "bundle"


class TensorRTOptions(TargetOptions):
    context: int | None = Field(None, json_schema_extra={"metavar": "N"}, description="tensorrt: positions the "
                                f"engine holds (default {DEFAULT_CONTEXT}, at most the model's)")
    max_prompt: int | None = Field(None, json_schema_extra={"metavar": "N"}, description="tensorrt: longest prefill "
                                   f"of the engine profile (default {DEFAULT_MAX_PROMPT})")


class TensorRTTarget(Target):
    """Here: the plain-ops ONNX, validated in ONNX Runtime, in a device bundle; the engine where TensorRT is."""

    name = "tensorrt"
    extension = EXTENSION
    quant_types = QUANT_TYPES
    Options = TensorRTOptions
    runs_files = False  # an engine runs on the device that builds it (trt-build); its runner here is the bundle's ONNX
    requires, extra = (("onnx", "onnx"), ("onnxruntime", "onnxruntime")), "onnx"  # the bundle's ONNX, checked here

    @property
    def tolerances(self):  # the bundle's ONNX is judged here as an ONNX; engines by ENGINE_TOLERANCES on the device
        from moeexport.backends import onnx as onnx_backend

        return {quant: onnx_backend.TOLERANCES[quant] for quant in QUANT_TYPES}

    def check(self, model, quant: str, options: TensorRTOptions) -> None:
        from moeexport.backends import onnx as onnx_backend

        onnx_backend.check(model, quant, moe_ops="plain")

    def export(self, model, directory: Path, quant: str, options: TensorRTOptions, inputs: ExportInputs) -> BundleArtifact:
        context, max_prompt = profile_sizes(model, options.context, options.max_prompt)
        return export_bundle_onnx(model, directory / BUNDLE_DIR, quant, context, max_prompt)

    def runner(self, path: Path, context: int):
        from moeexport.backends.onnx import OnnxRunner

        return OnnxRunner(path, context=context, providers=["CPUExecutionProvider"])

    def runtime(self) -> str:
        from moeexport.backends.tensorrt.bundle import onnxruntime_here

        return onnxruntime_here()

    def profile(self, artifact, prompt, new_tokens=64, threads=None):
        return None  # an engine is profiled on the device that builds it (trt-build)

    def finish(self, artifact: BundleArtifact, validation, inputs: ExportInputs, progress=None) -> Finished:
        finish_bundle(artifact, inputs.reference, validation, inputs.manifest)
        bundle = artifact.path.parent
        bundle_files = {f"{bundle.name}/{path.name}": path.stat().st_size for path in sorted(bundle.iterdir())}
        if not validation.passed:
            return Finished({"built": False, "reason": "the bundle's ONNX failed validation here"}, bundle_files)
        found = status()
        if not found.available:
            return Finished({"built": False, "reason": found.reason}, bundle_files)
        device = finish_on_device(Bundle(artifact.path.parent), progress=progress)
        return Finished({"built": True, **device.report}, bundle_files, tuple(device.failures))


    def build_on_device(self, bundle_dir, precision: str | None = None, workspace_bytes: int | None = None,
                        context: int | None = None, max_prompt: int | None = None, progress=None,
                        verbose: bool = False) -> DeviceResult:
        """`moeexport trt-build`: the engine of a bundle copied to this device, built, validated and profiled."""
        bundle = Bundle(bundle_dir)  # a wrong path or a partial copy is reported before TensorRT is looked for
        found = status()
        if not found.available:
            raise MoeExportError(found.reason)
        return finish_on_device(bundle, precision, workspace_bytes, context, max_prompt, progress, verbose)


TARGET = TensorRTTarget()

__all__ = ["BUNDLE_DIR", "ENGINE_TOLERANCES", "EXTENSION", "QUANT_TYPES", "Bundle", "BundleArtifact", "BundleResult",
           "Runner", "Status", "TARGET", "TensorRTOptions", "TensorRTRunner", "check_decoder_io", "check_onnx",
           "decoder_io", "finish_on_device", "import_tensorrt", "status", "support_table", "write_bundle"]
