"""The symmetric integer weight grid that the quantize pass leaves and the exporters read back.

Contract (exporters depend on it):
- A quantized weight [..., N, K] is stored as a float32 tensor lying exactly on a
  grid: w = code * scale, with one scale per row and per group of `group_size`
  consecutive input (contraction) columns, and integer codes in
  [-2^(b-1), 2^(b-1) - 1].
- scale = absmax(group) / (2^(b-1) - 1), rounded to 11 significant bits (float16's
  precision): code * scale is then exact in float32, and a float16 copy of the
  scale loses nothing within float16's range. An all-zero group has scale 1.
  No scale is 0, NaN or infinite.
- The grid itself is a `WeightGrid`. The model config records it as the dict
  `moeexport_weight_grid = {"bits", "group_size", "method", "targets"}` (see
  passes/quantize.py), so that it survives save/load; `weight_grid(model)` reads it
  back. Exporters take it as an explicit argument and never read the config.
- `recover_grid` gives back codes and scales from the float weights exactly, and
  refuses weights that are not on a grid (for instance a bfloat16 copy).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from moeexport.errors import MoeExportError

SUPPORTED_BITS = (4, 8)
SCALE_SIGNIFICANT_BITS = 11
GRID_ATTRIBUTE = "moeexport_weight_grid"  # the config attribute that persists the grid


@dataclass(frozen=True)
class WeightGrid:
    """The symmetric integer grid a quantize pass left the expert weights on."""

    bits: int  # 4 or 8
    group_size: int  # input columns per scale
    method: str  # how the codes were chosen: gptq | rtn
    targets: str  # what lies on it: "experts" or "experts+shared_experts"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> WeightGrid:
        return cls(**raw)


def weight_grid(model) -> WeightGrid | None:
    """The grid recorded on the model's config by a quantize pass (kept through save/load), or None."""
    raw = getattr(model.config, GRID_ATTRIBUTE, None)
    return WeightGrid.from_dict(raw) if raw else None


def code_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """[..., N, K] -> [..., N, K / group_size, group_size] (float32)."""
    width = weight.shape[-1]
    if width % group_size:
        raise MoeExportError(f"group_size {group_size} does not divide the input width {width}; choose a divisor of it")
    return weight.float().reshape(*weight.shape[:-1], width // group_size, group_size)


def short_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round positive scales to 11 significant bits, so that code * scale is exact in float32."""
    mantissa, exponent = torch.frexp(scale)
    steps = 2**SCALE_SIGNIFICANT_BITS
    return torch.ldexp(torch.round(mantissa * steps) / steps, exponent)


def group_scales(groups: torch.Tensor, bits: int) -> torch.Tensor:
    """One symmetric scale per group (last dimension): absmax / (2^(b-1) - 1); an all-zero group gets 1."""
    scale = short_scale(groups.abs().amax(dim=-1) / code_range(bits)[1])
    # a zero (or underflowed) scale would make every code NaN: such a group is all zero and stays so with scale 1
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    check_scales(scale)
    return scale


def check_scales(scales: torch.Tensor) -> None:
    if not (torch.isfinite(scales).all() and (scales > 0).all()):
        raise MoeExportError("quantization produced a zero, NaN or infinite scale: the weights hold NaN or infinity")


def round_to_grid(values: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of `values` on the grid of `scale` (broadcast), clamped to the code range."""
    low, high = code_range(bits)
    return torch.clamp(torch.round(values / scale), low, high)


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (codes int8 [..., N, K], scales float32 [..., N, K / group_size])."""
    groups = _grouped(weight, group_size)
    scales = group_scales(groups, bits)
    codes = round_to_grid(groups, scales[..., None], bits)
    return codes.reshape(weight.shape).to(torch.int8), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 weights of (codes, scales): exactly code * scale (scaled in place: one new matrix)."""
    weights = codes.to(torch.float32, copy=True)
    _grouped(weights, group_size).mul_(scales[..., None])
    return weights


def _candidate_maxima(bits: int) -> list[int]:
    """Largest |code| a group may have, most likely first: 2^(b-1)-1 (every absmax element of
    round-to-nearest, most GPTQ groups), 2^(b-1) (a GPTQ group clamped at the negative end), then smaller."""
    high = code_range(bits)[1]
    return [high, high + 1, *range(high - 1, 0, -1)]


def recover_grid(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [..., N, K], scales float32 [..., N, K / group_size]) with code * scale == weight exactly.

    Per group, the scale is absmax / c for the first c (of `_candidate_maxima`) that
    puts every element on an in-range integer code and reproduces it bit for bit.
    """
    if bits not in SUPPORTED_BITS:
        raise MoeExportError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    groups = _grouped(weight, group_size)
    flat = groups.reshape(-1, group_size)
    absmax = flat.abs().amax(dim=-1)
    scales = torch.ones(len(flat), dtype=torch.float32)
    codes = torch.zeros(flat.shape, dtype=torch.float32)
    resolved = absmax == 0  # all-zero groups: scale 1, codes 0
    low, high = code_range(bits)
    for maximum in _candidate_maxima(bits):
        pending = torch.where(~resolved)[0]
        if len(pending) == 0:
            break
        scale = absmax[pending] / maximum
        candidate = torch.round(flat[pending] / scale[:, None])
        fits = ((candidate >= low) & (candidate <= high) & (candidate * scale[:, None] == flat[pending])).all(dim=-1)
        accepted = pending[fits]
        scales[accepted], codes[accepted] = scale[fits], candidate[fits]
        resolved[accepted] = True
    if not resolved.all():
        first = int(torch.where(~resolved)[0][0])
        row, group = divmod(first, groups.shape[-2])
        raise MoeExportError(
            f"weights of shape {tuple(weight.shape)} are not on a symmetric int{bits} grid with group_size "
            f"{group_size} (first off-grid group: row {row}, group {group}); quantize them with the quantize pass "
            "and keep them float32 (a bfloat16/float16 copy of on-grid weights is off the grid)"
        )
    check_scales(scales)
    return codes.reshape(weight.shape).to(torch.int8), scales.reshape(groups.shape[:-1])
