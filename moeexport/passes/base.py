"""What a compression pass is.

A pass has strict options (a pydantic model), a pure `plan` from statistics and
the model's structure to a plan (plain data: printable, diffable, saved in the
manifest), and `apply`, which performs a plan on the torch model. The pipeline
drives each recipe entry through `check` and `check_model` (before any
calibration, and again right before planning) -> `plan` -> `apply`, once. A
pass that measures what its removals cost (`needs_scorer`) gets a RemovalScorer
in `plan`: the plan is still plain data, now with the damage it measured.

A pass whose new weights are computed from calibration activations (pruning,
GPTQ) says so in `needs_activations`: its plan names the targets, and the
pipeline calls `apply(model, plan, tokens=calibration token ids [N, L],
progress=...)`. `apply` may return the plan as performed (the same plan with
its outcome filled in: tokens seen per expert, fallbacks, what changed), which
the pipeline records instead of the plan it was given.
"""

from __future__ import annotations

from typing import ClassVar

from moeexport.adapters import LayerSpec
from moeexport.calibration.observers import Statistics
from moeexport.errors import MoeExportError
from moeexport.pass_options import PassOptions

MEASURED = ("perplexity", "kl")  # scores that measure each removal's damage on calibration tokens


class CompressionPass:
    name: ClassVar[str]
    Options: ClassVar[type[PassOptions]]

    def needs_statistics(self, options: PassOptions) -> bool:
        """Selections score with the observed statistics, except the `score: random` control and the scores
        that measure removals (`score: perplexity | kl`)."""
        return getattr(options, "score", None) not in ("random", *MEASURED)

    def needs_scorer(self, options: PassOptions) -> bool:
        """True when `plan` measures removals itself (`score: perplexity | kl`): it is given a scorer=RemovalScorer
        (calibration/damage.py) on the model as it stands."""
        return getattr(options, "score", None) in MEASURED

    def streams(self, options: PassOptions) -> bool:
        """True when `apply` works on a streamed model (moeexport.streaming): it removes blocks, sublayers or
        experts through the surgery in adapters/surgery.py, which the stream records, or it changes each expert
        matrix on its own, which the stream applies as the expert is read."""
        return False

    def needs_activations(self, options: PassOptions) -> bool:
        """True when `apply` needs the calibration tokens (see the module docstring)."""
        return False

    def refits(self, options: PassOptions) -> str | None:
        """What `apply` solves for on calibration activations (`repair: refit`): "attention" (an attention output
        projection per absorbing layer) or "experts" (a layer's kept experts at a time); None: nothing."""
        return None

    def experts_left(self, options: PassOptions) -> int | None:
        """Routed experts per MoE layer after `apply` (the average); None: as many as before."""
        return None

    def resolve(self, options: PassOptions, config, calibrated: bool) -> tuple[PassOptions, str]:
        """`options` with each `auto` decided for a model of this transformers `config` (`calibrated`: with
        calibration tokens), and a line saying what was decided and why ("" when nothing was)."""
        return options, ""

    def check(self, options: PassOptions, layers: list[LayerSpec]) -> None:
        """Raise MoeExportError when the options cannot apply to a model of this structure."""

    def check_model(self, options: PassOptions, model) -> None:
        """Raise MoeExportError when the options cannot apply to this model's weights (widths, dtypes)."""

    def plan(self, statistics: Statistics | None, layers: list[LayerSpec], options: PassOptions):
        raise NotImplementedError

    def plan_context(self, options: PassOptions, model) -> dict:
        """Keyword arguments `plan` takes from the model beyond its layer structure (Expert Drop: the expert
        groups its routing chooses within)."""
        return {}

    def apply(self, model, plan):
        """Perform `plan` on `model`; return None, or the plan as performed."""
        raise NotImplementedError


def check_expert_keep(name: str, keep: int, scope: str, layers: list[LayerSpec]) -> None:
    """A per-layer `keep` can be at most the largest layer's experts; a global one, the average."""
    counts = [spec.num_experts for spec in layers if spec.kind == "moe"]
    if not counts:
        raise MoeExportError(f"{name}: the model has no MoE layers left")
    limit = max(counts) if scope == "layer" else sum(counts) / len(counts)
    if keep > limit:
        what = "the largest layer has" if scope == "layer" else "layers have on average"
        raise MoeExportError(f"{name} keep={keep} but {what} {limit:g} experts")


def check_moe_remains(name: str, allow_empty_layers: bool, before: list[LayerSpec], after: list[LayerSpec]) -> None:
    """Refuse a drop that leaves the model without a MoE layer with experts, unless the step allows it."""
    def routed(layers: list[LayerSpec]) -> int:
        return sum(spec.kind == "moe" and spec.num_experts > 0 for spec in layers)

    if not allow_empty_layers and routed(before) and not routed(after):
        raise MoeExportError(
            f"{name} would leave the model without MoE layers (no routed experts in any layer); "
            "drop less, or add allow_empty_layers: true to the step if that is meant"
        )
