"""The supported families: one declaration each, registered by HF model_type.

This is the only file that knows a family's config keys and quirks; module
names that differ from the transformers 5 defaults in `Family` would be
spelled out here too.
"""

from __future__ import annotations

from dataclasses import replace

from moeexport.adapters.declaration import (CLAMPED_SWIGLU, NOAUX_TC, SIGMOID, ExpertLayout, FFNWidths, Family,
                                            LatentAttention, LinearAttention, MambaSizes, ModelConfig, Routing)
from moeexport.adapters.registry import register
from moeexport.errors import MoeExportError


def _renormalize_if_configured(config) -> Routing:
    return Routing(renormalize=bool(getattr(config, "norm_topk_prob", False)))


def _qwen2_routing(config) -> Routing:
    """Qwen2-MoE's shared expert is scaled by a sigmoid gate of its own."""
    return replace(_renormalize_if_configured(config), shared_expert_gate=True)


def _renumber_mlp_only_layers(config, kept: list[int]) -> None:
    """Qwen MoE names dense layers by index (mlp_only_layers) and by a stride
    (decoder_sparse_step); after Block Drop the survivors keep their own kind,
    so both become one explicit list over the new indices."""
    step = getattr(config, "decoder_sparse_step", 1)
    dense = set(getattr(config, "mlp_only_layers", []) or [])
    old_dense = [old for old in kept if old in dense or (old + 1) % step != 0]
    config.mlp_only_layers = [kept.index(old) for old in old_dense]
    config.decoder_sparse_step = 1


def _renumber_leading_dense(config, kept: list[int]) -> None:
    """DeepSeek's dense layers are the first `first_k_dense_replace`; dropping one shrinks the prefix."""
    config.first_k_dense_replace = sum(1 for old in kept if old < config.first_k_dense_replace)


def _deepseek_routing(config) -> Routing:
    """Softmax -> top-k -> x routed_scaling_factor; with topk_method group_limited_greedy, within the topk_group
    expert groups (of n_group) whose best expert scores highest."""
    grouped = config.topk_method == "group_limited_greedy"
    return Routing(renormalize=False, scale=float(config.routed_scaling_factor), method=config.topk_method,
                   groups=config.n_group if grouped else 1, top_groups=config.topk_group if grouped else 1,
                   group_score="max")


def _deepseek_latent_attention(config) -> LatentAttention:
    return LatentAttention(
        q_lora_rank=config.q_lora_rank,
        kv_lora_rank=config.kv_lora_rank,
        qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim,
        v_head_dim=config.v_head_dim,
        rope_interleaved=getattr(config, "rope_interleave", True),  # DeepSeek-V3's option; V2 always interleaves
    )


def _deepseek_group_routing_blocks_resize(config) -> str | None:
    if config.topk_method != "greedy":
        return (
            f"this DeepSeek model routes with topk_method={config.topk_method!r} over expert groups, "
            "which a change of expert count would break; use Block Drop or Layer Drop instead of "
            "Expert Drop for it"
        )
    return None


def _qwen_config_values(config: ModelConfig, widths: FFNWidths) -> dict:
    values = {"moe_intermediate_size": widths.expert, "norm_topk_prob": config.routing.renormalize,
              "mlp_only_layers": list(widths.dense_layers), "decoder_sparse_step": 1}
    if widths.shared:
        values["shared_expert_intermediate_size"] = widths.shared
    return values


def _deepseek_config_values(config: ModelConfig, widths: FFNWidths) -> dict:
    latent = config.latent
    return {
        "moe_intermediate_size": widths.expert,
        "n_shared_experts": config.shared_expert_count,
        "first_k_dense_replace": len(widths.dense_layers),
        "routed_scaling_factor": config.routing.scale,
        "norm_topk_prob": config.routing.renormalize,
        "topk_method": "greedy", "n_group": 1, "topk_group": 1,
        "q_lora_rank": latent.q_lora_rank,
        "kv_lora_rank": latent.kv_lora_rank,
        "qk_nope_head_dim": latent.qk_nope_head_dim,
        "qk_rope_head_dim": latent.qk_rope_head_dim,
        "v_head_dim": latent.v_head_dim,
    }


