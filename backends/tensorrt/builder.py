"""Build a TensorRT engine from the bundle's ONNX, on the device that will run it.

Engines are specific to the GPU and the TensorRT version, so this runs on the
Jetson (or workstation) itself. What differs between TensorRT releases:

- 10.x (JetPack 6 ships 10.3) is weakly typed by default: the ONNX computes in
  float32 and builder flags (FP16, BF16, INT8, FP8) let TensorRT pick lower
  precision kernels. INT8 and FP8 without calibration need explicit Q/DQ nodes
  in the ONNX; implicit calibration is deprecated and is not offered. fp32
  clears the TF32 flag, which Ampere and later GPUs (Orin included) otherwise
  use for float32 matrix products, because a fp32 build is the exactness check.
- 11.x removed every precision flag: networks are strongly typed and the
  precision is the ONNX's own. fp16/bf16 therefore convert the ONNX first with
  NVIDIA ModelOpt's AutoCast (keeping float32 inputs and outputs); int8/fp8
  need a Q/DQ ONNX.

The MoE decoder gets two optimization profiles (batch 1): prefill (1 to
max_prompt new tokens on top of any past) and decode (exactly one new token,
any past up to the context). A timing cache in the bundle makes a rebuild
skip kernel timing. Parser errors are reported with the node they concern.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from moeexport.backends.tensorrt.runtime import import_tensorrt
from moeexport.errors import MoeExportError

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
PREFILL, DECODE = 0, 1  # optimization profile indices, as the runner selects them


@dataclass(frozen=True)
class Profiles:
    """Shape ranges of the two optimization profiles."""

    max_prompt: int  # most new tokens in one prefill call
    context: int  # most tokens (past + new) the engine holds
    opt_prompt: int = 128

    def __post_init__(self):
        if not 1 <= self.max_prompt <= self.context:
            raise MoeExportError(f"max prompt {self.max_prompt} must be between 1 and the context {self.context}")

    def shapes(self, io: dict) -> list[dict[str, tuple[tuple, tuple, tuple]]]:
        """[prefill, decode]: {input name: (min, opt, max) shape} for every graph input."""
        context, max_prompt = self.context, self.max_prompt
        opt_prompt = min(self.opt_prompt, max_prompt)
        half = max(1, context // 2)
        prefill = {"new": (1, opt_prompt, max_prompt), "past": (0, 0, context - 1), "total": (1, opt_prompt, context)}
        decode = {"new": (1, 1, 1), "past": (0, half - 1, context - 1), "total": (1, half, context)}
        profiles = []
        for ranges in (prefill, decode):
            shapes = {name: tuple((1, n) for n in ranges["new"]) for name in ("input_ids", "position_ids")}
            shapes["attention_mask"] = tuple((1, n) for n in ranges["total"])
            for name, (heads, width) in io["cache"].items():
                shapes[name] = tuple((1, heads, n, width) for n in ranges["past"])
            profiles.append(shapes)
        return profiles


@dataclass
class Precision:
    """How a requested precision is realised by the installed TensorRT."""

    name: str
    flags: list[str] = field(default_factory=list)  # BuilderFlag names to set (10.x)
    clear: list[str] = field(default_factory=list)  # BuilderFlag names to clear
    strongly_typed: bool = False
    autocast: str | None = None  # 11.x: convert the ONNX to this type first


def plan_precision(requested: str, trt_major: int, onnx_info: dict, capability: tuple[int, int], fast_fp16: bool | None) -> Precision:
    """Map --precision onto builder flags (10.x) or ONNX conversion (11.x); refuse what cannot work, with the fix.

    onnx_info carries 'qdq' (the Q/DQ element types present, e.g. ['INT8']).
    """
    if requested not in PRECISIONS:
        raise MoeExportError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}")
    qdq = set(onnx_info.get("qdq", []))
    gpu = f"this GPU (compute capability {capability[0]}.{capability[1]})"
    if requested == "bf16" and capability < (8, 0):
        raise MoeExportError(f"bf16 needs compute capability 8.0 or newer, {gpu} has none; build fp16")
    if requested == "fp8" and capability < (8, 9):
        raise MoeExportError(f"fp8 needs compute capability 8.9 or newer (Ada, Hopper, Thor); {gpu} has no FP8: build fp16 or int8")
    if requested in ("int8", "fp8"):
        wanted = "INT8" if requested == "int8" else "FLOAT8E4M3FN"
        if wanted not in qdq:
            raise MoeExportError(
                f"{requested} needs an explicitly quantized ONNX ({wanted} QuantizeLinear/DequantizeLinear nodes) and this "
                "bundle's has none: quantize model.onnx with NVIDIA ModelOpt (python -m modelopt.onnx.quantization "
                f"--quantize_mode {requested}) or build fp16"
            )
    if trt_major >= 11:
        # strong typing is the only mode; the ONNX's types are the engine's types
        if requested in ("fp16", "bf16"):
            return Precision(requested, strongly_typed=True, autocast=requested)
        return Precision(requested, strongly_typed=True)
    if requested == "fp32":
        return Precision("fp32", clear=["TF32"])
    if requested == "fp16" and fast_fp16 is False:
        raise MoeExportError(f"{gpu} has no fast FP16 path; build fp32")
    flags = {"fp16": ["FP16"], "bf16": ["BF16"], "int8": ["INT8", "FP16"], "fp8": ["FP8", "FP16"]}[requested]
    return Precision(requested, flags=flags)


def default_precision(trt_major: int, fast_fp16: bool | None) -> str:
    """fp16 where TensorRT 10 can lower to it (every Jetson Orin), else the ONNX's own fp32."""
    return "fp16" if trt_major < 11 and fast_fp16 is not False else "fp32"


