"""Expert Slimming (He et al.): passes that rewrite every expert weight matrix in place.

The prune and quantize passes share this frame. `plan` (pure) names the targets:
the routed experts of every MoE layer, and the shared experts when
`shared_experts: true` (off by default: they see every token and are the most
sensitive part, HE Table 8). The new weights depend on calibration activations,
so they are computed in `apply`: the calibration set runs through the model one
decoder layer at a time, each target layer's expert inputs are gathered
(calibration/expert_inputs.py: a routed expert sees ONLY its routed tokens), the
layer is slimmed, and its slimmed outputs feed the next layer. `apply` returns
the plan with its outcome filled in: tokens seen per expert, which experts got
the fallback, how many weights changed and how many are zero, and the mean
relative output error ||dW X||^2 / ||W X||^2 over the calibrated matrices.

An expert routed fewer than `min_tokens` calibration tokens is not slimmed from
its thin statistics: it gets the pass's data-free fallback (magnitude pruning,
round-to-nearest) and the outcome lists it with its token count.

A streamed model (moeexport.streaming) is slimmed the same way, layer by layer,
to the same weights: a method that needs a vector per matrix (Wanda's input
norms; none for magnitude) rewrites each routed expert as it is read; GPTQ and
SparseGPT make each expert's Gram matrices from its routed tokens one expert at
a time, and its new matrices wait on disk until read. Shared experts are read
with their layer, which a stream does not rewrite: they are refused streamed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar

import scipy.linalg.lapack
import torch

from moeexport.adapters import LayerSpec, LayerView, adapter_for
from moeexport.adapters.experts import expert_stacks
from moeexport.calibration.expert_inputs import (RoutedRows, collect_layer_inputs, collect_routed_rows, layer_by_layer,
                                                 output_error, quadratic_form)
from moeexport.calibration.observers import Statistics
from moeexport.errors import MoeExportError
from moeexport.pass_options import SlimmingOptions
from moeexport.passes.base import CompressionPass
from moeexport.streaming import SpilledExperts, stream_of


@dataclass
class SlimmingOutcome:
    tokens_seen: dict[int, list[int]]  # MoE layer -> calibration tokens routed to each expert ({} if not calibrated)
    fallbacks: list[dict]  # {"layer", "expert", "tokens"}: experts under min_tokens, slimmed by the fallback
    matrices: int  # weight matrices rewritten
    weights: int  # weights in them
    zeros: int | None  # of those, weights that are zero afterwards (None: streamed, rewritten as each is read)
    output_error: float | None  # mean ||dW X||^2 / ||W X||^2 over matrices with a full Gram matrix


@dataclass
class SlimmingPlan:
    method: str
    settings: dict  # the method's parameters
    layers: dict[int, int]  # target MoE layer -> its routed experts
    shared_experts: bool  # asked for and present in the model
    min_tokens: int
    fallback: str
    outcome: SlimmingOutcome | None = None

    def describe(self) -> list[str]:
        experts = sum(self.layers.values())
        settings = " ".join(f"{k}={v}" for k, v in self.settings.items())
        shared = " and their shared experts" if self.shared_experts else ""
        lines = [f"targeted {experts} routed experts in {len(self.layers)} MoE layers{shared}: {self.method} {settings}"]
        if self.outcome is None:
            return lines + ["the new weights are computed at apply time from the calibration activations"]
        out = self.outcome
        lines.append(
            f"changed {out.matrices} weight matrices ({out.weights:,} weights; "
            + ("rewritten as each expert is read from disk)" if out.zeros is None
               else f"{out.zeros / max(out.weights, 1):.1%} zero)")
            + ("" if out.output_error is None else f"; mean relative output error {out.output_error:.4g}")
        )
        for layer, tokens in sorted(out.tokens_seen.items()):
            lines.append(f"layer {layer}: calibration tokens per expert {tokens}")
        if not out.tokens_seen:
            lines.append(f"{self.method} uses no calibration activations")
        if out.fallbacks:
            named = ", ".join(f"layer {f['layer']} expert {f['expert']} ({f['tokens']} tokens)" for f in out.fallbacks)
            lines.append(f"fallback {self.fallback} for {len(out.fallbacks)} experts under min_tokens={self.min_tokens}: {named}")
        return lines


def inverse_hessian_factor(grams: torch.Tensor, damp: float, order: torch.Tensor | None = None) -> torch.Tensor:
    """Upper Cholesky factors of (H + damping)^-1 for a stack of Gram matrices H [B, K, K], their rows and
    columns taken in `order` [B, K] when given (an input never seen gets H_jj = 1: its weights do not change
    the output on calibration data).

    Without `order` the factors are computed where the Gram matrices are (overwritten, when they are float32
    and contiguous), with it in one new buffer: the down projection's is ffn x ffn, 0.8 GB at ffn 14336.
    With P the reversal, P H P = L L^T gives H^-1 = U^T U for U = P L^-1 P, so LAPACK's in-place Cholesky and
    triangular inverse between two in-place reversals compute U where H is."""
    factors = grams.float().contiguous() if order is None else torch.empty(grams.shape, dtype=torch.float32)
    for number, hessian in enumerate(factors):
        if order is not None:
            _copy_ordered(hessian, grams[number], order[number])
        hessian.diagonal().add_(damping(hessian.diagonal(), damp))
        _reverse_in_place(hessian.view(-1))
        # a C-ordered symmetric matrix is its own Fortran-ordered transpose: LAPACK's upper factor R (P H P =
        # R^T R) lands here as L = R^T, and inverting R in place leaves L^-1
        fortran = hessian.numpy().T
        _, info = scipy.linalg.lapack.spotrf(fortran, lower=0, overwrite_a=1, clean=1)
        if info:
            raise MoeExportError(f"a Hessian is not positive definite even with damp={damp}; raise damp (e.g. 0.1)")
        scipy.linalg.lapack.strtri(fortran, lower=0, overwrite_c=1)
        _reverse_in_place(hessian.view(-1))
    return factors


def squared_norms(stack: torch.Tensor) -> torch.Tensor:
    """||M||^2 of each matrix of a stack [B, N, K], each summed alone: the same bits whether a matrix is solved
    in a stack (in memory) or alone (streamed)."""
    return torch.stack([matrix.pow(2).sum() for matrix in stack])


def damping(diagonal: torch.Tensor, damp: float) -> torch.Tensor:
    """What inverse_hessian_factor adds to the diagonals [..., K] of Gram matrices: 1 where an input was never
    seen, then `damp` x the mean of the diagonal so raised."""
    unseen = (diagonal == 0).float()
    return unseen + damp * (diagonal + unseen).mean(dim=-1, keepdim=True)


def _copy_ordered(into: torch.Tensor, matrix: torch.Tensor, order: torch.Tensor, rows: int = 256) -> None:
    """into = matrix[order][:, order], a block of rows at a time."""
    for start in range(0, len(order), rows):
        into[start : start + rows] = matrix[order[start : start + rows]][:, order]


def _reverse_in_place(values: torch.Tensor, chunk: int = 1 << 22) -> None:
    """Reverse a 1-D tensor without a second copy of it: swap its ends a chunk at a time."""
    count = len(values)
    for start in range(0, count // 2, chunk):
        width = min(chunk, count // 2 - start)
        head = values[start : start + width].clone()
        values[start : start + width] = values[count - start - width : count - start].flip(0)
        values[count - start - width : count - start] = head.flip(0)


@dataclass
class _Tally:
    matrices: int = 0
    weights: int = 0
    zeros: int = 0
    errors: list[float] = field(default_factory=list)


class ExpertSlimmingPass(CompressionPass):
    """Subclasses name their calibrated methods and implement `slim` and `fallback_slim`."""

    calibrated_methods: ClassVar[dict[str, str]]  # method -> "full" (X^T X) or "diagonal" (sum of x^2)
    fallback: ClassVar[str]
    exact_in_float32: ClassVar[bool] = False  # new weights a stream must read in float32 (LayerEdit.float32)

    def needs_statistics(self, options: SlimmingOptions) -> bool:
        return False  # token counts come from the pass's own calibration run

    def needs_activations(self, options) -> bool:
        return options.method in self.calibrated_methods

    def settings(self, options) -> dict:
        raise NotImplementedError

    def solve(self, weights: torch.Tensor, grams: torch.Tensor, plan: SlimmingPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """A full-Gram method (GPTQ, SparseGPT): new float32 weights for a stack [B, N, K] of matrices (one per
        expert) with their input Gram matrices [B, K, K], which it may overwrite, and its loss per matrix,
        tr(dW H dW^T) with H the damped Gram matrix (passes/slimming.damping)."""
        raise NotImplementedError

    def slim(self, weights: torch.Tensor, diagonals: torch.Tensor | None, plan: SlimmingPlan) -> torch.Tensor:
        """Any other method: new float32 weights for a stack [B, N, K] of matrices from the diagonals [B, K] of
        their input Gram matrices (None: a method without calibration)."""
        return self.fallback_slim(weights, plan)

    def fallback_slim(self, weights: torch.Tensor, plan: SlimmingPlan) -> torch.Tensor:
        raise NotImplementedError

    def check_input_width(self, options, width: int, what: str) -> None:
        """Raise MoeExportError when the options cannot apply to matrices `width` inputs wide."""

    def check_model(self, options, model) -> None:
        for what, width in target_input_widths(model, options.shared_experts).items():
            self.check_input_width(options, width, what)

    def plan(self, statistics: Statistics | None, layers: list[LayerSpec], options) -> SlimmingPlan:
        targets = {i: spec.num_experts for i, spec in enumerate(layers) if spec.kind == "moe" and spec.num_experts > 0}
        if not targets:
            raise MoeExportError(f"{self.name}: the model has no routed experts left to {self.name}")
        return SlimmingPlan(
            method=options.method,
            settings=self.settings(options),
            layers=targets,
            shared_experts=options.shared_experts and any(spec.shared_experts for spec in layers),
            min_tokens=options.min_tokens,
            fallback=self.fallback,
        )

    @torch.no_grad()
    def apply(self, model, plan: SlimmingPlan, tokens: torch.Tensor | None = None, progress=None) -> SlimmingPlan:
        adapter, stream = adapter_for(model.config), stream_of(model)
        gram = self.calibrated_methods.get(plan.method)
        tally, tokens_seen, fallbacks = _Tally(), {}, []
        task = progress.add_task(f"{self.name}: {plan.method} on experts", total=len(plan.layers)) if progress else None
        if gram is None:
            layer_inputs = ((layer, None) for layer in plan.layers)
        else:
            layer_inputs = (
                (index, _measure(adapter.layer_view(model, index), run, gram, plan.shared_experts, stream is not None))
                for index, _, run in layer_by_layer(adapter, model, tokens)
                if index in plan.layers
            )
        # the generator resumes (and runs a layer with its slimmed weights) only after that layer is slimmed
        for layer, inputs in layer_inputs:
            if inputs is not None:
                tokens_seen[layer] = inputs.expert_tokens
                fallbacks += [
                    {"layer": layer, "expert": expert, "tokens": count}
                    for expert, count in enumerate(inputs.expert_tokens)
                    if count < plan.min_tokens
                ]
            if isinstance(inputs, RoutedRows):
                self._slim_into_spill(stream, adapter.layer_view(model, layer), inputs, plan, tally)
            elif stream is not None:
                self._slim_as_read(stream, adapter.layer_view(model, layer), inputs, plan, tally)
            else:
                self._slim_in_place(adapter.layer_view(model, layer), inputs, plan, gram, tally)
            if progress:
                progress.advance(task)
        if progress:
            progress.remove_task(task)
        outcome = SlimmingOutcome(
            tokens_seen=tokens_seen,
            fallbacks=fallbacks,
            matrices=tally.matrices,
            weights=tally.weights,
            zeros=tally.zeros if stream is None else None,
            output_error=sum(tally.errors) / len(tally.errors) if tally.errors else None,
        )
        return replace(plan, outcome=outcome)

    def _slim_in_place(self, view: LayerView, inputs, plan: SlimmingPlan, gram: str | None, tally: _Tally) -> None:
        """Rewrite one layer's target matrices in the model, from the inputs measured on them (None: no calibration)."""
        for weights, matrix_inputs, routed in _targets(view, inputs, plan.shared_experts):
            original = weights.float().clone()  # .float() alone would alias float32 weights
            new = original.clone()
            use_fallback = torch.zeros(len(weights), dtype=torch.bool)
            if inputs is not None and routed:
                use_fallback = torch.tensor([m.tokens < plan.min_tokens for m in matrix_inputs])
            if use_fallback.any():
                new[use_fallback] = self.fallback_slim(original[use_fallback], plan)
            calibrated = torch.where(~use_fallback)[0].tolist()
            solved = {}
            if calibrated and gram == "full":
                grams = torch.stack([matrix_inputs[i].gram for i in calibrated])
                new[calibrated], errors = self._solve_measured(original[calibrated], grams, plan)
                solved = dict(zip(calibrated, errors))
            elif calibrated:
                grams = torch.stack([matrix_inputs[i].gram for i in calibrated]) if inputs else None
                new[calibrated] = self.slim(original[calibrated], grams, plan)
            weights.copy_(new)
            if gram == "full":
                tally.errors += [solved[i] if i in solved else output_error(new[i] - original[i], original[i], m.gram)
                                 for i, m in enumerate(matrix_inputs) if m.tokens]
            tally.matrices += len(weights)
            tally.weights += weights.numel()
            tally.zeros += int((weights == 0).sum())

    def _slim_as_read(self, stream, view: LayerView, inputs, plan: SlimmingPlan, tally: _Tally) -> None:
        """A streamed layer's routed experts, slimmed as each is read (moeexport.streaming: LayerStream
        transforms) from the input norms measured now, which its transform keeps (a vector per expert matrix):
        what _slim_in_place computes for them, one expert at a time."""
        stacks = expert_stacks(replace(view.layout, biases=False))
        kept = stream.kept_experts(stream.edits[view.index])  # slot -> source expert, what a transform is told
        measured = {stack: dict(zip(kept, seen)) for stack, seen in zip(stacks, (inputs.gate_up, inputs.down))
                    } if inputs is not None else None
        transposed = view.layout.transposed

        def slim_expert(matrix: torch.Tensor, stack: str, expert: int, rows: slice) -> torch.Tensor:
            rows_out = matrix.T if transposed else matrix
            seen = measured[stack][expert] if measured is not None else None
            if seen is not None and seen.tokens < plan.min_tokens:
                new = self.fallback_slim(rows_out[None], plan)[0]
            else:
                new = self.slim(rows_out[None], seen.gram[None] if seen is not None else None, plan)[0]
            return new.T if transposed else new

        stream.transform_experts(view.index, slim_expert, float32=self.exact_in_float32)
        _count(view, stacks, tally)

    def _slim_into_spill(self, stream, view: LayerView, routed: RoutedRows, plan: SlimmingPlan, tally: _Tally) -> None:
        """A streamed layer's routed experts slimmed from their Gram matrices (GPTQ, SparseGPT), one expert at a
        time (its two Gram matrices made from its routed tokens, used and dropped), what _slim_in_place computes
        for each; the new matrices wait on disk (SpilledExperts) for whatever reads the experts next."""
        stacks = expert_stacks(replace(view.layout, biases=False))
        spill, errors = SpilledExperts(), {stack: [] for stack in stacks}
        for slot, expert in enumerate(stream.kept_experts(stream.edits[view.index])):
            for stack, seen in zip(stacks, routed.inputs(slot)):
                new, error = self._slim_measured(getattr(view.experts, stack)[slot], seen, plan, view.layout.transposed)
                spill.put((stack, expert), new)
                errors[stack] += error
            del seen, new  # its down Gram matrix (now the solver's factor) goes before the next expert's is made
        stream.transform_experts(view.index, spill, float32=self.exact_in_float32)
        tally.errors += [error for stack in stacks for error in errors[stack]]  # _slim_in_place's order
        _count(view, stacks, tally)


    def _slim_measured(self, stored: torch.Tensor, seen, plan: SlimmingPlan, transposed: bool):
        """One expert matrix slimmed from its MatrixInputs, in its stored orientation, and its relative output
        error ([] when it saw no token); a solver overwrites its Gram matrix."""
        original = stored.float().T if transposed else stored.float()
        del stored  # the read's own copy (bf16) goes before the solver's are made
        if seen.tokens >= plan.min_tokens:
            solved, errors = self._solve_measured(original[None], seen.gram[None], plan)
            new = solved[0]
        else:
            new = self.fallback_slim(original[None], plan)[0]
            errors = [output_error(new - original, original, seen.gram)] if seen.tokens else []
        return (new.T if transposed else new), errors

    def _solve_measured(self, original: torch.Tensor, grams: torch.Tensor, plan: SlimmingPlan):
        """(self.solve's new weights, each matrix's relative output error ||dW X||^2 / ||W X||^2), the Gram
        matrices [B, K, K] overwritten: ||W X||^2 is taken before the solver runs, and ||dW X||^2 is its loss
        less what the damping added to it, so no second copy of a Gram matrix is ever held."""
        references = [quadratic_form(weight, gram) for weight, gram in zip(original, grams)]
        added = damping(grams.diagonal(dim1=-2, dim2=-1), plan.settings["damp"])
        new, losses = self.solve(original, grams, plan)
        errors = []
        for weight, before, loss, extra, reference in zip(new, original, losses, added, references):
            squares = sum((rows - rows_before).pow_(2).sum(dim=0) for rows, rows_before in zip(weight.split(256),
                                                                                                 before.split(256)))
            changed = loss - squares @ extra
            errors.append(float(changed / reference) if reference > 0 else 0.0)
        return new, errors