MIXTRAL = register(
    Family(
        model_type="mixtral",
        family="Mixtral",
        num_experts_key="num_local_experts",
        routing=lambda config: Routing(renormalize=True),
        own_config_values=lambda config, widths: {"intermediate_size": widths.expert},  # experts use it
    )
)

QWEN2_MOE = register(
    Family(
        model_type="qwen2_moe",
        family="Qwen2-MoE / Qwen1.5-MoE",
        num_experts_key="num_experts",
        routing=_qwen2_routing,
        shared_experts=("shared_expert",),
        shared_expert_gate="shared_expert_gate",
        renumber_dense_layers=_renumber_mlp_only_layers,
        own_config_values=_qwen_config_values,
    )
)

QWEN3_MOE = register(
    Family(
        model_type="qwen3_moe",
        family="Qwen3-MoE",
        num_experts_key="num_experts",
        routing=_renormalize_if_configured,
        renumber_dense_layers=_renumber_mlp_only_layers,
        own_config_values=_qwen_config_values,
    )
)

OLMOE = register(
    Family(
        model_type="olmoe",
        family="OLMoE",
        num_experts_key="num_experts",
        routing=_renormalize_if_configured,
        clip_qkv_key="clip_qkv",
        own_config_values=lambda config, widths: {"intermediate_size": widths.expert,  # experts use it
                                                  "norm_topk_prob": config.routing.renormalize},
    )
)

DEEPSEEK_V2 = register(
    Family(
        model_type="deepseek_v2",
        family="DeepSeek-MoE (V2 / V2-Lite: leading dense layers, shared experts)",
        num_experts_key="n_routed_experts",
        routing=_deepseek_routing,
        shared_experts=("shared_experts",),
        shared_expert_count_key="n_shared_experts",  # one module holds them all, n_shared_experts wide
        latent_attention=_deepseek_latent_attention,
        renumber_dense_layers=_renumber_leading_dense,
        expert_count_change_blocker=_deepseek_group_routing_blocks_resize,
        own_config_values=_deepseek_config_values,
    )
)


# --- gpt-oss -------------------------------------------------------------------------------------------------------

def _gpt_oss_expert_layout(config) -> ExpertLayout:
    """transformers' GptOssExperts: gate_up_proj [E, hidden, 2*ffn] applied as x @ W, gate and up columns
    alternating, biases beside both stacks, the clamped SwiGLU of config.swiglu_alpha / swiglu_limit."""
    return ExpertLayout(activation=CLAMPED_SWIGLU, interleaved=True, transposed=True, biases=True,
                        alpha=float(config.swiglu_alpha), limit=float(config.swiglu_limit))


def _gpt_oss_config_values(config: ModelConfig, widths: FFNWidths) -> dict:
    return {"intermediate_size": widths.expert,  # the experts use it
            "swiglu_alpha": config.experts.alpha, "swiglu_limit": config.experts.limit}


GPT_OSS = register(
    Family(
        model_type="gpt_oss",
        family="gpt-oss",
        num_experts_key="num_local_experts",
        # top-k of the router's logits (with its bias), then a softmax over those k
        routing=lambda config: Routing(renormalize=False, softmax_over_top_k=True, router_bias=True),
        expert_layout=_gpt_oss_expert_layout,
        router="router",
        router_tensors=("weight", "bias"),
        moe_returns_router_scores=True,
        own_config_values=_gpt_oss_config_values,
    )
)


# --- DeepSeek-V3 and GLM-4.7-Flash (llama.cpp deepseek2): sigmoid scores, a selection-only bias, expert groups ---

def _noaux_tc_routing(config) -> Routing:
    """DeepSeek-V3's router ("noaux_tc"): sigmoid scores; the k chosen on score + e_score_correction_bias, only
    within the topk_group best of n_group equal expert groups (a group scores the sum of its best two choice
    scores); weighed by the scores alone, renormalized if norm_topk_prob, x routed_scaling_factor."""
    return Routing(renormalize=bool(config.norm_topk_prob), scale=float(config.routed_scaling_factor),
                   method=NOAUX_TC, scores=SIGMOID, selection_bias=True, groups=config.n_group or 1,
                   top_groups=config.topk_group or 1, group_score="top2_sum")


