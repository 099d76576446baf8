"""The decoder graph: embeddings, attention with a KV cache, MoE / dense / dropped FFNs, head.

The graph is written node by node with onnx.helper rather than traced with
torch.onnx: a compressed model's layers differ from each other (expert counts,
dropped sublayers, dense layers), routing is data-dependent, and each MoE block
must become exactly one MoE/QMoE node or a fixed, scatter-free set of standard
ops. Writing the graph states all of that directly, with no exporter patches,
and the same code serves every family the adapters describe.

Attention, RoPE and RMSNorm are standard ops in both variants, so the graph
runs wherever ONNX does (TensorRT included); ONNX Runtime's graph optimizer
fuses the norm and attention patterns where its kernels allow.

IO (onnxruntime-genai naming): input_ids, attention_mask [batch, past + sequence]
(1 = attend), position_ids, past_key_values.{i}.key / .value; outputs logits
and present.{i}.key / .value (past and current positions concatenated).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from onnx import TensorProto

from moeexport.adapters import LayerView, ModelConfig, adapter_for
from moeexport.adapters.declaration import SIGMOID
from moeexport.backends.onnx.architectures import ARCHITECTURES, AttentionLayout
from moeexport.backends.onnx.graph import Graph
from moeexport.backends.onnx.moe import Quantization, RoutedExperts, routed_experts
from moeexport.streaming import layer_views, outer

MASKED = -1e30  # added to scores of masked keys; finite, so a fully masked (padding) row stays finite


@dataclass(frozen=True)
class CacheShape:
    """The cached key and value of a layer: [batch, heads, positions, width]."""

    heads: int
    key_width: int
    value_width: int


def cache_shape(model) -> CacheShape:
    """The cached key and value of every layer (all layers share it)."""
    config = adapter_for(model.config).model_config(model.config)
    if config.latent is not None:
        return CacheShape(1, config.latent.kv_lora_rank, config.latent.qk_rope_head_dim)
    return CacheShape(config.num_kv_heads, config.head_dim, config.head_dim)


@torch.no_grad()
def build_decoder(model, graph: Graph, lowering: str, quantization: Quantization | None, context: int) -> None:
    adapter = adapter_for(model.config)
    config = adapter.model_config(model.config)
    layout = ARCHITECTURES[config.model_type]
    if config.latent is not None and not config.latent.rope_interleaved:  # HF rope_interleave: false
        layout = replace(layout, rope="half")
    around = adapter.model_view(model)
    batch, sequence, total = "batch", "sequence", "total_sequence"
    input_ids = graph.input("input_ids", TensorProto.INT64, [batch, sequence])
    attention_mask = graph.input("attention_mask", TensorProto.INT64, [batch, total])
    position_ids = graph.input("position_ids", TensorProto.INT64, [batch, sequence])

    with outer(model, "input"):  # a streamed model reads its embeddings and head for the first and last steps only
        h = graph.op("Gather", graph.weight("embed_tokens.weight", around.embeddings.weight.float().numpy()), input_ids)
    if adapter.embedding_scale is not None:  # scaled embeddings, in float32 as the model scales them
        h = graph.op("Mul", h, graph.const(adapter.embedding_scale(model.config), np.float32))
    rotated = (config.latent.qk_rope_head_dim if config.latent is not None
               else config.rotary_dim or config.head_dim)  # partial rotary (GLM) turns the leading dims only
    cos, sin = (None, None) if layout.layer_modules else _rope_tables(graph, around.rotary_embedding, position_ids,
                                                                       context, rotated)
    mask = _additive_mask(graph, input_ids, attention_mask)
    # sliding-window layers see only the last `sliding_window` keys of each query
    sliding_mask = _additive_mask(graph, input_ids, attention_mask, config.sliding_window) if any(
        config.sliding_layers) else None
    eps = config.rms_norm_eps
    cache = cache_shape(model)
    if layout.layer_modules:
        h = _dense_beside_experts_layers(graph, model, h, position_ids, context, mask, sliding_mask, config, layout,
                                         lowering, quantization)
        layers = []  # every layer lowered above
    else:
        layers = layer_views(model)

    for view in layers:  # a streamed model materializes one layer at a time: copy, keep nothing
        index, prefix = view.index, f"layers.{view.index}"
        x = graph.rms_norm(h, f"{prefix}.attention_norm", view.attention_norm.weight, eps)
        past_key = graph.input(f"past_key_values.{index}.key", TensorProto.FLOAT, [batch, cache.heads, "past_sequence", cache.key_width])
        past_value = graph.input(f"past_key_values.{index}.value", TensorProto.FLOAT, [batch, cache.heads, "past_sequence", cache.value_width])
        lower = _latent_attention if config.latent is not None else _attention
        layer_mask = sliding_mask if config.sliding_layers and config.sliding_layers[index] else mask
        out, present_key, present_value = lower(graph, x, prefix, view.attention, config, layout, cos, sin,
                                                layer_mask, past_key, past_value)
        graph.output(present_key, f"present.{index}.key", TensorProto.FLOAT, [batch, cache.heads, total, cache.key_width])
        graph.output(present_value, f"present.{index}.value", TensorProto.FLOAT, [batch, cache.heads, total, cache.value_width])
        h = graph.op("Add", h, out)

        if view.kind == "dropped":
            continue
        x = graph.rms_norm(h, f"{prefix}.ffn_norm", view.ffn_norm.weight, eps)
        if view.kind == "dense":
            h = graph.op("Add", h, graph.swiglu_mlp(x, f"{prefix}.mlp", view.ffn))
            continue
        for part in _moe_parts(graph, x, prefix, view, config, lowering, quantization):
            h = graph.op("Add", h, part)

    with outer(model, "output"):
        h = graph.rms_norm(h, "final_norm", around.final_norm.weight, eps)
        logits = graph.linear(h, "lm_head", around.output.weight)
    if config.logit_softcap:  # cap x tanh(logits / cap)
        cap = graph.const(config.logit_softcap, np.float32)
        logits = graph.op("Mul", graph.op("Tanh", graph.op("Div", logits, cap)), cap)
    graph.output(logits, "logits", TensorProto.FLOAT, [batch, sequence, config.vocab_size])


def _dense_beside_experts_layers(graph: Graph, model, h: str, position_ids: str, context: int, mask: str,
                                 sliding_mask: str | None, config: ModelConfig, layout: AttentionLayout,
                                 lowering: str, quantization: Quantization | None) -> str:
    """Every decoder layer of a family whose layers run a dense MLP beside the experts (AttentionLayout.
    layer_modules); returns the residual stream after the last. Each layer's KV cache has its own heads and
    width (its attention's), each layer type its own RoPE tables."""
    adapter = adapter_for(model.config)
    rotary, eps = adapter.model_view(model).rotary_embedding, config.rms_norm_eps
    tables = {}
    for view in layer_views(model):
        index, prefix = view.index, f"layers.{view.index}"
        role = {name: _module_at(view.module, path) for name, path in layout.layer_modules}
        attention, sliding = view.attention, config.sliding_layers[index]
        width = attention.head_dim
        kv_heads = attention.k_proj.weight.shape[0] // width
        kind = "sliding_attention" if sliding else "full_attention"
        if kind not in tables:
            tables[kind] = _rope_tables(graph, lambda x, positions: rotary(x, positions, kind), position_ids,
                                        context, width, name=f"rope.{kind}")
        cos, sin = tables[kind]
        x = graph.rms_norm(h, f"{prefix}.attention_norm", view.attention_norm.weight, eps)
        q = graph.rms_norm(_heads(graph, graph.linear(x, f"{prefix}.q_proj", attention.q_proj.weight),
                                  config.num_heads, width), f"{prefix}.q_norm", attention.q_norm.weight,
                           attention.q_norm.variance_epsilon)
        raw_k = _heads(graph, graph.linear(x, f"{prefix}.k_proj", attention.k_proj.weight), kv_heads, width)
        v = raw_k if attention.v_proj is None else _heads(
            graph, graph.linear(x, f"{prefix}.v_proj", attention.v_proj.weight), kv_heads, width)
        k = graph.rms_norm(raw_k, f"{prefix}.k_norm", attention.k_norm.weight, attention.k_norm.variance_epsilon)
        v = graph.rms_norm(v, f"{prefix}.v_norm", None, eps)
        q, k = _rotate(graph, q, cos, sin, "half"), _rotate(graph, k, cos, sin, "half")
        shape = ["batch", kv_heads, "past_sequence", width]
        k = graph.op("Concat", graph.input(f"past_key_values.{index}.key", TensorProto.FLOAT, shape), k, axis=2)
        v = graph.op("Concat", graph.input(f"past_key_values.{index}.value", TensorProto.FLOAT, shape), v, axis=2)
        out = _attend(graph, q, k, v, sliding_mask if sliding else mask, attention,
                      (config.num_heads, kv_heads, width, width), prefix)
        present = ["batch", kv_heads, "total_sequence", width]
        graph.output(k, f"present.{index}.key", TensorProto.FLOAT, present)
        graph.output(v, f"present.{index}.value", TensorProto.FLOAT, present)
        out = graph.rms_norm(out, f"{prefix}.post_attention_norm", role["post_attention_norm"].weight, eps)
        h = graph.op("Add", h, out)

        dense = graph.glu_mlp(graph.rms_norm(h, f"{prefix}.ffn_norm", view.ffn_norm.weight, eps), f"{prefix}.mlp",
                              role["dense_mlp"], config.hidden_act)
        if view.kind == "moe":
            dense = graph.rms_norm(dense, f"{prefix}.dense_post_norm", role["dense_post_norm"].weight, eps)
        if view.kind == "moe" and view.experts is not None:  # (no experts left: the post-norm of zero is zero)
            dense = graph.op("Add", dense, _experts_beside(graph, h, prefix, view, role, config, lowering,
                                                            quantization))
        ffn = graph.rms_norm(dense, f"{prefix}.ffn_post_norm", role["ffn_post_norm"].weight, eps)
        h = graph.op("Mul", graph.op("Add", h, ffn), graph.weight(f"{prefix}.layer_scale",
                                                                 role["layer_scale"].float().numpy()))
    return h


def _experts_beside(graph: Graph, h: str, prefix: str, view: LayerView, role: dict, config: ModelConfig,
                    lowering: str, quantization: Quantization | None) -> str:
    """The routed experts of a layer whose router reads the residual RMS-normed without a weight, x its scale x
    hidden^-1/2, and whose experts read their own norm of it; each chosen expert weighs its per-expert scale (in
    its down rows), the sum post-normed."""
    eps, hidden = config.rms_norm_eps, config.hidden_size
    router_input = graph.op("Mul", graph.rms_norm(h, f"{prefix}.router_norm", None, eps), graph.weight(
        f"{prefix}.router.scale", (role["router_scale"].float() * hidden ** -0.5).numpy()))
    scale = role["expert_scale"].float()
    routed = RoutedExperts(
        router=view.router_weight.float().numpy(),
        gate_up=view.experts.gate_up_proj,
        down=_ScaledExperts(view.experts.down_proj, scale),
        top_k=view.top_k,
        renormalize=config.routing.renormalize,
        scale=config.routing.scale,
        layout=view.layout,
    )
    x = graph.rms_norm(h, f"{prefix}.experts_norm", view.experts_norm.weight, eps)
    out = routed_experts(graph, x, f"{prefix}.experts", routed, lowering, quantization, router_input=router_input)
    return graph.rms_norm(out, f"{prefix}.experts_post_norm", role["experts_post_norm"].weight, eps)


class _ScaledExperts:
    """A down stack whose expert e is multiplied by scale[e] (a per-expert scale on each expert's output)."""

    def __init__(self, stack, scale: torch.Tensor):
        self.stack, self.scale = stack, scale

    def __getitem__(self, expert: int) -> torch.Tensor:
        return self.stack[expert].float() * self.scale[expert]


def _module_at(layer, path: str):
    """The module or tensor at a dotted path inside a decoder layer; None where the layer has none (a dropped
    MoE sublayer's)."""
    for name in path.split("."):
        layer = getattr(layer, name, None)
    return layer


def _moe_parts(graph: Graph, x: str, prefix: str, view: LayerView, config: ModelConfig, lowering: str,
               quantization: Quantization | None) -> list[str]:
    """The outputs a MoE sublayer adds to the residual: its routed experts, then each shared expert."""
    parts = []
    if view.experts is not None:
        routed = RoutedExperts(
            router=view.router.weight.float().numpy(),
            gate_up=view.experts.gate_up_proj,  # read an expert at a time: a streamed layer holds one
            down=view.experts.down_proj,
            top_k=view.router.top_k,
            renormalize=config.routing.renormalize,
            scale=config.routing.scale,
            layout=view.layout,
            router_bias=view.router.bias.float().numpy() if config.routing.router_bias else None,
            softmax_over_top_k=config.routing.softmax_over_top_k,
            gate_up_bias=view.experts.gate_up_proj_bias.float() if view.layout.biases else None,
            down_bias=view.experts.down_proj_bias.float().numpy() if view.layout.biases else None,
            sigmoid=config.routing.scores == SIGMOID,
            selection_bias=None if view.selection_bias is None else view.selection_bias.float().numpy(),
            groups=config.routing.groups,
            top_groups=config.routing.top_groups,
            group_score=config.routing.group_score,
        )
        parts.append(routed_experts(graph, x, f"{prefix}.experts", routed, lowering, quantization))
    for module in view.shared_experts:
        shared = graph.swiglu_mlp(x, f"{prefix}.{_child_name(view.ffn, module)}", module)
        if view.shared_expert_gate is not None:
            gate = view.shared_expert_gate
            logit = graph.linear(x, f"{prefix}.{_child_name(view.ffn, gate)}", gate.weight)
            shared = graph.op("Mul", shared, graph.op("Sigmoid", logit))
        parts.append(shared)
    return parts


def _child_name(parent, child) -> str:
    """The attribute `parent` holds `child` under: shared-expert initializers are named as the checkpoint names them."""
    return next(name for name, module in parent.named_children() if module is child)


def _rope_tables(graph: Graph, rotary, position_ids: str, context: int, rotated: int,
                 name: str = "rope") -> tuple[str, str]:
    """cos and sin per position, [batch, 1, sequence, rotary/2], from the model's own rotary module (which
    rotates `rotated` dimensions of each head).

    Taking the tables from the module covers every RoPE scaling type
    transformers implements, attention scaling included.
    """
    positions = torch.arange(context)[None]
    probe = torch.zeros(1, dtype=torch.float32)
    table = rotary(probe, positions)
    if isinstance(table, tuple):  # (cos, sin), each [1, P, d] = two copies of the d/2 frequencies (or one: gpt-oss)
        cos, sin = (t[0].float() for t in table)
        half = rotated // 2
        cos, sin = cos[:, :half], sin[:, :half]
    else:  # complex freqs_cis [1, P, d/2]
        cos, sin = table[0].real.float(), table[0].imag.float()
    gathered = []
    for table_name, values in ((f"{name}.cos", cos), (f"{name}.sin", sin)):
        rows = graph.op("Gather", graph.raw(table_name, values.numpy().astype(np.float32)), position_ids)
        gathered.append(graph.op("Unsqueeze", rows, graph.const([1])))
    return gathered[0], gathered[1]


def _rotate(graph: Graph, x: str, cos: str, sin: str, style: str) -> str:
    """RoPE on x [B, heads, S, d] with tables [B, 1, S, d/2]."""
    if style == "half":
        first, second = graph.op("Split", x, axis=-1, outputs=2)
    else:  # interleaved pairs (x0, x1), (x2, x3), ...: view as [..., d/2, 2]
        pairs = graph.op("Reshape", x, graph.const([0, 0, 0, -1, 2]))
        first, second = (graph.op("Squeeze", half, graph.const([-1]))
                         for half in graph.op("Split", pairs, axis=-1, outputs=2))
    rotated_first = graph.op("Sub", graph.op("Mul", first, cos), graph.op("Mul", second, sin))
    rotated_second = graph.op("Add", graph.op("Mul", second, cos), graph.op("Mul", first, sin))
    if style == "half":
        return graph.op("Concat", rotated_first, rotated_second, axis=-1)
    stacked = graph.op("Concat", *(graph.op("Unsqueeze", r, graph.const([-1])) for r in (rotated_first, rotated_second)),
                       axis=-1)
    return graph.op("Reshape", stacked, graph.const([0, 0, 0, -1]))


def _rotate_leading(graph: Graph, x: str, cos: str, sin: str, style: str, rotary_dim: int | None, width: int) -> str:
    """RoPE on the leading `rotary_dim` dims of each head of x [B, heads, S, width] (all of them when None)."""
    if rotary_dim is None or rotary_dim == width:
        return _rotate(graph, x, cos, sin, style)
    rotary, passed = graph.op("Split", x, graph.const([rotary_dim, width - rotary_dim]), axis=-1, outputs=2)
    return graph.op("Concat", _rotate(graph, rotary, cos, sin, style), passed, axis=-1)


def _additive_mask(graph: Graph, input_ids: str, attention_mask: str, window: int | None = None) -> str:
    """[B, 1, 1, S, T]: 0 where query i (at cache slot T - S + i) may see key j, else MASKED.

    Keys are visible when they are not padding and not in the future (and, with a `window`, fewer than
    `window` slots before the query).
    """
    total = graph.op("Gather", graph.op("Shape", attention_mask), graph.const(1), axis=0)
    current = graph.op("Gather", graph.op("Shape", input_ids), graph.const(1), axis=0)
    key_slots = graph.op("Range", graph.const(0), total, graph.const(1))
    query_slots = graph.op("Range", graph.op("Sub", total, current), total, graph.const(1))
    causal = graph.op("LessOrEqual", graph.op("Unsqueeze", key_slots, graph.const([0])),
                      graph.op("Unsqueeze", query_slots, graph.const([1])))  # [S, T]
    if window is not None:
        distance = graph.op("Sub", graph.op("Unsqueeze", query_slots, graph.const([1])),
                            graph.op("Unsqueeze", key_slots, graph.const([0])))
        causal = graph.op("And", causal, graph.op("Less", distance, graph.const(window)))
    not_padding = graph.op("Cast", graph.op("Unsqueeze", attention_mask, graph.const([1, 2, 3])), to=TensorProto.BOOL)
    visible = graph.op("And", causal, not_padding)  # [B, 1, 1, S, T]
    return graph.op("Where", visible, graph.const(0.0, np.float32), graph.const(MASKED, np.float32))


def _heads(graph: Graph, x: str, heads: int, width: int) -> str:
    """[B, S, heads * width] -> [B, heads, S, width]."""
    return graph.op("Transpose", graph.op("Reshape", x, graph.const([0, 0, heads, width])), perm=[0, 2, 1, 3])


def _attend(graph: Graph, q: str, k: str, v: str, mask: str, attention, shape: tuple[int, int, int, int],
            prefix: str) -> str:
    """o_proj(softmax(q k^T * scaling + mask) v) with q [B, Hq, S, dk], k / v [B, Hkv, T, dk / dv] -> [B, S, H].

    shape = (Hq, Hkv, dk, dv). Query heads are grouped per kv head ([B, Hkv, Hq/Hkv, S, dk]) and
    broadcast against [B, Hkv, 1, T, d], so the kv heads are never copied.
    """
    heads, kv_heads, key_width, value_width = shape
    grouped_q = graph.op("Reshape", q, graph.const([0, kv_heads, heads // kv_heads, -1, key_width]))
    k5, v5 = (graph.op("Unsqueeze", t, graph.const([2])) for t in (k, v))
    scores = graph.op("MatMul", grouped_q, graph.op("Transpose", k5, perm=[0, 1, 2, 4, 3]))
    scores = graph.op("Add", graph.op("Mul", scores, graph.const(attention.scaling, np.float32)), mask)
    sinks = getattr(attention, "sinks", None)
    if sinks is None:
        probabilities = graph.op("Softmax", scores, axis=-1)
    else:  # a per-head logit in every softmax, whose share no value receives (gpt-oss)
        per_head = graph.weight(f"{prefix}.sinks", sinks.detach().float().numpy().reshape(1, kv_heads, -1, 1, 1))
        batch_heads_queries = graph.op("Shape", scores, start=0, end=4)
        column = graph.op("Expand", per_head, graph.op("Concat", batch_heads_queries, graph.const([1]), axis=0))
        with_sinks = graph.op("Softmax", graph.op("Concat", scores, column, axis=-1), axis=-1)
        keys = graph.op("Shape", scores, start=4, end=5)
        probabilities = graph.op("Slice", with_sinks, graph.const([0]), keys, graph.const([4]))
    context = graph.op("MatMul", probabilities, v5)  # [B, Hkv, G, S, dv]
    heads_first = graph.op("Reshape", context, graph.const([0, heads, -1, value_width]))
    merged = graph.op("Reshape", graph.op("Transpose", heads_first, perm=[0, 2, 1, 3]),
                      graph.const([0, 0, heads * value_width]))
    return graph.linear(merged, f"{prefix}.o_proj", attention.o_proj.weight, attention.o_proj.bias)


def _attention(graph: Graph, x: str, prefix: str, attention, config: ModelConfig, layout: AttentionLayout, cos, sin,
               mask, past_key: str, past_value: str):
    heads, kv_heads = config.num_heads, config.num_kv_heads
    head_dim = attention.head_dim
    projected = [graph.linear(x, f"{prefix}.{name}", getattr(attention, name).weight, getattr(attention, name).bias)
                 for name in ("q_proj", "k_proj", "v_proj")]
    q, k, v = projected
    if layout.qk_norm == "full":
        q = graph.rms_norm(q, f"{prefix}.q_norm", attention.q_norm.weight, attention.q_norm.variance_epsilon)
        k = graph.rms_norm(k, f"{prefix}.k_norm", attention.k_norm.weight, attention.k_norm.variance_epsilon)
    if config.clip_qkv is not None:
        low, high = graph.const(-config.clip_qkv, np.float32), graph.const(config.clip_qkv, np.float32)
        q, k, v = (graph.op("Clip", t, low, high) for t in (q, k, v))
    q, k, v = _heads(graph, q, heads, head_dim), _heads(graph, k, kv_heads, head_dim), _heads(graph, v, kv_heads, head_dim)
    if layout.qk_norm == "per_head" and getattr(attention, "q_norm", None) is not None:
        q = graph.rms_norm(q, f"{prefix}.q_norm", attention.q_norm.weight, attention.q_norm.variance_epsilon)
        k = graph.rms_norm(k, f"{prefix}.k_norm", attention.k_norm.weight, attention.k_norm.variance_epsilon)
    q, k = (_rotate_leading(graph, t, cos, sin, layout.rope, config.rotary_dim, head_dim) for t in (q, k))
    k = graph.op("Concat", past_key, k, axis=2)
    v = graph.op("Concat", past_value, v, axis=2)
    out = _attend(graph, q, k, v, mask, attention, (heads, kv_heads, head_dim, head_dim), prefix)
    return out, k, v


def _latent_attention(graph: Graph, x: str, prefix: str, attention, config: ModelConfig, layout: AttentionLayout, cos,
                      sin, mask, past_latent: str, past_rope_key: str):
    """Multi-head latent attention; the cache holds the normalized kv latent [B, 1, T, r] and rotated shared key [B, 1, T, d_rope]."""
    heads, sizes = config.num_heads, config.latent
    nope, rope_dim, value_dim = sizes.qk_nope_head_dim, sizes.qk_rope_head_dim, sizes.v_head_dim
    if sizes.q_lora_rank is None:
        q = graph.linear(x, f"{prefix}.q_proj", attention.q_proj.weight)
    else:
        q = graph.linear(x, f"{prefix}.q_a_proj", attention.q_a_proj.weight, attention.q_a_proj.bias)
        q = graph.rms_norm(q, f"{prefix}.q_a_layernorm", attention.q_a_layernorm.weight,
                           attention.q_a_layernorm.variance_epsilon)
        q = graph.linear(q, f"{prefix}.q_b_proj", attention.q_b_proj.weight)
    q_nope, q_rope = graph.op("Split", _heads(graph, q, heads, nope + rope_dim), graph.const([nope, rope_dim]),
                              axis=-1, outputs=2)
    compressed = graph.linear(x, f"{prefix}.kv_a_proj_with_mqa", attention.kv_a_proj_with_mqa.weight,
                              attention.kv_a_proj_with_mqa.bias)
    latent, k_rope = graph.op("Split", compressed, graph.const([sizes.kv_lora_rank, rope_dim]), axis=-1, outputs=2)
    latent = graph.rms_norm(latent, f"{prefix}.kv_a_layernorm", attention.kv_a_layernorm.weight,
                            attention.kv_a_layernorm.variance_epsilon)
    latent = graph.op("Unsqueeze", latent, graph.const([1]))  # [B, 1, S, r]
    k_rope = graph.op("Unsqueeze", k_rope, graph.const([1]))
    q_rope, k_rope = _rotate(graph, q_rope, cos, sin, layout.rope), _rotate(graph, k_rope, cos, sin, layout.rope)
    latent = graph.op("Concat", past_latent, latent, axis=2)
    k_rope = graph.op("Concat", past_rope_key, k_rope, axis=2)

    expanded = graph.linear(graph.op("Squeeze", latent, graph.const([1])), f"{prefix}.kv_b_proj",
                            attention.kv_b_proj.weight)  # [B, T, heads * (nope + v)]
    k_nope, v = graph.op("Split", _heads(graph, expanded, heads, nope + value_dim), graph.const([nope, value_dim]),
                         axis=-1, outputs=2)
    k_rope_all = graph.op("Expand", k_rope, graph.const([1, heads, 1, 1]))
    q = graph.op("Concat", q_nope, q_rope, axis=-1)
    k = graph.op("Concat", k_nope, k_rope_all, axis=-1)
    out = _attend(graph, q, k, v, mask, attention, (heads, heads, nope + rope_dim, value_dim), prefix)
    return out, latent, k_rope