def autocast_onnx(onnx_path: Path, low_precision: str) -> Path:
    """TensorRT 11: a mixed-precision copy of the ONNX (float32 IO kept) made by ModelOpt AutoCast."""
    target = onnx_path.with_name(f"{onnx_path.stem}-{low_precision}.onnx")
    if target.is_file():
        return target
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError:
        raise MoeExportError(
            f"TensorRT 11 takes {low_precision} only from the ONNX's own types: pip install nvidia-modelopt[onnx] so "
            "moeexport can convert it (ModelOpt AutoCast), or build fp32"
        ) from None
    import onnx

    converted = convert_to_mixed_precision(onnx_path=str(onnx_path), low_precision_type=low_precision, keep_io_types=True)
    temporary = target.with_name(target.name + ".partial")
    onnx.save(converted, str(temporary), save_as_external_data=converted.ByteSize() > 2**31 - 2**20,
              location=target.name + ".data")
    os.replace(temporary, target)
    return target


@dataclass
class BuildResult:
    engine_path: Path
    precision: str
    tensorrt_version: str
    seconds: float
    timing_cache: Path
    timing_cache_reused: bool
    profiles: list[dict]
    onnx_path: Path

    def to_dict(self) -> dict:
        return {
            "engine": str(self.engine_path),
            "engine_bytes": self.engine_path.stat().st_size,
            "precision": self.precision,
            "tensorrt_version": self.tensorrt_version,
            "build_seconds": self.seconds,
            "timing_cache": str(self.timing_cache),
            "timing_cache_reused": self.timing_cache_reused,
            "onnx": str(self.onnx_path),
            "profiles": [{name: [list(s) for s in shapes] for name, shapes in p.items()} for p in self.profiles],
        }


def _parser_errors(parser) -> str:
    messages = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        where = []
        for attribute in ("node_name", "node_operator"):
            getter = getattr(error, attribute, None)
            value = getter() if callable(getter) else None
            if value:
                where.append(str(value))
        prefix = f"node {' '.join(where)}: " if where else (f"node {error.node()}: " if error.node() >= 0 else "")
        messages.append(prefix + error.desc().strip())
    return "; ".join(messages) or "no detail from the parser"


def gpu_capability() -> tuple[int, int]:
    import torch

    return torch.cuda.get_device_capability()


def build_engine(
    onnx_path: Path,
    engine_dir: Path,
    io: dict,
    profiles: Profiles,
    precision: str | None = None,
    workspace_bytes: int | None = None,
    timing_cache: Path | None = None,
    onnx_info: dict | None = None,
    verbose: bool = False,
) -> BuildResult:
    """Parse, configure, build and serialize engine_dir/model-PRECISION.plan, atomically (temp name, then rename)."""
    trt = import_tensorrt()
    started = time.perf_counter()
    major = int(trt.__version__.split(".")[0])
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except (TypeError, RuntimeError) as error:
        raise MoeExportError(f"TensorRT {trt.__version__} cannot start a builder: no usable CUDA device or driver ({error})") from None
    fast_fp16 = getattr(builder, "platform_has_fast_fp16", None) if major < 11 else None
    precision = precision or default_precision(major, fast_fp16)
    plan = plan_precision(precision, major, onnx_info or {}, gpu_capability(), fast_fp16)
    if plan.autocast:
        onnx_path = autocast_onnx(onnx_path, plan.autocast)

    flags = 0
    if plan.strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") and major < 11:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external weights next to the file
        raise MoeExportError(f"TensorRT {trt.__version__} cannot parse {onnx_path.name}: {_parser_errors(parser)}")

    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    for name in plan.flags:
        if not hasattr(trt.BuilderFlag, name):
            raise MoeExportError(f"TensorRT {trt.__version__} has no {name} builder flag; build {default_precision(major, fast_fp16)}")
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in plan.clear:
        if hasattr(trt.BuilderFlag, name):
            config.clear_flag(getattr(trt.BuilderFlag, name))

    shapes = profiles.shapes(io)
    for shape_set in shapes:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shape_set.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)

    reused = bool(timing_cache and timing_cache.is_file())
    cache = config.create_timing_cache(timing_cache.read_bytes() if reused else b"")
    config.set_timing_cache(cache, False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise MoeExportError(
            f"TensorRT {trt.__version__} could not build an engine from {onnx_path.name} at {plan.name} "
            "(see the TensorRT messages above; a larger --workspace or a smaller --context may help)"
        )
    engine_path = Path(engine_dir) / f"model-{plan.name}.plan"
    _write_atomically(engine_path, memoryview(serialized))
    if timing_cache:
        _write_atomically(timing_cache, memoryview(config.get_timing_cache().serialize()))
    return BuildResult(
        engine_path, plan.name, trt.__version__, time.perf_counter() - started, timing_cache, reused, shapes, onnx_path
    )


def _write_atomically(path: Path, data) -> None:
    temporary = path.with_name(path.name + ".partial")
    with open(temporary, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)
