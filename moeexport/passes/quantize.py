"""Expert Slimming by quantization: GPTQ or round-to-nearest onto a symmetric int grid.

    - quantize: {method: gptq, bits: 4, group_size: 128}
    - quantize: {method: rtn, bits: 8}

Only the routed experts are quantized by default (`shared_experts: true` adds
the shared experts); router, norms, attention and embeddings stay in high
precision. The weights stay float32 tensors lying exactly on the grid of
moeexport/quantization.py (w = code * scale, one scale per row and group of
`group_size` input columns), and the model config records
`moeexport_weight_grid = {"bits", "group_size", "method", "targets"}`, with
targets "experts" or "experts+shared_experts", for the exporters
(`recover_grid`) and for the saved checkpoint's config.json.

GPTQ (Frantar et al. 2022) quantizes one input column at a time and spreads
each column's rounding error over the columns not yet quantized through the
inverse Hessian of the matrix's own inputs (a routed expert: its routed tokens
only), with `damp` x mean diagonal added; blocks of 128 columns. The group's
scale is fixed when its first column is reached (from the error-updated
weights). `act_order: true` visits columns by decreasing Hessian diagonal; the
groups then keep their original columns and their scales come from the
original weights (GPTQ's static groups), so the grid layout is unchanged. An
expert routed fewer than `min_tokens` tokens is rounded to nearest instead and
listed in the outcome.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from moeexport.errors import MoeExportError
from moeexport.passes.slimming import ExpertSlimmingPass, SlimmingOptions, SlimmingPlan, inverse_hessian_factor, target_dtypes
from moeexport.quantization import dequantize, group_scales, quantize_rtn, round_to_grid

GPTQ_BLOCK = 128
GRID_ATTRIBUTE = "moeexport_weight_grid"


class QuantizeOptions(SlimmingOptions):
    method: Literal["gptq", "rtn"]
    bits: Literal[4, 8]
    group_size: int = Field(128, ge=1, description="input columns per scale; must divide every target input width")
    damp: float = Field(0.01, gt=0, le=1, description="GPTQ dampening, a share of the mean Hessian diagonal")
    act_order: bool = False


def gptq(weight: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int, damp: float, act_order: bool):
    """(codes int8 [N, K], scales float32 [N, K / group_size]) of `weight` [N, K] for inputs with Gram `gram`."""
    weight = weight.float().clone()
    rows, width = weight.shape
    order = torch.argsort(gram.diagonal(), descending=True) if act_order else torch.arange(width)
    group_of = order // group_size  # the group of the column quantized at each step
    scales = group_scales(weight.reshape(rows, -1, group_size), bits) if act_order else torch.empty(rows, width // group_size)
    weight = weight[:, order]
    inverse = inverse_hessian_factor(gram[order][:, order], damp)
    codes = torch.empty(rows, width)
    step = max(group_size, GPTQ_BLOCK // group_size * group_size)  # a group never straddles two blocks
    for start in range(0, width, step):
        end = min(start + step, width)
        block, block_inverse = weight[:, start:end].clone(), inverse[start:end, start:end]
        errors = torch.zeros_like(block)
        for column in range(end - start):
            if not act_order and (start + column) % group_size == 0:
                scales[:, group_of[start + column]] = group_scales(block[:, column : column + group_size], bits)
            scale = scales[:, group_of[start + column]]
            code = round_to_grid(block[:, column], scale, bits)
            codes[:, start + column] = code
            error = (block[:, column] - code * scale) / block_inverse[column, column]
            block[:, column:] -= error[:, None] * block_inverse[column, column:][None, :]
            errors[:, column] = error
        weight[:, end:] -= errors @ inverse[start:end, end:]
    codes = codes[:, torch.argsort(order)]
    return codes.to(torch.int8), scales


class Quantize(ExpertSlimmingPass):
    name = "quantize"
    Options = QuantizeOptions
    calibrated_methods = {"gptq": "full"}
    fallback = "round-to-nearest"

    def settings(self, options: QuantizeOptions) -> dict:
        settings = {"bits": options.bits, "group_size": options.group_size}
        return settings | ({"damp": options.damp, "act_order": options.act_order} if options.method == "gptq" else {})

    def check_input_width(self, options: QuantizeOptions, width: int, what: str) -> None:
        if width % options.group_size:
            raise MoeExportError(
                f"quantize group_size {options.group_size} does not divide the {what} {width}; choose a divisor of it"
            )

    def check_model(self, options: QuantizeOptions, model) -> None:
        super().check_model(options, model)
        dtypes = target_dtypes(model, options.shared_experts) - {torch.float32}
        if dtypes:
            raise MoeExportError(
                f"quantize needs float32 expert weights to hold the grid exactly, the model has {sorted(map(str, dtypes))}; "
                "load it with --dtype float32"
            )

    def slim(self, weight: torch.Tensor, gram: torch.Tensor | None, plan: SlimmingPlan) -> torch.Tensor:
        if plan.method == "rtn":
            return self.fallback_slim(weight, plan)
        s = plan.settings
        codes, scales = gptq(weight, gram, s["bits"], s["group_size"], s["damp"], s["act_order"])
        return dequantize(codes, scales, s["group_size"])

    def fallback_slim(self, weight: torch.Tensor, plan: SlimmingPlan) -> torch.Tensor:
        codes, scales = quantize_rtn(weight, plan.settings["bits"], plan.settings["group_size"])
        return dequantize(codes, scales, plan.settings["group_size"])

    def apply(self, model, plan: SlimmingPlan, tokens: torch.Tensor | None = None, progress=None) -> SlimmingPlan:
        performed = super().apply(model, plan, tokens, progress)
        setattr(model.config, GRID_ATTRIBUTE, {
            "bits": plan.settings["bits"],
            "group_size": plan.settings["group_size"],
            "method": plan.method,
            "targets": "experts+shared_experts" if plan.shared_experts else "experts",
        })
        return performed

