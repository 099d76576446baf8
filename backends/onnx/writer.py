"""Export a (compressed) torch MoE model to one ONNX decoder graph with a KV cache.

`moe_ops="contrib"` writes each MoE layer as ONE com.microsoft MoE node (f32 /
f16 weights) or QMoE node (int8 / int4 experts, block-wise scales), for ONNX
Runtime >= 1.23. `moe_ops="plain"` writes standard ops only (for TensorRT and
runtimes without the contrib ops), computing every expert; "plain-routed" adds
an `If` that decodes a single token through its k selected experts only. Both
take f32 or f16 weights. Attention, norms, router, shared experts and the head
stay float in every variant.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moeexport.adapters import adapter_for
from moeexport.adapters.declaration import CLAMPED_SWIGLU
from moeexport.backends.onnx.types import DEFAULT_BLOCK_SIZE, MOE_OPS, QUANT_TYPES
from moeexport.errors import MoeExportError

if TYPE_CHECKING:
    from moeexport.quantization import WeightGrid

BITS = {"int8": 8, "int4": 4}
DEFAULT_CONTEXT_LIMIT = 4096  # RoPE table rows written when the model allows more positions
EXTERNAL_DATA_THRESHOLD = 1 << 30  # protobuf stops at 2 GiB; weights move to a .data file well before
MIN_ONNXRUNTIME = (1, 23)  # first release with CPU kernels for MoE / QMoE and the [E, N, K] layout


@dataclass
class ONNXExport:
    path: Path
    representation: str
    moe_ops: str
    context: int  # positions the rotary tables cover (also in the graph's metadata)
    fallbacks: list[str] = field(default_factory=list)


def onnxruntime_version() -> tuple[int, int] | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return tuple(int(part) for part in onnxruntime.__version__.split(".")[:2])


def require_moe_kernels() -> None:
    """The contrib variant needs onnxruntime's CPU MoE kernels; say so in one line when they are missing."""
    version = onnxruntime_version()
    if version is None:
        raise MoeExportError("running ONNX graphs needs onnxruntime: pip install 'moeexport[onnx]'")
    if version < MIN_ONNXRUNTIME:
        raise MoeExportError(
            f"onnxruntime {'.'.join(map(str, version))} has no CPU kernels for com.microsoft MoE/QMoE (added in 1.23): "
            "pip install -U 'onnxruntime>=1.23', or export with --moe-ops plain"
        )


# token mixers of hybrid families that the exporter writes no graph for, as its refusal names them
UNLOWERED_MIXERS = {"linear_attention": "linear-attention", "mamba": "Mamba-2", "none": "feed-forward-only"}


def check(model, quant: str, moe_ops: str = "contrib", block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    """Everything that would stop an export, raised before any file is written."""
    from moeexport.backends.onnx.architectures import ARCHITECTURES

    if quant not in QUANT_TYPES:
        raise MoeExportError(f"--quant {quant} is not an onnx type; choose one of {', '.join(QUANT_TYPES)}")
    if moe_ops not in MOE_OPS:
        raise MoeExportError(f"--moe-ops {moe_ops} is unknown; choose contrib (ONNX Runtime MoE ops), plain or "
                             "plain-routed")
    if quant in BITS and moe_ops != "contrib":
        raise MoeExportError(f"--quant {quant} needs the QMoE op; the {moe_ops} variant takes f32 or f16 "
                             "(use --moe-ops contrib)")
    if moe_ops == "contrib":
        require_moe_kernels()
    adapter = adapter_for(model.config)
    config = adapter.model_config(model.config)
    unlowered = sorted({UNLOWERED_MIXERS[mixer] for mixer in config.layer_mixers if mixer != "attention"})
    if unlowered:
        raise MoeExportError(
            f"the onnx exporter does not lower {' or '.join(unlowered)} layers ({adapter.family}) yet: ONNX Runtime's "
            "com.microsoft CausalConvWithState / LinearAttention ops (what onnxruntime-genai's builder emits) are not "
            "written by it; export GGUF instead"
        )
    if config.model_type not in ARCHITECTURES:
        raise MoeExportError(f"the onnx exporter has no attention layout for model_type {config.model_type!r}")
    if config.experts.activation not in ("silu", CLAMPED_SWIGLU, "gelu_pytorch_tanh"):
        raise MoeExportError(f"experts use {config.experts.activation!r}; the exporter writes SwiGLU (silu), "
                             "clamped SwiGLU and GELU-tanh GLU experts only")
    if config.experts.activation == "gelu_pytorch_tanh" and quant in BITS:
        raise MoeExportError(f"--quant {quant} needs the QMoE op, whose gated activation is a SwiGLU; this model's "
                             "experts are GELU-tanh GLUs (written in standard ops): export f32 or f16")
    lacking = _not_lowered(config)
    if lacking:
        raise MoeExportError(f"this model's MoE layers have {', '.join(lacking)}, which neither the MoE op nor the "
                             "plain lowering computes")
    biased = [view.index for view in adapter.layer_views(model)  # the graph's dense and shared MLPs have no biases
              for mlp in ([view.ffn] if view.kind == "dense" else list(view.shared_experts))
              if any(projection.bias is not None for projection in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))]
    if biased:
        raise MoeExportError(f"layers {biased} have biases on their dense or shared MLP projections, which the "
                             "exporter does not write: this model cannot be exported to ONNX")
    if quant in BITS:
        for view in adapter.layer_views(model):  # shapes only: a streamed model's layers may be on the meta device
            if view.experts is None:  # dense, dropped, or no routed experts left
                continue
            _, hidden, width = view.experts.down_proj.shape
            if hidden % block_size or width % block_size or block_size < 16 or block_size & (block_size - 1):
                fitting = [b for b in (128, 64, 32, 16) if hidden % b == 0 and width % b == 0]
                fix = f"try --block-size {fitting[0]}" if fitting else "no block size fits: export f16 or f32 experts"
                raise MoeExportError(
                    f"--block-size {block_size} cannot quantize layer {view.index}'s experts (hidden {hidden}, width {width}): "
                    f"QMoE needs a power of two >= 16 dividing both; {fix}"
                )