def _noaux_tc_config_values(config: ModelConfig, widths: FFNWidths) -> dict:
    """What DeepSeek-V3 and GLM-4.7-Flash share: experts, routing and latent attention sizes."""
    latent, routing = config.latent, config.routing
    return {
        "moe_intermediate_size": widths.expert,
        "n_shared_experts": config.shared_expert_count,
        "routed_scaling_factor": routing.scale,
        "norm_topk_prob": routing.renormalize,
        "n_group": routing.groups, "topk_group": routing.top_groups,
        "q_lora_rank": latent.q_lora_rank,
        "kv_lora_rank": latent.kv_lora_rank,
        "qk_nope_head_dim": latent.qk_nope_head_dim,
        "qk_rope_head_dim": latent.qk_rope_head_dim,
        "v_head_dim": latent.v_head_dim,
    }


def _deepseek_v3_config_values(config: ModelConfig, widths: FFNWidths) -> dict:
    return _noaux_tc_config_values(config, widths) | {"first_k_dense_replace": len(widths.dense_layers)}


def _glm4_moe_lite_config_values(config: ModelConfig, widths: FFNWidths) -> dict:
    dense = set(widths.dense_layers)
    kinds = ["dense" if layer in dense else "sparse" for layer in range(widths.layers)]
    return _noaux_tc_config_values(config, widths) | {"mlp_layer_types": kinds}


def _noaux_tc_with_latent_attention(**declared) -> Family:
    """A family with DeepSeek-V3's router (sigmoid scores, the selection bias, groups), its shared experts and
    multi-head latent attention, under DeepSeek-V3's module names and config keys."""
    return Family(
        num_experts_key="n_routed_experts",
        routing=_noaux_tc_routing,
        router_tensors=("weight", "e_score_correction_bias"),
        selection_bias="e_score_correction_bias",
        shared_experts=("shared_experts",),
        shared_expert_count_key="n_shared_experts",
        latent_attention=_deepseek_latent_attention,
        **declared,
    )


DEEPSEEK_V3 = register(
    _noaux_tc_with_latent_attention(
        model_type="deepseek_v3",
        family="DeepSeek-V3 / R1 (sigmoid routing with a selection bias, expert groups, MLA)",
        renumber_dense_layers=_renumber_leading_dense,
        own_config_values=_deepseek_v3_config_values,
    )
)

GLM4_MOE_LITE = register(
    _noaux_tc_with_latent_attention(
        model_type="glm4_moe_lite",
        family="GLM-4.7-Flash (DeepSeek-V3 routing and MLA; dense layers named by mlp_layer_types)",
        # mlp_layer_types lists every layer's kind: Block Drop's per-layer lists follow their layers already
        own_config_values=_glm4_moe_lite_config_values,
    )
)


# --- GLM-4.5 / 4.6 (glm4_moe) and ERNIE-4.5-MoE (ernie4_5_moe) ---------------------------------------------------


def _glm4_moe_config_values(config: ModelConfig, widths: FFNWidths) -> dict:
    values = {
        "moe_intermediate_size": widths.expert,
        "n_shared_experts": config.shared_expert_count,
        "first_k_dense_replace": len(widths.dense_layers),
        "routed_scaling_factor": config.routing.scale,
        "norm_topk_prob": config.routing.renormalize,
        "n_group": config.routing.groups, "topk_group": config.routing.top_groups,
        "num_nextn_predict_layers": 0,  # moeexport writes and reads no next-token-prediction layers
        "attention_bias": config.qkv_bias, "use_qk_norm": config.qk_norm,
    }
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rotary_dim is not None:
        rope["partial_rotary_factor"] = config.rotary_dim / config.head_dim
    return values | {"rope_parameters": rope}


