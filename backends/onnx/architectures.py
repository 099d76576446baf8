"""How each HF model_type's attention is lowered: the ONNX backend's one family table.

Everything else the exporter needs (norms, routers, experts, shared experts,
dense layers, routing rule) comes from the adapters and the modules themselves.
What differs between families is inside attention:
- RoPE pairs: `half` rotates dimension i with i + d/2 (HF rotate_half, cos/sin
  repeated twice); `interleaved` rotates (2i, 2i+1) as complex numbers (DeepSeek).
- q/k norms: none, per head (Qwen3), or over the whole projection (OLMoE).
- multi-head latent attention (DeepSeek-V2): the cache holds the normalized
  kv latent and the rotated shared key, as transformers' cache does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class AttentionLayout:
    rope: Literal["half", "interleaved"] = "half"
    qk_norm: Literal["none", "per_head", "full"] = "none"
    clip_qkv: bool = False  # clamp q, k, v to ±config.clip_qkv when set (OLMoE)
    latent: bool = False  # DeepSeek-V2 multi-head latent attention


ARCHITECTURES = {
    "mixtral": AttentionLayout(),
    "qwen2_moe": AttentionLayout(),
    "qwen3_moe": AttentionLayout(qk_norm="per_head"),
    "olmoe": AttentionLayout(qk_norm="full", clip_qkv=True),
    "deepseek_v2": AttentionLayout(rope="interleaved", latent=True),
}
