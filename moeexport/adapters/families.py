"""The supported families: one declaration each, registered by HF model_type.

This is the only file that knows a family's config keys and quirks; module
names that differ from the transformers 5 defaults in `Family` would be
spelled out here too.
"""

from __future__ import annotations

from dataclasses import replace

from moeexport.adapters.declaration import NOAUX_TC, SIGMOID, FFNWidths, Family, LatentAttention, ModelConfig, Routing
from moeexport.adapters.declaration import CLAMPED_SWIGLU, ExpertLayout  # gpt-oss
from moeexport.adapters.registry import register


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


DEEPSEEK_V3 = register(
    Family(
        model_type="deepseek_v3",
        family="DeepSeek-V3 / R1 (sigmoid routing with a selection bias, expert groups, MLA)",
        num_experts_key="n_routed_experts",
        routing=_noaux_tc_routing,
        router_tensors=("weight", "e_score_correction_bias"),
        selection_bias="e_score_correction_bias",
        shared_experts=("shared_experts",),
        shared_expert_count_key="n_shared_experts",
        latent_attention=_deepseek_latent_attention,
        renumber_dense_layers=_renumber_leading_dense,
        own_config_values=_deepseek_v3_config_values,
    )
)

GLM4_MOE_LITE = register(
    Family(
        model_type="glm4_moe_lite",
        family="GLM-4.7-Flash (DeepSeek-V3 routing and MLA; dense layers named by mlp_layer_types)",
        num_experts_key="n_routed_experts",
        routing=_noaux_tc_routing,
        router_tensors=("weight", "e_score_correction_bias"),
        selection_bias="e_score_correction_bias",
        shared_experts=("shared_experts",),
        shared_expert_count_key="n_shared_experts",
        latent_attention=_deepseek_latent_attention,
        # mlp_layer_types lists every layer's kind: Block Drop's per-layer lists follow their layers already
        own_config_values=_glm4_moe_lite_config_values,
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