def _ernie_routing(config) -> Routing:
    """Softmax scores; the k chosen on scores + moe_statics.e_score_correction_bias, weighed by the unbiased
    scores renormalized (transformers' Ernie4_5_MoeTopKRouter; its moe_norm_min only keeps the divisor above
    1e-12, which k softmax scores never fall to)."""
    return Routing(renormalize=True, selection_bias=True)


def _ernie_moe_layers(start: int, end: int, interval: int, count: int) -> list[bool]:
    """Which of `count` layers transformers builds with experts (Ernie4_5_MoeDecoderLayer's rule)."""
    return [(i + 1) % interval == 0 and start <= i <= end for i in range(count)]


def _renumber_ernie_moe_layers(config, kept: list[int]) -> None:
    """ERNIE places its MoE layers by moe_layer_start_index / end_index / interval. After Block Drop each survivor
    keeps its kind, so the three keys are rewritten to the rule that gives the survivors' kinds (with interval 1,
    as every released ERNIE-4.5-MoE has, always one); a pattern no such rule gives is refused."""
    old = _ernie_moe_layers(config.moe_layer_start_index, config.moe_layer_end_index, config.moe_layer_interval,
                            config.num_hidden_layers)
    wanted = [old[i] for i in kept]
    moe = [i for i, is_moe in enumerate(wanted) if is_moe]
    end = moe[-1] if moe else -1
    for interval in range(1, len(wanted) + 1):
        for start in range(len(wanted) + 1):
            if _ernie_moe_layers(start, end, interval, len(wanted)) == wanted:
                config.moe_layer_start_index, config.moe_layer_end_index = start, end
                config.moe_layer_interval = interval
                return
    raise MoeExportError(
        f"after this Block Drop the MoE layers {moe} of {len(wanted)} follow no start/end/interval rule that "
        "ERNIE-4.5's config can state; drop other blocks (or keep the interval's pattern)"
    )


def _ernie_config_values(config: ModelConfig, widths: FFNWidths) -> dict:
    return {
        "moe_intermediate_size": widths.expert,
        "moe_num_shared_experts": config.shared_expert_count,
        "moe_layer_start_index": len(widths.dense_layers),  # a leading dense run, as GGUF hosts hold them
        "moe_layer_end_index": -1,  # transformers reads -1 as the last layer
        "moe_layer_interval": 1,
        "use_bias": False,
    }


GLM4_MOE = register(
    Family(
        model_type="glm4_moe",
        family="GLM-4.5 / GLM-4.6 (sigmoid routing with a selection bias, shared experts, leading dense layers)",
        num_experts_key="n_routed_experts",
        routing=_noaux_tc_routing,  # Glm4MoeTopkRouter is DeepSeek-V3's router
        router_tensors=("weight", "e_score_correction_bias"),
        selection_bias="e_score_correction_bias",  # a buffer [E]
        shared_experts=("shared_experts",),
        shared_expert_count_key="n_shared_experts",  # one module holds them all, n_shared_experts wide
        renumber_dense_layers=_renumber_leading_dense,
        own_config_values=_glm4_moe_config_values,
    )
)

ERNIE4_5_MOE = register(
    Family(
        model_type="ernie4_5_moe",
        family="ERNIE-4.5-MoE (softmax routing with a selection bias, shared experts, dense layers)",
        num_experts_key="moe_num_experts",
        top_k_key="moe_k",
        routing=_ernie_routing,
        router_tensors=("weight", "moe_statics.e_score_correction_bias"),
        selection_bias="moe_statics.e_score_correction_bias",  # a parameter [1, E]
        shared_experts=("shared_experts",),
        shared_expert_count_key="moe_num_shared_experts",  # one module holds them all; 0: none (shared_experts None)
        renumber_dense_layers=_renumber_ernie_moe_layers,
        own_config_values=_ernie_config_values,
    )
)


# --- Nemotron-H MoE (Nemotron-3-Nano; llama.cpp nemotron_h_moe): one block per layer, Mamba-2, attention or MoE ---

# transformers' layers_block_type -> the token mixer of that layer ("moe" and "mlp" blocks are a feed-forward alone)
_NEMOTRON_H_MIXERS = {"linear_attention": "mamba", "full_attention": "attention", "moe": "none", "mlp": "none"}


