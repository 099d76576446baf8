"""Every compression pass's options, importable without torch.

A recipe is validated against these models before anything heavy is imported,
so a typo is refused in a fraction of a second; the passes (moeexport/passes/,
which need torch) import their options from here. OPTIONS maps the name a
recipe uses to its options model, in the order `--help` and errors list them.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class PassOptions(BaseModel):
    """Options of one pass: unknown keys are errors, values are validated strictly
    (`keep: true` or `keep: "6"` is an error, not 1 or 6; an int is still a valid float)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# --- trimming (passes/trim.py) ------------------------------------------------------------

SEED = Field(0, ge=0, description="seed of score: random")
ALLOW_EMPTY = Field(False, description="let the drop leave MoE layers without experts, or the model without MoE layers")
REPAIR = Field("auto", description="refit: least-squares refit, on calibration tokens, of the weights that absorb "
                                   "what was removed (passes/repair.py); auto (default): refit where the model's "
                                   "layout takes it, else none (the run says which and why)")
RIDGE = Field(0.1, gt=0, description="repair: refit, the pull towards the original weights")


class BlockDropOptions(PassOptions):
    n: int = Field(ge=1, description="number of decoder blocks to drop")
    mode: Literal["discrete", "consecutive"] = "discrete"
    score: Literal["perplexity", "kl", "similarity", "random"] = "perplexity"
    seed: int = SEED
    allow_empty_layers: bool = ALLOW_EMPTY
    repair: Literal["auto", "none", "refit"] = REPAIR
    ridge: float = RIDGE


class LayerDropOptions(PassOptions):
    n: int = Field(ge=1, description="number of MoE sublayers to drop")
    score: Literal["perplexity", "kl", "similarity", "random"] = "perplexity"
    seed: int = SEED
    allow_empty_layers: bool = ALLOW_EMPTY
    repair: Literal["auto", "none", "refit"] = REPAIR
    ridge: float = RIDGE


class ExpertDropOptions(PassOptions):
    keep: int = Field(ge=0, description="experts kept per MoE layer (the average, for scope global)")
    scope: Literal["layer", "global"] = "layer"
    min_keep: int = Field(default=0, ge=0, description="scope global: every layer keeps at least this many "
                                                       "(and at least 1 unless allow_empty_layers)")
    score: Literal["reap", "perplexity", "kl", "frequency", "routing_mass", "random"] = "reap"
    seed: int = SEED
    allow_empty_layers: bool = ALLOW_EMPTY
    repair: Literal["auto", "none", "refit"] = REPAIR
    ridge: float = RIDGE


# --- merging (passes/merge.py) ------------------------------------------------------------


class CompressOptions(PassOptions):
    rank: int = Field(ge=1, description="rank r of the low-rank part U·V of each expert matrix")
    sparsity: float = Field(ge=0, lt=1, description="share of the residual W - U·V set to zero (lowest magnitude)")


class MergeOptions(PassOptions):
    keep: int = Field(ge=1, description="experts per MoE layer after merging (the average, for scope global)")
    scope: Literal["layer", "global"] = "layer"
    router: Literal["frequency_weighted", "dominant"] = "frequency_weighted"
    align: bool = True  # weight-matching permutation alignment before averaging
    layout: Literal["grouped", "alias"] = "grouped"
    compress: CompressOptions | None = None


# --- Expert Slimming (passes/slimming.py, prune.py, quantize.py) --------------------------

# An expert routed fewer tokens than this has a Gram matrix of rank < 64: GPTQ / SparseGPT would
# mostly fit its few tokens (and the dampening), Wanda would rank columns from a handful of samples.
DEFAULT_MIN_TOKENS = 64


class SlimmingOptions(PassOptions):
    shared_experts: bool = False  # also slim the always-on shared experts
    min_tokens: int = Field(DEFAULT_MIN_TOKENS, ge=1, description="routed tokens below which an expert gets the fallback")


def n_of_m(pattern: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): zeros, group width."""
    return None if pattern is None else tuple(int(part) for part in pattern.split(":"))


class PruneOptions(SlimmingOptions):
    method: Literal["wanda", "sparsegpt", "magnitude"]
    sparsity: float | None = Field(None, gt=0, lt=1, description="share of weights set to zero")
    pattern: str | None = None  # "N:M": N zeros in every M consecutive input weights
    damp: float = Field(0.01, gt=0, le=1, description="SparseGPT dampening, a share of the mean Hessian diagonal")

    @field_validator("pattern")
    @classmethod
    def _valid_pattern(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            match = re.fullmatch(r"(\d+):(\d+)", pattern)
            if not match or not 0 < int(match[1]) < int(match[2]):
                raise ValueError(f"pattern must be 'N:M' with 0 < N < M (N zeros in every M weights), e.g. '2:4'; got {pattern!r}")
        return pattern

    @model_validator(mode="after")
    def _sparsity_or_pattern(self):
        if self.pattern is None and self.sparsity is None:
            raise ValueError("give sparsity (e.g. 0.5) or pattern (e.g. '2:4')")
        if self.pattern is not None and self.sparsity is not None:
            zeros, group = n_of_m(self.pattern)
            if abs(self.sparsity - zeros / group) > 1e-9:
                raise ValueError(f"sparsity {self.sparsity} contradicts pattern {self.pattern} ({zeros / group:g}); give one of them")
        return self


class QuantizeOptions(SlimmingOptions):
    method: Literal["gptq", "rtn"]
    bits: Literal[4, 8]
    group_size: int = Field(128, ge=1, description="input columns per scale; must divide every target input width")
    damp: float = Field(0.01, gt=0, le=1, description="GPTQ dampening, a share of the mean Hessian diagonal")
    act_order: bool = False


OPTIONS: dict[str, type[PassOptions]] = {
    "block_drop": BlockDropOptions, "layer_drop": LayerDropOptions, "expert_drop": ExpertDropOptions,
    "merge": MergeOptions, "prune": PruneOptions, "quantize": QuantizeOptions,
}
