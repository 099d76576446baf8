"""How each HF model_type's attention is lowered: the ONNX backend's one family table.

Everything else the exporter needs (norms, routers, experts, shared experts,
dense layers, routing rule, a q/k/v clamp, multi-head latent attention and its
sizes) comes from the adapter's views (moeexport.adapters.views). What differs
between families and is not in their config is inside attention:
- RoPE pairs: `half` rotates dimension i with i + d/2 (HF rotate_half, cos/sin
  repeated twice); `interleaved` rotates (2i, 2i+1) as complex numbers (DeepSeek).
- q/k norms: none, per head (Qwen3), or over the whole projection (OLMoE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class AttentionLayout:
    rope: Literal["half", "interleaved"] = "half"
    qk_norm: Literal["none", "per_head", "full"] = "none"


ARCHITECTURES = {
    "mixtral": AttentionLayout(),
    "qwen2_moe": AttentionLayout(),
    "qwen3_moe": AttentionLayout(qk_norm="per_head"),
    "olmoe": AttentionLayout(qk_norm="full"),
    "deepseek_v2": AttentionLayout(rope="interleaved"),
    # HF's rope_interleave (the default) rotates interleaved pairs; the decoder takes `half` when it is false
    "deepseek_v3": AttentionLayout(rope="interleaved"),
    "glm4_moe_lite": AttentionLayout(rope="interleaved"),
    # q/k/v/o biases, attention sinks and per-layer sliding windows come from the modules and the config
    "gpt_oss": AttentionLayout(),
}