def _nemotron_h_layer_mixers(config) -> tuple:
    return tuple(_NEMOTRON_H_MIXERS[kind] for kind in config.layers_block_type)


def _nemotron_h_expert_layout(config) -> ExpertLayout:
    """NemotronHExperts: ungated, down(relu2(up x)) with up_proj [E, ffn, hidden]; a latent projection around the
    experts (moe_latent_size) is not supported."""
    if getattr(config, "moe_latent_size", None) is not None:
        raise MoeExportError(f"Nemotron-H with moe_latent_size={config.moe_latent_size} (experts in a latent "
                             "space) is not supported; only checkpoints without moe_latent_size are")
    return ExpertLayout(activation=config.mlp_hidden_act, gated=False)


def _nemotron_h_mamba_sizes(config) -> MambaSizes:
    return MambaSizes(conv_kernel=config.conv_kernel, inner=config.mamba_num_heads * config.mamba_head_dim,
                      state=config.ssm_state_size, heads=config.mamba_num_heads, groups=config.n_groups)


def _nemotron_h_config_values(config: ModelConfig, widths: FFNWidths) -> dict:
    routing = config.routing
    return {"moe_intermediate_size": widths.expert, "moe_shared_expert_intermediate_size": widths.shared,
            "n_shared_experts": config.shared_expert_count, "routed_scaling_factor": routing.scale,
            "norm_topk_prob": routing.renormalize, "n_group": routing.groups, "topk_group": routing.top_groups,
            "layer_norm_epsilon": config.rms_norm_eps, "mlp_hidden_act": config.experts.activation}


NEMOTRON_H = register(
    Family(
        model_type="nemotron_h",
        family="Nemotron-H MoE / Nemotron-3-Nano (Mamba-2, attention and MoE blocks; ReLU² experts, sigmoid routing "
               "with a selection bias, a shared expert)",
        num_experts_key="n_routed_experts",
        routing=_noaux_tc_routing,  # NemotronHTopkRouter is DeepSeek-V3's router
        expert_layout=_nemotron_h_expert_layout,
        embeddings="model.embeddings",
        final_norm="model.norm_f",
        rotary_embedding="",  # no positional rotation anywhere (NoPE attention)
        # each layer is one block: a norm, then its mixer (Mamba-2, attention, the MoE or a dense MLP)
        attention="mixer",
        attention_norm="norm",
        moe="mixer",
        moe_norm="norm",
        router_tensors=("weight", "e_score_correction_bias"),
        selection_bias="e_score_correction_bias",  # a buffer [E]
        shared_experts=("shared_experts",),
        shared_expert_count_key="n_shared_experts",  # one module, moe_shared_expert_intermediate_size wide
        layer_mixers=_nemotron_h_layer_mixers,
        # layers_block_type lists every layer's kind: Block Drop's per-layer lists follow their layers already
        own_config_values=_nemotron_h_config_values,
        rms_norm_eps_key="layer_norm_epsilon",
        hidden_act_key="mlp_hidden_act",
        mamba_sizes=_nemotron_h_mamba_sizes,
    )
)


# --- Gemma 4 MoE (gemma4_text: the text model, Gemma4ForCausalLM) -------------------------------------------------


def _gemma4_routing(config) -> Routing:
    """Gemma4TextRouter: a scale-less RMSNorm of the layer's input x scale x hidden^-1/2 -> linear -> softmax ->
    top-k, renormalized, x the chosen experts' per_expert_scale; a dense MLP runs beside the experts."""
    return Routing(renormalize=True, dense_mlp_beside=True, per_expert_scale=True)


def _gemma4_expert_layout(config) -> ExpertLayout:
    return ExpertLayout(activation=config.hidden_activation)


