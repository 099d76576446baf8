"""Write a (compressed) torch MoE model as a GGUF file that stock llama.cpp loads.

Built on gguf-py (GGUFWriter, numpy quantizers, vocabulary readers). Layout
(llama.cpp's loader checks every shape exactly): per layer the experts are three
stacked 3-D tensors, `ffn_gate_exps`/`ffn_up_exps` numpy (E, ffn, hidden) and
`ffn_down_exps` (E, hidden, ffn); the router `ffn_gate_inp` (E, hidden) and all
norms stay F32. Hosts per family are in architectures.py.

Structure:
- Block Drop: blocks are already renumbered in the torch model; written as is.
- A layer without a MoE sublayer (Layer Drop, or an expert drop that emptied a
  layer without shared experts) moves a family whose host has no dense layers
  to its padded host, where it is a tiny all-zero dense FFN: its experts' bytes and compute
  are gone. The other hosts need MoE tensors in every layer, so there it keeps
  MoE tensors whose expert weights are all zero, so its output is exactly 0
  whatever the input, stored in ggml's smallest block type (Q1_0: 1.125 bits
  per weight; llama.cpp still multiplies the k experts it routes to). The file
  records the representation under `moeexport.representation`. (Its norm and
  any shared gate are ones, not zeros: llama.cpp forms the shared-expert gate
  sigmoid(g) as silu(g)/g, which is NaN at g = 0.)
- Different expert counts per layer move the model to its family's padded host
  (architectures.py), where every layer is padded to the largest count with
  zero experts that a -1e9 selection bias keeps from ever being chosen; without
  such a host they are refused, as are dense layers inside a MoE stack and a
  router whose top-k rule differs from the host's, each with the change that
  makes the model exportable.

Weight types: f32, f16, bf16, q8_0, q4_0 in numpy; q4_k_m, q5_k_m, q6_k through
llama.cpp's own quantizer from an F32 intermediate. Experts that a quantize pass
put on a symmetric grid (the `weight_grid` argument, a moeexport.quantization.WeightGrid)
go into q4_0 (int4) or q8_0 (int8) files with their exact codes and scales when
the group size is a multiple of 32: each 32-wide block takes its group's scale,
which the grid keeps exact in float16. Any other type re-quantizes them, and the
export says so. In f16/bf16 files the token embedding stays F32: it is a row
lookup (no compute), and its rounding is what moved logits most (fixture: max
|delta logit| 0.46 with it in F16, 4.4e-3 with it in F32).
The file is written under a temporary name and renamed when complete. Tensor
names come from gguf-py's tables (names.py); modules and config values come from
the adapter's views (moeexport.adapters.views).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from moeexport.adapters import LayerView, ModelConfig, adapter_for
from moeexport.adapters.declaration import CLAMPED_SWIGLU
from moeexport.adapters.experts import down_weights, gate_and_up_biases, gate_and_up_weights
from moeexport.adapters.surgery import decoder_layers, structure
from moeexport.backends.gguf import ggml
from moeexport.backends.gguf.imatrix_file import Imatrix, ImatrixEntry
from moeexport.backends.gguf.architectures import ARCHITECTURES, UNBOUNDED_WINDOW, GGUFArchitecture, host_named
from moeexport.backends.gguf.names import DENSE_FFN, LAYERS_KEY, ROUTED_FFN, SHARED_FFN, BlockNames, TensorNames
from moeexport.backends.gguf.reader import per_expert
from moeexport.backends.gguf.types import KEEP, LLAMA_CPP_TYPES, LLAMA_FTYPES, QUANT_TYPES
from moeexport import mxfp4
from moeexport.errors import MoeExportError
from moeexport.quantization import WeightGrid
from moeexport.streaming import ExpertStack, child_name, layer_views, outer, stream_of

REPRESENTATION_KEY = "moeexport.representation"
STANDIN_WIDTH = 32  # width of the all-zero stand-in FFNs some hosts need (a multiple of every 4/8-bit block)


@dataclass
class GGUFExport:
    path: Path
    architecture: str
    quant: str
    representation: str  # how MoE-less layers are written
    fallbacks: list[str] = field(default_factory=list)  # tensors kept at a wider type than asked, and why
    imatrix: Imatrix | None = None  # the importance matrix this build measured, in llama.cpp's terms


@dataclass(frozen=True)
class _Plan:
    """What check() established: the host, the layers, and the shared sizes of the file."""

    architecture: GGUFArchitecture
    config: ModelConfig
    layers: list
    num_experts: int
    silent_layers: list[int]  # layers written as MoE sublayers with all-zero experts
    expert_width: int  # ffn width of every routed expert
    shared_width: int  # ffn width of the shared expert, 0 without one
    shared_gate: bool  # the shared expert's output is scaled by a sigmoid gate
    hybrid: "HybridLayout | None" = None  # hosts with one block per layer (hybrid_blocks): what each block is
    # per layer (head width, kv heads), where the host reads them per layer (per_layer_attention)
    layer_heads: tuple[tuple[int, int], ...] = ()

    @property
    def experts_used(self) -> int:
        """The file's expert_used_count: llama.cpp's one top-k for every layer."""
        return min(self.config.top_k, self.num_experts)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise MoeExportError("the GGUF target needs gguf-py: pip install 'moeexport[gguf]'") from None
    return gguf


def check(model, quant: str = "f32", tensor_types: dict[str, str] | None = None) -> _Plan:
    """Raise before anything is written when the model, type or a type override cannot be exported."""
    _ggml_types(_gguf(), tensor_types or {})
    if quant not in QUANT_TYPES:
        raise MoeExportError(f"unknown GGUF type {quant!r}; this release writes {', '.join(QUANT_TYPES)}")
    if quant == KEEP and _Carry.source_file(model) is None:
        raise MoeExportError("--quant keep carries the tensors of an input GGUF; this model was not read from one: "
                             "choose a weight type (e.g. --quant q4_k_m)")
    if quant == KEEP and tensor_types:
        raise MoeExportError("--tensor-type cannot change types in a --quant keep build, which carries them as they are")
    adapter = adapter_for(model.config)
    config = adapter.model_config(model.config)
    architecture = ARCHITECTURES.get(adapter.model_type)
    if architecture is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise MoeExportError(f"the GGUF exporter does not write {adapter.family} yet (it writes: {supported})")
    if not architecture.configurable_norm and config.routing.renormalize != architecture.renormalizes:
        raise MoeExportError(
            f"llama.cpp's {architecture.name} always {'renormalizes' if architecture.renormalizes else 'keeps'} the "
            "top-k weights but this model's router does not; its GGUF would compute something else"
        )
    differs = _moe_rule_differs(config, architecture)
    if differs:
        raise MoeExportError(f"llama.cpp's {architecture.name} {differs}; its GGUF would compute something else")
    if config.routing.scale != 1.0 and not (architecture.routing_keys or architecture.latent_attention):
        raise MoeExportError(f"llama.cpp's {architecture.name} does not scale the routed weights, but this model's "
                             f"router multiplies them by {config.routing.scale}; its GGUF would compute something else")
    routing = config.routing
    if _expert_groups(routing) and routing.group_score != "top2_sum":
        raise MoeExportError(
            f"llama.cpp scores an expert group by the sum of its best two experts, but this model's router "
            f"(topk_method={routing.method!r}) scores it by its best one; its GGUF would route elsewhere"
        )
    rope_type = config.rope_scaling.get("rope_type", "default")
    if rope_type != "default" and not (architecture.yarn and rope_type == "yarn"):  # no scaling keys written
        raise MoeExportError(f"this model's RoPE is scaled (rope_type {rope_type!r}), which the GGUF writer does not "
                             "write yet: its GGUF would rotate and scale attention otherwise (export ONNX instead)")
    if architecture.yarn_mscale and rope_type == "yarn":
        _check_latent_yarn(config.rope_scaling, architecture)
    if architecture.latent_attention and not config.latent.rope_interleaved:
        raise MoeExportError(f"llama.cpp's {architecture.name} rotates interleaved RoPE pairs, and this model has "
                             "rope_interleave: false; its GGUF would compute another attention")
    if architecture.hybrid_blocks:
        return _hybrid_plan(adapter, model, config, architecture)
    if architecture.requires_attention_layer and "attention" not in config.layer_mixers:
        raise MoeExportError(f"llama.cpp's {architecture.name} cannot run a model without a full-attention layer "
                             "(its KV cache would be empty), and Block Drop removed every one: drop other blocks")
    layers = structure(adapter, model)
    _check_biases_the_host_drops(adapter.layer_views(model), architecture)
    dense = [i for i, spec in enumerate(layers) if spec.kind == "dense"]
    if dense and not (architecture.leading_dense and dense == list(range(len(dense)))):
        where = "outside a leading run of layers" if architecture.leading_dense else "in a MoE-only host"
        raise MoeExportError(f"llama.cpp's {architecture.name} cannot place dense layers {dense} {where}")
    if any(spec.kind == "moe" and spec.num_experts == 0 and spec.shared_experts for spec in layers):
        raise MoeExportError("a layer kept its shared experts but no routed ones; GGUF hosts cannot express that")
    silent = [i for i, s in enumerate(layers) if s.kind == "dropped" or (s.kind == "moe" and s.num_experts == 0)]
    routed = {spec.num_experts for i, spec in enumerate(layers) if spec.kind == "moe" and i not in silent}
    if not routed:
        raise MoeExportError("the model has no MoE layer with experts left; there is nothing to host in a MoE GGUF")
    top_k = config.top_k
    short = [i for i, spec in enumerate(layers) if spec.kind == "moe" and i not in silent and spec.num_experts < top_k]
    if short and len(routed) > 1 and not architecture.pads_by_router_bias:  # there a selected pad weighs 0
        raise MoeExportError(
            f"layers {short} keep fewer experts than the top-{top_k} the others route to, and llama.cpp uses one "
            f"top-k for every layer: add min_keep: {top_k} to the expert_drop step"
        )
    if architecture.latent_attention and config.latent.q_lora_rank is None and len(layers) not in (26, 27):
        raise MoeExportError(
            f"llama.cpp's {architecture.name} recognises a model without a q LoRA (a 'Lite' variant) only by its "
            f"26 or 27 layers; with {len(layers)} it expects q_a/q_b tensors: this model cannot be written after "
            "Block Drop"
        )
    lite_by_shape = len(layers) in (26, 27) or (len(layers) == 48 and config.vocab_size == 128256)  # llama.cpp's test
    if architecture.latent_attention and config.latent.q_lora_rank is not None and lite_by_shape:
        raise MoeExportError(
            f"llama.cpp's {architecture.name} takes a model of {len(layers)} layers for a 'Lite' variant without a q "
            "LoRA and would not load this model's q_a/q_b tensors: keep another number of layers (Block Drop)"
        )
    padded_host = architecture.padded_host
    if len(routed) > 1 and architecture.pads_experts:
        padded_host = architecture  # the family's own host pads exactly
    if len(routed) > 1 or (silent and padded_host is not None and padded_host.dense_silent_layers):
        if padded_host is None and not architecture.pads_by_router_bias:
            counts = [spec.num_experts if spec.kind == "moe" else 0 for spec in layers]
            raise MoeExportError(
                f"per-layer expert counts {counts} differ and no llama.cpp host can run this family that way: "
                "use expert_drop with scope: layer (the same keep everywhere)"
            )
        architecture = padded_host or architecture
    views = adapter.layer_views(model)
    # every routed expert has one width; a layer with experts exists (checked above)
    width = next(view.experts.down_proj.shape[-2 if view.layout.transposed else -1]
                 for view in views if view.experts is not None)
    shared_width = next((view.shared_experts[0].down_proj.weight.shape[-1] for view in views if view.shared_experts), 0)
    shared_gate = any(view.shared_expert_gate is not None for view in views)
    if architecture.shared_width_is_expert_multiple and not shared_width:
        raise MoeExportError(f"llama.cpp's {architecture.name} runs shared experts in every MoE layer (without their "
                             "tensors it adds silu(x)), and this model has none: it cannot be written to GGUF")
    if architecture.shared_width_is_expert_multiple and shared_width != width * config.shared_expert_count:
        raise MoeExportError(
            f"llama.cpp's {architecture.name} sizes the shared experts as {config.shared_expert_count} x the routed "
            f"experts' width {width}, but this model's are {shared_width} wide (and its graph always runs them): "
            "slim the shared experts with the routed ones, or leave both"
        )
    layer_heads = tuple((view.attention.head_dim, view.attention.k_proj.weight.shape[0] // view.attention.head_dim)
                        for view in views) if architecture.per_layer_attention else ()
    if architecture.per_layer_attention:
        _check_per_layer_attention(config, architecture)
    return _Plan(architecture, config, layers, max(routed), silent, width, shared_width, shared_gate, layer_heads=layer_heads)


def _check_per_layer_attention(config: ModelConfig, architecture: GGUFArchitecture) -> None:
    """The RoPE a host with per-layer-type attention computes: plain RoPE in the sliding layers, proportional
    (unscaled) in the full ones (transformers' rope_parameters per layer type)."""
    sliding, full = (config.rope_scaling.get(kind) or {} for kind in ("sliding_attention", "full_attention"))
    if sliding.get("rope_type", "default") != "default" or full.get("rope_type") != "proportional" or \
            full.get("factor", 1.0) != 1.0 or sliding.get("partial_rotary_factor", 1.0) != 1.0:
        raise MoeExportError(f"llama.cpp's {architecture.name} rotates sliding layers with plain RoPE and full ones "
                             f"with unscaled proportional RoPE; this model's rope_parameters are {config.rope_scaling}")


def _check_biases_the_host_drops(views: list[LayerView], architecture: GGUFArchitecture) -> None:
    """Refuse biases on attention outputs (unless the host adds them: gpt-oss) and on dense or shared MLPs: the
    writer has no tensor for them."""
    for view in views:
        mlps = ([view.ffn] if view.kind == "dense" else []) + list(view.shared_experts)
        output = None if architecture.biases else getattr(view.attention, "o_proj", None)
        biased = [output] + [p for m in mlps for p in (m.gate_proj, m.up_proj, m.down_proj)]
        if any(getattr(projection, "bias", None) is not None for projection in biased):
            raise MoeExportError(
                f"layer {view.index} has biases on its attention output or MLP projections, which llama.cpp's "
                f"{architecture.name} does not add: this model cannot be written to GGUF"
            )


def export(
    model,
    out_path: str | Path,
    quant: str = "f32",
    overwrite: bool = False,
    tensor_types: dict[str, str] | None = None,
    imatrix=None,
    weight_grid: WeightGrid | None = None,
) -> GGUFExport:
    """Write the GGUF.

    `tensor_types` maps regex patterns on GGUF tensor names to ggml types (e.g.
    {"_exps": "q4_k", "attn_": "q8_0"}); the first matching pattern wins.
    `imatrix` (calibration.moments.InputMoments of this model, or llama.cpp's
    imatrix file read by imatrix_file.read) weighs llama.cpp's rounding by each
    input column's mean square; experts that saw no calibration tokens use their
    layer's average and are listed in the fallbacks. Measured moments come back
    as `GGUFExport.imatrix`, in llama.cpp's terms, for imatrix_file.write.
    `weight_grid` (moeexport.quantization.weight_grid(model)) is the grid a quantize
    pass left the experts on: a plain q4_0 / q8_0 file that can hold it keeps their
    exact codes and scales; any other file re-quantizes them and says so.
    """
    gguf = _gguf()
    plan = check(model, quant, tensor_types)
    overrides = _ggml_types(gguf, tensor_types or {})
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise MoeExportError(f"output {out_path} already exists; pass --overwrite or choose another --out")
    representation = _describe_representation(plan)
    result = GGUFExport(out_path, plan.architecture.name, quant, representation)
    yarn = plan.config.rope_scaling if plan.architecture.yarn else {}
    if yarn.get("rope_type") == "yarn" and yarn.get("truncate") is False:
        result.fallbacks.append("RoPE: YaRN with truncate: false, which llama.cpp does not read: it rounds the "
                                "correction range to whole dimensions, so its rotations differ slightly from "
                                "transformers' (as in every GGUF of this model, llama.cpp's converter's too)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.partial")
    via_llama_cpp = quant in LLAMA_CPP_TYPES or bool(overrides) or imatrix is not None
    grid = _carried_grid(weight_grid, quant, via_llama_cpp, result.fallbacks) if quant != KEEP else None
    try:
        if quant == KEEP:  # every tensor the model kept, carried from the input GGUF as it is stored there
            carry = _Carry.of(model, plan)
            _write_file(gguf, partial, model, plan, quant, representation,
                        {"fallbacks": result.fallbacks, "carry": carry})
            result.representation += f"; {carry.summary()}"
            result.fallbacks += [f"{name}: rewritten ({why})" for name, why in carry.rewritten.items()]
        elif via_llama_cpp:  # llama.cpp chooses every tensor's type and quantizes it (backends/gguf/ggml.py)
            importance = {}
            if imatrix is not None:
                shapes, standins = _tensor_shapes(gguf, model, plan)
                if isinstance(imatrix, Imatrix):
                    _check_imatrix(imatrix, gguf, plan, shapes, standins, result.fallbacks)
                else:  # the moments this build measured, handed back to be written beside the file
                    imatrix = result.imatrix = _measured_imatrix(gguf, imatrix, plan, shapes)
                importance = _importance(gguf, imatrix, plan, shapes, result.fallbacks)
            types = ggml.tensor_types(
                lambda proxy: _write_file(gguf, proxy, model, plan, "f32", representation,
                                          {"fallbacks": [], "proxy": True}),
                lambda source, target: _llama_cpp_quantize(source, target, LLAMA_FTYPES[quant], overrides))
            standins = _write_file(gguf, partial, model, plan, quant, representation,
                                   {"fallbacks": result.fallbacks, "types": types, "importance": importance})
            result.fallbacks += _types_other_than_asked(gguf, partial, quant, overrides, standins)
        else:
            _write_file(gguf, partial, model, plan, quant, representation,
                        {"fallbacks": result.fallbacks, "grid": grid})
        os.replace(partial, out_path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return result


def _expert_groups(routing) -> bool:
    """The router chooses within its best expert groups, and it matters (llama.cpp takes fewer than all groups
    only; choosing within all of them is plain top-k)."""
    return routing.groups > 1 and routing.top_groups < routing.groups


def _moe_rule_differs(config: ModelConfig, host: GGUFArchitecture) -> str | None:
    """How the host's fixed routing and expert computation differ from the model's (None: they agree)."""
    layout, rule = config.experts, config.routing
    if rule.softmax_over_top_k != host.softmax_over_top_k:
        own = "a softmax over the top-k router logits" if host.softmax_over_top_k else "the top-k of routing scores"
        return f"routes by {own}, which this model's router does not"
    if (rule.router_bias or layout.biases) and not host.biases:
        return "has no router or expert biases, which this model has"
    clamped = (layout.alpha, layout.limit) if layout.activation == CLAMPED_SWIGLU else None
    if clamped != host.clamped_swiglu:
        own = (f"computes a clamped SwiGLU (alpha {host.clamped_swiglu[0]}, limit {host.clamped_swiglu[1]})"
               if host.clamped_swiglu else "has no clamped SwiGLU")
        return f"{own} in its experts, and this model's experts compute {layout.activation} {clamped or ''}".rstrip()
    return None


def _describe_representation(plan: _Plan) -> str:
    if plan.hybrid is not None:
        return _describe_hybrid(plan)
    parts = []
    padded = [
        i for i, spec in enumerate(plan.layers)
        if spec.kind == "moe" and i not in plan.silent_layers and spec.num_experts < plan.num_experts
    ]
    if padded:
        parts.append(f"padded to {plan.num_experts} experts with never-selected pads (exp_probs_b -1e9) in layers {padded}")
    if plan.silent_layers and plan.architecture.layer_tensors:
        parts.append(f"the dense MLP alone (no router or expert tensors) for MoE-less layers {plan.silent_layers}")
    elif plan.silent_layers and plan.architecture.dense_silent_layers:
        parts.append(f"tiny all-zero dense FFN for MoE-less layers {plan.silent_layers}")
    elif plan.silent_layers:
        parts.append(f"zero experts for MoE-less layers {plan.silent_layers}")
    return "; ".join(parts) or "uniform"


GRID_TYPES = {4: "q4_0", 8: "q8_0"}  # the ggml block types that hold a symmetric int grid exactly
ZERO_TYPES = ("Q1_0", "Q4_0")  # all-zero stand-ins: 1.125 bits per weight in blocks of 128, else 4.5 in 32
GGML_BLOCK = 32
GGML_F32, GGML_F16 = 0, 1  # ggml type ids


def zero_type(gguf, width: int):
    """The ggml type an all-zero stand-in with rows of `width` is stored in: the first of ZERO_TYPES whose block
    divides the rows (None: none does, and it is written in F16)."""
    return next((gguf.GGMLQuantizationType[t] for t in ZERO_TYPES
                 if width % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]][0] == 0), None)


