"""The one registry of model families, keyed by HF `model_type`."""

from __future__ import annotations

from moeexport.adapters.base import MoEAdapter
from moeexport.errors import MoeExportError

_ADAPTERS: dict[str, MoEAdapter] = {}


def register(adapter: MoEAdapter) -> MoEAdapter:
    if adapter.model_type in _ADAPTERS:
        raise ValueError(f"model_type {adapter.model_type!r} is registered twice")
    _ADAPTERS[adapter.model_type] = adapter
    return adapter


def supported_families() -> dict[str, MoEAdapter]:
    return dict(_ADAPTERS)


def adapter_for(config) -> MoEAdapter:
    """The adapter for a config, or a one-line error naming what is supported."""
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(f"{a.family} ({t})" for t, a in sorted(_ADAPTERS.items()))
    if model_type in _ADAPTERS:
        return _ADAPTERS[model_type]
    if model_type and not _looks_like_moe(config):
        raise MoeExportError(
            f"model_type {model_type!r} is a dense (non-MoE) model; moeexport compresses "
            f"Mixture-of-Experts models: {supported}"
        )
    raise MoeExportError(f"unsupported model_type {model_type!r}; supported MoE families: {supported}")


def _looks_like_moe(config) -> bool:
    keys = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
    return any((getattr(config, key, 0) or 0) > 1 for key in keys)
