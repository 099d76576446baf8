"""Tiny random-weight models of every supported family, built in the tests."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moeexport.modelio import EXPERTS_IMPLEMENTATION

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# One entry per registered family; test_adapters checks that the two lists agree.
TINY_CONFIGS = {
    "mixtral": dict(num_local_experts=4),
    "qwen2_moe": dict(
        num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=40, mlp_only_layers=[1],
        norm_topk_prob=False,
    ),
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=24, norm_topk_prob=True),
    "olmoe": dict(num_experts=4, norm_topk_prob=False, num_key_value_heads=4),  # OLMoE has no GQA
    "deepseek_v2": dict(
        n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=24, first_k_dense_replace=1,
        num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=8, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
    ),
    # layers alternate sliding / full attention; the window is shorter than the tests' token windows; YaRN as
    # the hub's gpt-oss-20b config has it (a smaller original context), but with the correction range rounded
    # to whole dimensions (truncate: true), as llama.cpp always rounds it (tests/test_family_gpt_oss.py)
    "gpt_oss": dict(
        num_local_experts=4, intermediate_size=24, head_dim=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": True, "original_max_position_embeddings": 64},
    ),
    # 2 groups of 4, the best 1 taken: groups matter; Expert Drop keeps an even number, at least 2 per group
    "deepseek_v3": dict(
        n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=24, first_k_dense_replace=1,
        num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=8, n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
    ),
    "glm4_moe_lite": dict(  # one group, as GLM-4.7-Flash; its first layer dense (mlp_layer_types' default)
        n_routed_experts=6, n_shared_experts=1, moe_intermediate_size=24, num_key_value_heads=4, kv_lora_rank=16,
        q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=1.8,
    ),
    # q/k/v biases, per-head q/k norms, half the head rotated, a scale on the routed weights
    "glm4_moe": dict(
        n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=24, first_k_dense_replace=1,
        n_group=1, topk_group=1, routed_scaling_factor=1.5, norm_topk_prob=True, attention_bias=True,
        use_qk_norm=True, partial_rotary_factor=0.5,
    ),
    # a leading dense layer; tied embeddings as in ERNIE-4.5-21B-A3B. (llama.cpp's converter takes the shared
    # experts' width as intermediate_size // num_key_value_heads, which these sizes keep true: 48 // 2 = 24 x 1)
    "ernie4_5_moe": dict(
        moe_num_experts=4, moe_intermediate_size=24, moe_num_shared_experts=1, moe_layer_start_index=1,
        moe_layer_end_index=-1, moe_layer_interval=1, use_bias=False,
    ),
    # one block per layer as Nemotron-3-Nano's pattern (Mamba-2, MoE, NoPE attention, MoE); its router is
    # DeepSeek-V3's (one group, renormalized, scaled); chunk_size shorter than the tests' windows, so the Mamba
    # scan crosses chunks; a Mamba inner width of 64, the head size llama.cpp's converter assumes. (layers_block_type
    # sets the layer count; num_hidden_layers is ignored)
    "nemotron_h": dict(
        layers_block_type=["linear_attention", "moe", "full_attention", "moe"], n_routed_experts=4,
        n_shared_experts=1, moe_intermediate_size=24, moe_shared_expert_intermediate_size=40, head_dim=8,
        mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=8, conv_kernel=4, chunk_size=16,
        n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
    ),
    # Gemma 4 MoE (the text model): three sliding-window layers and a full-attention one (the last must be), whose
    # heads are twice as wide, with one kv head that is also the values (attention_k_eq_v, as 26B-A4B) and
    # proportional RoPE over a quarter of them; no per-layer inputs, as the MoE checkpoints; logit softcapping
    "gemma4_text": dict(
        num_experts=4, top_k_experts=2, moe_intermediate_size=24, enable_moe_block=True, head_dim=16,
        global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=8,
        layer_types=["sliding_attention"] * 3 + ["full_attention"], hidden_size_per_layer_input=0,
        final_logit_softcapping=30.0,
    ),
    # Qwen3.5-MoE's text model: layers 0-2 Gated DeltaNet, 3 gated full attention (a quarter of each head
    # rotated); more DeltaNet value heads than key heads (the hub's 32 / 16), key and value heads equally wide
    # (llama.cpp's qwen35moe needs that)
    "qwen3_5_moe_text": dict(
        num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=40, head_dim=16,
        linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
        linear_num_value_heads=4, full_attention_interval=4,
        # M-RoPE sections over the 2 rotated pairs (llama.cpp needs them to fit; the hub's [11, 11, 10] fill 32)
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [1, 1, 0]},
    ),
}
FAMILIES = sorted(TINY_CONFIGS)


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A small random model whose routers are sharp enough that every expert is used."""
    config = AutoConfig.for_model(model_type, **(COMMON | TINY_CONFIGS[model_type] | overrides))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, experts_implementation=EXPERTS_IMPLEMENTATION)
    for name, parameter in model.named_parameters():
        if "norm" not in name:
            torch.nn.init.normal_(parameter, std=0.2 if name.endswith("gate.weight") else 0.05)
    for name, parameter in model.named_parameters():  # Gemma 4's router scales: near one, each its own
        if name.endswith(("router.scale", "router.per_expert_scale")):
            parameter.data = 1 + 0.2 * torch.randn_like(parameter)
        elif name.endswith("router.proj.weight"):
            torch.nn.init.normal_(parameter, std=2.0)  # sharp after the router's norm and hidden^-1/2
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # a selection bias left at zero would never matter
            buffer.normal_(std=0.1)
    model.eval().requires_grad_(False)
    return model


def random_tokens(count: int = 4, length: int = 24, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (count, length), generator=generator)
