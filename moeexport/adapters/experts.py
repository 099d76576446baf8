"""What one routed expert computes, for every layout a family declares (declaration.ExpertLayout).

Observers, streaming, repair and the exporters compute an expert through these
functions, not through act(gate) * up copies of their own. For transformers 5's
concatenated layout they are the float operations of its eager expert loop, so
results stay bit for bit the model's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from moeexport.adapters.declaration import CLAMPED_SWIGLU, ExpertLayout


def expert_intermediate(layout: ExpertLayout, experts, expert: int, tokens: torch.Tensor) -> torch.Tensor:
    """The input of expert `expert`'s down projection for `tokens` [T, hidden]: act(gate x) * up x, or act(up x)
    for an ungated layout. `experts` holds the stacks (gate_up_proj or up_proj, down_proj, and any *_bias)."""
    stack = "gate_up_proj" if layout.gated else "up_proj"
    projected = _apply(layout, tokens, getattr(experts, stack)[expert], _bias(layout, experts, stack, expert))
    if not layout.gated:
        return ACT2FN[layout.activation](projected)
    return activate(layout, *_gate_and_up(layout, projected))


def expert_output(layout: ExpertLayout, experts, expert: int, intermediate: torch.Tensor) -> torch.Tensor:
    """Expert `expert`'s output (its down projection) for its intermediate [T, ffn]."""
    return _apply(layout, intermediate, experts.down_proj[expert], _bias(layout, experts, "down_proj", expert))


def expert_stacks(layout: ExpertLayout) -> tuple[str, ...]:
    """The names of a layout's per-expert tensors in its experts module, each [E, ...]: what Expert Drop slices."""
    stacks = ("gate_up_proj" if layout.gated else "up_proj", "down_proj")
    return stacks + tuple(f"{stack}_bias" for stack in stacks) if layout.biases else stacks


def activate(layout: ExpertLayout, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """A gated expert's activation of its gate and up projections: what its down projection reads."""
    if layout.activation == CLAMPED_SWIGLU:
        gate, up = gate.clamp(max=layout.limit), up.clamp(-layout.limit, layout.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * layout.alpha))
    return ACT2FN[layout.activation](gate) * up


def gate_and_up_weights(layout: ExpertLayout, gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) weights [..., ffn, hidden] (a row per neuron, as F.linear takes them) of a gate_up stack or
    matrix stored as the layout says (or of a streamed ExpertStack, rearranged as each expert is read)."""
    if not isinstance(gate_up, torch.Tensor) and (layout.transposed or layout.interleaved):
        experts, rows, columns = gate_up.shape
        shape = (experts, columns // 2, rows) if layout.transposed else (experts, rows // 2, columns)
        return tuple(gate_up.mapped(shape, lambda matrix, part=part: gate_and_up_weights(layout, matrix)[part])
                     for part in (0, 1))
    rows = gate_up.transpose(-1, -2) if layout.transposed else gate_up
    if layout.interleaved:
        return rows[..., ::2, :], rows[..., 1::2, :]
    gate, up = rows.chunk(2, dim=len(rows.shape) - 2)  # a positive dim: streamed ExpertStacks take only that
    return gate, up


def down_weights(layout: ExpertLayout, down: torch.Tensor) -> torch.Tensor:
    """The down weights [..., hidden, ffn] (a row per output, as F.linear takes them) of a down stack or matrix
    (or of a streamed ExpertStack, transposed as each expert is read)."""
    if not layout.transposed:
        return down
    if not isinstance(down, torch.Tensor):
        experts, rows, columns = down.shape
        return down.mapped((experts, columns, rows), lambda matrix: matrix.transpose(-1, -2))
    return down.transpose(-1, -2)


def gate_and_up_biases(layout: ExpertLayout, gate_up_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) biases [..., ffn] of a gate_up bias stored as the layout says."""
    return _gate_and_up(layout, gate_up_bias)


def _gate_and_up(layout: ExpertLayout, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) of a gate_up projection's output [..., 2*ffn]."""
    if layout.interleaved:
        return projected[..., ::2], projected[..., 1::2]
    gate, up = projected.chunk(2, dim=-1)
    return gate, up


def _apply(layout: ExpertLayout, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    weight = weight.to(x.dtype)  # a streamed quantized expert is read in float32 (streaming.LayerEdit.float32)
    if layout.transposed:
        return x @ weight if bias is None else x @ weight + bias
    return F.linear(x, weight, bias)


def _bias(layout: ExpertLayout, experts, stack: str, expert: int) -> torch.Tensor | None:
    return getattr(experts, f"{stack}_bias")[expert] if layout.biases else None
