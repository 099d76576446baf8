"""Trimming passes of He et al. (Block Drop, Layer Drop, Expert Drop), without the paper code's bugs.

- Block Drop removes whole decoder layers, Layer Drop the norm + MoE sublayer of
  MoE layers (attention stays). By default (`score: perplexity`) they choose by
  the damage itself: greedily, the block or sublayer whose removal raises the
  model's next-token loss on the calibration tokens least, measured with the
  ones already chosen removed (calibration/damage.py); `score: kl` measures
  KL(original || removed) instead. The papers' rules stay available: `score:
  similarity` drops what is most alike at input and output (Block Drop:
  cos(input, output), `mode: consecutive` the most alike window; Layer Drop:
  cos(x, x + MoE(norm(x)))). `repair: refit` then refits the attention output
  projection that absorbs each drop (passes/repair.py).
- Expert Drop keeps `keep` experts per layer (scope layer) or drops the globally
  lowest-scoring experts (scope global: the same total, per-layer counts vary, a
  layer may keep none and then passes its input through, if the step allows it).
  Scores: REAP saliency (the default; Lasby et al. 2025: mean gate weight x
  expert output norm over the expert's routed tokens), selection frequency,
  routing mass (He et al.), measured damage in greedy rounds (perplexity, kl),
  or random. `repair: refit` then rebuilds the kept experts from their own and
  the dropped experts' neurons, fit to the original model's output after each
  layer (passes/repair.py).
Every selection also has `score: random` as the control baseline.

A drop that would leave a MoE layer with no experts (`keep: 0`, or a global drop
that empties a layer), or the model without any MoE layer with experts, is
refused unless the step says `allow_empty_layers: true`.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np

from moeexport.adapters import LayerSpec, adapter_for
from moeexport.adapters.declaration import NOAUX_TC
from moeexport.adapters.surgery import (check_expert_count_change, decoder_layers, drop_blocks, drop_moe_sublayer,
                                     keep_experts)
from moeexport.calibration.damage import BLOCK, EXPERT, MOE, Removed
from moeexport.calibration.observers import Statistics
from moeexport.errors import MoeExportError
from moeexport.memory import MAX_GRAM_BYTES
from moeexport.pass_options import BlockDropOptions, ExpertDropOptions, LayerDropOptions
from moeexport.passes.base import MEASURED, CompressionPass, check_expert_keep, check_moe_remains
from moeexport.passes.repair import (expert_refit_refusal, refit_and_keep, refit_attention_outputs,
                                     residuals_at)


def _top_n(scores: list[float], n: int) -> list[int]:
    """Indices of the n highest scores (ties go to the lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:n])