def zero_row_bytes(gguf, qtype, width: int) -> int:
    """The bytes of one all-zero row of `width` in block type `qtype`."""
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    return width // block * block_bytes


def zero_bytes(gguf, shape: tuple[int, ...]) -> int:
    """The bytes of an all-zero stand-in of `shape` as _TensorSink.add_zeros stores it."""
    qtype = zero_type(gguf, shape[-1])
    if qtype is None:
        return math.prod(shape) * 2  # F16
    return math.prod(shape[:-1]) * zero_row_bytes(gguf, qtype, shape[-1])


def zero_ffn_shapes(hidden: int, width: int, experts: int = 0) -> tuple[tuple[int, ...], ...]:
    """The (gate, up, down) shapes of an all-zero FFN of `width`; `experts` > 0 stacks that many."""
    stack = (experts,) if experts else ()
    return (*stack, width, hidden), (*stack, width, hidden), (*stack, hidden, width)


def _carried_grid(grid: WeightGrid | None, quant: str, via_llama_cpp: bool,
                  fallbacks: list[str]) -> WeightGrid | None:
    """The quantize pass's expert grid when the file holds it exactly; otherwise None, and a note why not."""
    if grid is None:
        return None
    exact = GRID_TYPES.get(grid.bits) if grid.group_size % GGML_BLOCK == 0 else None
    if exact == quant and not via_llama_cpp:
        return grid
    advice = (f"a plain --quant {exact} build (no --tensor-type, no --imatrix) carries them exactly" if exact
              else "no ggml type holds that group size exactly")
    fallbacks.append(f"experts were quantized to int{grid.bits} g{grid.group_size} by the quantize pass; "
                     f"this {quant} file re-quantizes them ({advice})")
    return None


def _write_file(gguf, path: Path, model, plan: _Plan, quant: str, representation: str,
                sink_options: dict) -> list[str]:
    """Header from the model's shapes (no weights read), then each tensor's data as its layer is read.

    `sink_options` go to the _TensorSink: the fallbacks list, and a grid, llama.cpp's types or proxy.
    Returns the names of the all-zero stand-in tensors (_TensorSink.add_zeros).
    """
    writer = gguf.GGUFWriter(str(path), plan.architecture.name)
    try:
        carry = sink_options.get("carry")  # a carried file keeps its input's file type
        _write_hparams(writer, gguf, plan, carry.file.metadata["general.file_type"] if carry else LLAMA_FTYPES[quant])
        writer.add_string(REPRESENTATION_KEY, representation)
        writer.add_string(LAYERS_KEY, json.dumps([asdict(spec) for spec in plan.layers]))  # what reader.py reads
        _write_vocab(writer, gguf, plan.config, plan.architecture)
        sink = _TensorSink(writer, gguf, plan.architecture.name, quant, **sink_options)
        skeleton = adapter_for(model.config).layer_views(model)
        _write_tensors(sink, model, skeleton, plan)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        sink.writing = True
        # a proxy and a file whose every model tensor is carried need no weight read: the skeleton's shapes do
        sink.reads = not sink.proxy and not (sink.carry is not None and not sink.carry.rewritten)
        _write_tensors(sink, model, layer_views(model) if sink.reads
                       else adapter_for(model.config).layer_views(model), plan)
    finally:
        writer.close()
    return sink.zeros