def _count(view: LayerView, stacks, tally: _Tally) -> None:
    """Count a streamed layer's expert matrices as rewritten."""
    for stack in stacks:
        shape = getattr(view.experts, stack).shape
        tally.matrices += shape[0]
        tally.weights += math.prod(shape)


def _measure(view: LayerView, run, gram: str, shared: bool, streamed: bool):
    """What one layer's calibration run measures for slimming it: every target's LayerInputs, or for a streamed
    layer's Gram matrices the routed tokens they are made of, one expert at a time (RoutedRows)."""
    if streamed and gram == "full":
        return collect_routed_rows(view, run)
    return collect_layer_inputs(view, run, gram == "diagonal", shared)


def _targets(view: LayerView, inputs, shared: bool):
    """Stacks of target matrices of one MoE layer: (weights [B, N, K], a view: writing it changes the
    model; their MatrixInputs, or None without calibration; whether they are routed experts)."""
    experts = view.experts
    yield _rows_out(view, _input_stack(view).data), inputs.gate_up if inputs else None, True
    yield _rows_out(view, experts.down_proj.data), inputs.down if inputs else None, True
    for number, module in enumerate(view.shared_experts if shared else ()):
        into, middle = inputs.shared[number] if inputs else (None, None)
        reading = [getattr(module, name) for name in ("gate_proj", "up_proj") if hasattr(module, name)]  # ungated: up
        for linear, seen in [(linear, into) for linear in reading] + [(module.down_proj, middle)]:
            yield linear.weight.data[None], None if seen is None else [seen], False