def _top_n_per_group(scores: list[float], n: int, groups: int) -> list[int]:
    """The n highest scores taken evenly from `groups` equal, consecutive groups of experts (n / groups each)."""
    size = len(scores) // groups
    return [start + e for start in range(0, len(scores), size) for e in _top_n(scores[start:start + size], n // groups)]


def _check_grouped_drop(options, routing, top_k: int) -> None:
    """Refuse an Expert Drop that would leave a group-limited router's groups unequal or unusable: its router
    reshapes the experts into `groups` equal groups, each scored by its best one or two (llm-compressor's REAP
    drops the same number from each group, too). A router of method NOAUX_TC scores its one group by its best two
    as well, so with one group every layer needs two experts left."""
    groups = routing.groups
    need = 2 if routing.group_score == "top2_sum" else 1
    if groups == 1:
        least = options.min_keep if options.scope == "global" else options.keep
        if least < need:
            fix = f"add min_keep: {need} to the step" if options.scope == "global" else f"keep at least {need}"
            raise MoeExportError(f"expert_drop could leave a layer fewer than {need} experts, and this model's router "
                                 f"scores its experts by their best {need} ({routing.method}): {fix}")
        return
    where = f"this model routes within {groups} equal expert groups (n_group={groups})"
    if options.scope != "layer":
        raise MoeExportError(f"expert_drop scope: global drops different numbers of experts per group, but {where}: "
                             f"use scope: layer with keep a multiple of {groups}")
    if options.score in MEASURED:
        raise MoeExportError(f"expert_drop score: {options.score} removes experts one at a time, which cannot keep "
                             f"the groups equal, but {where}: use score reap, frequency, routing_mass or random")
    per_group = options.keep // groups
    if options.keep % groups or per_group < need:
        raise MoeExportError(f"expert_drop keep={options.keep} cannot keep the same number (at least {need}) in each "
                             f"group, but {where}: choose keep a multiple of {groups}, at least {need * groups}")
    if per_group * routing.top_groups < top_k:
        raise MoeExportError(f"expert_drop keep={options.keep} leaves {per_group} experts per group, and the "
                             f"{routing.top_groups} groups a token routes within would hold fewer than its top-{top_k}: "
                             f"keep at least {-(-top_k // routing.top_groups) * groups}")


def _score(similarity: float | None) -> str:
    return "random pick" if similarity is None else f"{similarity:.4f}"


def _random_scores(count: int, seed: int) -> list[float]:
    return np.random.default_rng(seed).random(count).tolist()


def _remaining(layers: list[LayerSpec], drop: list[int]) -> list[LayerSpec]:
    return [spec for index, spec in enumerate(layers) if index not in drop]


DAMAGE = {"perplexity": "rise in log perplexity", "kl": "KL"}


BEAM_WIDTH = 3  # partial choices a measured Block / Layer Drop keeps per step


def _beam_by_damage(scorer, candidates: list[int], n: int, what: str, metric: str) -> tuple[list[int], list[float]]:
    """Remove `n` of `candidates` by a beam search over the damage (`metric`) measured on the calibration tokens:
    each step extends each of the BEAM_WIDTH least damaging partial choices by every candidate left, scores the
    extensions with what they already remove, and keeps the best BEAM_WIDTH. Pure greedy (width 1) misses pairs
    whose members are not the best single removal (on the fixture the greedy pair of blocks costs 1.164x
    perplexity where the best pair costs 1.125x). Returns (the best choice in the order it was built, the damage
    after each step of it); a step scores at most BEAM_WIDTH x candidates removals, the first step exactly the
    greedy one's."""
    beam: list[tuple[tuple[int, ...], tuple[float, ...]]] = [((), ())]
    for _ in range(n):
        extensions: dict[frozenset, tuple[tuple[int, ...], tuple[float, ...]]] = {}
        for chosen, damage in beam:
            for candidate in candidates:
                if candidate not in chosen:
                    extensions.setdefault(frozenset(chosen + (candidate,)), (chosen + (candidate,), damage))
        paths = list(extensions.values())
        measured = scorer.damage([frozenset(Removed(layer, what) for layer in path) for path, _ in paths], metric)
        ranked = sorted(zip(measured, paths), key=lambda scored: (scored[0], sorted(scored[1][0])))
        beam = [(path, damage + (value,)) for value, (path, damage) in ranked[:BEAM_WIDTH]]
    chosen, damage = beam[0]
    return list(chosen), list(damage)


def _repair_lines(repair_error: dict[int, list[float]], what: str) -> list[str]:
    if not repair_error:
        return []
    errors = ", ".join(f"{layer}: {before:.3f} -> {after:.3f}" for layer, (before, after) in sorted(repair_error.items()))
    return [f"refit {what}; relative output error per layer {errors}"]


@dataclass(kw_only=True)
class _MeasuredAndRepaired:
    """What a removal plan records beside its choice: the damage that chose it and the repair after it."""

    # measured scores: the damage after each choice (Block / Layer Drop, in drop's order) or round (Expert Drop)
    damage: list[float] = field(default_factory=list)
    metric: str = ""  # which damage: perplexity | kl
    repair: str = "none"
    ridge: float = 0.1
    # repair: refit, per refit layer (original index): relative error of what it refits to [dropped, refit]
    repair_error: dict[int, list[float]] = field(default_factory=dict)


class _Repairable(CompressionPass):
    """A pass with `repair: refit`, which solves for weights on calibration activations, layer by layer (an
    attention refit streams: the stream reads its solved projection instead of the checkpoint's)."""

    def streams(self, options) -> bool:
        return True

    def needs_activations(self, options) -> bool:
        return options.repair == "refit"

    def refits(self, options) -> str | None:
        return "attention" if options.repair == "refit" else None

    def refit_refusal(self, config) -> str:
        """Why `repair: refit` cannot take a model of this config ("" when it can)."""
        adapter = adapter_for(config)
        mixers = sorted(set(adapter.model_config(config).layer_mixers) - {"attention"})
        if mixers:
            return (f"the refit solves for the attention output projection that absorbs a drop, which "
                    f"{adapter.family}'s {' and '.join(mixers)} layers do not have")
        return ""

    def resolve(self, options, config, calibrated: bool):
        """`repair: auto` is a refit wherever the model takes one and there are calibration tokens to solve on
        (it measured better in every case, README), else none."""
        if options.repair != "auto":
            return options, ""
        refusal = self.refit_refusal(config) if calibrated else "no calibration tokens to solve on"
        decided = "none" if refusal else "refit"
        return (options.model_copy(update={"repair": decided}),
                f"repair: auto -> {decided}" + (f" ({refusal})" if refusal else ""))

    def check_model(self, options, model) -> None:
        if options.repair == "refit" and (refusal := self.refit_refusal(model.config)):
            raise MoeExportError(f"{self.name}: repair: refit cannot apply: {refusal}; use repair: none")


# --- Block Drop -------------------------------------------------------------------------


@dataclass
class _DropPlan(_MeasuredAndRepaired):
    drop: list[int]
    similarity: list[float | None]  # score: similarity, the redundancy of each dropped index (else None)
    unrepaired: list[int] = field(default_factory=list)  # repair: refit, dropped with no attention after them

    what: ClassVar[str]
    legend: ClassVar[str]

    def describe(self) -> list[str]:
        if self.damage:
            name = DAMAGE[self.metric]
            steps = ", ".join(f"{index} ({name} {value:.4g})" for index, value in zip(self.drop, self.damage))
            lines = [f"drop {self.what} {steps}  [beam search, width {BEAM_WIDTH}: calibration {name} with each one "
                     "and those before it "
                     "removed]"]
        else:
            pairs = ", ".join(f"{index} ({_score(s)})" for index, s in zip(self.drop, self.similarity))
            lines = [f"drop {self.what} {pairs}  [{self.legend}]"]
        lines += _repair_lines(self.repair_error, "the attention output projection absorbing each drop")
        if self.unrepaired:
            lines.append(f"not repaired: {self.unrepaired} (no attention after them to absorb the drop)")
        return lines


@dataclass
class BlockDropPlan(_DropPlan):
    what = "blocks"
    legend = "block: cos(input, output); consecutive: of the whole window"


class BlockDrop(_Repairable):
    name = "block_drop"
    Options = BlockDropOptions

    def check(self, options: BlockDropOptions, layers: list[LayerSpec]) -> None:
        if options.n >= len(layers):
            raise MoeExportError(f"block_drop n={options.n} but the model has {len(layers)} blocks (at least one must stay)")
        if options.score in MEASURED and options.mode == "consecutive":
            raise MoeExportError("block_drop mode: consecutive scores windows by similarity: add score: similarity")

    def plan_context(self, options: BlockDropOptions, model) -> dict:
        return {"kept": adapter_for(model.config).blocks_kept(model.config)}

    def plan(self, statistics: Statistics | None, layers: list[LayerSpec], options: BlockDropOptions,
             scorer=None, kept: tuple[int, ...] = ()) -> BlockDropPlan:
        """`kept`: blocks the family needs (never dropped, nor in a dropped window)."""
        count, n = len(layers), options.n
        if n > count - len(kept) or (kept and options.mode == "consecutive" and not any(
                not set(range(start, start + n)) & set(kept) for start in range(count - n + 1))):
            raise MoeExportError(f"block_drop n={options.n}: this model must keep blocks {list(kept)}; drop fewer")
        if options.score in MEASURED:
            candidates = [block for block in range(count) if block not in kept]
            drop, damage = _beam_by_damage(scorer, candidates, n, BLOCK, options.score)
            check_moe_remains(self.name, options.allow_empty_layers, layers, _remaining(layers, drop))
            return BlockDropPlan(drop, [None] * n, damage=damage, metric=options.score, repair=options.repair,
                                 ridge=options.ridge)
        if options.mode == "discrete":
            scores = (
                [s.block_similarity for s in statistics.layers]
                if options.score == "similarity"
                else _random_scores(count, options.seed)
            )
            scores = [-math.inf if block in kept else score for block, score in enumerate(scores)]
            drop = _top_n(scores, n)
            similarity = [statistics.layers[b].block_similarity if statistics else None for b in drop]
        else:
            starts = range(count - n + 1)
            if options.score == "similarity":
                window_scores = [statistics.window_similarity(start, n) for start in starts]
            else:
                window_scores = _random_scores(len(starts), options.seed)
            window_scores = [-math.inf if set(range(start, start + n)) & set(kept) else score
                             for start, score in zip(starts, window_scores)]
            start = _top_n(window_scores, 1)[0]
            window = statistics.window_similarity(start, n) if statistics else None
            drop, similarity = list(range(start, start + n)), [window] * n
        check_moe_remains(self.name, options.allow_empty_layers, layers, _remaining(layers, drop))
        return BlockDropPlan(drop, similarity, repair=options.repair, ridge=options.ridge)

    def apply(self, model, plan: BlockDropPlan, tokens=None, progress=None) -> BlockDropPlan:
        adapter = adapter_for(model.config)
        if plan.repair == "none":
            drop_blocks(adapter, model, plan.drop)
            return plan
        # each run of dropped blocks is absorbed by the attention of the first block kept after it
        kept = [b for b in range(len(decoder_layers(adapter, model))) if b not in plan.drop]
        absorbing = sorted({next(k for k in kept if k > b) for b in plan.drop if b < kept[-1]})
        targets = residuals_at(model, {b: "attention" for b in absorbing}, tokens)
        drop_blocks(adapter, model, plan.drop)
        targets = {kept.index(b): residual for b, residual in targets.items()}
        errors = refit_attention_outputs(model, targets, tokens, plan.ridge, self.name, progress)
        return replace(plan, repair_error={kept[index]: error for index, error in errors.items()},
                       unrepaired=sorted(b for b in plan.drop if b > kept[-1]))


# --- Layer Drop -------------------------------------------------------------------------


@dataclass
class LayerDropPlan(_DropPlan):
    what = "the MoE sublayer of layers"
    legend = "layer: cos(x, x + MoE(norm(x)))"


class LayerDrop(_Repairable):
    name = "layer_drop"
    Options = LayerDropOptions

    def check(self, options: LayerDropOptions, layers: list[LayerSpec]) -> None:
        moe_layers = sum(spec.kind == "moe" for spec in layers)
        if options.n > moe_layers:
            raise MoeExportError(f"layer_drop n={options.n} but the model has {moe_layers} MoE layers left")
        if options.n == moe_layers:  # known before planning: every MoE sublayer goes
            check_moe_remains(self.name, options.allow_empty_layers, layers, [s for s in layers if s.kind != "moe"])

    def plan(self, statistics: Statistics | None, layers: list[LayerSpec], options: LayerDropOptions,
             scorer=None) -> LayerDropPlan:
        candidates = [i for i, spec in enumerate(layers) if spec.kind == "moe"]
        if options.score in MEASURED:
            drop, damage = _beam_by_damage(scorer, candidates, options.n, MOE, options.score)
            check_moe_remains(self.name, options.allow_empty_layers, layers, _remaining(layers, drop))
            return LayerDropPlan(drop, [None] * options.n, damage=damage, metric=options.score, repair=options.repair,
                                 ridge=options.ridge)
        if options.score == "similarity":
            scores = [statistics.layers[i].moe_similarity for i in candidates]
        else:
            scores = _random_scores(len(candidates), options.seed)
        drop = [candidates[i] for i in _top_n(scores, options.n)]
        check_moe_remains(self.name, options.allow_empty_layers, layers, _remaining(layers, drop))
        similarity = [statistics.layers[i].moe_similarity if statistics else None for i in drop]
        return LayerDropPlan(drop, similarity, repair=options.repair, ridge=options.ridge)

    def apply(self, model, plan: LayerDropPlan, tokens=None, progress=None) -> LayerDropPlan:
        adapter = adapter_for(model.config)
        # each dropped MoE sublayer is absorbed by the attention just before it, to the original layer's output
        targets = residuals_at(model, {layer: "output" for layer in plan.drop}, tokens) if plan.repair == "refit" else {}
        for layer in plan.drop:
            drop_moe_sublayer(adapter, model, layer)
        if not targets:
            return plan
        return replace(plan, repair_error=refit_attention_outputs(model, targets, tokens, plan.ridge, self.name, progress))


# --- Expert Drop ------------------------------------------------------------------------


def _least_kept(options: ExpertDropOptions) -> int:
    """The fewest experts a global drop leaves a layer: a layer whose experts all score below the others' keeps
    its best one unless the step allows empty layers, so the recipe a user writes first builds."""
    return max(options.min_keep, 0 if options.allow_empty_layers else 1)


@dataclass
class ExpertDropPlan(_MeasuredAndRepaired):
    keep: dict[int, list[int]]  # MoE layer -> experts kept, in their original order
    drop: dict[int, list[int]]  # MoE layer -> experts dropped
    dropped_expert_tokens: dict[int, list[int]]  # tokens each dropped expert saw in calibration
    layer_tokens: dict[int, int]  # routing decisions per layer in calibration
    # repair: refit, per rebuilt layer: the neurons each kept expert took from the dropped experts
    borrowed: dict[int, list[int]] = field(default_factory=dict)
    rebuilt_per_expert: list[int] = field(default_factory=list)  # layers too wide for the joint rebuild

    def describe(self) -> list[str]:
        changed = [layer for layer in self.keep if self.drop[layer]]
        dropped_total = sum(len(d) for d in self.drop.values())
        lines = [f"targeted {len(self.keep)} MoE layers; dropped {dropped_total} experts in {len(changed)} of them"]
        if self.damage:
            trace = ", ".join(f"{value:.4g}" for value in self.damage)
            lines.append(f"chosen greedily by calibration {DAMAGE[self.metric]}, {len(self.damage)} rounds: {trace}")
        lines += _repair_lines(self.repair_error, "the kept experts from their own and the dropped experts' neurons")
        if self.borrowed:
            taken = ", ".join(f"{layer}: {counts}" for layer, counts in sorted(self.borrowed.items()))
            lines.append(f"neurons each kept expert took from the dropped ones, per layer {taken}")
        if self.rebuilt_per_expert:
            lines.append(f"layers {self.rebuilt_per_expert} rebuilt one kept expert at a time (their joint system "
                         f"would exceed {MAX_GRAM_BYTES / 2**30:.0f} GiB): a dropped expert's neuron replaces an own "
                         "one where it lowers the error more")
        for layer in sorted(self.keep):
            kept, dropped = self.keep[layer], self.drop[layer]
            line = f"layer {layer}: keep {len(kept)} {kept}, drop {len(dropped)} {dropped}"
            if self.dropped_expert_tokens and dropped:
                seen = self.dropped_expert_tokens[layer]
                share = sum(seen) / max(self.layer_tokens[layer], 1)
                line += f"  (dropped experts saw {seen} tokens = {share:.1%} of routing)"
            if not kept:
                line += "  -> no experts left: the routed part of this layer now adds nothing"
            lines.append(line)
        return lines


class ExpertDrop(_Repairable):
    name = "expert_drop"
    Options = ExpertDropOptions

    def refits(self, options: ExpertDropOptions) -> str | None:
        return "experts" if options.repair == "refit" else None

    def needs_statistics(self, options: ExpertDropOptions) -> bool:
        return options.score != "random"  # measured scores also report the tokens each dropped expert saw

    def check(self, options: ExpertDropOptions, layers: list[LayerSpec]) -> None:
        if options.min_keep > options.keep:
            raise MoeExportError(f"expert_drop min_keep={options.min_keep} is more than keep={options.keep}")
        check_expert_keep(self.name, options.keep, options.scope, layers)
        if options.keep == 0 and not options.allow_empty_layers:
            raise MoeExportError(
                "expert_drop keep=0 drops every routed expert of every MoE layer; "
                "add allow_empty_layers: true to the step if that is meant"
            )

    def refit_refusal(self, config) -> str:
        return expert_refit_refusal(config)

    def experts_left(self, options: ExpertDropOptions) -> int:
        return options.keep

    def check_model(self, options: ExpertDropOptions, model) -> None:
        super().check_model(options, model)
        config = adapter_for(model.config).model_config(model.config)
        if config.routing.groups > 1 or config.routing.method == NOAUX_TC:
            _check_grouped_drop(options, config.routing, config.top_k)

    def plan_context(self, options: ExpertDropOptions, model) -> dict:
        return {"groups": adapter_for(model.config).model_config(model.config).routing.groups}

    def plan(self, statistics: Statistics | None, layers: list[LayerSpec], options: ExpertDropOptions,
             scorer=None, groups: int = 1) -> ExpertDropPlan:
        """`groups` > 1: the router chooses within that many equal, consecutive expert groups, and a layer keeps
        the same number of each (check_model refused every drop that cannot)."""
        moe_layers = [i for i, spec in enumerate(layers) if spec.kind == "moe"]
        trace = []
        if options.score in MEASURED:
            keep, trace = self._keep_by_damage(scorer, layers, moe_layers, options)
        else:
            scores = {layer: self._layer_scores(statistics, layers[layer], layer, options) for layer in moe_layers}
            if options.scope == "layer" and groups > 1:
                keep = {layer: _top_n_per_group(scores[layer], options.keep, groups) for layer in moe_layers}
            elif options.scope == "layer":
                keep = {layer: _top_n(scores[layer], min(options.keep, len(scores[layer]))) for layer in moe_layers}
            else:
                keep = self._global_keep(scores, options.keep, _least_kept(options))
        drop = {layer: [e for e in range(layers[layer].num_experts) if e not in keep[layer]] for layer in moe_layers}
        tokens = {layer: statistics.layers[layer].expert_tokens for layer in moe_layers} if statistics else {}
        return ExpertDropPlan(
            keep,
            drop,
            {layer: [seen[e] for e in drop[layer]] for layer, seen in tokens.items()},
            {layer: sum(seen) for layer, seen in tokens.items()},
            damage=trace,
            metric=options.score if trace else "",
            repair=options.repair,
            ridge=options.ridge,
        )

    @staticmethod
    def _keep_by_damage(scorer, layers: list[LayerSpec], moe_layers: list[int], options: ExpertDropOptions):
        """Remove experts in rounds, each round scoring every expert still removable by the damage of removing
        it with those already gone (`options.score`: perplexity or kl), and taking the cheapest, at most one
        per layer (a layer's next removal is scored with its last one gone), at most a quarter of what is left
        to remove, and only those that cost at most twice the cheapest.

        Cost: a round is one pass over the model with one hidden state per candidate expert (RemovalScorer);
        the rounds are about 4 x log of the experts to drop, e.g. 11 for the fixture's 8 -> 4."""
        counts = {layer: layers[layer].num_experts for layer in moe_layers}
        if options.scope == "layer":
            floor = {layer: min(options.keep, counts[layer]) for layer in moe_layers}
            to_drop = sum(counts[layer] - floor[layer] for layer in moe_layers)
        else:
            floor = {layer: min(_least_kept(options), counts[layer]) for layer in moe_layers}
            to_drop = round(sum(counts.values()) - options.keep * len(moe_layers))
        dropped: dict[int, list[int]] = {layer: [] for layer in moe_layers}
        trace = []
        while to_drop > 0:
            candidates = [(layer, e) for layer in moe_layers if counts[layer] - len(dropped[layer]) > floor[layer]
                          for e in range(counts[layer]) if e not in dropped[layer]]
            if not candidates:
                break
            gone = [Removed(layer, EXPERT, e) for layer in moe_layers for e in dropped[layer]]
            now, *damage = scorer.damage([frozenset(gone)] + [frozenset(gone + [Removed(layer, EXPERT, e)])
                                                               for layer, e in candidates], options.score)
            if gone:
                trace.append(now)  # the damage after the previous round, measured alongside this one's candidates
            ranked = sorted(zip(damage, candidates))
            cheapest = ranked[0][0] - now
            taken, budget = set(), max(1, -(-to_drop // 4))
            for score, (layer, expert) in ranked:
                # a round takes only removals about as cheap as its cheapest: no layer loses one because it is due
                if len(taken) == budget:
                    break
                if layer not in taken and (not taken or score - now <= 2 * max(cheapest, 0) + 1e-9):
                    taken.add(layer)
                    dropped[layer].append(expert)
            to_drop -= len(taken)
        everything = frozenset(Removed(layer, EXPERT, e) for layer in moe_layers for e in dropped[layer])
        trace.append(scorer.damage([everything], options.score)[0])
        return {layer: [e for e in range(counts[layer]) if e not in dropped[layer]] for layer in moe_layers}, trace

    @staticmethod
    def _layer_scores(statistics, spec: LayerSpec, layer: int, options: ExpertDropOptions) -> list[float]:
        if options.score == "random":
            return _random_scores(spec.num_experts, options.seed + layer)
        layer_statistics = statistics.layers[layer]
        if options.score == "frequency":
            return layer_statistics.expert_frequency()
        return list(getattr(layer_statistics, options.score))

    @staticmethod
    def _global_keep(scores: dict[int, list[float]], keep_average: int, min_keep: int) -> dict[int, list[int]]:
        """Drop the globally lowest-scoring experts, sparing each layer's best `min_keep`.

        Scores are compared as they are: frequency and routing mass are shares of
        their layer's routing, while REAP is an absolute output magnitude, so
        global REAP also spares the layers whose experts write the most.
        """
        protected = {(layer, e) for layer, layer_scores in scores.items() for e in _top_n(layer_scores, min_keep)}
        ranked = [
            (score, layer, expert)
            for layer, layer_scores in scores.items()
            for expert, score in enumerate(layer_scores)
            if (layer, expert) not in protected
        ]
        to_drop = round(sum(len(s) for s in scores.values()) - keep_average * len(scores))
        dropped = {(layer, expert) for _, layer, expert in sorted(ranked)[:to_drop]}
        return {
            layer: [e for e in range(len(layer_scores)) if (layer, e) not in dropped]
            for layer, layer_scores in scores.items()
        }

    def apply(self, model, plan: ExpertDropPlan, tokens=None, progress=None) -> ExpertDropPlan:
        adapter = adapter_for(model.config)
        check_expert_count_change(adapter, model.config)
        if plan.repair == "refit":
            errors, borrowed, per_expert = refit_and_keep(model, plan.keep, tokens, plan.ridge, progress)
            return replace(plan, repair_error=errors, borrowed=borrowed, rebuilt_per_expert=per_expert)
        for layer, kept in plan.keep.items():
            keep_experts(adapter, model, layer, kept)
        return plan