def _ggml_types(gguf, tensor_types: dict[str, str]) -> dict[str, int]:
    """Pattern -> ggml type id, with a clear error for a pattern or type name that cannot work."""
    overrides = {}
    for pattern, name in tensor_types.items():
        try:
            re.compile(pattern)
        except re.error as error:
            raise MoeExportError(f"tensor-type pattern {pattern!r} is not a regular expression: {error}") from None
        qtype = getattr(gguf.GGMLQuantizationType, name.upper(), None)
        if qtype is None:
            raise MoeExportError(f"unknown ggml type {name!r} for {pattern!r} (e.g. q4_k, q5_k, q6_k, q8_0, f16)")
        overrides[pattern] = int(qtype)
    return overrides


def _weighed(gguf, plan: _Plan) -> dict[str, tuple[int, str]]:
    """GGUF tensor name -> the (layer, role) of calibration.moments.InputMoments whose inputs it reads, for every
    matrix a measured importance matrix weighs (names the file may lack: see _tensor_shapes)."""
    names = TensorNames(gguf, plan.architecture.name)

    def hosted(kinds) -> bool:  # a host may hold the experts otherwise (gate and up in one stack)
        return names.allowed is None or set(kinds) <= names.allowed

    weighed = {names("OUTPUT"): (-1, "output_in")}
    for index, spec in enumerate(plan.layers):
        if index in plan.silent_layers:
            continue  # stand-in zeros: nothing to weigh
        name = names.block(index)
        for kind in ("ATTN_Q", "ATTN_K", "ATTN_V"):
            weighed[name(kind)] = (index, "attention_in")
        weighed[name("ATTN_OUT")] = (index, "attention_out")
        if spec.shared_experts and hosted(SHARED_FFN):
            gate, up, down = SHARED_FFN
            weighed |= {name(gate): (index, "shared_in"), name(up): (index, "shared_in"),
                        name(down): (index, "shared_mid")}
        if spec.kind == "moe" and hosted(ROUTED_FFN):
            gate, up, down = ROUTED_FFN
            weighed |= {name(gate): (index, "experts_in"), name(up): (index, "experts_in"),
                        name(down): (index, "experts_mid")}
    return weighed


class _ShapeRecorder:
    """Takes a GGUFWriter's place in a header pass: the tensors a file holds, by name, with their shapes."""

    def __init__(self):
        self.shapes: dict[str, tuple[int, ...]] = {}

    def add_tensor_info(self, name: str, shape, *args, **kwargs) -> None:
        self.shapes[name] = tuple(shape)


def _tensor_shapes(gguf, model, plan: _Plan) -> tuple[dict[str, tuple[int, ...]], frozenset[str]]:
    """The weight tensors of the file `plan` writes ([experts,] rows, inputs), and its all-zero stand-ins' names
    (nothing to weigh there); no weight is read."""
    recorder = _ShapeRecorder()
    sink = _TensorSink(recorder, gguf, plan.architecture.name, "f32", [])
    _write_tensors(sink, model, adapter_for(model.config).layer_views(model), plan)
    standins = frozenset(sink.zeros)
    return {name: shape for name, shape in recorder.shapes.items() if name not in standins}, standins


def _measured_imatrix(gguf, moments, plan: _Plan, shapes: dict[str, tuple[int, ...]]) -> Imatrix:
    """The moments this build measured as llama.cpp's imatrix of this file: per expert stack one row per expert,
    pads and experts without tokens with zero sums and count 0 (as llama-imatrix writes an expert it never saw)."""
    entries = {}
    for name, (index, role) in _weighed(gguf, plan).items():
        if name not in shapes or (index, role) not in moments.sums:
            continue
        sums = moments.sums[(index, role)].double()
        counts = torch.as_tensor(moments.counts[(index, role)], dtype=torch.float64).reshape(-1)
        if len(shapes[name]) == 3:  # an expert stack, padded to the file's expert count
            pads = shapes[name][0] - len(sums)
            sums = torch.cat([sums, sums.new_zeros(pads, sums.shape[-1])])
            counts = torch.cat([counts, counts.new_zeros(pads)])
        entries[name] = ImatrixEntry(sums.reshape(-1).numpy(), counts.numpy())
    return Imatrix(entries, [moments.dataset] if moments.dataset else [], moments.chunks, moments.chunk_size)


def _check_imatrix(imatrix: Imatrix, gguf, plan: _Plan, shapes: dict[str, tuple[int, ...]], standins: frozenset[str],
                  fallbacks: list[str]) -> None:
    """Refuse a file (llama.cpp's imatrix) that names a tensor this file lacks, has the wrong width for one, or
    leaves out one a measured imatrix weighs; the output head alone may be missing (llama-imatrix collects it only
    with --process-output): it is then rounded unweighted, and `fallbacks` says so."""
    where = f"--imatrix {imatrix.path}"
    remake = "make it with llama-imatrix on this build's model (an f16 build of the same recipe)"
    for name, entry in imatrix.entries.items():
        if name in standins:
            continue
        if name not in shapes:
            raise MoeExportError(f"{where} names {name}, which this model's GGUF does not have (an imatrix of "
                                 f"another model, or of this one before the recipe changed it?): {remake}")
        shape = shapes[name]
        experts, width = (shape[0] if len(shape) == 3 else 1), shape[-1]
        if len(entry.sums) != experts * width or len(entry.counts) not in (1, experts):
            raise MoeExportError(f"{where}: {name} has {len(entry.sums)} values in {len(entry.counts)} row(s), where "
                                 f"this model's tensor takes {experts} x {width}: {remake}")
    output = TensorNames(gguf, plan.architecture.name)("OUTPUT")
    missing = [name for name in _weighed(gguf, plan) if name in shapes and name not in imatrix.entries]
    if output in missing:
        missing.remove(output)
        fallbacks.append(f"imatrix: {output} is not in {imatrix.path} (llama-imatrix collects it only with "
                         "--process-output): rounded without importance")
    if missing:
        raise MoeExportError(f"{where} does not cover {missing[0]}" + (f" (nor {len(missing) - 1} more)" if
                             len(missing) > 1 else "") + f": {remake}")


def check_imatrix_file(model, imatrix: Imatrix, quant: str = "f32",
                       tensor_types: dict[str, str] | None = None) -> list[str]:
    """_check_imatrix before anything is written (the GGUF target's check); returns its notes."""
    gguf = _gguf()
    plan = check(model, quant, tensor_types)
    notes = []
    _check_imatrix(imatrix, gguf, plan, *_tensor_shapes(gguf, model, plan), notes)
    return notes


def _importance(gguf, imatrix: Imatrix, plan: _Plan, shapes: dict[str, tuple[int, ...]],
                fallbacks: list[str]) -> dict[str, np.ndarray]:
    """GGUF tensor name -> mean squared input per column (per expert, experts concatenated), computed as
    llama-quantize does from the file (float32 sums over float32 counts), so that a build and llama-quantize
    given its imatrix.gguf round alike. An expert without tokens takes its layer's average (llama-quantize weighs
    it by 1s) and is reported; a pad is not reported."""
    weighed = _weighed(gguf, plan)
    importance, unseen = {}, []
    for name, entry in imatrix.entries.items():
        if name not in shapes:
            continue  # an all-zero stand-in
        experts = shapes[name][0] if len(shapes[name]) == 3 else 1
        sums, counts = (torch.from_numpy(a).float() for a in entry.rows(experts))
        means = sums / counts[:, None].clamp_min(1)
        if experts > 1:
            means[counts == 0] = (sums.double().sum(0) / max(int(counts.sum()), 1)).float()
            index = weighed.get(name, (None,))[0]
            if index is not None:
                real = plan.layers[index].num_experts
                unseen += [(index, e) for e in torch.where(counts[:real] == 0)[0].tolist() if (index, e) not in unseen]
        importance[name] = means.flatten().numpy()
    fallbacks += [f"imatrix: blk.{index} expert {expert} saw no calibration tokens -> its layer's average"
                  for index, expert in sorted(unseen)]
    return importance


def _llama_cpp_quantize(source: Path, target: Path, llama_ftype: int, overrides: dict[str, int]) -> None:
    """llama.cpp's quantizer on a whole file: here the proxy, to learn the types it chooses (backends/gguf/ggml.py;
    an importance matrix weighs its rounding, not its choice of types)."""
    try:
        import llama_cpp
    except ImportError:
        raise MoeExportError("K-quants and tensor-type overrides need llama-cpp-python: pip install 'moeexport[gguf]'") from None
    from llama_cpp._utils import suppress_stdout_stderr  # what Llama(verbose=False) uses for llama.cpp's log

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_ftype
    params.nthread = os.cpu_count() or 1
    params.allow_requantize = True  # the intermediate's only non-F32 weights are all-zero experts: exact in any type
    entries = [llama_cpp.llama_model_tensor_override(p.encode(), t) for p, t in overrides.items()]
    table = (llama_cpp.llama_model_tensor_override * (len(entries) + 1))(*entries)  # null-terminated
    if entries:
        params.tt_overrides = table
    with suppress_stdout_stderr(disable=False):
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0:
        raise MoeExportError(f"llama.cpp's quantizer failed on {source.name}")


def _types_other_than_asked(gguf, path: Path, quant: str, overrides: dict[str, int], standins: list[str]) -> list[str]:
    """Weight matrices llama.cpp's quantizer kept at another type than asked (shape or mix rules)."""
    base = quant.split("_")[0].upper() + "_K" if quant in LLAMA_CPP_TYPES else quant.upper()
    report = []
    for tensor in gguf.GGUFReader(path).tensors:
        if len(tensor.shape) < 2 or "ffn_gate_inp" in tensor.name or tensor.name in standins:
            continue  # norms and routers stay F32, stand-in zeros take the smallest type, by design
        asked = next((gguf.GGMLQuantizationType(t).name for p, t in overrides.items() if re.search(p, tensor.name)), base)
        if tensor.tensor_type.name != asked:
            report.append(f"{tensor.name}: {tensor.tensor_type.name}, not {asked} (llama.cpp's {quant} rules)")
    return report


