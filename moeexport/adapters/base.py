"""What an adapter is, and the model surgery every pass shares.

An adapter is plain data: where a family keeps its decoder layers, its MoE
sublayer, router and experts, which config keys hold the expert counts, and how
it routes. transformers 5 gives every supported family the same expert layout
(router `weight` [E, hidden]; experts `gate_up_proj` [E, 2*ffn, hidden] and
`down_proj` [E, hidden, ffn]; `router(x) -> (logits, top_k_weights, top_k_index)`),
so the surgery below is written once and driven by the adapter's fields. The
adapter also hands out typed views (views.py): `model_config(config)`,
`model_view(model)`, `layer_view(model, index)`, so that passes and backends
never spell a module name or a config key themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from moeexport.adapters.views import LatentAttention, LayerKind, LayerView, ModelConfig, ModelView, Routing
from moeexport.errors import MoeExportError
from moeexport.stream_registry import stream_of  # (not streaming's import: streaming imports the adapters)


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
class FFNWidths:
    """The feed-forward widths a config must state besides the canonical ones (see MoEAdapter.config_values)."""

    expert: int  # one routed expert's ffn width
    shared: int = 0  # the shared expert's (all shared experts together), 0 without one
    dense_layers: tuple[int, ...] = ()  # the layers with a dense MLP instead of experts


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
    # config key with the number of experts fused into the shared module; without one, one per module name
    shared_expert_count_key: str | None = None
    clip_qkv_key: str | None = None  # config key of a clamp on q, k and v, if the family has one
    latent_attention: Callable[[object], LatentAttention] | None = None  # config -> its latent sizes, if MLA
    # Rewrites the config keys that name dense layers after Block Drop (kept = surviving old indices).
    renumber_dense_layers: Callable[[object, list[int]], None] = _no_dense_layer_keys
    # An error message when the family's routing cannot survive a change of expert count.
    expert_count_change_blocker: Callable[[object], str | None] = _any_expert_count
    # (canonical config, FFN widths) -> this family's own config keys; the inverse of what model_config reads
    own_config_values: Callable[[ModelConfig, "FFNWidths"], dict] = lambda config, widths: {}

    def model_config(self, config) -> ModelConfig:
        """The config under canonical names (transformers' common keys plus this family's own)."""
        rope = getattr(config, "rope_parameters", None) or {}
        shared = (getattr(config, self.shared_expert_count_key) if self.shared_expert_count_key
                  else len(self.shared_experts))
        return ModelConfig(
            model_type=self.model_type,
            name_or_path=str(config.name_or_path or ""),
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            context_length=config.max_position_embeddings,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
            hidden_act=getattr(config, "hidden_act", "silu"),
            num_experts=getattr(config, self.num_experts_key),
            top_k=getattr(config, self.top_k_key),
            routing=self.routing(config),
            shared_expert_count=shared,
            clip_qkv=getattr(config, self.clip_qkv_key, None) if self.clip_qkv_key else None,
            latent=self.latent_attention(config) if self.latent_attention else None,
        )

    def config_values(self, config: ModelConfig, layers: int, widths: "FFNWidths", tied: bool) -> dict:
        """transformers config keys (with model_type) for a model described under canonical names, e.g. one
        read from a GGUF: the inverse of model_config."""
        values = {
            "model_type": self.model_type,
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": layers,
            "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads,
            "head_dim": config.head_dim,
            "max_position_embeddings": config.context_length,
            "rms_norm_eps": config.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
            "hidden_act": config.hidden_act,
            "tie_word_embeddings": tied,
            self.num_experts_key: config.num_experts,
            self.top_k_key: config.top_k,
        }
        if self.clip_qkv_key:
            values[self.clip_qkv_key] = config.clip_qkv
        return values | self.own_config_values(config, widths)

    def model_view(self, model: nn.Module) -> ModelView:
        return ModelView(
            embeddings=get_path(model, self.embeddings),
            rotary_embedding=get_path(model, self.rotary_embedding),
            final_norm=get_path(model, self.final_norm),
            output=model.get_output_embeddings(),
            num_layers=len(decoder_layers(self, model)),
        )

    def layer_view(self, model: nn.Module, index: int) -> LayerView:
        return self._view(index, decoder_layers(self, model)[index])

    def layer_views(self, model: nn.Module) -> list[LayerView]:
        return [self._view(index, layer) for index, layer in enumerate(decoder_layers(self, model))]

    def _view(self, index: int, layer: nn.Module) -> LayerView:
        kind = layer_kind(self, layer)
        ffn = getattr(layer, self.moe)
        router = experts = shared_gate = None
        shared: tuple[nn.Module, ...] = ()
        if kind == "moe":
            router, experts = getattr(ffn, self.router), getattr(ffn, self.experts)
            experts = None if isinstance(experts, NoRoutedExperts) else experts
            # the one place that looks for shared experts: a family may name several, a layer may lack them
            shared = tuple(getattr(ffn, name) for name in self.shared_experts if hasattr(ffn, name))
            shared_gate = getattr(ffn, self.shared_expert_gate, None) if self.shared_expert_gate else None
        return LayerView(
            index=index,
            kind=kind,
            module=layer,
            attention=get_path(layer, self.attention),
            attention_norm=get_path(layer, self.attention_norm),
            ffn_norm=get_path(layer, self.moe_norm),
            ffn=ffn,
            router=router,
            experts=experts,
            shared_experts=shared,
            shared_expert_gate=shared_gate,
        )


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
    return [
        LayerSpec("moe", view.num_experts, view.top_k, bool(view.shared_experts)) if view.kind == "moe"
        else LayerSpec(view.kind)
        for view in adapter.layer_views(model)
    ]


def keep_experts(adapter: MoEAdapter, model: nn.Module, layer: int, keep: list[int]) -> None:
    """Keep only the routed experts `keep` (in that order) of one MoE layer.

    The router rows go with their experts, so the softmax renormalizes over the
    survivors; top-k is clamped to the number kept. Zero experts is allowed: the
    routed part then contributes nothing (shared experts, if any, still run).
    """
    stream = stream_of(model)
    if stream is not None:  # a streamed model reads only the kept experts when the layer is read
        stream.keep_experts(layer, keep)
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
    stream = stream_of(model)
    if stream is not None:
        stream.keep_blocks(kept)
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
