"""How each HF model_type's attention is lowered: the ONNX backend's one family table.

Everything else the exporter needs (norms, routers, experts, shared experts,
dense layers, routing rule, a q/k/v clamp, multi-head latent attention and its
sizes) comes from the adapter's views (moeexport.adapters.views). What differs
between families and is not in their config is inside attention:
- RoPE pairs: `half` rotates dimension i with i + d/2 (HF rotate_half, cos/sin
  repeated twice); `interleaved` rotates (2i, 2i+1) as complex numbers (DeepSeek).
- q/k norms: none, per head (Qwen3), or over the whole projection (OLMoE); a
  model without q_norm / k_norm modules (GLM-4.5 with use_qk_norm off) has none.
- Partial rotary (GLM-4.5: the config's rotary_dim) rotates only the leading
  dims of each head, in the layout's pair style; the rest pass unrotated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class AttentionLayout:
    rope: Literal["half", "interleaved"] = "half"
    qk_norm: Literal["none", "per_head", "full"] = "none"
    # A decoder layer with a dense MLP beside the experts (Gemma 4): the modules of its roles, dotted paths inside
    # the layer (post_attention_norm, dense_mlp, dense_post_norm, experts_post_norm, ffn_post_norm, router_scale,
    # expert_scale, layer_scale). Its attention: per-head q/k norms, values RMS-normed without a weight (the keys
    # before their norm where there is no v_proj), each layer type (sliding, full) its own head width and RoPE.
    layer_modules: tuple[tuple[str, str], ...] = ()


ARCHITECTURES = {
    "mixtral": AttentionLayout(),
    "qwen2_moe": AttentionLayout(),
    "qwen3_moe": AttentionLayout(qk_norm="per_head"),
    "olmoe": AttentionLayout(qk_norm="full"),
    "deepseek_v2": AttentionLayout(rope="interleaved"),
    # q/k/v/o biases, attention sinks and per-layer sliding windows come from the modules and the config
    "gpt_oss": AttentionLayout(),
    # HF's rope_interleave (the default) rotates interleaved pairs; the decoder takes `half` when it is false
    "deepseek_v3": AttentionLayout(rope="interleaved"),
    "glm4_moe_lite": AttentionLayout(rope="interleaved"),
    "glm4_moe": AttentionLayout(qk_norm="per_head"),  # the norms only where use_qk_norm builds them
    "ernie4_5_moe": AttentionLayout(rope="interleaved"),  # HF ERNIE rotates pairs (2i, 2i+1)
}

# Gemma 4's decoder layer: attention between an input and a post-attention norm; then a GELU-tanh dense MLP and
# the experts (the router on the residual, the experts on their own norm of it) side by side, each post-normed,
# summed and post-normed again; the layer's output times its scalar
ARCHITECTURES["gemma4_text"] = AttentionLayout(qk_norm="per_head", layer_modules=(
    ("post_attention_norm", "post_attention_layernorm"), ("dense_mlp", "mlp"),
    ("dense_post_norm", "post_feedforward_layernorm_1"), ("experts_post_norm", "post_feedforward_layernorm_2"),
    ("ffn_post_norm", "post_feedforward_layernorm"), ("router_scale", "router.scale"),
    ("expert_scale", "router.per_expert_scale"), ("layer_scale", "layer_scalar"),
))
