"""Model adapters: the only code that knows a family's module names and routing rule."""

from moeexport.adapters import families as _families  # noqa: F401  (registers the families)
from moeexport.adapters.base import LayerSpec, MoEAdapter, Routing
from moeexport.adapters.registry import adapter_for, supported_families

__all__ = ["LayerSpec", "MoEAdapter", "Routing", "adapter_for", "supported_families"]