def _renumber_gemma4_layers(config, kept: list[int]) -> None:
    """Gemma 4's full-attention layers override head_dim (and kv heads) in per_layer_config, keyed by layer index:
    after Block Drop the survivors keep their own."""
    if kept and config.layer_types[-1] != "full_attention":  # (the per-layer lists are renumbered already)
        raise MoeExportError(f"Gemma 4 ends in a full-attention layer (transformers turns a sliding last layer into "
                             f"one), and this Block Drop would end it in sliding layer {kept[-1]}: keep the last layer")
    overrides = {int(layer): values for layer, values in config.to_dict().get("per_layer_config", {}).items()}
    config.per_layer_config = {new: overrides[old] for new, old in enumerate(kept) if old in overrides}


def _gemma4_not_moe(config) -> str | None:
    if not getattr(config, "enable_moe_block", False):
        return "this Gemma 4 model has no experts (enable_moe_block is false): moeexport compresses the MoE variant"
    return None


GEMMA4 = register(
    Family(
        model_type="gemma4_text",
        family="Gemma 4 MoE (a dense MLP beside the experts, a normed and scaled router, sliding-window attention)",
        num_experts_key="num_experts",
        top_k_key="top_k_experts",
        routing=_gemma4_routing,
        expert_layout=_gemma4_expert_layout,
        moe="",  # the decoder layer itself holds the router and the experts, beside its dense `mlp`
        moe_norm="pre_feedforward_layernorm",  # its input is the residual the router reads
        router="router",
        router_weight="proj.weight",
        router_tensors=("proj.weight", "per_expert_scale"),  # per_expert_scale goes with its expert
        router_returns_probabilities=True,
        experts_norm="pre_feedforward_layernorm_2",
        hidden_act_key="hidden_activation",
        # Layer Drop leaves a dense Gemma 4 layer: its MLP, pre- and post-feed-forward norms (llama.cpp's gemma4
        # runs a layer without router tensors so)
        moe_modules=("router", "experts", "pre_feedforward_layernorm_2", "post_feedforward_layernorm_1",
                     "post_feedforward_layernorm_2"),
        moe_switch="enable_moe_block",
        router_reads_config_top_k=True,  # Gemma4TextRouter takes config.top_k_experts
        embedding_scale=lambda config: config.hidden_size ** 0.5,  # Gemma4TextScaledWordEmbedding's embed_scale
        blocks_kept=lambda config: (config.num_hidden_layers - 1,),
        renumber_dense_layers=_renumber_gemma4_layers,
        expert_count_change_blocker=_gemma4_not_moe,
    )
)


# --- Qwen3.5 / 3.6-MoE (qwen3_5_moe's text model): Gated DeltaNet and gated full attention, a gated shared expert ---


def _qwen3_5_layer_mixers(config) -> tuple:
    """layer_types: "linear_attention" (Gated DeltaNet) or "full_attention" (three of every four are linear)."""
    return tuple("linear_attention" if kind == "linear_attention" else "attention" for kind in config.layer_types)


def _qwen3_5_linear_attention(config) -> LinearAttention:
    return LinearAttention(conv_kernel=config.linear_conv_kernel_dim, key_head_dim=config.linear_key_head_dim,
                           value_head_dim=config.linear_value_head_dim, key_heads=config.linear_num_key_heads,
                           value_heads=config.linear_num_value_heads)


QWEN3_5_MOE = register(
    Family(
        model_type="qwen3_5_moe_text",
        family="Qwen3.5 / 3.6-MoE (Gated DeltaNet + gated attention, a sigmoid-gated shared expert)",
        num_experts_key="num_experts",
        # Qwen3_5MoeTopKRouter: softmax -> top-k -> always renormalized
        routing=lambda config: Routing(renormalize=True, shared_expert_gate=True),
        shared_experts=("shared_expert",),
        shared_expert_gate="shared_expert_gate",
        layer_mixers=_qwen3_5_layer_mixers,
        mixer_modules=(("linear_attention", "linear_attn"),),
        linear_attention=_qwen3_5_linear_attention,
        intermediate_size_key="moe_intermediate_size",  # no dense MLP: every layer is MoE
        norm_weight_offset=1.0,  # Qwen3_5MoeRMSNorm scales by 1 + weight (not the DeltaNet's gated norm)
    )
)
