"""What an adapter is, and the model surgery every pass shares.

An adapter is plain data: where a family keeps its decoder layers, its MoE
sublayer, router and experts, which config keys hold the expert counts, and how
it routes. transformers 5 gives every supported family the same expert layout
(router `weight` [E, hidden]; experts `gate_up_proj` [E, 2*ffn, hidden] and
`down_proj` [E, hidden, ffn]; `router(x) -> (logits, top_k_weights, top_k_index)`),
so the surgery below is written once and driven by the adapter's fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from moeexport.errors import MoeExportError

LayerKind = Literal["moe", "dense", "dropped"]


@dataclass(frozen=True)
class Routing:
    """How a family turns router logits into expert weights."""

    renormalize: bool  # softmax -> top-k -> renormalize the k weights (Mixtral) or not (OLMoE)
    scale: float = 1.0  # multiplier on the routed weights (DeepSeek's routed_scaling_factor)


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer as the passes see it."""

    kind: LayerKind
    num_experts: int = 0  # routed experts (0 for dense layers and dropped MoE sublayers)
    top_k: int = 0
    shared_experts: bool = False


def _no_dense_layer_keys(config: object, kept: list[int]) -> None:
    """Families whose dense layers are not named in the config need no rewrite."""


def _any_expert_count(config: object) -> str | None:
    return None


@dataclass(frozen=True)
class MoEAdapter:
    """Everything moeexport knows about one model family (keyed by HF model_type)."""

    model_type: str
    family: str  # human name for messages and docs
    num_experts_key: str  # config key holding the routed expert count
    routing: Callable[[object], Routing]  # config -> routing rule
    top_k_key: str = "num_experts_per_tok"
    layers: str = "model.layers"  # path from the causal LM to its decoder layers
    embeddings: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    rotary_embedding: str = "model.rotary_emb"  # module(x, position_ids) -> (cos, sin), or complex freqs
    attention: str = "self_attn"  # with q_proj, k_proj, v_proj, o_proj
    attention_norm: str = "input_layernorm"
    moe: str = "mlp"  # the MoE (or dense MLP) sublayer of a decoder layer
    moe_norm: str = "post_attention_layernorm"  # the norm feeding that sublayer
    router: str = "gate"
    experts: str = "experts"
    shared_experts: tuple[str, ...] = ()  # always-on expert modules inside the MoE block
    shared_expert_gate: str | None = None  # a sigmoid gate scaling the shared expert's output, if any
    # Rewrites the config keys that name dense layers after Block Drop (kept = surviving old indices).
    renumber_dense_layers: Callable[[object, list[int]], None] = _no_dense_layer_keys
    # An error message when the family's routing cannot survive a change of expert count.
    expert_count_change_blocker: Callable[[object], str | None] = _any_expert_count


