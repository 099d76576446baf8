"""MXFP4 expert weights as the hub stores them (gpt-oss), read as floats.

A parameter P (an expert stack) is stored as `P_blocks` [E, N, K / 32, 16] uint8 and `P_scales` [E, N, K / 32]
uint8: each row of N (an output) holds K inputs in blocks of 32 4-bit E2M1 codes, two per byte (the even input
in the low nibble), with one E8M0 scale per block (2^(scale - 127)). Dequantized, a stack is [E, N, K]; a family
whose layout stores its stacks transposed (gpt-oss: [E, K, N], x @ W) takes its transpose. This is the layout
transformers' integrations/mxfp4.py reads; the values are exact in float32 (and bfloat16).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where weights are dequantized: the memory plan reads headers without it
    import torch

BLOCKS, SCALES = "_blocks", "_scales"
BLOCK = 32  # inputs per scale
SCALE_BIAS = 127
DEQUANTIZED_ROWS = 256  # rows (outputs) dequantized at once: their int64 codes take 2 KiB per input block
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # E2M1


def packed_parameters(names) -> dict[str, tuple[str, str]]:
    """Parameter name -> (its blocks key, its scales key), for every MXFP4 pair among checkpoint `names`."""
    names = set(names)
    return {name[:-len(BLOCKS)]: (name, name[:-len(BLOCKS)] + SCALES)
            for name in names if name.endswith(BLOCKS) and name[:-len(BLOCKS)] + SCALES in names}


def unpacked_shape(blocks_shape, transposed: bool) -> list[int]:
    """The parameter's shape for blocks of `blocks_shape` ([..., N, K / 32, 16])."""
    *outer, rows, groups, _ = blocks_shape
    return [*outer, groups * BLOCK, rows] if transposed else [*outer, rows, groups * BLOCK]


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, transposed: bool) -> torch.Tensor:
    """float32 weights of MXFP4 `blocks` [..., N, K / 32, 16] and `scales` [..., N, K / 32]: [..., N, K], or
    [..., K, N] for a `transposed` layout."""
    import torch

    table = torch.tensor(FP4_VALUES, dtype=torch.float32)
    *outer, rows, groups, _ = blocks.shape
    matrix = torch.empty((*outer, rows, groups * BLOCK), dtype=torch.float32)
    for first in range(0, rows, DEQUANTIZED_ROWS):  # the int64 codes of a few rows at a time, not of them all
        stop = first + DEQUANTIZED_ROWS
        part, part_scales = blocks[..., first:stop, :, :], scales[..., first:stop, :]
        codes = torch.stack([part & 0x0F, part >> 4], dim=-1).long()  # [..., n, G, 16, 2]: even input low
        values = table[codes].flatten(-2) * torch.exp2(part_scales.float() - SCALE_BIAS)[..., None]  # [..., n, G, 32]
        matrix[..., first:stop, :] = values.flatten(-2)
    return matrix.transpose(-1, -2).contiguous() if transposed else matrix  # laid out as a stored stack is


def unpacked_headers(headers: dict, transposed: bool) -> dict:
    """Checkpoint headers (name -> (shape, dtype, file)) with each MXFP4 pair as the parameter it holds, of the
    shape it dequantizes to, in bfloat16 (which holds every MXFP4 value exactly)."""
    pairs = packed_parameters(headers)
    unpacked = {name: header for name, header in headers.items()
                if not any(name in pair for pair in pairs.values())}
    for name, (blocks, _) in pairs.items():
        shape, _, path = headers[blocks]
        unpacked[name] = (unpacked_shape(shape, transposed), "BF16", path)
    return unpacked


def ggml_blocks(blocks: "torch.Tensor", scales: "torch.Tensor") -> "torch.Tensor":
    """MXFP4 rows in the hub's layout (blocks [N, G, 16], scales [N, G]) as GGML's MXFP4 blocks [N, G * 17]: per
    block its scale byte, then 16 bytes holding input j in the low nibble of byte j and input j + 16 in its high
    nibble (the hub packs inputs 2j and 2j + 1 into byte j). The same codes and scales: nothing re-quantized."""
    import torch

    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2)  # [N, G, 32], in input order
    packed = codes[..., :16] | (codes[..., 16:] << 4)
    return torch.cat([scales[..., None], packed], dim=-1).flatten(-2)


class PackedExperts:
    """Where an in-memory experts module's stacks lie as MXFP4 pairs in its checkpoint (set by moeexport.load,
    kept per expert by Expert Drop): what a quantized GGUF carries as the same codes, for each expert whose
    weights are still exactly those codes dequantized (a pass that changed them makes that expert not carried).
    """

    def __init__(self, checkpoint, pairs: dict[str, tuple[str, str]], experts: tuple[int, ...], transposed: bool):
        self.checkpoint = checkpoint  # a SafetensorsCheckpoint: stored_slice(key, expert)
        self.pairs = pairs  # stack name in the experts module ("gate_up_proj") -> (blocks key, scales key)
        self.experts = experts  # the checkpoint expert of each expert slot
        self.transposed = transposed

    def kept(self, keep: list[int]) -> "PackedExperts":
        return PackedExperts(self.checkpoint, self.pairs, tuple(self.experts[slot] for slot in keep), self.transposed)

    def codes(self, stack: str, slot: int, weights: "torch.Tensor"):
        """(blocks, scales) of expert `slot`'s `stack` when `weights` (its matrix as the module holds it) are
        exactly what they decode to; None otherwise."""
        import torch

        blocks, scales = (self.checkpoint.stored_slice(key, self.experts[slot]) for key in self.pairs[stack])
        decoded = dequantize(blocks, scales, self.transposed)
        return (blocks, scales) if torch.equal(decoded.to(weights.dtype), weights) else None
