"""`search`'s trimming grid: every recipe of block_drop n x layer_drop n x expert keep applied to the original in
torch, each pass with its default score, sharing ONE StatisticsProvider (statistics are cached by the passes
applied so far, so candidates that share a prefix share them; a prefix is applied once and copied), each scored
by one forward of the calibration tokens against the original's recorded logits."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from moeexport.errors import MoeExportError
from moeexport.events import EventStream
from moeexport.search_report import SearchOptions, Trimming


class _Prefixed:
    """The one StatisticsProvider, for a model that a recipe prefix already compressed: statistics are keyed
    by the prefix's steps followed by the passes applied now, as one compress of the whole recipe keys them.

    It applies one recipe entry at a time, so a removal scorer (`score: perplexity`) always measures the model the
    prefix left: its damages are remembered under the prefix's key in `memo`, shared by every candidate. Greedy
    drops of n and n + 1 then share their first n steps' measurements instead of repeating them."""

    def __init__(self, provider, history: list[dict], memo: dict):
        self._provider, self._history, self._memo = provider, history, memo

    def statistics(self, model, history: list[dict]):
        return self._provider.statistics(model, self._history + history)

    def scorer(self, model):
        return _RememberingScorer(self._provider.scorer(model), self._memo, self._provider.key(self._history))

    def __getattr__(self, name):
        return getattr(self._provider, name)


class _RememberingScorer:
    """A RemovalScorer whose `damage` answers removals measured before (on the same model state) from `memo`."""

    def __init__(self, scorer, memo: dict, state: str):
        self._scorer, self._memo, self._state = scorer, memo, state

    def damage(self, removals, metric: str) -> list[float]:
        keys = [(self._state, metric, frozenset(removal)) for removal in removals]
        missing = [key for key in dict.fromkeys(keys) if key not in self._memo]
        if missing:
            for key, value in zip(missing, self._scorer.damage([key[2] for key in missing], metric)):
                self._memo[key] = value
        return [self._memo[key] for key in keys]

    def __getattr__(self, name):
        return getattr(self._scorer, name)


@dataclass
class _Applied:
    model: object
    history: list[dict]  # AppliedStep.to_dict() of every step so far
    passes: list[dict]  # the recipe entries so far
    plans: list[str]
    new_block_index: list[int | None]  # original block -> its index now


def _apply(state: _Applied, entry: dict | None, provider, memo: dict) -> _Applied:
    """`state` with one more recipe entry applied, to a copy (None: the state itself, shared)."""
    if entry is None:
        return state
    from moeexport.compress import compress
    from moeexport.recipe import parse_recipe

    model = copy.deepcopy(state.model)
    result = compress(model, parse_recipe({"passes": [entry]}), _Prefixed(provider, state.history, memo))
    index = [None if i is None else result.new_block_index[i] for i in state.new_block_index]
    steps = [step.to_dict() for step in result.steps]
    plans = [f"{step.name}: {line}" for step in result.steps for line in step.summary()]
    return _Applied(model, state.history + steps, state.passes + [entry], state.plans + plans, index)


def _grid(original, options: SearchOptions):
    """(block_drop n, layer_drop n, expert keep) values that can apply to this model, and its E and top-k."""
    from moeexport.adapters import adapter_for
    from moeexport.adapters.surgery import structure

    adapter = adapter_for(original.config)
    layers = structure(adapter, original)
    moe = [spec for spec in layers if spec.kind == "moe"]
    experts = max(spec.num_experts for spec in moe)
    top_k = max(spec.top_k for spec in moe)
    keeps = sorted({max(1, round(share * experts)) for share in options.expert_keep}, reverse=True)
    blocks = sorted({n for n in options.block_drop if n < len(layers)})
    layer_drops = sorted({n for n in options.layer_drop if n < len(moe)})
    return blocks, layer_drops, keeps, experts, top_k


def _label(block: int, layer: int, keep: int, experts: int) -> str:
    parts = ([f"block_drop {block}"] if block else []) + ([f"layer_drop {layer}"] if layer else [])
    parts += [f"experts {keep}/{experts}"] if keep < experts else []
    return " + ".join(parts) or "untrimmed"


