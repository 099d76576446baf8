"""GGUF tensor names, taken from gguf-py's tables instead of spelled by hand.

A name is gguf-py's template for a tensor kind (`TENSOR_NAMES[MODEL_TENSOR.X]`,
e.g. "blk.{bid}.ffn_gate_exps") with the block filled in, plus ".weight" or
".bias". Kinds are given by their MODEL_TENSOR member names ("FFN_GATE_EXP"), so
this module imports nothing from gguf-py itself: it is an optional dependency
that the writer imports when it runs. Where gguf-py lists the tensors an
architecture may hold (`MODEL_TENSORS`), a kind outside that list is refused:
llama.cpp would reject the file when loading it.
"""

from __future__ import annotations

from typing import Callable

from moeexport.errors import MoeExportError

# the three projections of a SwiGLU FFN, in the order the writer adds them: gate, up, down
DENSE_FFN = ("FFN_GATE", "FFN_UP", "FFN_DOWN")
SHARED_FFN = ("FFN_GATE_SHEXP", "FFN_UP_SHEXP", "FFN_DOWN_SHEXP")
ROUTED_FFN = ("FFN_GATE_EXP", "FFN_UP_EXP", "FFN_DOWN_EXP")  # stacked [E, ...] experts
EXPERT_STACKS = (*ROUTED_FFN, "FFN_GATE_UP_EXP")  # and gate and up in one stack, where a host takes only that

BlockNames = Callable[..., str]  # (kind, suffix=".weight") -> the name of that tensor in one decoder block


class TensorNames:
    """The tensor names of one file whose general.architecture is `architecture`."""

    def __init__(self, gguf, architecture: str):
        self.gguf, self.architecture = gguf, architecture
        arch = next((a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture), None)
        # kinds gguf-py lists for the host; None for a host newer than this gguf-py, with nothing to check
        self.allowed = frozenset(t.name for t in gguf.MODEL_TENSORS[arch]) if arch is not None else None

    def __call__(self, kind: str, block: int | None = None, suffix: str = ".weight") -> str:
        """The name of tensor `kind` (of decoder block `block`, for per-block tensors)."""
        if self.allowed is not None and kind not in self.allowed:
            raise MoeExportError(f"llama.cpp's {self.architecture} has no {kind} tensor (gguf-py MODEL_TENSORS)")
        template = self.gguf.TENSOR_NAMES[self.gguf.MODEL_TENSOR[kind]]
        return template.format(bid=block) + suffix

    def block(self, index: int) -> BlockNames:
        """The names inside decoder block `index`: block(2)("ATTN_Q") == "blk.2.attn_q.weight"."""
        return lambda kind, suffix=".weight": self(kind, index, suffix)


LAYERS_KEY = "moeexport.layers"  # JSON list of LayerSpec dicts: each layer's structure, written by writer.py
