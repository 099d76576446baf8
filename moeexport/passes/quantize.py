"""Expert Slimming by quantization: GPTQ or round-to-nearest onto a symmetric int grid.

    - quantize: {method: gptq, bits: 4, group_size: 128}
    - quantize: {method: rtn, bits: 8}

Only the routed experts are quantized by default (`shared_experts: true` adds
the shared experts); router, norms, attention and embeddings stay in high
precision. The weights stay float32 tensors lying exactly on the grid of
moeexport/quantization.py (w = code * scale, one scale per row and group of
`group_size` input columns), and the model config records the `WeightGrid` as
`moeexport_weight_grid = {"bits", "group_size", "method", "targets"}`, with
targets "experts" or "experts+shared_experts", so that the saved checkpoint's
config.json keeps it; callers hand `weight_grid(model)` to the exporters
(`recover_grid`).

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

from dataclasses import replace

import torch

from moeexport.adapters import adapter_for
from moeexport.adapters.experts import expert_stacks
from moeexport.errors import MoeExportError
from moeexport.pass_options import QuantizeOptions
from moeexport.passes.slimming import (ExpertSlimmingPass, SlimmingOutcome, SlimmingPlan,
                                       inverse_hessian_factor, squared_norms, target_dtypes)
from moeexport.quantization import GRID_ATTRIBUTE, WeightGrid, dequantize, group_scales, quantize_rtn, round_to_grid
from moeexport.streaming import stream_of

GPTQ_BLOCK = 128


def gptq(weights: torch.Tensor, grams: torch.Tensor, bits: int, group_size: int, damp: float, act_order: bool):
    """(codes int8 [B, N, K], scales float32 [B, N, K / group_size], the loss tr(dW H dW^T) per matrix with H the
    damped Gram matrix) of a stack of matrices [B, N, K], each for inputs with Gram matrix grams[b] [K, K],
    which this overwrites (slimming.inverse_hessian_factor) unless `act_order`."""
    weights = weights.float()  # aliases float32 weights: every branch below copies before writing
    count, rows, width = weights.shape
    if act_order:
        order = torch.argsort(grams.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True)
        scales = group_scales(weights.reshape(count, rows, -1, group_size), bits)  # static groups
        weights = weights[torch.arange(count)[:, None], :, order].transpose(1, 2)
    else:
        order = torch.arange(width).expand(count, width)
        scales = torch.empty(count, rows, width // group_size)
        weights = weights.clone()
    group_of = order // group_size  # [B, K]: the group of the column quantized at each step
    inverse = inverse_hessian_factor(grams, damp, order if act_order else None)
    codes, loss = torch.empty(count, rows, width, dtype=torch.int8), torch.zeros(count)
    step = max(group_size, GPTQ_BLOCK // group_size * group_size)  # a group never straddles two blocks
    for start in range(0, width, step):
        end = min(start + step, width)
        block, block_inverse = weights[..., start:end].clone(), inverse[:, start:end, start:end]
        errors = torch.zeros_like(block)
        for column in range(end - start):
            if not act_order and (start + column) % group_size == 0:
                scales[..., (start + column) // group_size] = group_scales(block[..., column : column + group_size], bits)
            scale = scales.gather(2, group_of[:, None, start + column, None].expand(count, rows, 1))[..., 0]
            code = round_to_grid(block[..., column], scale, bits)
            codes[..., start + column] = code
            error = (block[..., column] - code * scale) / block_inverse[:, column, column, None]
            block[..., column:] -= error[..., None] * block_inverse[:, None, column, column:]
            errors[..., column] = error
        # W - Q = E U (E the scaled errors, U the factor) and H^-1 = U^T U, so tr(dW H dW^T) = ||E||^2
        loss += squared_norms(errors)
        weights[..., end:].baddbmm_(errors, inverse[:, start:end, end:], alpha=-1)
    if act_order:
        codes = codes.gather(2, torch.argsort(order, dim=-1)[:, None, :].expand(count, rows, width))
    return codes, scales, loss


class Quantize(ExpertSlimmingPass):
    name = "quantize"
    Options = QuantizeOptions
    calibrated_methods = {"gptq": "full"}
    fallback = "round-to-nearest"
    exact_in_float32 = True  # a grid's values (code x float32 scale): a stream reads them in float32

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
        if dtypes and stream_of(model) is None:  # a stream reads its quantized experts in float32
            raise MoeExportError(
                f"quantize needs float32 expert weights to hold the grid exactly, the model has {sorted(map(str, dtypes))}; "
                "load it with --dtype float32"
            )

    def solve(self, weights: torch.Tensor, grams: torch.Tensor, plan: SlimmingPlan) -> tuple[torch.Tensor, torch.Tensor]:
        s = plan.settings
        codes, scales, loss = gptq(weights, grams, s["bits"], s["group_size"], s["damp"], s["act_order"])
        return dequantize(codes, scales, s["group_size"]), loss

    def fallback_slim(self, weights: torch.Tensor, plan: SlimmingPlan) -> torch.Tensor:
        codes, scales = quantize_rtn(weights, plan.settings["bits"], plan.settings["group_size"])
        return dequantize(codes, scales, plan.settings["group_size"])

    def streams(self, options: QuantizeOptions) -> bool:
        # rounding needs nothing but the expert; GPTQ's experts are computed when their layer is calibrated
        return not options.shared_experts

    def apply(self, model, plan: SlimmingPlan, tokens: torch.Tensor | None = None, progress=None) -> SlimmingPlan:
        stream = stream_of(model)
        if stream is not None and plan.method == "rtn":
            performed = self._apply_on_read(model, stream, plan)
        else:
            performed = super().apply(model, plan, tokens, progress)
        grid = WeightGrid(
            bits=plan.settings["bits"],
            group_size=plan.settings["group_size"],
            method=plan.method,
            targets="experts+shared_experts" if plan.shared_experts else "experts",
        )
        setattr(model.config, GRID_ATTRIBUTE, grid.to_dict())  # the persisted form: config.json keeps it
        return performed


    def _apply_on_read(self, model, stream, plan: SlimmingPlan) -> SlimmingPlan:
        """A streamed model's experts are rounded onto the grid as each is read (the same rounding, expert by
        expert: it works row by row). The outcome counts what is rewritten; zeros are not counted."""
        adapter, matrices, weights = adapter_for(model.config), 0, 0
        layout = adapter.expert_layout(model.config)
        transposed = layout.transposed  # stored [inputs, outputs]: round its columns

        def round_expert(matrix: torch.Tensor, stack: str, expert: int, rows: slice) -> torch.Tensor:
            if transposed:
                return self.fallback_slim(matrix.T[None], plan)[0].T
            return self.fallback_slim(matrix[None], plan)[0]

        for layer in plan.layers:
            experts = adapter.layer_view(model, layer).experts
            stream.transform_experts(layer, round_expert, float32=self.exact_in_float32)
            stacks = [getattr(experts, stack) for stack in expert_stacks(replace(layout, biases=False))]
            matrices += sum(stack.shape[0] for stack in stacks)
            weights += sum(stack.numel() for stack in stacks)
        outcome = SlimmingOutcome(tokens_seen={}, fallbacks=[], matrices=matrices, weights=weights, zeros=None,
                                  output_error=None)
        return replace(plan, outcome=outcome)
