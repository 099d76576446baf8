"""The model a config describes, built on the meta device: modules, shapes and dtypes, no weights.

What a streamed model starts from (moeexport.modelio.load_streamed) and what a GGUF's
tensors are named after (moeexport.source): both reshape it to a recorded per-layer
structure first.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from moeexport.adapters import adapter_for
from moeexport.adapters.declaration import LayerSpec
from moeexport.adapters.surgery import drop_moe_sublayer, keep_experts, structure
from moeexport.errors import MoeExportError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# transformers' default grouped_mm experts kernel costs seconds per forward on CPU; the
# per-expert loop is far faster there and computes the same thing.
EXPERTS_IMPLEMENTATION = "grouped_mm" if torch.cuda.is_available() else "eager"


def skeleton(config, dtype: str, trust_remote_code: bool = False, layers: list[LayerSpec] | None = None) -> nn.Module:
    """The model `config` builds, on the meta device (no weights), reshaped to `layers` when given."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(own_copy(config), dtype=DTYPES[dtype],
                                              trust_remote_code=trust_remote_code,
                                              experts_implementation=EXPERTS_IMPLEMENTATION)
    if layers is not None:
        apply_structure(lm, layers)
    lm.config.name_or_path = config.name_or_path
    lm.eval()
    lm.requires_grad_(False)
    return lm


def own_copy(config):
    """A copy of `config` for one model to own: transformers builds a model on the config object it is given,
    passes edit the model's config, and a Source's config (moeexport.source) stays as it was read."""
    return copy.deepcopy(config)


def apply_structure(lm: nn.Module, layers: list[LayerSpec]) -> None:
    """Reshape a freshly built model to a recorded per-layer structure (weights are loaded after)."""
    adapter = adapter_for(lm.config)
    current = structure(adapter, lm)
    if len(current) != len(layers):
        raise MoeExportError(f"manifest lists {len(layers)} layers but config.json builds {len(current)}")
    for index, (built, wanted) in enumerate(zip(current, layers)):
        if wanted.kind == "dropped":
            drop_moe_sublayer(adapter, lm, index)
        elif wanted.kind == "moe" and wanted.num_experts != built.num_experts:
            keep_experts(adapter, lm, index, list(range(wanted.num_experts)))