def _write_hparams(writer, gguf, plan: _Plan, file_type: int) -> None:
    if plan.hybrid is not None:
        _write_hybrid_hparams(writer, gguf, plan, file_type)
        return
    config = plan.config
    writer.add_name(Path(config.name_or_path or "moeexport-model").name)
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(len(plan.layers))
    host = plan.architecture
    if host.expert_width_key == "feed_forward_length":
        writer.add_feed_forward_length(plan.expert_width)
    else:
        writer.add_feed_forward_length(STANDIN_WIDTH if host.dense_silent_layers else config.intermediate_size)
        writer.add_expert_feed_forward_length(plan.expert_width)
    if shared_width := plan.shared_width or (STANDIN_WIDTH if host.requires_shared_expert else 0):
        writer.add_expert_shared_feed_forward_length(shared_width)
    if host.softmax_gating:
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType[config.routing.scores.upper()])  # SOFTMAX | SIGMOID
        writer.add_expert_weights_norm(True)
    writer.add_head_count(config.num_heads)
    if not host.per_layer_attention:  # there, each layer kind's base: _write_per_layer_attention_hparams
        writer.add_rope_freq_base(config.rope_theta)
    if host.yarn and config.rope_scaling.get("rope_type") == "yarn":
        _write_yarn(writer, gguf, config.rope_scaling)
        if host.yarn_mscale:
            writer.add_rope_scaling_yarn_log_mul(0.1 * config.rope_scaling["mscale_all_dim"])
    if host.sliding_period:
        _write_sliding_window(writer, config, len(plan.layers), host.sliding_period)
    if host.latent_attention:
        _write_latent_attention_hparams(writer, config)
    elif host.per_layer_attention:
        _write_per_layer_attention_hparams(writer, plan)
    else:
        writer.add_head_count_kv(config.num_kv_heads)
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_rope_dimension_count(config.rotary_dim or config.head_dim)
    if config.rotary_dim and not host.rope_dims_partial:
        raise MoeExportError(f"llama.cpp's {host.name} rotates whole heads; this model rotates {config.rotary_dim} "
                             f"of each head's {config.head_dim} dims")
    if host.leading_dense:
        _write_moe_placement_hparams(writer, gguf, config, plan)
    if host.mrope_sections:
        sections = (list(config.rope_scaling.get("mrope_section") or host.mrope_sections) + [0] * 4)[:4]
        if sum(sections) > (config.rotary_dim or config.head_dim):
            raise MoeExportError(f"llama.cpp's {host.name} needs M-RoPE sections {sections} to fit the "
                                 f"{config.rotary_dim or config.head_dim} rotated dims of each head; state "
                                 "rope_parameters.mrope_section that fit in the checkpoint's config")
        writer.add_rope_dimension_sections(sections)
    if config.linear is not None:
        _write_linear_attention_hparams(writer, config, len(plan.layers))
    if host.unbounded_sliding_window:
        writer.add_sliding_window(UNBOUNDED_WINDOW)
        writer.add_sliding_window_pattern([True] * len(plan.layers))
        writer.add_rope_dimension_count_swa(config.head_dim)
        writer.add_rope_freq_base_swa(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_expert_count(plan.num_experts)
    writer.add_expert_used_count(plan.experts_used)
    if _expert_groups(config.routing):
        writer.add_expert_group_count(config.routing.groups)
        writer.add_expert_group_used_count(config.routing.top_groups)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)  # a llama_ftype id, as llama.cpp's quantizer records it
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _check_latent_yarn(yarn: dict, architecture: GGUFArchitecture) -> None:
    """llama.cpp's latent attention scales q.k by YaRN's mscale(mscale_all_dim) squared, and its rotations by
    mscale(mscale) / mscale(mscale_all_dim) with mscale taken equal to mscale_all_dim, so 1: exact where HF's
    attention_factor is 1 too, with mscale equal to a nonzero mscale_all_dim (as the hub's MLA configs set them)."""
    mscale, mscale_all_dim = yarn.get("mscale"), yarn.get("mscale_all_dim")
    if yarn.get("attention_factor") is not None or not mscale_all_dim or mscale != mscale_all_dim:
        raise MoeExportError(
            f"llama.cpp's {architecture.name} takes YaRN's mscale equal to mscale_all_dim and no attention_factor, "
            f"but this model's YaRN has mscale {mscale}, mscale_all_dim {mscale_all_dim} and attention_factor "
            f"{yarn.get('attention_factor')}: its GGUF would scale attention otherwise (export ONNX instead)")
    if not yarn.get("factor"):
        raise MoeExportError("this model's YaRN RoPE states no factor; llama.cpp needs rope.scaling.factor: "
                             "set rope_parameters.factor in config.json")


def _write_yarn(writer, gguf, yarn: dict) -> None:
    """YaRN's keys as llama.cpp reads them. (HF's `truncate: false`, gpt-oss's, keeps the correction range
    unrounded, where llama.cpp rounds it to whole dimensions: no key says otherwise.)"""
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(yarn["factor"])
    writer.add_rope_scaling_orig_ctx_len(yarn["original_max_position_embeddings"])
    if (attention_factor := yarn.get("attention_factor")) is not None:
        writer.add_rope_scaling_yarn_attn_factor(attention_factor)
    if (beta_fast := yarn.get("beta_fast")) is not None:
        writer.add_rope_scaling_yarn_beta_fast(beta_fast)
    if (beta_slow := yarn.get("beta_slow")) is not None:
        writer.add_rope_scaling_yarn_beta_slow(beta_slow)


def _write_sliding_window(writer, config: ModelConfig, layers: int, period: int) -> None:
    """The window, and which layers slide where that differs from the host's default (every layer but each
    `period`-th), e.g. after Block Drop. A model left with no sliding layer is written as one whose every layer
    slides over a window that never slides (llama.cpp's context refuses a model without a sliding layer)."""
    sliding = list(config.sliding_layers)
    if not any(sliding):
        sliding = [True] * layers
    writer.add_sliding_window(config.sliding_window or UNBOUNDED_WINDOW)
    if sliding != [index % period < period - 1 for index in range(layers)]:
        writer.add_sliding_window_pattern(sliding)


def _write_per_layer_attention_hparams(writer, plan: _Plan) -> None:
    """Sliding and full-attention layers as the host reads them: each kind's head width (key_length for the full
    layers, key_length_swa for the sliding ones; values as wide), kv heads per layer, RoPE bases and rotated dims
    (the full layers rotate all dims, the rope_freqs factors keep the proportional RoPE's unrotated ones still),
    the window and which layers slide, and the final logit softcapping."""
    config, sliding = plan.config, list(plan.config.sliding_layers)
    full_width = next((width for (width, _), slides in zip(plan.layer_heads, sliding) if not slides), None)
    swa_width = next((width for (width, _), slides in zip(plan.layer_heads, sliding) if slides), None)
    full_width, swa_width = full_width or swa_width, swa_width or full_width
    writer.add_head_count_kv([kv for _, kv in plan.layer_heads])
    writer.add_key_length(full_width)
    writer.add_value_length(full_width)
    writer.add_key_length_swa(swa_width)
    writer.add_value_length_swa(swa_width)
    writer.add_rope_dimension_count(full_width)
    writer.add_rope_dimension_count_swa(swa_width)
    writer.add_rope_freq_base(config.rope_scaling["full_attention"]["rope_theta"])
    writer.add_rope_freq_base_swa(config.rope_scaling["sliding_attention"]["rope_theta"])
    writer.add_sliding_window(config.sliding_window or UNBOUNDED_WINDOW)
    writer.add_sliding_window_pattern(sliding)
    writer.add_shared_kv_layers(0)
    writer.add_embedding_length_per_layer_input(0)
    if config.logit_softcap:
        writer.add_final_logit_softcapping(config.logit_softcap)


