"""The torch side of an adapter: finding a family's modules in a model, and the surgery every pass shares.

A family is plain data (declaration.py): where it keeps its decoder layers, its
MoE sublayer, router and experts, which config keys hold the expert counts, how
it routes. transformers 5 stacks every supported family's experts in 3-D tensors
(`gate_up_proj`, `down_proj`, and their biases where the layout has them, stored
as the family's ExpertLayout says) behind a router whose per-expert tensors the
family names (`router_tensors`), so the surgery below is written once and driven
by the declaration's fields. The
adapter hands out typed views (views.py): `model_view(model)`,
`layer_view(model, index)`, so that passes and backends never spell a module name
themselves.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from functools import cache

import torch
from torch import nn

from moeexport.adapters.declaration import Family, LayerKind, LayerSpec
from moeexport.adapters.experts import expert_stacks
from moeexport.adapters.registry import family_for
from moeexport.adapters.views import LayerView, ModelView
from moeexport.errors import MoeExportError
from moeexport.stream_registry import stream_of  # (not streaming's import: streaming imports the adapters)


@dataclass(frozen=True)
class MoEAdapter(Family):
    """A family's declaration with what finds its modules in a torch model: the views passes and backends read."""

    def model_view(self, model: nn.Module) -> ModelView:
        return ModelView(
            embeddings=get_path(model, self.embeddings),
            rotary_embedding=get_path(model, self.rotary_embedding) if self.rotary_embedding else None,
            final_norm=get_path(model, self.final_norm),
            output=model.get_output_embeddings(),
            num_layers=len(decoder_layers(self, model)),
        )

    def layer_view(self, model: nn.Module, index: int) -> LayerView:
        return self._view(model, index, decoder_layers(self, model)[index])

    def layer_views(self, model: nn.Module) -> list[LayerView]:
        return [self._view(model, index, layer) for index, layer in enumerate(decoder_layers(self, model))]

    def _view(self, model: nn.Module, index: int, layer: nn.Module) -> LayerView:
        kind = layer_kind(self, layer)
        ffn = get_path(layer, self.moe)
        router = experts = shared_gate = selection_bias = router_weight = experts_norm = None
        shared: tuple[nn.Module, ...] = ()
        if kind == "moe":
            router, experts = getattr(ffn, self.router), getattr(ffn, self.experts)
            experts = None if isinstance(experts, NoRoutedExperts) else experts
            # the one place that looks for shared experts: a family may name several, a layer may lack them
            shared = tuple(getattr(ffn, name) for name in self.shared_experts
                           if getattr(ffn, name, None) is not None)  # ERNIE sets shared_experts = None
            shared_gate = getattr(ffn, self.shared_expert_gate, None) if self.shared_expert_gate else None
            selection_bias = get_path(router, self.selection_bias).flatten() if self.selection_bias else None
            router_weight = get_path(router, self.router_weight)
            experts_norm = get_path(layer, self.experts_norm) if self.experts_norm else None
        return LayerView(
            index=index,
            kind=kind,
            module=layer,
            attention=get_path(layer, self.mixer_module(model.config, index)),
            attention_norm=get_path(layer, self.attention_norm),
            ffn_norm=get_path(layer, self.moe_norm),
            ffn=ffn,
            router=router,
            experts=experts,
            shared_experts=shared,
            shared_expert_gate=shared_gate,
            layout=self.expert_layout(model.config),
            selection_bias=selection_bias,
            router_weight=router_weight,
            configured_top_k=getattr(getattr(router, "config", None) or model.config, self.top_k_key, 0),
            router_returns_probabilities=self.router_returns_probabilities,
            experts_norm=experts_norm,
        )


def adapter_for(config) -> MoEAdapter:
    """The adapter for a config, or a one-line error naming what is supported."""
    return _adapter(family_for(config))


@cache
def _adapter(family: Family) -> MoEAdapter:
    return MoEAdapter(**{field.name: getattr(family, field.name) for field in fields(Family)})


class DroppedSublayer(nn.Module):
    """Stands in for a removed MoE sublayer: the residual stream passes through unchanged.

    It returns what the sublayer it replaces returned: the hidden states, or with `router_scores` a pair whose
    second part its decoder layer discards (gpt-oss).
    """

    def __init__(self, router_scores: bool = False):
        super().__init__()
        self.router_scores = router_scores

    def forward(self, hidden_states: torch.Tensor):
        zeros = torch.zeros_like(hidden_states)
        return (zeros, None) if self.router_scores else zeros


def sublayer_hidden(output):
    """The hidden states a MoE sublayer returned (a family's sublayer may return its router scores beside them)."""
    return output[0] if isinstance(output, tuple) else output


def silenced(output):
    """A MoE sublayer's output with its hidden states zeroed, in the sublayer's own form (for a forward hook)."""
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]), *output[1:])
    return torch.zeros_like(output)


class NoRoutedExperts(nn.Module):
    """The experts of a layer that kept none: the routed part adds nothing.

    (transformers' fused expert kernels cannot take an expert count of zero.)
    """

    num_experts = 0

    def forward(self, hidden_states: torch.Tensor, top_k_index, top_k_weights) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def get_path(root: nn.Module, dotted: str) -> nn.Module:
    """The module (or tensor) at a dotted path inside `root`; "" is `root` itself."""
    for name in filter(None, dotted.split(".")):
        root = getattr(root, name)
    return root


def decoder_layers(adapter: MoEAdapter, model: nn.Module) -> nn.ModuleList:
    return get_path(model, adapter.layers)


