"""Model adapters: the only code that knows a family's module names and routing rule."""

from moeexport.adapters import families as _families  # noqa: F401  (registers the families)
from moeexport.adapters.base import LayerSpec, MoEAdapter
from moeexport.adapters.registry import adapter_for, supported_families
from moeexport.adapters.views import LatentAttention, LayerView, ModelConfig, ModelView, Routing

__all__ = ["LatentAttention", "LayerSpec", "LayerView", "MoEAdapter", "ModelConfig", "ModelView", "Routing",
           "adapter_for", "supported_families"]