def _proportional_rope_factors(plan: _Plan) -> np.ndarray:
    """llama.cpp's rope_freqs for the full-attention layers: 1 for the pairs proportional RoPE rotates, 1e30 (no
    rotation) for the rest, as llama.cpp's converter writes them."""
    full = plan.config.rope_scaling["full_attention"]
    width = next(width for (width, _), slides in zip(plan.layer_heads, plan.config.sliding_layers) if not slides)
    rotated = int(full.get("partial_rotary_factor", 1.0) * width // 2)
    return np.array([1.0] * rotated + [1e30] * (width // 2 - rotated), np.float32)


def _write_moe_placement_hparams(writer, gguf, config: ModelConfig, plan: _Plan) -> None:
    """Where the MoE layers are (after a leading dense run) and, where the host reads them, the shared-expert
    count and the routing rule."""
    writer.add_leading_dense_block_count(sum(1 for spec in plan.layers if spec.kind == "dense"))
    if plan.architecture.moe_layer_step:
        writer.add_interleave_moe_layer_step(1)
    writer.add_expert_shared_count(config.shared_expert_count)
    if not (plan.architecture.routing_keys or plan.architecture.latent_attention):  # a latent-attention host always reads them
        return
    routing = config.routing
    writer.add_expert_weights_scale(routing.scale)
    writer.add_expert_weights_norm(routing.renormalize)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType[routing.scores.upper()])  # SOFTMAX | SIGMOID


def _write_linear_attention_hparams(writer, config: ModelConfig, layers: int) -> None:
    """Gated DeltaNet sizes under llama.cpp's ssm keys, and which layers are DeltaNet (recurrent): one flag per
    layer, so a Block Drop of any layer kind is stated as it is."""
    linear = config.linear
    writer.add_ssm_conv_kernel(linear.conv_kernel)
    writer.add_ssm_state_size(linear.key_head_dim)
    writer.add_ssm_group_count(linear.key_heads)
    writer.add_ssm_time_step_rank(linear.value_heads)
    writer.add_ssm_inner_size(linear.value_head_dim * linear.value_heads)
    recurrent = [kind == "linear_attention" for kind in config.layer_mixers]
    assert len(recurrent) == layers, "layer_mixers lists every layer"
    writer.add_array(f"{writer.arch}.attention.recurrent_layers", recurrent)


def _write_latent_attention_hparams(writer, config: ModelConfig) -> None:
    """MLA as llama.cpp runs it: one shared latent KV head (MQA) plus the per-head k_b / v_b absorptions."""
    latent = config.latent
    writer.add_head_count_kv(1)
    if latent.q_lora_rank is not None:
        writer.add_q_lora_rank(latent.q_lora_rank)
    writer.add_kv_lora_rank(latent.kv_lora_rank)
    writer.add_key_length(latent.kv_lora_rank + latent.qk_rope_head_dim)
    writer.add_value_length(latent.kv_lora_rank)
    writer.add_key_length_mla(latent.qk_nope_head_dim + latent.qk_rope_head_dim)
    writer.add_value_length_mla(latent.v_head_dim)
    writer.add_rope_dimension_count(latent.qk_rope_head_dim)


def _write_vocab(writer, gguf, config: ModelConfig, architecture: GGUFArchitecture) -> None:
    """Vocabulary (SentencePiece or BPE), special tokens and chat template from the checkpoint directory,
    or copied as they are from the GGUF the model was read from."""
    source = Path(config.name_or_path)
    if source.suffix == ".gguf":
        _copy_vocab(writer, gguf, source)
        return
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)  # it warns about post-processors it ignores
    if (source / "tokenizer.model").is_file():
        vocab, pre = gguf.vocab.SentencePieceVocab(source), "default"
    else:
        try:
            vocab, pre = gguf.vocab.BpeVocab(source), architecture.bpe_pre
        except FileNotFoundError:
            raise MoeExportError(
                f"no SentencePiece tokenizer.model or byte-level BPE tokenizer.json in {source}: "
                "the GGUF needs the model's vocabulary"
            ) from None
    tokens, scores, types = [], [], []
    for text, score, token_type in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(token_type)
    for padding in range(len(tokens), config.vocab_size):  # embedding rows past the tokenizer
        tokens.append(f"[PAD{padding}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(source, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)


def _copy_vocab(writer, gguf, source: Path) -> None:
    reader = gguf.GGUFReader(source)
    for name, stored in reader.fields.items():
        if name.startswith("tokenizer."):
            value_type = stored.types[0]
            sub_type = stored.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, stored.contents(), value_type, sub_type=sub_type)


class _TensorSink:
    """Writes tensors in the requested type, falling back per tensor where the shape cannot take it.

    A file is written in two passes over the same tensors: the first (`writing`
    False) only announces each tensor's name, type and shape, which the header
    needs, and reads no weights, so a streamed model is walked on its meta-device
    skeleton; the second converts the data a slice at a time (one expert, or a
    block of rows) into the tensor's bytes and writes them, so at most one tensor's
    stored bytes and one slice in float32 exist at once.
    """

    ROWS_PER_SLICE = 4096

    def __init__(self, writer, gguf, architecture: str, quant: str, fallbacks: list[str],
                 grid: WeightGrid | None = None, types: dict[str, int] | None = None,
                 importance: dict[str, np.ndarray] | None = None, proxy: bool = False, carry: "_Carry | None" = None):
        self.writer, self.gguf, self.quant, self.fallbacks, self.grid = writer, gguf, quant, fallbacks, grid
        self.carry = carry  # a --quant keep file: tensors come from the input GGUF's bytes where they can
        self.types = types  # GGUF name -> ggml type id, when llama.cpp chose them (a K-quant mix, overrides)
        self.importance = importance or {}
        self.proxy = proxy  # a small stand-in of the file for llama.cpp to choose types on (backends/gguf/ggml.py)
        self.writing = False
        self.reads = False  # whether the writing pass reads the model's weights (set when it starts)
        self.zeros: list[str] = []  # the all-zero stand-ins (add_zeros)
        self.names = TensorNames(gguf, architecture)

    def add(self, name: str, tensor: torch.Tensor | np.ndarray, keep_f32: bool = False, quant: str | None = None,
            on_grid: bool = False):
        """`on_grid`: routed-expert weights, written with the quantize pass's codes when the file carries its grid."""
        shape = tuple(tensor.shape)
        if self.carry is not None:
            # numpy arrays are the writer's own (zeros, ones, biases); the model's weights are torch tensors
            # or expert stacks, which the input GGUF may hold byte for byte
            own = isinstance(tensor, np.ndarray)
            carried = None if own else self.carry.find(name, tensor)
            if carried is not None:
                self._add_carried(name, carried)
                return
            quant = quant or ("f32" if own else self.carry.rewrite_type(name, shape, self.writing))
        quant = "f32" if keep_f32 or len(shape) == 1 else (quant or self.quant)
        if self.types is not None:
            quant = self.types[name]
        elif on_grid and self.grid and quant == self.quant:
            quant = "grid"
        elif isinstance(quant, str) and quant not in ("f32", "f16"):
            block = self.gguf.GGML_QUANT_SIZES[self._qtype(quant)][0]
            if shape[-1] % block:
                if not self.writing:
                    self.fallbacks.append(f"{name}: rows of {shape[-1]} are not a multiple of {block} -> f16")
                quant = "f16"
        if self.proxy:
            shape = ggml.proxy_shape(shape)
            tensor = np.zeros(shape, np.float32)  # llama.cpp's type rules never look at values
        row = self._convert(np.zeros((1, shape[-1]), np.float32), quant, name, None)  # the stored form of one row
        nbytes = math.prod(shape[:-1]) * row.nbytes
        if not self.writing:  # the header's entry
            self.writer.add_tensor_info(name, (*shape[:-1], row.shape[-1]), row.dtype, nbytes,
                                        raw_dtype=self._raw_dtype(quant))
            return
        self.writer.write_tensor_data(_ConvertedData(nbytes, lambda: (
            self._convert(_float32(rows), quant, name, expert)
            for expert, rows in _slices(tensor, shape, self.ROWS_PER_SLICE))))

    def add_zeros(self, name: str, shape: tuple[int, ...]) -> None:
        """An all-zero weight the host needs but that adds nothing, in the smallest type that holds it exactly.

        Every block type scales its codes by a per-block factor, so all-zero bytes decode to exact zeros:
        the smallest type whose block divides the rows is chosen (ZERO_TYPES), whatever the file's type, so
        K-quant files too keep them at 1.1 bits per weight. A proxy (for llama.cpp's type rules) takes them
        in F32, as every other tensor.
        """
        if self.proxy:
            self.add(name, np.zeros(shape, np.float32), quant="f32")
            return
        qtype = zero_type(self.gguf, shape[-1])
        if qtype is None:
            self.add(name, np.zeros(shape, np.float32), quant="f16")
            return
        row_bytes = zero_row_bytes(self.gguf, qtype, shape[-1])
        nbytes = math.prod(shape[:-1]) * row_bytes
        if not self.writing:
            self.writer.add_tensor_info(name, (*shape[:-1], row_bytes), np.uint8, nbytes, raw_dtype=qtype)
            self.zeros.append(name)
            return
        rows = max(1, SLICE_BYTES // row_bytes)
        counts = [min(rows, math.prod(shape[:-1]) - start) for start in range(0, math.prod(shape[:-1]), rows)]
        self.writer.write_tensor_data(_ConvertedData(nbytes, lambda: (np.zeros(n * row_bytes, np.uint8) for n in counts)))

    def carries_mxfp4(self) -> bool:
        """Whether expert stacks the input holds in MXFP4 are written as GGML MXFP4 with their own bytes: in
        every quantized file (an f32 / f16 / bf16 file stays float), llama.cpp's type choices included."""
        return not self.proxy and self.carry is None and self.quant not in ("f32", "f16", "bf16")

    def add_mxfp4(self, name: str, shape: tuple[int, int, int], expert_blocks) -> None:
        """An expert stack [E, rows, inputs] of GGML MXFP4 blocks, `expert_blocks(e)` -> expert e's [rows, bytes]
        (None: an all-zero pad), written an expert at a time."""
        qtype = self.gguf.GGMLQuantizationType.MXFP4
        block, block_bytes = self.gguf.GGML_QUANT_SIZES[qtype]
        row_bytes = shape[-1] // block * block_bytes
        nbytes = shape[0] * shape[1] * row_bytes
        if not self.writing:
            self.writer.add_tensor_info(name, (*shape[:-1], row_bytes), np.uint8, nbytes, raw_dtype=qtype)
            return

        def experts():
            for expert in range(shape[0]):
                blocks = expert_blocks(expert)
                yield np.zeros(shape[1] * row_bytes, np.uint8) if blocks is None else blocks.reshape(-1)

        self.writer.write_tensor_data(_ConvertedData(nbytes, experts))

    def _add_carried(self, name: str, carried: "_Carried") -> None:
        if not self.writing:
            stored, count = carried.stored, len(carried.slots)
            if stored.qtype in (GGML_F32, GGML_F16):
                self.writer.add_tensor_info(name, (count, *stored.shape[1:]), _FLOAT_TYPES[stored.qtype],
                                            carried.nbytes)
            else:
                byte_shape = (count, *stored.shape[1:-1], stored.outer_bytes() // math.prod(stored.shape[1:-1]))
                self.writer.add_tensor_info(name, byte_shape, np.uint8, carried.nbytes,
                                            raw_dtype=self.gguf.GGMLQuantizationType(stored.qtype))
            return
        self.writer.write_tensor_data(_ConvertedData(carried.nbytes, lambda: carried.slices(self)))

    def zero_slice(self, stored, count: int) -> np.ndarray:
        """`count` all-zero slices (padding experts or router rows) in the stored form of `stored`."""
        zeros = np.zeros((count * math.prod(stored.shape[1:-1]), stored.shape[-1]), np.float32)
        return self._convert(zeros, stored.qtype, stored.name, None).view(np.uint8).reshape(count, -1)

    def _qtype(self, quant: str):
        return getattr(self.gguf.GGMLQuantizationType, (self.quant if quant == "grid" else quant).upper())

    def _raw_dtype(self, quant: str | int):
        if isinstance(quant, int):
            return None if quant in (GGML_F32, GGML_F16) else self.gguf.GGMLQuantizationType(quant)
        return None if quant in ("f32", "f16") else self._qtype(quant)

    def _convert(self, data: np.ndarray, quant: str | int, name: str, expert: int | None) -> np.ndarray:
        """float32 rows [n, width] (of expert `expert` of a stack) -> their stored form (elements, or blocks as
        bytes). `quant` is a type name (numpy and the grid write those), or a ggml type id (ggml writes it)."""
        if quant in ("f32", GGML_F32):
            return data.astype(np.float32, copy=False)
        if quant in ("f16", GGML_F16):
            return data.astype(np.float16)
        if quant == "grid":
            return self._grid_blocks(name, data)
        if isinstance(quant, int):
            importance = self.importance.get(name)
            if importance is not None and expert is not None:
                importance = importance[expert * data.shape[-1]:(expert + 1) * data.shape[-1]]
            return ggml.quantize_rows(quant, data, importance, os.cpu_count() or 1)
        return self.gguf.quants.quantize(data, self._qtype(quant))

    def _grid_blocks(self, name: str, data: np.ndarray) -> np.ndarray:
        """q4_0 / q8_0 blocks (f16 scale, then 32 codes) straight from the grid's codes and scales."""
        from moeexport.quantization import recover_grid

        bits, group_size = self.grid.bits, self.grid.group_size
        codes, scales = (t.numpy() for t in recover_grid(torch.from_numpy(data), bits, group_size))
        exact_scales = np.repeat(scales, group_size // GGML_BLOCK, axis=-1)
        block_scales = exact_scales.astype(np.float16)
        rounded = f"{name}: scales below float16's normal range were rounded in the file"
        if not np.array_equal(block_scales.astype(np.float32), exact_scales) and rounded not in self.fallbacks:
            self.fallbacks.append(rounded)
        codes = codes.reshape(*codes.shape[:-1], -1, GGML_BLOCK)
        if bits == 4:  # unsigned nibbles with zero point 8; element j low, element j + 16 high
            nibbles = (codes.astype(np.int16) + 8).astype(np.uint8)
            payload = nibbles[..., :16] | (nibbles[..., 16:] << 4)
        else:
            payload = codes.astype(np.int8).view(np.uint8)
        blocks = np.concatenate([block_scales[..., None].view(np.uint8), payload], axis=-1)
        return blocks.reshape(*data.shape[:-1], -1)


_FLOAT_TYPES = {GGML_F32: np.float32, GGML_F16: np.float16}


@dataclass(frozen=True)
class _Carried:
    """An output tensor made of slices of an input tensor along its outer axis (experts, or rows), with
    all-zero slices (None) where the output pads experts."""

    stored: object  # reader.StoredTensor
    slots: tuple  # input slice index per output slice, None for a zero pad
    file: object  # reader.GGUFFile

    @property
    def nbytes(self) -> int:
        return len(self.slots) * self.stored.outer_bytes()

    def slices(self, sink: "_TensorSink"):
        """The stored bytes, a run of consecutive input slices (at most SLICE_BYTES) at a time."""
        per_slice = max(1, SLICE_BYTES // self.stored.outer_bytes())
        index = 0
        while index < len(self.slots):
            start = self.slots[index]
            if start is None:
                yield sink.zero_slice(self.stored, 1)
                index += 1
                continue
            run = 1
            while (run < per_slice and index + run < len(self.slots)
                   and self.slots[index + run] == start + run):
                run += 1
            yield self.file.raw(self.stored.name, start, run)
            index += run


SLICE_BYTES = 64 * 2**20  # a carried tensor is copied this much at a time


class _Carry:
    """Which tensors of a --quant keep file are carried from the GGUF the streamed model was read from.

    The stream's record of each layer (moeexport.streaming.LayerEdit: its source
    layer, the experts it keeps, transforms applied as they are read) says where
    an output tensor lies in the input file: `blk.N.*` in block `source`, expert
    stacks and router rows at the kept experts. A tensor is carried when the input
    holds it with the same inner shape and no transform changed it; one that is
    rewritten takes its input tensor's type, and is listed. When the input's host
    and the output's differ in RoPE layout (a `llama`-host file trimmed onto
    step35), q and k are carried with their rows reordered: ggml's blocks lie
    within a row, so whole rows move and their bytes stay as stored.
    """

    def __init__(self, stream, file, plan: _Plan):
        self.stream, self.file = stream, file
        self.carried: list[str] = []
        self.rewritten: dict[str, str] = {}  # output name -> why
        self.refit: set[str] = set()  # output names of weights a pass computed (LayerEdit.replaced)
        source_host = host_named(plan.config.model_type, file.architecture)
        self.row_orders = {}  # output tensor name suffix -> the input row of each output row
        if source_host.permute_qk != plan.architecture.permute_qk:
            config = plan.config
            for suffix, heads in ((".attn_q.weight", config.num_heads), (".attn_k.weight", config.num_kv_heads)):
                order = _permute_rows(torch.arange(heads * config.head_dim), heads)  # HF row of each NORM row
                self.row_orders[suffix] = tuple((order if plan.architecture.permute_qk else order.argsort()).tolist())

    @staticmethod
    def source_file(model):
        """The GGUF file `model` is streamed from (None: it was not read from one)."""
        from moeexport.backends.gguf.reader import GGUFCheckpoint

        checkpoint = getattr(stream_of(model), "checkpoint", None)
        return checkpoint.file if isinstance(checkpoint, GGUFCheckpoint) else None

    @classmethod
    def of(cls, model, plan: _Plan) -> "_Carry":
        return cls(stream_of(model), cls.source_file(model), plan)

    def _input(self, name: str):
        """(input tensor name, the layer's edit or None) for output tensor `name`."""
        match = re.match(r"blk\.(\d+)\.(.*)", name)
        if not match:
            return name, None
        edit = self.stream.edits[int(match.group(1))]
        return f"blk.{edit.source}.{match.group(2)}", edit

    def find(self, name: str, tensor) -> _Carried | None:
        """Where output tensor `name`, the model's `tensor`, lies in the input file (None: it is rewritten)."""
        source, edit = self._input(name)
        stored, shape = self.file.tensors.get(source), tuple(tensor.shape)
        if stored is None or tuple(stored.shape[1:]) != shape[1:]:
            return None
        if edit is not None and edit.replaced and self._replaced(name, tensor):
            return None
        if not per_expert(name):
            slots = tuple(range(shape[0])) if stored.shape[0] == shape[0] else None
            order = next((rows for suffix, rows in self.row_orders.items() if name.endswith(suffix)), None)
            slots = order if slots and order else slots
        elif "_exps." in name and edit.transforms:
            slots = None  # a pass rewrote these experts (rounded, pruned, rebuilt) as they are read: their values changed
        else:
            kept = self.stream.kept_experts(edit)
            slots = tuple(kept) + (None,) * (shape[0] - len(kept)) if len(kept) <= shape[0] else None
        if slots is None:
            return None
        if name not in self.carried:
            self.carried.append(name)
        return _Carried(stored, slots, self.file)

    def _replaced(self, name: str, tensor) -> bool:
        """Whether `tensor` (of output tensor `name`) is a weight a pass computed for its layer (a refit)."""
        layer = int(re.match(r"blk\.(\d+)\.", name).group(1))
        module = decoder_layers(self.stream.adapter, self.stream.model)[layer]
        if any(tensor is module.get_parameter(replaced) for replaced in self.stream.edits[layer].replaced):
            self.refit.add(name)
            return True
        return False

    def rewrite_type(self, name: str, shape: tuple[int, ...], writing: bool) -> int | str:
        """The type a model tensor that cannot be carried is written in: its input tensor's (a ggml type id),
        or f16 where the input has none of that row width; the header pass records why it is rewritten."""
        source, edit = self._input(name)
        stored = self.file.tensors.get(source)
        if not writing:
            why = ("a pass rewrote its experts" if edit is not None and edit.transforms and "_exps." in name
                   else "a repair refit it" if name in self.refit
                   else "the input has no tensor of that shape there")
            self.rewritten[name] = why
        return stored.qtype if stored is not None and stored.shape[-1] == shape[-1] else "f16"

    def summary(self) -> str:
        text = f"{len(self.carried)} tensors carried byte for byte from {self.file.path.name}"
        return text + (f", {len(self.rewritten)} rewritten" if self.rewritten else "")


class _ConvertedData:
    """One tensor's stored bytes, converted a slice at a time while GGUFWriter writes them: it takes any
    object with `nbytes` and `tofile`, so the whole stored tensor never exists in memory."""

    def __init__(self, nbytes: int, converted_slices):
        self.nbytes, self._slices = nbytes, converted_slices

    def tofile(self, file) -> None:
        written = 0
        for converted in self._slices():
            converted.tofile(file)
            written += converted.nbytes
        assert written == self.nbytes, f"wrote {written} bytes of a tensor announced as {self.nbytes}"


def _slices(tensor, shape: tuple[int, ...], rows_per_slice: int):
    """(expert or None, row block [n, width]) covering the tensor in order: an expert at a time for stacked
    experts (which a streamed model reads one at a time), else blocks of `rows_per_slice` rows."""
    if len(shape) == 3:
        yield from ((expert, tensor[expert]) for expert in range(shape[0]))
        return
    flat = tensor.reshape(-1, shape[-1])
    yield from ((None, flat[start:start + rows_per_slice]) for start in range(0, flat.shape[0], rows_per_slice))


def _float32(rows) -> np.ndarray:
    return rows.detach().float().numpy() if isinstance(rows, torch.Tensor) else rows.astype(np.float32)


def _permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF rotate-half q/k rows -> the interleaved pairs that llama.cpp's NORM RoPE rotates."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _write_tensors(tensors: _TensorSink, model, views, plan: _Plan) -> None:
    if plan.hybrid is not None:
        _write_hybrid_tensors(tensors, model, views, plan)
        return
    config, adapter, names = plan.config, adapter_for(model.config), tensors.names
    around = adapter.model_view(model)
    reads = tensors.writing and tensors.reads  # the header pass and a proxy need shapes only
    stream = stream_of(model) if reads else None  # streamed: the embeddings and head read a block of rows at a time
    with outer(model, "input") if reads and stream is None else nullcontext():
        embeddings = stream.weight_rows("input") if stream is not None else around.embeddings.weight
        tensors.add(names("TOKEN_EMBD"), embeddings, keep_f32=tensors.quant in ("f16", "bf16"))
    if plan.architecture.per_layer_attention and not all(config.sliding_layers):
        tensors.add(names("ROPE_FREQS"), _proportional_rope_factors(plan))
    for view in views:
        index, name = view.index, names.block(view.index)
        tensors.add(name("ATTN_NORM"), _norm(view.attention_norm.weight, config))
        if plan.architecture.latent_attention:
            _write_latent_attention(tensors, name, view.attention, config)
        elif config.layer_mixers and config.layer_mixers[index] == "linear_attention":
            _write_linear_attention(tensors, name, view.attention, config)
        else:
            _write_attention(tensors, name, view.attention, config, plan.architecture)
        for path, kind, suffix in plan.architecture.layer_tensors:  # the host's further per-layer tensors
            tensor = _layer_tensor(view.module, path)
            if tensor is not None:
                tensors.add(name(kind, suffix), tensor)
        if index in plan.silent_layers and plan.architecture.layer_tensors:  # its dense MLP alone
            tensors.add(name(plan.architecture.ffn_norm), view.ffn_norm.weight)
            continue
        if view.kind == "dense":
            tensors.add(name(plan.architecture.ffn_norm), view.ffn_norm.weight)
            _write_ffn(tensors, name, DENSE_FFN, view.ffn)
            continue
        if index in plan.silent_layers and plan.architecture.dense_silent_layers:
            tensors.add(name("FFN_NORM"), np.ones(config.hidden_size, np.float32))
            _write_zero_ffn(tensors, name, DENSE_FFN, config.hidden_size, STANDIN_WIDTH)
            continue
        if index in plan.silent_layers:
            _write_silent_moe(tensors, name, config.hidden_size, plan)
            continue
        _write_moe(tensors, name, view, plan, model)
    with outer(model, "output" if stream is None else "final_norm") if reads else nullcontext():
        tensors.add(names("OUTPUT_NORM"), _norm(around.final_norm.weight, config))
        tensors.add(names("OUTPUT"), stream.weight_rows("output") if stream is not None else around.output.weight)


def _layer_tensor(layer, path: str):
    """The parameter or buffer at a dotted path inside a decoder layer; None where the layer has none."""
    owner_path, _, attribute = path.rpartition(".")
    owner = layer
    for part in filter(None, owner_path.split(".")):
        owner = getattr(owner, part, None)
    return getattr(owner, attribute, None) if owner is not None else None


def _write_moe(tensors: _TensorSink, name: BlockNames, view: LayerView, plan: _Plan, model) -> None:
    """A MoE sublayer: norm, router and stacked experts (padded to the file's count), then its shared experts."""
    experts, host = view.experts, plan.architecture
    pads = plan.num_experts - experts.down_proj.shape[0]
    gate, up = gate_and_up_weights(view.layout, _pad_experts(experts.gate_up_proj, pads))
    gate_kind, up_kind, down_kind = ROUTED_FFN
    tensors.add(name(host.ffn_norm), _norm(view.ffn_norm.weight, plan.config))
    tensors.add(name("FFN_GATE_INP"), _pad_experts(view.router_weight, pads), keep_f32=True)
    if plan.config.routing.router_bias:
        tensors.add(name("FFN_GATE_INP", ".bias"), _pad_experts(view.router.bias, pads, fill=-1e9))
    packed = _packed_experts(model, view)
    if tensors.carries_mxfp4() and packed is not None:
        _write_mxfp4_experts(tensors, name, view, pads, packed)
    elif "FFN_GATE_UP_EXP" in (tensors.names.allowed or ()) and "FFN_GATE_EXP" not in tensors.names.allowed:
        # a host that takes only the fused stack: gate rows, then up rows, as transformers stores them
        tensors.add(name("FFN_GATE_UP_EXP"), _pad_experts(experts.gate_up_proj, pads), on_grid=True)
        tensors.add(name(down_kind), down_weights(view.layout, _pad_experts(experts.down_proj, pads)), on_grid=True)
    else:
        tensors.add(name(gate_kind), gate, on_grid=True)
        tensors.add(name(up_kind), up, on_grid=True)
        tensors.add(name(down_kind), down_weights(view.layout, _pad_experts(experts.down_proj, pads)), on_grid=True)
    if view.layout.biases:
        gate_bias, up_bias = gate_and_up_biases(view.layout, _pad_experts(experts.gate_up_proj_bias, pads))
        tensors.add(name(gate_kind, ".bias"), gate_bias, keep_f32=True)
        tensors.add(name(up_kind, ".bias"), up_bias, keep_f32=True)
        tensors.add(name(down_kind, ".bias"), _pad_experts(experts.down_proj_bias, pads), keep_f32=True)
    bias = None
    if view.selection_bias is not None:  # the model's own (a meta tensor in the header pass), then the pads' -1e9
        bias = view.selection_bias.float()
        bias = torch.cat([bias, bias.new_full((pads,), -1e9)]) if pads else bias
    elif pads and not host.pads_by_router_bias:
        real = plan.num_experts - pads
        bias = np.array([0.0] * real + [-1e9] * pads, np.float32)
    if bias is not None:
        tensors.add(name("FFN_EXP_PROBS_B", plan.architecture.selection_bias_suffix), bias)
    for shared in view.shared_experts:
        _write_ffn(tensors, name, SHARED_FFN, shared)
    if not view.shared_experts and plan.architecture.requires_shared_expert:
        _write_zero_ffn(tensors, name, SHARED_FFN, plan.config.hidden_size, STANDIN_WIDTH)
    if view.shared_expert_gate is not None:
        shared_gate = view.shared_expert_gate.weight  # [1, hidden]
        tensors.add(name("FFN_GATE_INP_SHEXP"), shared_gate[0], keep_f32=True)


def _packed_experts(model, view: LayerView):
    """(stack name inside the layer -> a reader of kept expert e's MXFP4 (blocks, scales)) when a streamed layer
    reads both expert stacks from MXFP4 pairs that no pass changed; None otherwise."""
    stream = stream_of(model)
    if stream is None:
        return _packed_in_memory(view)
    prefix = child_name(view.module, view.experts) + "."
    stacks = {stack: prefix + stack for stack in ("gate_up_proj", "down_proj")}
    if not all(stream.packed(view.index, path) for path in stacks.values()):
        return None
    return {stack: (lambda slot, path=path: stream.packed(view.index, path, slot)) for stack, path in stacks.items()}


def _packed_in_memory(view: LayerView):
    """_packed_experts of an in-memory layer whose every expert still holds exactly its checkpoint's MXFP4 codes
    dequantized (mxfp4.PackedExperts, checked against the weights); None otherwise."""
    source = getattr(view.experts, "mxfp4_source", None)
    if source is None:
        return None
    codes = {stack: [source.codes(stack, slot, weights) for slot, weights in enumerate(getattr(view.experts, stack))]
             for stack in ("gate_up_proj", "down_proj")}
    if any(pair is None for pairs in codes.values() for pair in pairs):
        return None
    return {stack: (lambda slot, pairs=pairs: pairs[slot]) for stack, pairs in codes.items()}


def _write_mxfp4_experts(tensors: _TensorSink, name: BlockNames, view: LayerView, pads: int, packed) -> None:
    """The routed experts as GGML MXFP4 blocks holding the checkpoint's own codes and scales (pads: zero bytes,
    which decode to zeros): gate and up are the gate_up stack's rows the layout says."""
    layout, count = view.layout, view.experts.down_proj.shape[0]
    width = packed["gate_up_proj"](0)[0].shape[0] // 2  # the stack's outputs are its blocks' rows
    gate_rows = slice(0, None, 2) if layout.interleaved else slice(0, width)
    up_rows = slice(1, None, 2) if layout.interleaved else slice(width, None)
    gate_kind, up_kind, down_kind = ROUTED_FFN
    for kind, stack, rows in ((gate_kind, "gate_up_proj", gate_rows), (up_kind, "gate_up_proj", up_rows),
                              (down_kind, "down_proj", slice(None))):
        def expert_blocks(slot: int, stack=stack, rows=rows) -> np.ndarray:
            if slot >= count:
                return None
            blocks, scales = packed[stack](slot)
            return mxfp4.ggml_blocks(blocks[rows], scales[rows]).numpy()

        blocks, _ = packed[stack](0)
        shape = (count + pads, len(range(blocks.shape[0])[rows]), blocks.shape[1] * mxfp4.BLOCK)
        tensors.add_mxfp4(name(kind), shape, expert_blocks)


def _write_ffn(tensors: _TensorSink, name: BlockNames, kinds: tuple[str, str, str], mlp) -> None:
    """One SwiGLU MLP's gate, up and down projections under the (gate, up, down) tensor kinds."""
    for kind, projection in zip(kinds, (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
        tensors.add(name(kind), projection.weight)


def _pad_experts(tensor, pads: int, fill: float = 0.0):
    """Append `pads` all-zero (or `fill`) experts (router rows) along the first axis (of a tensor or an
    ExpertStack)."""
    if not pads:
        return tensor
    if isinstance(tensor, ExpertStack):
        return tensor.padded(pads)
    return torch.cat([tensor.detach(), tensor.new_full((pads, *tensor.shape[1:]), fill)])


def _write_attention(tensors: _TensorSink, name: BlockNames, attention, config: ModelConfig,
                     architecture: GGUFArchitecture) -> None:
    q, k = attention.q_proj.weight, attention.k_proj.weight
    if architecture.permute_qk:
        q = _permute_rows(q, config.num_heads)
        k = _permute_rows(k, config.num_kv_heads)
    tensors.add(name("ATTN_Q"), q)
    tensors.add(name("ATTN_K"), k)
    if attention.v_proj is not None:  # without one the keys are the values (the host's graph does the same)
        tensors.add(name("ATTN_V"), attention.v_proj.weight)
    tensors.add(name("ATTN_OUT"), attention.o_proj.weight)
    for kind, projection in (("ATTN_Q", attention.q_proj), ("ATTN_K", attention.k_proj), ("ATTN_V", attention.v_proj)):
        if projection is not None and projection.bias is not None:
            tensors.add(name(kind, ".bias"), projection.bias)
    if attention.o_proj.bias is not None:
        tensors.add(name("ATTN_OUT", ".bias"), attention.o_proj.bias)
    if (sinks := getattr(attention, "sinks", None)) is not None:  # a per-head logit in every softmax (gpt-oss)
        tensors.add(name("ATTN_SINKS"), sinks)
    norms = (("ATTN_Q_NORM", getattr(attention, "q_norm", None)), ("ATTN_K_NORM", getattr(attention, "k_norm", None)))
    for kind, norm in norms:
        if norm is not None:
            tensors.add(name(kind), _norm(norm.weight, config))


def _norm(weight, config: ModelConfig):
    """An RMSNorm's weight as llama.cpp multiplies by it: offset + w for a zero-centred norm."""
    return weight + config.norm_weight_offset if config.norm_weight_offset else weight


def _write_linear_attention(tensors: _TensorSink, name: BlockNames, deltanet, config: ModelConfig) -> None:
    """A Gated DeltaNet layer as llama.cpp's hybrid host reads it: q/k/v in one projection (attn_qkv), the output
    gate z (attn_gate), beta and alpha (decay) projections, the depthwise conv kernel [channels, taps], dt's bias,
    A = -exp(A_log), the gated norm (its plain weight) and the output projection. transformers repeats each key
    head for its consecutive value heads; ggml tiles the key heads instead, so the value heads (and everything per
    value head) are reordered from grouped by key head to tiled."""
    linear = config.linear
    per_key = linear.value_heads // linear.key_heads

    def tiled(tensor, dim: int, width: int):
        if per_key == 1:
            return tensor
        shape = list(tensor.shape)
        grouped = tensor.reshape(*shape[:dim], linear.key_heads, per_key, width, *shape[dim + 1:])
        return grouped.transpose(dim, dim + 1).reshape(shape)

    keys = linear.key_head_dim * linear.key_heads * 2  # the q and k rows (and conv channels) before v's
    qkv = deltanet.in_proj_qkv.weight
    tensors.add(name("ATTN_QKV"), torch.cat([qkv[:keys], tiled(qkv[keys:], 0, linear.value_head_dim)]))
    tensors.add(name("ATTN_GATE"), tiled(deltanet.in_proj_z.weight, 0, linear.value_head_dim))
    tensors.add(name("SSM_BETA"), tiled(deltanet.in_proj_b.weight, 0, 1))
    tensors.add(name("SSM_ALPHA"), tiled(deltanet.in_proj_a.weight, 0, 1))
    conv = deltanet.conv1d.weight.squeeze(1)  # [channels, 1, taps] -> [channels, taps]
    tensors.add(name("SSM_CONV1D"), torch.cat([conv[:keys], tiled(conv[keys:], 0, linear.value_head_dim)]),
                keep_f32=True)  # ggml's ssm_conv takes an F32 kernel
    tensors.add(name("SSM_DT", ".bias"), tiled(deltanet.dt_bias, 0, 1))
    tensors.add(name("SSM_A", ""), tiled(-torch.exp(deltanet.A_log.float()), 0, 1))
    tensors.add(name("SSM_NORM"), deltanet.norm.weight)
    tensors.add(name("SSM_OUT"), tiled(deltanet.out_proj.weight, 1, linear.value_head_dim))


def _write_latent_attention(tensors: _TensorSink, name: BlockNames, attention, config: ModelConfig) -> None:
    """Multi-head latent attention, with kv_b split per head into k_b (transposed) and v_b as llama.cpp absorbs them."""
    latent = config.latent
    if latent.q_lora_rank is None:
        tensors.add(name("ATTN_Q"), attention.q_proj.weight)
    else:
        tensors.add(name("ATTN_Q_A"), attention.q_a_proj.weight)
        tensors.add(name("ATTN_Q_A_NORM"), attention.q_a_layernorm.weight)
        tensors.add(name("ATTN_Q_B"), attention.q_b_proj.weight)
    tensors.add(name("ATTN_KV_A_MQA"), attention.kv_a_proj_with_mqa.weight)
    tensors.add(name("ATTN_KV_A_NORM"), attention.kv_a_layernorm.weight)
    nope, value = latent.qk_nope_head_dim, latent.v_head_dim
    kv_b = attention.kv_b_proj.weight.reshape(config.num_heads, nope + value, latent.kv_lora_rank)
    k_b, v_b = kv_b.split([nope, value], dim=1)
    tensors.add(name("ATTN_K_B"), k_b.transpose(1, 2))
    tensors.add(name("ATTN_V_B"), v_b)
    tensors.add(name("ATTN_OUT"), attention.o_proj.weight)


def _write_silent_moe(tensors: _TensorSink, name: BlockNames, hidden: int, plan: _Plan) -> None:
    """A MoE sublayer that adds exactly nothing: every projection is zero, so is every expert's output (biases
    too, where the host has them)."""
    experts, width = plan.num_experts, plan.expert_width
    tensors.add(name(plan.architecture.ffn_norm), np.ones(hidden, np.float32))
    tensors.add(name("FFN_GATE_INP"), np.zeros((experts, hidden), np.float32), keep_f32=True)
    if plan.config.routing.selection_bias:  # hosts of a family with one may require it in every MoE layer
        tensors.add(name("FFN_EXP_PROBS_B", plan.architecture.selection_bias_suffix), np.zeros(experts, np.float32))
    _write_zero_ffn(tensors, name, ROUTED_FFN, hidden, width, experts)
    if plan.architecture.biases:
        tensors.add(name("FFN_GATE_INP", ".bias"), np.zeros(experts, np.float32))
        for kind, shape in zip(ROUTED_FFN, ((experts, width), (experts, width), (experts, hidden))):
            tensors.add(name(kind, ".bias"), np.zeros(shape, np.float32), keep_f32=True)
    if plan.shared_width:  # hosts with a shared expert need its tensors in every layer
        _write_zero_ffn(tensors, name, SHARED_FFN, hidden, plan.shared_width)
    if plan.shared_width and plan.shared_gate:
        tensors.add(name("FFN_GATE_INP_SHEXP"), np.ones(hidden, np.float32))  # see module docstring


def _write_zero_ffn(tensors: _TensorSink, name: BlockNames, kinds: tuple[str, str, str], hidden: int, width: int,
                    experts: int = 0) -> None:
    """All-zero gate/up/down projections under the (gate, up, down) kinds; `experts` > 0 stacks that many."""
    for kind, shape in zip(kinds, zero_ffn_shapes(hidden, width, experts)):
        tensors.add_zeros(name(kind), shape)


# --- hosts with one block per layer (hybrid_blocks): Mamba-2, attention or MoE, per-layer top-k and expert widths ---

MAX_EXPERTS = 1024  # llama.cpp's LLAMA_MAX_EXPERTS


@dataclass(frozen=True)
class ExpertSlots:
    """How one MoE layer's kept experts fill the file's one expert count: each expert split into `split` slots of
    `width` neurons (the last one's tail zero: relu2(0) adds nothing), then never-selected pads. An expert's slots
    have its router row and selection bias, so they are chosen together (top-k x split); each computes its share of
    the expert's neurons (ReLU² acts per neuron, so the shares add up to the expert)."""

    experts: int  # experts the layer kept
    split: int  # slots per expert
    width: int  # neurons per slot
    top_k: int  # slots routed to per token

    def pads(self, slots: int) -> int:
        return slots - self.experts * self.split


@dataclass(frozen=True)
class HybridLayout:
    """The blocks a hybrid host's file holds: the model layers written (a dropped MoE block, an identity, is left
    out), each one's mixer, and each MoE block's expert slots."""

    layers: tuple[int, ...]  # model layer index of each written block
    mixers: tuple[str, ...]  # "mamba", "attention" or "none" (a MoE block)
    slots: tuple[ExpertSlots | None, ...]  # per written block: its expert slots (None: not a MoE block)
    model_layers: int  # the model's decoder layers, those left out included


def expert_slots(counts: list[int], width: int, top_k: int) -> tuple[int, list[ExpertSlots]]:
    """The file's expert count and each MoE layer's slots: every layer splits its experts into as many slots as
    the count holds, the rest pads. Of the counts whose slots store within 1% of the fewest weights (router rows
    counted), the smallest: fewer, wider slots compute faster."""
    def cost(total: int) -> int:
        return sum(total * (2 * -(-width // (total // count)) + 1) for count in counts)

    costs = {total: cost(total) for total in range(max(counts), MAX_EXPERTS + 1)}
    least = min(costs.values())
    total = min(total for total, bytes_ in costs.items() if bytes_ <= 1.01 * least)
    splits = [total // count for count in counts]
    return total, [ExpertSlots(count, split, -(-width // split), min(top_k, count) * split)
                   for count, split in zip(counts, splits)]


def _hybrid_plan(adapter, model, config: ModelConfig, host: GGUFArchitecture) -> _Plan:
    """The plan of a hybrid host's file; refuses, in one line, what its graph cannot compute."""
    why = None
    if config.routing.scores != "sigmoid" or not config.routing.selection_bias:
        why = "routes by sigmoid scores with a selection bias, which this model's router does not"
    elif _expert_groups(config.routing):
        why = "does not choose experts within expert groups, and this model's router does"
    elif config.experts.gated or config.experts.activation != "relu2":
        why = f"computes relu2 experts without a gate, and this model's experts compute {config.experts.activation}"
    if why:
        raise MoeExportError(f"llama.cpp's {host.name} {why}; its GGUF would compute something else")
    specs, views = structure(adapter, model), adapter.layer_views(model)
    mixers = config.layer_mixers
    written = [i for i, spec in enumerate(specs) if spec.kind != "dropped"]
    for i in written:
        view, spec = views[i], specs[i]
        if mixers[i] == "none" and spec.kind == "dense":
            raise MoeExportError(f"layer {i} is a dense MLP block, which llama.cpp's {host.name} loads as a MoE "
                                 "block once the file has experts: this model cannot be written to GGUF")
        if spec.kind == "moe" and spec.num_experts == 0:
            raise MoeExportError(f"layer {i} kept its shared expert but no routed ones, which llama.cpp's "
                                 f"{host.name} cannot express: keep at least one expert there (min_keep)")
        if mixers[i] == "mamba":
            _check_mamba_mixer(view.attention, i, host)
        mlps = list(view.shared_experts) + ([view.attention] if mixers[i] == "attention" else [])
        if any(getattr(getattr(m, p, None), "bias", None) is not None
               for m in mlps for p in ("up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj")):
            raise MoeExportError(f"layer {i} has biases on its attention or shared expert projections, which "
                                 f"llama.cpp's {host.name} does not add: this model cannot be written to GGUF")
    for kind in ("mamba", "attention"):  # its context builds both memories and aborts on an empty one
        if kind not in {mixers[i] for i in written}:
            raise MoeExportError(f"llama.cpp's {host.name} cannot run a model without any {kind} block (it aborts "
                                 f"allocating their empty state): keep at least one {kind} block (Block Drop)")
    moe = [i for i in written if specs[i].kind == "moe"]
    if not moe:
        raise MoeExportError("the model has no MoE layer with experts left; there is nothing to host in a MoE GGUF")
    width = views[moe[0]].experts.down_proj.shape[-1]
    total, slots = expert_slots([specs[i].num_experts for i in moe], width, config.top_k)
    by_layer = dict(zip(moe, slots))
    layout = HybridLayout(tuple(written), tuple(mixers[i] for i in written), tuple(by_layer.get(i) for i in written),
                          len(specs))
    shared_width = next((view.shared_experts[0].down_proj.weight.shape[-1] for view in views if view.shared_experts), 0)
    if any(specs[i].kind == "moe" and not views[i].shared_experts for i in moe):
        raise MoeExportError(f"llama.cpp's {host.name} runs a shared expert in every MoE block, and this model has "
                             "MoE blocks without one: it cannot be written to GGUF")
    return _Plan(host, config, [specs[i] for i in written], total, [], width, shared_width, False, hybrid=layout)


def _check_mamba_mixer(mixer, index: int, host: GGUFArchitecture) -> None:
    """llama.cpp's Mamba-2 block: SiLU, no projection biases, an unclamped time step."""
    limit = tuple(float(x) for x in getattr(mixer, "time_step_limit", (0.0, float("inf"))))
    biased = any(getattr(mixer, name).bias is not None for name in ("in_proj", "out_proj"))
    if getattr(mixer, "activation", "silu") != "silu" or biased or limit != (0.0, float("inf")):
        raise MoeExportError(f"layer {index}'s Mamba-2 block has projection biases, a time-step limit {limit} or "
                             f"an activation other than SiLU, which llama.cpp's {host.name} does not compute")


def _write_hybrid_hparams(writer, gguf, plan: _Plan, file_type: int) -> None:
    """The per-layer arrays follow the written blocks: head_count_kv 0 where there is no attention,
    feed_forward_length 0 where there is no MoE (both 0: a Mamba-2 block), each MoE block's slot width and top-k."""
    config, layout, arch = plan.config, plan.hybrid, plan.architecture.name
    writer.add_name(Path(config.name_or_path or "moeexport-model").name)
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(len(layout.layers))
    widths = [slots.width if slots else 0 for slots in layout.slots]
    used = [slots.top_k if slots else 0 for slots in layout.slots]
    writer.add_feed_forward_length(widths)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv([config.num_kv_heads if mixer == "attention" else 0 for mixer in layout.mixers])
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_layer_norm_eps(config.rms_norm_eps)  # the loader requires it (for a final norm it never runs here)
    moe_widths = {width for width in widths if width}
    moe_used = {k for k in used if k}
    if len(moe_widths) == 1:
        writer.add_expert_feed_forward_length(moe_widths.pop())
    else:
        writer.add_array(gguf.Keys.LLM.EXPERT_FEED_FORWARD_LENGTH.format(arch=arch), widths)
    if len(moe_used) == 1:
        writer.add_expert_used_count(moe_used.pop())
    else:  # the host selects and sums each layer's own top-k (llama-graph's n_expert_used(il))
        writer.add_array(gguf.Keys.LLM.EXPERT_USED_COUNT.format(arch=arch), used)
    writer.add_expert_count(plan.num_experts)
    writer.add_expert_shared_count(config.shared_expert_count)
    writer.add_expert_shared_feed_forward_length(plan.shared_width)
    writer.add_expert_weights_norm(config.routing.renormalize)
    writer.add_expert_weights_scale(config.routing.scale)
    writer.add_expert_group_count(config.routing.groups)
    writer.add_expert_group_used_count(config.routing.top_groups)
    if config.mamba is not None:  # the loader requires them, with or without a Mamba-2 block left
        writer.add_ssm_conv_kernel(config.mamba.conv_kernel)
        writer.add_ssm_inner_size(config.mamba.inner)
        writer.add_ssm_state_size(config.mamba.state)
        writer.add_ssm_time_step_rank(config.mamba.heads)
        writer.add_ssm_group_count(config.mamba.groups)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_hybrid_tensors(tensors: _TensorSink, model, views, plan: _Plan) -> None:
    """Each written block: its norm, then its Mamba-2 mixer, attention or MoE, as llama.cpp's converter lays them
    out (A as -exp(A_log), the conv kernel squeezed, the gated norm per group; q/k rows permuted, which changes
    nothing without RoPE)."""
    config, adapter, names, layout = plan.config, adapter_for(model.config), tensors.names, plan.hybrid
    around = adapter.model_view(model)
    reads = tensors.writing and tensors.reads
    with outer(model, "input") if reads else nullcontext():
        tensors.add(names("TOKEN_EMBD"), around.embeddings.weight, keep_f32=tensors.quant in ("f16", "bf16"))
    block_of = {index: block for block, index in enumerate(layout.layers)}
    for view in views:  # (a streamed model's are read one at a time, in order)
        if view.index not in block_of:
            continue
        block = block_of[view.index]
        mixer, slots, name = layout.mixers[block], layout.slots[block], names.block(block)
        tensors.add(name("ATTN_NORM"), view.attention_norm.weight)
        if mixer == "mamba":
            _write_mamba(tensors, name, view.attention, config.mamba.groups)
        elif mixer == "attention":
            attention = view.attention
            tensors.add(name("ATTN_Q"), _permute_rows(attention.q_proj.weight, config.num_heads))
            tensors.add(name("ATTN_K"), _permute_rows(attention.k_proj.weight, config.num_kv_heads))
            tensors.add(name("ATTN_V"), attention.v_proj.weight)
            tensors.add(name("ATTN_OUT"), attention.o_proj.weight)
        else:
            _write_expert_slots(tensors, name, view, slots, plan)
    with outer(model, "output") if reads else nullcontext():
        tensors.add(names("OUTPUT_NORM"), around.final_norm.weight)
        tensors.add(names("OUTPUT"), around.output.weight)


def _write_mamba(tensors: _TensorSink, name: BlockNames, mixer, groups: int) -> None:
    """(The conv kernel, A, D and the gated norm stay float32 in every file, as the converter keeps them: llama.cpp's
    ssm_conv takes float32 only.)"""
    tensors.add(name("SSM_IN"), mixer.in_proj.weight)
    conv = mixer.conv1d.weight  # [channels, 1, kernel]
    tensors.add(name("SSM_CONV1D"), conv.reshape(conv.shape[0], conv.shape[-1]), keep_f32=True)
    if mixer.conv1d.bias is not None:
        tensors.add(name("SSM_CONV1D", ".bias"), mixer.conv1d.bias)
    tensors.add(name("SSM_DT", ".bias"), mixer.dt_bias)
    a_log, heads = mixer.A_log, mixer.A_log.shape[0]
    tensors.add(name("SSM_A", ""), -torch.exp(a_log.float()).reshape(heads, 1) if not a_log.is_meta
                else a_log.reshape(heads, 1), keep_f32=True)
    tensors.add(name("SSM_D", ""), mixer.D.reshape(heads, 1), keep_f32=True)
    norm = mixer.norm.weight
    tensors.add(name("SSM_NORM"), norm.reshape(groups, norm.shape[0] // groups), keep_f32=True)
    tensors.add(name("SSM_OUT"), mixer.out_proj.weight)


def _split_stack(stack, slots: ExpertSlots, rows_are_neurons: bool):
    """[E, ...] expert weights -> [E * split, ...] slots of `width` neurons each (expert-major, the neurons past the
    expert's zero): up [E, ffn, hidden] splits its rows, down [E, hidden, ffn] its columns."""
    if slots.split == 1:
        return stack
    if not isinstance(stack, torch.Tensor):  # a streamed stack: this layer's experts, read now
        stack = torch.stack([stack[e] for e in range(len(stack))])
    experts, rows, columns = stack.shape
    neurons = slots.split * slots.width
    if rows_are_neurons:
        padded = torch.nn.functional.pad(stack, (0, 0, 0, neurons - rows))
        return padded.reshape(experts * slots.split, slots.width, columns)
    padded = torch.nn.functional.pad(stack, (0, neurons - columns))
    return padded.reshape(experts, rows, slots.split, slots.width).transpose(1, 2).reshape(
        experts * slots.split, rows, slots.width)


def _write_expert_slots(tensors: _TensorSink, name: BlockNames, view: LayerView, slots: ExpertSlots,
                        plan: _Plan) -> None:
    """A MoE block: router rows and selection bias repeated for each slot of an expert (pads: zero rows, bias
    -1e9, never selected), the experts' slots, then the shared expert. Where the top-k weights are renormalized an
    expert's slots share its weight, so their down projections carry x split."""
    pads, split, experts = slots.pads(plan.num_experts), slots.split, view.experts
    router = _pad_experts(view.router.weight.repeat_interleave(split, dim=0) if split > 1 else view.router.weight,
                          pads)
    tensors.add(name("FFN_GATE_INP"), router, keep_f32=True)
    bias = view.selection_bias.float()
    bias = bias.repeat_interleave(split) if split > 1 else bias
    tensors.add(name("FFN_EXP_PROBS_B", ".bias"), torch.cat([bias, bias.new_full((pads,), -1e9)]) if pads else bias)
    up = _split_stack(experts.up_proj, slots, rows_are_neurons=True)
    down = _split_stack(experts.down_proj, slots, rows_are_neurons=False)
    if split > 1 and plan.config.routing.renormalize:
        down = down * split
    tensors.add(name("FFN_UP_EXP"), _pad_experts(up, pads), on_grid=True)
    tensors.add(name("FFN_DOWN_EXP"), _pad_experts(down, pads), on_grid=True)
    for shared in view.shared_experts:
        tensors.add(name("FFN_UP_SHEXP"), shared.up_proj.weight)
        tensors.add(name("FFN_DOWN_SHEXP"), shared.down_proj.weight)


def _describe_hybrid(plan: _Plan) -> str:
    layout, parts = plan.hybrid, []
    moe = [(index, slots) for index, slots in zip(layout.layers, layout.slots) if slots is not None]
    split = [f"{index}: {slots.experts} x {slots.split} of width {slots.width}" for index, slots in moe if slots.split > 1]
    if split:
        parts.append(f"{plan.num_experts} expert slots per layer, experts split into equal slots in layers "
                     f"{'; '.join(split)} (per-layer top-k and widths)")
    padded = [index for index, slots in moe if slots.pads(plan.num_experts)]
    if padded:
        parts.append(f"never-selected pads (exp_probs_b -1e9) in layers {padded}")
    left_out = [index for index in range(layout.model_layers) if index not in layout.layers]
    if left_out:
        parts.append(f"MoE-less blocks {left_out} left out (identities)")
    return "; ".join(parts) or "uniform"