def moe_block(adapter: MoEAdapter, model: nn.Module, layer: int) -> nn.Module:
    return get_path(decoder_layers(adapter, model)[layer], adapter.moe)


def layer_kind(adapter: MoEAdapter, layer_module: nn.Module) -> LayerKind:
    sublayer = get_path(layer_module, adapter.moe)
    if isinstance(sublayer, DroppedSublayer) or isinstance(getattr(sublayer, adapter.router, None), DroppedSublayer):
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

    Every per-expert tensor goes with its expert: the router's (its rows, a router
    bias, a selection bias: `Family.router_tensors`) and the experts' stacks and
    biases, so the router scores only the survivors; top-k is clamped to the number
    kept. Zero experts is allowed: the routed part then contributes nothing (shared
    experts, if any, still run).
    """
    stream = stream_of(model)
    if stream is not None:  # a streamed model reads only the kept experts when the layer is read
        stream.keep_experts(layer, keep)
    block = moe_block(adapter, model, layer)
    router, experts = getattr(block, adapter.router), getattr(block, adapter.experts)
    count, index = get_path(router, adapter.router_weight).shape[0], torch.tensor(keep, dtype=torch.long)
    for path in adapter.router_tensors:
        owner_path, _, name = path.rpartition(".")
        owner = get_path(router, owner_path) if owner_path else router
        _set_like(owner, name, expert_entries(getattr(owner, name).data, index, count))
    if keep:
        for name in expert_stacks(adapter.expert_layout(model.config)):
            _set_like(experts, name, getattr(experts, name).data.index_select(0, index).clone())
        if getattr(experts, "mxfp4_source", None) is not None:  # the kept experts' codes (moeexport.mxfp4)
            experts.mxfp4_source = experts.mxfp4_source.kept(keep)
    else:
        setattr(block, adapter.experts, NoRoutedExperts())
    _set_expert_counts(adapter, model, block, len(keep))


def expert_entries(tensor: torch.Tensor, index: torch.Tensor, count: int) -> torch.Tensor:
    """The entries of `tensor` for the experts `index`, along its expert axis: the first of length `count`
    (router rows [E, hidden], a bias [E], ERNIE's selection bias [1, E])."""
    axis = list(tensor.shape).index(count)
    return tensor.index_select(axis, index).clone()


def _set_like(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set a module's parameter or buffer `name` to `value`, keeping what kind of tensor it was."""
    if name in module._parameters:
        setattr(module, name, nn.Parameter(value, requires_grad=False))
    else:
        setattr(module, name, value)


def replace_experts(
    adapter: MoEAdapter,
    model: nn.Module,
    layer: int,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    router_weight: torch.Tensor,
) -> None:
    """Install new routed experts ([E, 2*ffn, hidden], [E, hidden, ffn]) and router rows [E, hidden] (merging;
    see check_experts_can_merge)."""
    block = moe_block(adapter, model, layer)
    router, experts = getattr(block, adapter.router), getattr(block, adapter.experts)
    router.weight = nn.Parameter(router_weight, requires_grad=False)
    experts.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
    experts.down_proj = nn.Parameter(down, requires_grad=False)
    _set_expert_counts(adapter, model, block, router_weight.shape[0])


def _set_expert_counts(adapter: MoEAdapter, model: nn.Module, block: nn.Module, count: int) -> None:
    """The modules' own expert counts and top-k after a layer's experts changed to `count`."""
    router, experts = getattr(block, adapter.router), getattr(block, adapter.experts)
    configured_top_k = getattr(model.config, adapter.top_k_key)
    for module in (block, router, experts):
        if hasattr(module, "num_experts") and not isinstance(module, NoRoutedExperts):
            module.num_experts = count
        if hasattr(module, "top_k"):
            module.top_k = min(configured_top_k, count)
    if adapter.router_reads_config_top_k:
        router.config = copy.copy(router.config)
        setattr(router.config, adapter.top_k_key, min(configured_top_k, count))


def drop_moe_sublayer(adapter: MoEAdapter, model: nn.Module, layer: int) -> None:
    """Remove the norm + MoE sublayer of one layer; attention and the residual stay."""
    layer_module = decoder_layers(adapter, model)[layer]
    if not adapter.moe:  # the layer holds its experts beside a dense MLP: that MLP and its norms stay
        for name in adapter.moe_modules:
            delattr(layer_module, name)
        setattr(layer_module, adapter.router, DroppedSublayer())
        setattr(layer_module, adapter.moe_switch, False)
        return
    setattr(layer_module, adapter.moe, DroppedSublayer(adapter.moe_returns_router_scores))
    if adapter.moe_norm != adapter.attention_norm:  # a block's one norm (Nemotron-H) stays: its forward reads it
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


def check_experts_can_merge(adapter: MoEAdapter, config: object) -> None:
    """Refuse merging where router rows and two bias-free stacks are not every per-expert tensor: an expert
    made of several would need a router bias, a selection bias or expert biases that nothing defines."""
    extra = [path for path in adapter.router_tensors if path != "weight"]
    layout = adapter.expert_layout(config)
    if extra or not layout.concatenated or not layout.gated:
        what = f"its router's {', '.join(extra)}" if extra else "its experts' layout"
        raise MoeExportError(f"{adapter.family}: experts cannot be merged ({what} has no merged value here); use "
                             "Expert Drop instead of merge for this family")


def check_expert_count_change(adapter: MoEAdapter, config: object) -> None:
    message = adapter.expert_count_change_blocker(config)
    if message:
        raise MoeExportError(message)