def _input_stack(view: LayerView) -> torch.Tensor:
    """The expert stack that reads the layer's input: gate and up together, or the one projection of an ungated
    layout (its down projection reads what that computes)."""
    return getattr(view.experts, expert_stacks(view.layout)[0])


def _rows_out(view: LayerView, stack: torch.Tensor) -> torch.Tensor:
    """An expert stack as [E, outputs, inputs], the orientation the slimming methods work in (a view of a
    transposed layout's [E, inputs, outputs] stack: writing it writes the model)."""
    return stack.transpose(-1, -2) if view.layout.transposed else stack


def _routed_layers(model) -> list[LayerView]:
    """The layers that still have routed experts."""
    return [view for view in adapter_for(model.config).layer_views(model) if view.experts is not None]


def target_input_widths(model, shared: bool) -> dict[str, int]:
    """Input widths of the matrices a slimming pass would rewrite, named for error messages."""
    widths = {}
    for view in _routed_layers(model):
        inputs = -2 if view.layout.transposed else -1
        widths["expert input (hidden size)"] = _input_stack(view).shape[inputs]
        widths["expert intermediate size"] = view.experts.down_proj.shape[inputs]
        for module in view.shared_experts if shared else ():
            widths["shared expert intermediate size"] = module.down_proj.in_features
    return widths


def target_dtypes(model, shared: bool) -> set[torch.dtype]:
    return {weights.dtype for view in _routed_layers(model) for weights, _, _ in _targets(view, None, shared)}
