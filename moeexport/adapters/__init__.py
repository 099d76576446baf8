"""Model adapters: the only code that knows a family's module names, expert layout and routing rule.

The declarations (declaration.py, families.py, registry.py) import no torch; the
torch side (surgery.py's `adapter_for` and `MoEAdapter`, views.py) is imported on
first use, so that reading a family's names (memory.py's early refusal) loads no torch.
"""

from importlib import import_module

from moeexport.adapters import families as _families  # noqa: F401  (registers the families)
from moeexport.adapters.declaration import (ExpertLayout, Family, LatentAttention, LayerSpec, ModelConfig,
                                            Routing)
from moeexport.adapters.registry import family_for, supported_families

_TORCH_SIDE = {"adapter_for": "surgery", "MoEAdapter": "surgery", "LayerView": "views", "ModelView": "views"}

__all__ = ["ExpertLayout", "Family", "LatentAttention", "LayerSpec", "LayerView", "MoEAdapter", "ModelConfig",
           "ModelView", "Routing", "adapter_for", "family_for", "supported_families"]


def __getattr__(name: str):
    if name in _TORCH_SIDE:
        return getattr(import_module(f"moeexport.adapters.{_TORCH_SIDE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
