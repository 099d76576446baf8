"""The ONNX target: decoder graphs with a KV cache for ONNX Runtime (MoE ops) or any runtime (plain ops).

Installed as moeexport.backends.onnx. Beside every graph go genai_config.json
and the tokenizer files, so onnxruntime-genai runs the directory as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from moeexport.backends.decoding import TokenBytes
from moeexport.backends.onnx.runner import OnnxRunner, bytes_per_token
from moeexport.backends.onnx.types import DEFAULT_BLOCK_SIZE, MOE_OPS, QUANT_TYPES, TOLERANCES
from moeexport.backends.target import Artifact, ExportInputs, Target, TargetOptions

EXTENSION = "onnx"
Runner = OnnxRunner


class ONNXOptions(TargetOptions):
    # com.microsoft MoE/QMoE nodes, or standard ops only (every expert computed, or a decoded token's k)
    moe_ops: Literal["contrib", "plain", "plain-routed"] = Field(
        "contrib", description="onnx: one com.microsoft MoE/QMoE node per MoE layer (contrib, the default; "
        "onnxruntime >= 1.23) or standard ops only (plain: for TensorRT and runtimes without the contrib ops, every "
        "expert computed; plain-routed: the same, but a single decoded token runs only its k experts, through an If; "
        "f32/f16)")
    block_size: int = Field(  # int8/int4: inputs sharing one scale
        DEFAULT_BLOCK_SIZE, json_schema_extra={"metavar": "N"},
        description="onnx int8/int4: inputs sharing one scale (a power of two >= 16 dividing the expert widths; "
        f"default {DEFAULT_BLOCK_SIZE})")

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value < 16 or value & (value - 1):
            raise ValueError(f"must be a power of two >= 16, got {value}")
        return value


class ONNXTarget(Target):
    name = "onnx"
    extension = EXTENSION
    requires = (("onnx", "onnx"), ("onnxruntime", "onnxruntime"))
    quant_types = QUANT_TYPES
    tolerances = TOLERANCES
    Options = ONNXOptions

    def check(self, model, quant: str, options: ONNXOptions) -> None:
        from moeexport.backends.onnx.writer import check

        check(model, quant, options.moe_ops, options.block_size)

    def export(self, model, directory: Path, quant: str, options: ONNXOptions, inputs: ExportInputs) -> Artifact:
        from moeexport.backends.onnx.genai import write_genai_files
        from moeexport.backends.onnx.writer import export

        written = export(model, directory / f"model-{quant}.onnx", quant=quant, moe_ops=options.moe_ops,
                         block_size=options.block_size, weight_grid=inputs.weight_grid)
        data = _external_data(written.path)
        genai = write_genai_files(model, inputs.tokenizer, written.path, written.context) if inputs.tokenizer else []
        return Artifact(written.path, written.representation, written.fallbacks, [data, *genai])

    def quant_of(self, path: Path) -> str | None:
        return _graph_metadata(path).get("moeexport.quant")

    def runner(self, path: Path, context: int) -> OnnxRunner:
        return OnnxRunner(path, context=context)

    def serving_runner(self, path: Path, context: int, threads: int | None = None) -> OnnxRunner:
        return OnnxRunner(path, context=context, threads=threads)

    def runtime(self) -> str:
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())})"

    def stored_files(self, path: Path) -> list[Path]:
        return [path, _external_data(path)]

    def token_bytes(self, path: Path) -> TokenBytes:
        return bytes_per_token(path)


def _external_data(graph: Path) -> Path:
    """Where the exporter moves the weights of a graph too large for one protobuf (when it does)."""
    return graph.with_name(graph.name + ".data")


def _graph_metadata(path: Path) -> dict[str, str]:
    """What the exporter wrote into the graph's metadata (moeexport.quant, moeexport.context)."""
    import onnx

    try:
        return {prop.key: prop.value for prop in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception:  # not a readable graph: nothing it says; its runner reports why
        return {}


TARGET = ONNXTarget()


def __getattr__(name: str):
    if name in ("ONNXExport", "check", "export", "require_moe_kernels"):  # the writer's, imported on first use
        from moeexport.backends.onnx import writer

        return getattr(writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEFAULT_BLOCK_SIZE", "EXTENSION", "MOE_OPS", "ONNXExport", "ONNXOptions", "OnnxRunner", "QUANT_TYPES",
           "Runner", "TARGET", "TOLERANCES", "check", "export", "require_moe_kernels"]
