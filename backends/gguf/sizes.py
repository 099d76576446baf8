"""What the writer's files of trimmed copies of a model weigh, read off its file of the untrimmed model.

`search` sizes every trimming x weight type of a grid without writing them: each
file is the untrimmed file (same weight type) tensor by tensor, less what the
trimming removes: a dropped block's tensors, a dropped MoE sublayer's router and
expert stacks (plus the all-zero stand-ins its host then needs, by the writer's
rules), and expert stacks and routers at the file's expert count, the largest
of any layer (the writer pads every layer to it). Exact for the untrimmed model;
otherwise an estimate: the K-quant mixes choose some tensors' types by layer
index and expert count, which shift when layers or experts go, and the header is
taken as the untrimmed file's. The bytes a decoded token reads follow the
runner's rule (runner.py `token_bytes`).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from moeexport.backends.gguf.names import DENSE_FFN, EXPERT_STACKS, SHARED_FFN
from moeexport.backends.gguf.reader import GGUFFile
from moeexport.backends.gguf.runner import TensorRead, tensor_reads, token_bytes
from moeexport.backends.gguf.writer import STANDIN_WIDTH, zero_bytes, zero_ffn_shapes
from moeexport.backends.target import FileSize

BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")  # a decoder block's tensor: its index, and the rest of its name
F32_BYTES = 4  # routers, selection biases and shared-expert gates stay F32


# the writer's block tensor kinds (names.py) by what trimming does to them; every other kind is attention's
ROLES = {**dict.fromkeys(EXPERT_STACKS, "experts"), "FFN_GATE_INP": "router", "FFN_EXP_PROBS_B": "bias",
         **dict.fromkeys((*SHARED_FFN, "FFN_GATE_INP_SHEXP"), "shared"), "FFN_NORM": "moe_norm",
         **dict.fromkeys(DENSE_FFN, "dense")}


def role(rest: str) -> str:
    """What a block tensor ("attn_q.weight", "ffn_up_exps.weight", ...) is, for trimming."""
    return _roles_by_stem().get(rest.split(".")[0], "attention")


@functools.cache
def _roles_by_stem() -> dict[str, str]:
    """ROLES under the names gguf-py gives the kinds in a block ("ffn_gate_exps": "experts", ...)."""
    import gguf

    return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[kind]].removeprefix("blk.{bid}."): role for kind, role in ROLES.items()}


class TrimmedSizes:
    """Sizes of the writer's files of trimmed copies of one model, from its untrimmed file in one weight type
    (the target's `Sizer`)."""

    def __init__(self, untrimmed: Path):
        file = GGUFFile(untrimmed)
        reads = tensor_reads(file)
        self.alignment = int(file.metadata.get("general.alignment", 32))
        self.header_bytes = min(tensor.offset for tensor in file.tensors.values())
        self.outer = [read for name, read in reads.items() if not BLOCK_NAME.match(name)]
        self.blocks: dict[int, dict[str, object]] = {}  # block -> the rest of each tensor's name -> StoredTensor
        for name, tensor in file.tensors.items():
            if match := BLOCK_NAME.match(name):
                self.blocks.setdefault(int(match.group(1)), {})[match.group(2)] = tensor

    def size(self, layout, kept: list[int | None]) -> FileSize:
        """The file of the trimmed copy that writer.check laid out as `layout`; `kept` maps each untrimmed block to
        its index there (None: dropped)."""
        tensors = self.tensors(layout, kept)
        file_bytes = self.header_bytes + sum(self._padded(tensor.nbytes) for tensor in tensors)
        return FileSize(file_bytes, token_bytes(tensors, layout.experts_used).total)

    def tensors(self, layout, kept: list[int | None]) -> list[TensorRead]:
        tensors = list(self.outer)
        for block, new in enumerate(kept):
            if new is not None:  # None: Block Drop took the block's tensors
                tensors += _block(layout, new, self.blocks.get(block, {}))
        return tensors

    def _padded(self, nbytes: int) -> int:
        return -(-nbytes // self.alignment) * self.alignment


def _block(layout, index: int, stored: dict) -> list[TensorRead]:
    """The tensors of block `index` of the trimmed file, from the untrimmed block's `stored` tensors."""
    roles = {rest: role(rest) for rest in stored}
    kept = [TensorRead(stored[rest].nbytes) for rest, kind in roles.items()
            if kind in ("attention", "moe_norm", "dense")]
    if layout.layers[index].kind == "dense":
        return kept
    if index in layout.silent_layers:  # Layer Drop: router and experts gone, stand-ins as the host needs them
        return kept + _silent_moe(layout)
    return kept + _moe(layout, layout.layers[index], stored, roles)


def _silent_moe(layout) -> list[TensorRead]:
    """The stand-ins of a MoE-less layer (writer.py _write_tensors and _write_silent_moe)."""
    hidden, count = layout.config.hidden_size, layout.num_experts
    if layout.architecture.dense_silent_layers:
        return _zero_ffn(hidden, STANDIN_WIDTH)
    tensors = [TensorRead(count * hidden * F32_BYTES), *_zero_ffn(hidden, layout.expert_width, count)]  # a zero router
    if layout.config.routing.selection_bias:  # a zero one, where the family has one
        tensors.append(TensorRead(count * F32_BYTES))
    if layout.shared_width:
        tensors += _zero_ffn(hidden, layout.shared_width)
    if layout.shared_width and layout.shared_gate:
        tensors.append(TensorRead(hidden * F32_BYTES))
    return tensors


def _moe(layout, spec, stored: dict, roles: dict[str, str]) -> list[TensorRead]:
    """A MoE sublayer: stacks and router at the file's expert count, its padding's selection bias, and the all-zero
    shared expert a host that requires one gets without it (writer.py _write_moe)."""
    count, tensors = layout.num_experts, []
    stored_count = next(stored[rest].shape[0] for rest, kind in roles.items() if kind == "experts")
    for rest, kind in roles.items():
        tensor = stored[rest]
        per_expert = tensor.shape[0] == stored_count  # (a router's scale over the hidden size is kept whole)
        if kind == "experts":
            tensors.append(TensorRead(tensor.outer_bytes() * count, "experts", count))
        elif kind == "router":
            tensors.append(TensorRead(tensor.outer_bytes() * count if per_expert else tensor.nbytes))
        elif kind == "shared":
            tensors.append(TensorRead(tensor.nbytes))
    own_bias = any(kind == "bias" for kind in roles.values())  # the family's selection bias
    if own_bias or (layout.architecture.pads_experts and spec.num_experts < count):
        tensors.append(TensorRead(count * F32_BYTES))  # with -1e9 for pads, which keeps them unchosen
    shared = any(kind == "shared" for kind in roles.values()) or spec.shared_experts
    if layout.architecture.requires_shared_expert and not shared:
        tensors += _zero_ffn(layout.config.hidden_size, STANDIN_WIDTH)
    return tensors


def _zero_ffn(hidden: int, width: int, experts: int = 0) -> list[TensorRead]:
    import gguf

    read = "experts" if experts else "whole"
    shapes = zero_ffn_shapes(hidden, width, experts)
    return [TensorRead(zero_bytes(gguf, shape), read, experts or 1) for shape in shapes]
