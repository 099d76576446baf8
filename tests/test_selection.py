"""Output-aware selection: the removal scorer against removing for real, and the passes that choose by it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from moeexport.adapters import adapter_for
from moeexport.adapters.surgery import drop_blocks, drop_moe_sublayer, structure
from moeexport.calibration.damage import BLOCK, MOE, RemovalScorer, Removed
from moeexport.calibration.sources import CalibrationConfig
from moeexport.compress import StatisticsProvider, compress
from moeexport.recipe import parse_recipe
from moeexport.passes.trim import BEAM_WIDTH
from tests.tiny_models import random_tokens, tiny_model


def _kl(reference, model, tokens) -> float:
    """Mean per-token KL(reference || model) on tokens, computed directly."""
    with torch.no_grad():
        p = F.log_softmax(reference(input_ids=tokens, use_cache=False).logits.float(), -1)
        q = F.log_softmax(model(input_ids=tokens, use_cache=False).logits.float(), -1)
    return F.kl_div(q, p, log_target=True, reduction="sum").item() / (tokens.shape[0] * tokens.shape[1])


def _without(model, removal):
    """A copy of `model` with the removal performed by the surgery the passes use (MoE sublayers first:
    Block Drop renumbers)."""
    model = copy.deepcopy(model)
    adapter = adapter_for(model.config)
    for item in sorted(removal):
        if item.what == MOE:
            drop_moe_sublayer(adapter, model, item.layer)
    drop_blocks(adapter, model, [item.layer for item in removal if item.what == BLOCK])
    return model


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_the_scorer_measures_what_removing_for_real_costs(family):
    model = tiny_model(family)
    tokens = random_tokens(5, 24, seed=2)
    removals = [frozenset({Removed(1, BLOCK)}), frozenset({Removed(2, MOE)}), frozenset({Removed(0, BLOCK), Removed(3, MOE)}),
                frozenset({Removed(1, MOE), Removed(2, BLOCK)}), frozenset()]
    scorer = RemovalScorer(model, tokens, batch_size=2, max_states=3)  # groups: more than one pass
    measured = scorer.kl(removals)
    assert scorer.passes == 3
    for removal, kl in zip(removals, measured):
        assert kl == pytest.approx(_kl(model, _without(model, removal), tokens), rel=1e-4, abs=1e-7), removal
    assert measured[-1] == 0.0 and min(measured[:-1]) > 0


def _loss_rise(reference, model, tokens) -> float:
    """Mean per-token next-token loss of model on tokens minus reference's: the log of the perplexity ratio."""
    def loss(m):
        with torch.no_grad():
            logits = m(input_ids=tokens, use_cache=False).logits.float()
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item()
    return loss(model) - loss(reference)


@pytest.mark.parametrize("name", ["block_drop", "layer_drop"])
@pytest.mark.parametrize("score", [None, "kl"], ids=["default_perplexity", "kl"])
def test_measured_selection_is_the_default_and_picks_the_cheapest_pair_by_beam_search(name, score):
    """n: 2 keeps the BEAM_WIDTH cheapest single removals and takes the cheapest pair that extends one of them."""
    model = tiny_model("mixtral")
    tokens = random_tokens(6, 32, seed=1)
    provider = StatisticsProvider(None, CalibrationConfig(), "tiny", cache_dir=None, tokens=tokens)
    options = {"n": 2, **({"score": score} if score else {})}
    chosen = compress(copy.deepcopy(model), parse_recipe({"passes": [{name: options}]}), provider).steps[0].plan
    damage = _kl if score == "kl" else _loss_rise
    what = BLOCK if name == "block_drop" else MOE
    layers = range(len(structure(adapter_for(model.config), model)))
    first = {layer: damage(model, _without(model, {Removed(layer, what)}), tokens) for layer in layers}
    beam = sorted(layers, key=first.get)[:BEAM_WIDTH]
    pairs = {frozenset({a, b}): damage(model, _without(model, {Removed(a, what), Removed(b, what)}), tokens)
             for a in beam for b in layers if a != b}
    assert chosen.drop[0] in beam and frozenset(chosen.drop) == min(pairs, key=pairs.get)
    assert chosen.damage == pytest.approx([first[chosen.drop[0]], pairs[frozenset(chosen.drop)]], rel=1e-4, abs=1e-6)
    assert chosen.metric == (score or "perplexity") and "beam search" in chosen.describe()[0]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_the_scorer_removes_experts_as_expert_drop_does(family):
    from moeexport.adapters.surgery import keep_experts
    from moeexport.calibration.damage import EXPERT

    model = tiny_model(family)
    tokens = random_tokens(4, 24, seed=5)
    layers = structure(adapter_for(model.config), model)
    layer = next(i for i, spec in enumerate(layers) if spec.kind == "moe")
    removal = frozenset({Removed(layer, EXPERT, 0), Removed(layer, EXPERT, 2), Removed(layer + 1, MOE)})
    measured, = RemovalScorer(model, tokens, batch_size=2).kl([removal])
    expected = copy.deepcopy(model)
    adapter = adapter_for(expected.config)
    keep_experts(adapter, expected, layer, [e for e in range(layers[layer].num_experts) if e not in (0, 2)])
    drop_moe_sublayer(adapter, expected, layer + 1)
    assert measured == pytest.approx(_kl(model, expected, tokens), rel=1e-4, abs=1e-7)
