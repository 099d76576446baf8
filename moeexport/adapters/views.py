"""What an adapter hands out: typed views of a model, so nothing outside the adapters spells a family's names.

`ModelConfig` is the config under canonical names (from `MoEAdapter.model_config`):
passes and backends read `top_k` or `latent.kv_lora_rank`, never `num_experts_per_tok`
or `config.kv_lora_rank`. `ModelView` and `LayerView` (`model_view`, `layer_view`) hold
the modules themselves: the attention, norms, router, experts and shared experts of
one decoder layer, already found, so no caller walks attribute names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

LayerKind = Literal["moe", "dense", "dropped"]


@dataclass(frozen=True)
class Routing:
    """How a family turns router logits into expert weights."""

    renormalize: bool  # softmax -> top-k -> renormalize the k weights (Mixtral) or not (OLMoE)
    scale: float = 1.0  # multiplier on the routed weights (DeepSeek's routed_scaling_factor)
    method: str = "greedy"  # top-k over all experts; DeepSeek may instead pick within expert groups


@dataclass(frozen=True)
class LatentAttention:
    """Multi-head latent attention sizes (DeepSeek-V2): q and kv go through low-rank latents."""

    q_lora_rank: int | None  # None: q is one full projection (the "Lite" models)
    kv_lora_rank: int  # width of the cached kv latent
    qk_nope_head_dim: int  # per-head q/k width without RoPE
    qk_rope_head_dim: int  # per-head q/k width with RoPE (the rotated key is shared by all heads)
    v_head_dim: int


@dataclass(frozen=True)
class ModelConfig:
    """The config facts passes and backends use, under one spelling for every family."""

    model_type: str
    name_or_path: str  # the checkpoint directory (tokenizer files live there), "" when unknown
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # the dense MLP width (in an all-MoE family, the expert width)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    context_length: int  # max_position_embeddings
    rms_norm_eps: float
    rope_theta: float
    hidden_act: str
    num_experts: int  # routed experts per MoE layer (the largest, once layers differ)
    top_k: int
    routing: Routing
    shared_expert_count: int  # always-on experts per MoE layer (0 without any)
    clip_qkv: float | None = None  # q, k and v are clamped to +-clip_qkv (OLMoE), None: not clamped
    latent: LatentAttention | None = None  # set for families with multi-head latent attention


@dataclass(frozen=True)
class ModelView:
    """The modules around the decoder layers."""

    embeddings: nn.Embedding
    rotary_embedding: nn.Module  # module(x, position_ids) -> (cos, sin), or complex freqs
    final_norm: nn.Module
    output: nn.Linear  # the LM head
    num_layers: int


@dataclass(frozen=True)
class LayerView:
    """One decoder layer's modules, found by the adapter.

    For a dense layer `ffn` is the MLP and there is no router; for a dropped MoE
    sublayer `ffn` adds nothing and `ffn_norm` is an identity. `experts` is None
    in a MoE layer that kept no routed experts (its shared experts may still run).
    """

    index: int
    kind: LayerKind
    module: nn.Module  # the decoder layer itself
    attention: nn.Module  # with q/k/v/o projections, or the latent-attention ones
    attention_norm: nn.Module  # the norm feeding attention (input_layernorm)
    ffn_norm: nn.Module  # the norm feeding the MoE or dense sublayer (post_attention_layernorm)
    ffn: nn.Module  # the MoE block, the dense MLP, or the stand-in of a dropped sublayer
    router: nn.Module | None = None  # weight [E, hidden]; router(x) -> (logits, top-k weights, top-k index)
    experts: nn.Module | None = None  # gate_up_proj [E, 2 * ffn, hidden], down_proj [E, hidden, ffn]
    shared_experts: tuple[nn.Module, ...] = ()  # always-on SwiGLU MLPs present in this layer
    shared_expert_gate: nn.Module | None = None  # a sigmoid gate scaling the shared experts' output

    @property
    def num_experts(self) -> int:
        return self.router.weight.shape[0] if self.router is not None else 0

    @property
    def top_k(self) -> int:
        return self.router.top_k if self.router is not None else 0
