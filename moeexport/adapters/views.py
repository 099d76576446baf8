"""What an adapter hands out: typed views of a model, so nothing outside the adapters spells a family's names.

`ModelView` and `LayerView` (`model_view`, `layer_view`) hold the modules
themselves: the attention, norms, router, experts and shared experts of one
decoder layer, already found, so no caller walks attribute names. (The config
under canonical names, `ModelConfig`, is plain data: declaration.py.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moeexport.adapters.declaration import ExpertLayout, LayerKind


@dataclass(frozen=True)
class ModelView:
    """The modules around the decoder layers."""

    embeddings: nn.Embedding
    rotary_embedding: nn.Module | None  # module(x, position_ids) -> (cos, sin), or complex freqs; None: NoPE
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
    experts: nn.Module | None = None  # gate_up_proj and down_proj, stored as `layout` says
    shared_experts: tuple[nn.Module, ...] = ()  # always-on SwiGLU MLPs present in this layer
    shared_expert_gate: nn.Module | None = None  # a sigmoid gate scaling the shared experts' output
    layout: ExpertLayout = ExpertLayout()  # how the routed experts are stored and what they compute
    selection_bias: torch.Tensor | None = None  # [E], added to the routing scores to choose the k, if the family has one
    router_weight: torch.Tensor | None = None  # the router's [E, hidden] matrix (router.weight unless declared)
    configured_top_k: int = 0  # the config's top-k, for a router that keeps none of its own (it reads the config)
    router_returns_probabilities: bool = False  # router(x)[0] is its softmax scores rather than its logits
    experts_norm: nn.Module | None = None  # a norm that the experts' input has and the router's does not

    @property
    def num_experts(self) -> int:
        return self.router_weight.shape[0] if self.router is not None else 0

    @property
    def top_k(self) -> int:
        return getattr(self.router, "top_k", self.configured_top_k) if self.router is not None else 0
