"""Which llama.cpp architecture hosts which HF model_type: the GGUF backend's one family table.

Facts from research/gguf_llamacpp.md (checked against llama.cpp's loader and graphs):
- `llama` (Mixtral) uses NORM RoPE, so HF's rotate-half q/k rows are permuted;
  the other hosts use NEOX RoPE and take them as they are.
- Each host has a fixed routing rule: llama and qwen3moe renormalize the top-k
  weights, qwen2moe and olmoe do not. A model whose router differs is refused.
- The family hosts need MoE tensors in every layer and one global expert count.
  Different counts per layer need a host with a selection bias (`exp_probs_b`,
  added to the routing scores for selection only): every layer is padded to
  the largest count with zero experts biased by -1e9, never selected. That is
  exact only where the host renormalizes the top-k weights (the pads' softmax
  mass then cancels): step35 for Mixtral, hy_v3 for Qwen3-MoE (per-head q/k
  norms). Both take softmax gating only when the file says so (their default
  is sigmoid).
- step35 and hy_v3 also decide dense-or-MoE per layer by tensor presence, so a
  MoE-less layer (Layer Drop) becomes a tiny all-zero dense FFN there: exact,
  and its experts' bytes and compute are really gone. Their MoE layers need
  shared-expert tensors (without them llama.cpp adds silu(x)), so a model
  without one gets a tiny all-zero one.
- step35 hosts Mixtral's attention as it is: plain grouped-query attention,
  q/k norms and the head gate optional, NEOX RoPE (HF's rotate-half rows, not
  permuted). Its context refuses a model without a sliding-window layer, so
  every layer is written as one whose window (UNBOUNDED_WINDOW tokens) never
  slides, with its own RoPE keys (full rotation, the model's base): the
  full-attention layers of step35 rotate only half of each head.
- No stock host can store fewer experts in one layer than in another: every
  MoE layer's expert stacks have the global count and width (only
  nemotron_h_moe and glm5-next read per-layer widths and top-k, and neither has
  RoPE attention with SwiGLU experts), so padding costs the pads' bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

# a window longer than any context llama.cpp is run with (x 256 sequences still fits its uint32 arithmetic)
UNBOUNDED_WINDOW = 2**22


@dataclass(frozen=True)
class GGUFArchitecture:
    name: str  # llama.cpp's general.architecture
    renormalizes: bool  # the host's fixed top-k rule
    permute_qk: bool = False  # NORM RoPE wants interleaved q/k rows
    expert_width_key: str = "expert_feed_forward_length"  # or feed_forward_length, where experts use it
    bpe_pre: str = "default"  # tokenizer.ggml.pre for BPE vocabularies
    pads_experts: bool = False  # takes per-layer expert counts by padding with never-selected experts
    selection_bias_suffix: str = ".bias"  # what follows "blk.N.exp_probs_b" in that per-layer bias tensor's name
    dense_silent_layers: bool = False  # MoE-less layers become tiny all-zero dense FFNs (real byte savings)
    softmax_gating: bool = False  # write expert_gating_func=softmax and expert_weights_norm explicitly
    requires_shared_expert: bool = False  # MoE layers need shared-expert tensors (zeros if the model has none)
    leading_dense: bool = False  # dense layers are allowed as a leading prefix (leading_dense_block_count)
    latent_attention: bool = False  # multi-head latent attention (DeepSeek-V2): kv_a / k_b / v_b tensors
    unbounded_sliding_window: bool = False  # every layer written as sliding-window attention that never slides
    padded_host: GGUFArchitecture | None = None  # the host this family moves to when its expert counts differ
    ffn_norm: str = "FFN_NORM"  # the tensor kind of the norm feeding the FFN (gpt-oss, glm4moe: ATTN_POST_NORM)
    # gpt-oss (`gpt-oss`, llama.cpp's openai-moe graph):
    softmax_over_top_k: bool = False  # the host's top-k rule: a softmax over the k chosen router logits
    biases: bool = False  # the host reads a router bias and expert biases (and an attention output bias)
    clamped_swiglu: tuple[float, float] | None = None  # (alpha, limit) of the clamped SwiGLU the host hard-codes
    # the host reads the model's sliding window; by default every layer slides but each `sliding_period`-th
    sliding_period: int = 0
    yarn: bool = False  # the model's YaRN RoPE scaling is written (rope.scaling.* keys)
    # pads experts in its own architecture: a pad's router bias of -1e9 keeps it out of the raw logits' top-k,
    # and out of the softmax over them
    pads_by_router_bias: bool = False
    unread: str | None = None  # what of this host's files moeexport's GGUF reader does not read yet (refused)
    # DeepSeek-V3, GLM, ERNIE (deepseek2, glm4moe, ernie4_5-moe):
    routing_keys: bool = False  # the file states the routing: gating function, weights norm and scale, groups
    moe_layer_step: bool = False  # the host reads interleave_moe_layer_step (written as 1: MoE after the dense run)
    rope_dims_partial: bool = False  # RoPE may rotate only the leading rotary_dim dims of each head
    shared_width_is_expert_multiple: bool = False  # shared width = expert width x expert_shared_count (loader's)
    configurable_norm: bool = False  # the host reads expert_weights_norm from the file: either top-k rule exports
    # one block per layer, its kind per layer in the file (Mamba-2: no heads and no FFN; attention: no FFN; MoE),
    # per-layer top-k and expert widths honoured (hybrid_blocks_written_by in writer.py)
    hybrid_blocks: bool = False
    # a host shared by families that differ in gating (deepseek2): the reader takes a file whose
    # expert_gating_func is sigmoid for one of these families, and one without it (softmax) for the others
    sigmoid_gated: bool = False
    # deepseek2: YaRN's mscale_all_dim as rope.scaling.yarn_log_multiplier (x 0.1, as the converter writes it);
    # llama.cpp scales q.k by that mscale squared, as HF's latent attention does, taking mscale equal to it
    yarn_mscale: bool = False
    # Gemma 4 (gemma4): a dense MLP beside the experts in every layer, each with its own norms, and more
    # per-layer tensors: (a dotted path inside the decoder layer, tensor kind, suffix), each written where the
    # layer has it (a Layer-Dropped layer keeps only its dense MLP and norms: llama.cpp runs a layer without
    # router tensors as that dense MLP alone)
    layer_tensors: tuple[tuple[str, str, str], ...] = ()
    # sliding and full-attention layers with their own head widths, kv heads and RoPE (key_length_swa, a
    # head_count_kv array, rope_freqs factors for the full layers' proportional RoPE), final logit softcapping
    per_layer_attention: bool = False
    # the experts' activation is GELU, which llama.cpp's CPU backend reads from an fp16 table (GGML_GELU_FP16):
    # an f32 file matches the model up to that rounding only, and is judged as an f16 file is
    fp16_activation: bool = False
    # the host rotates by M-RoPE sections (rope.dimension_sections, required): a text model's positions are the
    # same in every section, so any split rotates as NEOX RoPE does; the model's own mrope_section if it has one
    mrope_sections: tuple[int, ...] = ()
    # a hybrid host whose context allocates its KV cache over the attention layers: one must be left (llama.cpp
    # aborts on a model whose every layer is recurrent)
    requires_attention_layer: bool = False



ARCHITECTURES = {
    "mixtral": GGUFArchitecture(
        name="llama",
        renormalizes=True,
        permute_qk=True,
        expert_width_key="feed_forward_length",
        padded_host=GGUFArchitecture(
            name="step35",
            renormalizes=True,
            pads_experts=True,
            dense_silent_layers=True,
            softmax_gating=True,
            requires_shared_expert=True,
            unbounded_sliding_window=True,
        ),
    ),
    "qwen2_moe": GGUFArchitecture(name="qwen2moe", renormalizes=False, bpe_pre="qwen2"),
    "qwen3_moe": GGUFArchitecture(
        name="qwen3moe",
        renormalizes=True,
        bpe_pre="qwen2",
        padded_host=GGUFArchitecture(
            name="hy_v3",
            renormalizes=True,
            bpe_pre="qwen2",
            pads_experts=True,
            selection_bias_suffix="",
            dense_silent_layers=True,
            softmax_gating=True,
            requires_shared_expert=True,
        ),
    ),
    "olmoe": GGUFArchitecture(name="olmoe", renormalizes=False, expert_width_key="feed_forward_length", bpe_pre="olmo"),
    # HF applies RoPE to interleaved pairs here, which is llama.cpp's NORM layout already: no permutation
    "deepseek_v2": GGUFArchitecture(
        name="deepseek2", renormalizes=False, bpe_pre="deepseek-llm", leading_dense=True, latent_attention=True
    ),
    # llama.cpp's gpt-oss: the router's bias and expert biases, sinks, sliding-window layers alternating with
    # full ones (layer 0 slides), the clamped SwiGLU with alpha 1.702 and limit 7 fixed in its graph. Every
    # layer needs MoE tensors: a MoE-less layer (Layer Drop) is written as all-zero experts (exact, output 0).
    "gpt_oss": GGUFArchitecture(
        name="gpt-oss", renormalizes=False, bpe_pre="gpt-4o", ffn_norm="ATTN_POST_NORM", softmax_over_top_k=True,
        biases=True, clamped_swiglu=(1.702, 7.0), sliding_period=2, yarn=True, pads_by_router_bias=True,
    ),
    # deepseek2 also takes DeepSeek-V3's router from the file: sigmoid gating, exp_probs_b, expert groups (scored by
    # their best two, as the model's router), expert_weights_norm and _scale; HF's rope_interleave is NORM RoPE
    "deepseek_v3": GGUFArchitecture(
        name="deepseek2", renormalizes=True, configurable_norm=True, bpe_pre="deepseek-v3", leading_dense=True,
        latent_attention=True, sigmoid_gated=True, yarn=True, yarn_mscale=True,
    ),
    "glm4_moe_lite": GGUFArchitecture(
        name="deepseek2", renormalizes=True, configurable_norm=True, bpe_pre="glm4", leading_dense=True,
        latent_attention=True, sigmoid_gated=True, yarn=True, yarn_mscale=True,
    ),
    # Own hosts with a selection bias (exp_probs_b); leading dense layers (leading_dense_block_count) and shared
    # experts. glm4moe: NEOX RoPE over the leading rotary_dim dims of each head, as HF rotates them (no
    # permutation); sigmoid or softmax gating, norm, scale and groups read from the file; its MoE layers need
    # exp_probs_b and (the graph adds them unconditionally) shared experts. Sigmoid scores are per expert, so
    # zero experts biased by -1e9 pad a layer exactly. ernie4_5-moe: NORM RoPE, the interleaved pairs HF ERNIE
    # rotates already (no permutation); softmax, always renormalized; the loader makes every layer after the
    # leading dense run MoE, so only interleave step 1 loads. Its softmax runs over pads too, shrinking the real
    # experts' scores by a per-token factor that the unchanged selection bias is then added to: the choice can
    # change, so non-uniform expert counts are refused there.
    "glm4_moe": GGUFArchitecture(
        name="glm4moe", renormalizes=True, configurable_norm=True, bpe_pre="glm4", pads_experts=True,
        leading_dense=True, ffn_norm="ATTN_POST_NORM", routing_keys=True, rope_dims_partial=True, shared_width_is_expert_multiple=True,
    ),
    "ernie4_5_moe": GGUFArchitecture(
        name="ernie4_5-moe", renormalizes=True, leading_dense=True, moe_layer_step=True,
    ),
    # Nemotron-H MoE: Mamba-2, NoPE attention and MoE blocks; sigmoid gating fixed in the graph, the selection bias,
    # expert_weights_norm and _scale read from the file; relu2 experts without a gate; one global expert count, but
    # per-layer expert_used_count and expert_feed_forward_length (the only host that honours both). A dropped MoE
    # block is an identity: it is left out of the file.
    "nemotron_h": GGUFArchitecture(
        name="nemotron_h_moe", renormalizes=True, configurable_norm=True, routing_keys=True, hybrid_blocks=True,
        unread="Mamba-2 blocks and per-layer expert widths",
    ),
    # Qwen3.5 / 3.6-MoE's own host: softmax, always renormalized; a sigmoid-gated shared expert and MoE in every
    # layer (a dropped MoE sublayer is written as all-zero experts); which layers are Gated DeltaNet is read from
    # attention.recurrent_layers (one flag per layer, so any Block Drop is stated exactly); NEOX (IM)RoPE over the
    # leading rotary_dim dims of each head; its norms are stored as 1 + w (ModelConfig.norm_weight_offset)
    "qwen3_5_moe_text": GGUFArchitecture(
        name="qwen35moe", renormalizes=True, bpe_pre="qwen35", ffn_norm="ATTN_POST_NORM", rope_dims_partial=True,
        mrope_sections=(11, 11, 10, 0), requires_attention_layer=True, unread="Gated DeltaNet layers",
    ),
}


# Gemma 4's per-layer tensors besides attention, its input norm, the experts and the router's matrix
_GEMMA4_LAYER_TENSORS = (
    ("post_attention_layernorm.weight", "ATTN_POST_NORM", ".weight"),
    ("mlp.gate_proj.weight", "FFN_GATE", ".weight"),
    ("mlp.up_proj.weight", "FFN_UP", ".weight"),
    ("mlp.down_proj.weight", "FFN_DOWN", ".weight"),
    ("post_feedforward_layernorm.weight", "FFN_POST_NORM", ".weight"),
    ("post_feedforward_layernorm_1.weight", "FFN_POST_NORM_1", ".weight"),
    ("pre_feedforward_layernorm_2.weight", "FFN_PRE_NORM_2", ".weight"),
    ("post_feedforward_layernorm_2.weight", "FFN_POST_NORM_2", ".weight"),
    ("router.scale", "FFN_GATE_INP", ".scale"),
    ("router.per_expert_scale", "FFN_DOWN_EXP", ".scale"),  # llama.cpp scales each expert's output by it
    ("layer_scalar", "LAYER_OUT_SCALE", ".weight"),
)

# llama.cpp's gemma4: the router (RMSNorm without weight, x 1/sqrt(hidden), x its scale) and softmax -> top-k ->
# renormalize -> x ffn_down_exps.scale are its graph's, as HF's; the dense MLP and the experts GELU-tanh GLUs;
# embeddings x sqrt(hidden); q/k norms, values RMS-normed, attention scale 1; sliding layers with their own head
# width and RoPE base; final logit softcapping. A layer without router tensors runs its dense MLP alone.
ARCHITECTURES["gemma4_text"] = GGUFArchitecture(
    name="gemma4", renormalizes=True, ffn_norm="FFN_PRE_NORM", layer_tensors=_GEMMA4_LAYER_TENSORS,
    per_layer_attention=True, fp16_activation=True,
    unread="Gemma 4's per-layer attention, dense MLP beside the experts and router scales",
)


def host_named(model_type: str, name: str) -> GGUFArchitecture:
    """The host of `model_type` whose general.architecture is `name` (its own, or its padded one)."""
    architecture = ARCHITECTURES[model_type]
    padded = architecture.padded_host
    return padded if padded is not None and padded.name == name else architecture