def layer_modules(model_type: str) -> tuple:
    from moeexport.backends.onnx.architectures import ARCHITECTURES

    return ARCHITECTURES[model_type].layer_modules


def _not_lowered(config) -> list[str]:
    """What the family's expert layout and routing rule have that the MoE lowering does not compute (it computes
    gated SwiGLU or clamped-SwiGLU experts in any stored layout, with or without biases, routed by softmax or
    sigmoid scores -> top-k, chosen with any selection bias within the best expert groups -> (renormalize) x scale,
    or by a softmax over the top-k logits, with or without a router bias)."""
    layout, rule = config.experts, config.routing
    return [what for what, present in (
        ("ungated experts", not layout.gated),
        # lowered where the family's layout names that layer's modules (decoder.py)
        ("a dense MLP beside the experts", rule.dense_mlp_beside and not layer_modules(config.model_type)),
    ) if present]


def _stored_bytes(model, weight_dtype) -> int:
    """The graph's weight bytes if every parameter is stored as a float weight: an upper bound for int8 / int4
    experts. Shapes only (a streamed model's layers are on the meta device); tied embeddings count twice,
    as the graph holds the embedding and the head apart."""
    count = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    return count * np.dtype(weight_dtype).itemsize


def export(
    model,
    out_path: str | Path,
    quant: str = "f32",
    overwrite: bool = False,
    moe_ops: str = "contrib",
    block_size: int = DEFAULT_BLOCK_SIZE,
    context: int | None = None,
    weight_grid: WeightGrid | None = None,
) -> ONNXExport:
    """Write the graph to out_path (+ out_path.data when its float weights pass 1 GiB), atomically.

    `weight_grid` (moeexport.quantization.weight_grid(model)) is the grid a quantize pass left the
    experts on: an int8 / int4 graph of the same bits and block size keeps their exact codes and scales.
    """
    import onnx

    from moeexport.backends.onnx.decoder import build_decoder
    from moeexport.backends.onnx.graph import ExternalData, Graph
    from moeexport.backends.onnx.moe import Quantization

    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise MoeExportError(f"output {out_path} already exists; pass --overwrite or choose another --out")
    check(model, quant, moe_ops, block_size)
    config = adapter_for(model.config).model_config(model.config)
    context = context or min(config.context_length, DEFAULT_CONTEXT_LIMIT)
    weight_dtype = np.float16 if quant == "f16" else np.float32
    quantization = Quantization(BITS[quant], block_size, weight_grid) if quant in BITS else None
    # decided before building, since the weights are written to the .data file as the graph is built
    external = _stored_bytes(model, weight_dtype) > EXTERNAL_DATA_THRESHOLD
    data_path = out_path.with_name(out_path.name + ".data")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # both files are staged under their real names, so the graph's reference to its .data holds once they move
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".partial", dir=out_path.parent))
    try:
        with open(staging / data_path.name, "wb") if external else contextlib.nullcontext() as data:
            graph = Graph(weight_dtype, ExternalData(data, data_path.name) if external else None)
            build_decoder(model, graph, moe_ops, quantization, context)
        doc = f"moeexport {config.model_type} decoder, {quant} experts, {moe_ops} MoE ops, {context} positions"
        proto = graph.model("moeexport_decoder", doc, uses_contrib=moe_ops == "contrib")
        proto.metadata_props.add(key="moeexport.context", value=str(context))
        proto.metadata_props.add(key="moeexport.quant", value=quant)  # what `validate` judges the graph by
        onnx.save_model(proto, staging / out_path.name)
        onnx.checker.check_model(staging / out_path.name)  # by path: external tensors are checked on disk, not loaded
        if external:
            os.replace(staging / data_path.name, data_path)  # first, so a graph under the real name has its data
        else:
            data_path.unlink(missing_ok=True)
        os.replace(staging / out_path.name, out_path)
    except BaseException:
        if external:
            data_path.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    what = f"{quant} experts" + (f" (block {block_size})" if quant in BITS else "")
    representation = f"{what}, " + {"contrib": "MoE/QMoE contrib ops", "plain": "standard ops only",
                                     "plain-routed": "standard ops only, routed decoding"}[moe_ops]
    fallbacks = []
    grid = weight_grid
    if quant in BITS and grid is not None and (grid.bits, grid.group_size) != (BITS[quant], block_size):
        fallbacks.append(
            f"the model's experts were quantized to int{grid.bits} g{grid.group_size}; the graph re-quantizes "
            f"them to {quant} block {block_size} (use --quant int{grid.bits} --block-size {grid.group_size} to keep them)"
        )
    return ONNXExport(out_path, representation, moe_ops, context, fallbacks)
