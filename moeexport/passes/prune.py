"""Expert Slimming by pruning: Wanda, SparseGPT and magnitude inside the experts.

    - prune: {method: wanda, sparsity: 0.5}
    - prune: {method: sparsegpt, pattern: "2:4"}

Unstructured (default): `sparsity` of every matrix's weights become zero.
`pattern: "N:M"`: N zeros in every M consecutive weights along the input
(contraction) dimension of each row, as the Wanda / SparseGPT code reads it
("2:4" = 50%); `sparsity`, if given too, must equal N/M. Methods:
- magnitude: lowest |W| per output row (no calibration);
- wanda (Sun et al. 2023): lowest |W_ij| * ||X_j|| per output row, X the inputs
  the matrix saw (an expert's routed tokens only);
- sparsegpt (Frantar & Alistarh 2023): optimal-brain-surgeon pruning with the
  matrix's Hessian X^T X, `damp` x mean diagonal added, in blocks of 128 columns;
  each block's mask takes its lowest w^2 / [H^-1]_jj^2 over the whole block
  (unstructured) or per N:M group, and the remaining weights absorb the error.
Pruned weights stay as dense tensors holding zeros. An expert routed fewer than
`min_tokens` calibration tokens is magnitude-pruned instead (listed in the outcome).
"""

from __future__ import annotations


import torch

from moeexport.errors import MoeExportError
from moeexport.pass_options import PruneOptions, n_of_m
from moeexport.passes.slimming import ExpertSlimmingPass, SlimmingPlan, inverse_hessian_factor, squared_norms

SPARSEGPT_BLOCK = 128


def _sparsity(plan: SlimmingPlan) -> float:
    return plan.settings["sparsity"]


def _pattern(plan: SlimmingPlan) -> tuple[int, int] | None:
    return n_of_m(plan.settings["pattern"])


def prune_lowest(weights: torch.Tensor, score: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None) -> torch.Tensor:
    """`weights` [..., N, K] with the lowest-scoring entries zeroed: int(K * sparsity) per row, or N of every M."""
    if pattern is None:
        drop = score.topk(int(weights.shape[-1] * sparsity), dim=-1, largest=False).indices
        return weights.scatter(-1, drop, 0.0)
    zeros, group = pattern
    grouped = (*weights.shape[:-1], weights.shape[-1] // group, group)
    drop = score.reshape(grouped).topk(zeros, dim=-1, largest=False).indices
    return weights.reshape(grouped).scatter(-1, drop, 0.0).reshape(weights.shape)


def wanda(weights: torch.Tensor, input_squares: torch.Tensor, sparsity: float, pattern) -> torch.Tensor:
    """Wanda: |W_ij| * ||X_j||, from the per-column sums of squared inputs [..., K]."""
    return prune_lowest(weights, weights.abs() * input_squares.sqrt()[..., None, :], sparsity, pattern)


def sparsegpt(weights: torch.Tensor, grams: torch.Tensor, sparsity: float, pattern, damp: float):
    """SparseGPT on a stack [B, N, K]: prune column by column, each pruned weight's error spread over the
    columns after it through the inverse Hessian. (The pruned weights, the loss tr(dW H dW^T) per matrix with
    H the damped Gram matrix); `grams` [B, K, K] are overwritten (slimming.inverse_hessian_factor)."""
    weights = weights.float().clone()
    width = weights.shape[-1]
    inverse, loss = inverse_hessian_factor(grams, damp), torch.zeros(len(weights))
    # N:M groups must not straddle two blocks
    step = SPARSEGPT_BLOCK if pattern is None else max(pattern[1], SPARSEGPT_BLOCK // pattern[1] * pattern[1])
    for start in range(0, width, step):
        end = min(start + step, width)
        block, block_inverse = weights[..., start:end].clone(), inverse[:, start:end, start:end]
        errors = torch.zeros_like(block)
        saliency_scale = block_inverse.diagonal(dim1=-2, dim2=-1).pow(2)[:, None, :]  # [B, 1, width]
        mask = torch.zeros_like(block, dtype=torch.bool)
        if pattern is None:
            saliency = (block.pow(2) / saliency_scale).flatten(1)
            drop = saliency.topk(int(saliency.shape[1] * sparsity), dim=1, largest=False).indices
            mask.view(len(mask), -1).scatter_(1, drop, True)
        for column in range(end - start):
            if pattern is not None and column % pattern[1] == 0:
                group = slice(column, column + pattern[1])
                saliency = block[..., group].pow(2) / saliency_scale[..., group]
                mask[..., group] = mask[..., group].scatter(-1, saliency.topk(pattern[0], dim=-1, largest=False).indices, True)
            values = block[..., column]
            pruned = torch.where(mask[..., column], 0.0, values)
            error = (values - pruned) / block_inverse[:, column, column, None]
            block[..., column:] -= error[..., None] * block_inverse[:, None, column, column:]
            block[..., column] = pruned
            errors[..., column] = error
        weights[..., start:end] = block
        loss += squared_norms(errors)  # as in GPTQ, W - W' = E U
        weights[..., end:].baddbmm_(errors, inverse[:, start:end, end:], alpha=-1)
    return weights, loss


class Prune(ExpertSlimmingPass):
    name = "prune"
    Options = PruneOptions
    calibrated_methods = {"wanda": "diagonal", "sparsegpt": "full"}
    fallback = "magnitude pruning"

    def settings(self, options: PruneOptions) -> dict:
        pattern = n_of_m(options.pattern)
        sparsity = options.sparsity if pattern is None else pattern[0] / pattern[1]
        settings = {"sparsity": sparsity, "pattern": options.pattern}
        return settings | ({"damp": options.damp} if options.method == "sparsegpt" else {})

    def streams(self, options: PruneOptions) -> bool:
        """A streamed expert is pruned as it is read (magnitude, Wanda: row by row, from a vector per expert
        matrix) or when its layer is calibrated (SparseGPT, kept on disk until read); shared experts are read
        with their layer, which a stream does not rewrite."""
        return not options.shared_experts

    def check_input_width(self, options: PruneOptions, width: int, what: str) -> None:
        pattern = n_of_m(options.pattern)
        if pattern and width % pattern[1]:
            raise MoeExportError(f"prune pattern {options.pattern}: groups of {pattern[1]} do not divide the {what} {width}")

    def solve(self, weights: torch.Tensor, grams: torch.Tensor, plan: SlimmingPlan) -> tuple[torch.Tensor, torch.Tensor]:
        return sparsegpt(weights, grams, _sparsity(plan), _pattern(plan), plan.settings["damp"])

    def slim(self, weights: torch.Tensor, diagonals: torch.Tensor | None, plan: SlimmingPlan) -> torch.Tensor:
        if plan.method == "wanda":
            return wanda(weights, diagonals, _sparsity(plan), _pattern(plan))
        return self.fallback_slim(weights, plan)

    def fallback_slim(self, weights: torch.Tensor, plan: SlimmingPlan) -> torch.Tensor:
        return prune_lowest(weights, weights.abs(), _sparsity(plan), _pattern(plan))