class DroppedSublayer(nn.Module):
    """Stands in for a removed MoE sublayer: the residual stream passes through unchanged."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class NoRoutedExperts(nn.Module):
    """The experts of a layer that kept none: the routed part adds nothing.

    (transformers' fused expert kernels cannot take an expert count of zero.)
    """

    num_experts = 0

    def forward(self, hidden_states: torch.Tensor, top_k_index, top_k_weights) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def get_path(root: nn.Module, dotted: str) -> nn.Module:
    for name in dotted.split("."):
        root = getattr(root, name)
    return root


def decoder_layers(adapter: MoEAdapter, model: nn.Module) -> nn.ModuleList:
    return get_path(model, adapter.layers)


def moe_block(adapter: MoEAdapter, model: nn.Module, layer: int) -> nn.Module:
    return getattr(decoder_layers(adapter, model)[layer], adapter.moe)


def layer_kind(adapter: MoEAdapter, layer_module: nn.Module) -> LayerKind:
    sublayer = getattr(layer_module, adapter.moe)
    if isinstance(sublayer, DroppedSublayer):
        return "dropped"
    return "moe" if hasattr(sublayer, adapter.router) else "dense"


def structure(adapter: MoEAdapter, model: nn.Module) -> list[LayerSpec]:
    """The model's layer-by-layer shape: what passes plan against and manifests record."""
    specs = []
    for layer_module in decoder_layers(adapter, model):
        kind = layer_kind(adapter, layer_module)
        if kind != "moe":
            specs.append(LayerSpec(kind))
            continue
        block = getattr(layer_module, adapter.moe)
        router = getattr(block, adapter.router)
        specs.append(
            LayerSpec(
                "moe",
                num_experts=router.weight.shape[0],
                top_k=router.top_k,
                shared_experts=any(hasattr(block, name) for name in adapter.shared_experts),
            )
        )
    return specs


def keep_experts(adapter: MoEAdapter, model: nn.Module, layer: int, keep: list[int]) -> None:
    """Keep only the routed experts `keep` (in that order) of one MoE layer.

    The router rows go with their experts, so the softmax renormalizes over the
    survivors; top-k is clamped to the number kept. Zero experts is allowed: the
    routed part then contributes nothing (shared experts, if any, still run).
    """
    block = moe_block(adapter, model, layer)
    router, experts = getattr(block, adapter.router), getattr(block, adapter.experts)
    index = torch.tensor(keep, dtype=torch.long)
    if not keep:
        replace_experts(adapter, model, layer, None, None, router.weight.data[:0].clone())
        return
    replace_experts(
        adapter,
        model,
        layer,
        experts.gate_up_proj.data.index_select(0, index).clone(),
        experts.down_proj.data.index_select(0, index).clone(),
        router.weight.data.index_select(0, index).clone(),
    )


def replace_experts(
    adapter: MoEAdapter,
    model: nn.Module,
    layer: int,
    gate_up: torch.Tensor | None,
    down: torch.Tensor | None,
    router_weight: torch.Tensor,
) -> None:
    """Install new routed experts ([E, 2*ffn, hidden], [E, hidden, ffn]) and router rows [E, hidden].

    None for the expert tensors (with E = 0) leaves a layer whose routed part adds nothing.
    """
    block = moe_block(adapter, model, layer)
    router, experts = getattr(block, adapter.router), getattr(block, adapter.experts)
    count = router_weight.shape[0]
    router.weight = nn.Parameter(router_weight, requires_grad=False)
    if count == 0:
        experts = NoRoutedExperts()
        setattr(block, adapter.experts, experts)
    else:
        experts.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
        experts.down_proj = nn.Parameter(down, requires_grad=False)
    configured_top_k = getattr(model.config, adapter.top_k_key)
    for module in (block, router, experts):
        if hasattr(module, "num_experts") and not isinstance(module, NoRoutedExperts):
            module.num_experts = count
        if hasattr(module, "top_k"):
            module.top_k = min(configured_top_k, count)


def drop_moe_sublayer(adapter: MoEAdapter, model: nn.Module, layer: int) -> None:
    """Remove the norm + MoE sublayer of one layer; attention and the residual stay."""
    layer_module = decoder_layers(adapter, model)[layer]
    setattr(layer_module, adapter.moe, DroppedSublayer())
    setattr(layer_module, adapter.moe_norm, nn.Identity())


def drop_blocks(adapter: MoEAdapter, model: nn.Module, drop: list[int]) -> None:
    """Delete whole decoder layers and renumber the survivors (KV-cache slots included)."""
    layers = decoder_layers(adapter, model)
    kept = [i for i in range(len(layers)) if i not in set(drop)]
    survivors = nn.ModuleList(layers[i] for i in kept)
    for new_index, layer_module in enumerate(survivors):
        for module in layer_module.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    parent_path, _, attr = adapter.layers.rpartition(".")
    setattr(get_path(model, parent_path) if parent_path else model, attr, survivors)

    config = model.config
    old_count = config.num_hidden_layers
    for key, value in list(vars(config).items()):
        # per-layer lists (layer_types, ...) follow their layers
        if isinstance(value, list) and len(value) == old_count and not key.startswith("_"):
            setattr(config, key, [value[i] for i in kept])
    adapter.renumber_dense_layers(config, kept)
    config.num_hidden_layers = len(kept)


def sync_expert_config(adapter: MoEAdapter, model: nn.Module) -> bool:
    """Write the expert counts back to the config; True when stock transformers can load the result.

    Stock classes need one expert count for every MoE layer and no dropped
    sublayer. Otherwise the config holds the largest count (so that building
    from it allocates enough) and moeexport.json describes each layer.
    """
    specs = structure(adapter, model)
    counts = {spec.num_experts for spec in specs if spec.kind == "moe"}
    uniform = len(counts) <= 1 and all(spec.kind != "dropped" for spec in specs)
    if counts:
        setattr(model.config, adapter.num_experts_key, max(counts))
    if uniform and counts:
        top_k = getattr(model.config, adapter.top_k_key)
        setattr(model.config, adapter.top_k_key, min(top_k, max(counts)))
    return uniform and bool(counts) and max(counts) > 0


def check_expert_count_change(adapter: MoEAdapter, config: object) -> None:
    message = adapter.expert_count_change_blocker(config)
    if message:
        raise MoeExportError(message)