def apply_grid(original, provider, tokens, reference, options: SearchOptions, target, events: EventStream):
    """Every trimming recipe of the grid applied in torch: (trimmings, skipped, (the target's layout of each, its
    new block index))."""
    blocks, layer_drops, keeps, experts, top_k = _grid(original, options)
    total = len(blocks) * len(layer_drops) * len(keeps)
    task = events.add_task(f"trimming candidates: {total} recipes applied and scored on the calibration set",
                           total=total)
    root = _Applied(original, [], [], [], list(range(len(_layers(original)))))
    trimmings, skipped, layouts = [], [], []
    memo = {}  # removal damages measured by `score: perplexity | kl` passes, by model state (_Prefixed)

    def skip(block: int, layer: int, keep_values, error: Exception) -> None:
        for keep in keep_values:
            skipped.append({"label": _label(block, layer, keep, experts), "reason": str(error)})
            events.advance(task)

    for block in blocks:
        try:
            blocked = _apply(root, {"block_drop": {"n": block}} if block else None, provider, memo)
        except MoeExportError as error:
            for layer in layer_drops:
                skip(block, layer, keeps, error)
            continue
        for layer in layer_drops:
            try:
                layered = _apply(blocked, {"layer_drop": {"n": layer}} if layer else None, provider, memo)
            except MoeExportError as error:
                skip(block, layer, keeps, error)
                continue
            for keep in keeps:
                try:
                    leaf = _apply(layered, _expert_drop(keep, experts, top_k, options.expert_scope), provider, memo)
                    layout = target.layout(leaf.model)
                except MoeExportError as error:
                    skip(block, layer, [keep], error)
                    continue
                kl, top1 = _scored(leaf.model, original, tokens, reference)
                layers = _layers(leaf.model)
                trimmings.append(Trimming(
                    label=_label(block, layer, keep, experts), passes=_pinned(leaf), block_drop=block,
                    layer_drop=layer, expert_keep=keep, kl=kl, top1_agreement=top1,
                    experts=[spec.num_experts for spec in layers], file_experts=layout.num_experts,
                    plans=leaf.plans))
                layouts.append((layout, leaf.new_block_index))
                events.advance(task)
                del leaf
            del layered
        del blocked
    events.remove_task(task)
    if not trimmings:
        reasons = "; ".join(sorted({entry["reason"] for entry in skipped}))
        raise MoeExportError(f"the model takes none of the grid's trimming recipes ({reasons})")
    return trimmings, skipped, layouts


def _expert_drop(keep: int, experts: int, top_k: int, scope: str) -> dict | None:
    """The grid's expert_drop entry keeping `keep` of `experts` (None: all kept, no pass)."""
    if keep >= experts:
        return None
    entry = {"keep": keep, "scope": scope}
    if scope == "global":
        entry["min_keep"] = min(top_k, keep)  # llama.cpp routes every layer to one top-k
    return {"expert_drop": entry}


def _scored(model, original, tokens, reference) -> tuple[float, float]:
    """(KL, top-1 agreement) of a trimmed model against the original's recorded logits."""
    from moeexport.evaluate import evaluate

    if model is original:
        return 0.0, 1.0  # the original itself
    scored = evaluate(model, tokens, reference=reference)
    return scored.kl, scored.top1_agreement


def _layers(model):
    from moeexport.adapters import adapter_for
    from moeexport.adapters.surgery import structure

    return structure(adapter_for(model.config), model)


def _pinned(applied: _Applied) -> list[dict]:
    """The recipe entries as applied, each pass's score and repair written out as it ran when searched, so that
    the recipe selects and repairs the same way if a default changes later."""
    pinned = []
    for entry, step in zip(applied.passes, applied.history):
        (name, given), = entry.items()
        ran = {key: step["options"][key] for key in ("score", "repair") if key in step["options"]}
        pinned.append({name: {**given, **ran}})
    return pinned
