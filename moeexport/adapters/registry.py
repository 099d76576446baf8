"""The one registry of model families, keyed by HF `model_type` (torch-free: it holds declarations)."""

from __future__ import annotations

from moeexport.adapters.declaration import Family
from moeexport.errors import MoeExportError

_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.model_type in _FAMILIES:
        raise ValueError(f"model_type {family.model_type!r} is registered twice")
    _FAMILIES[family.model_type] = family
    return family


def supported_families() -> dict[str, Family]:
    return dict(_FAMILIES)


def family_for(config) -> Family:
    """The family of a config, or a one-line error naming what is supported."""
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(f"{a.family} ({t})" for t, a in sorted(_FAMILIES.items()))
    if model_type in _FAMILIES:
        return _FAMILIES[model_type]
    if model_type and not _looks_like_moe(config):
        raise MoeExportError(
            f"model_type {model_type!r} is a dense (non-MoE) model; moeexport compresses "
            f"Mixture-of-Experts models: {supported}"
        )
    raise MoeExportError(f"unsupported model_type {model_type!r}; supported MoE families: {supported}")


def _looks_like_moe(config) -> bool:
    keys = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
    return any((getattr(config, key, 0) or 0) > 1 for key in keys)
