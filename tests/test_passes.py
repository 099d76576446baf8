"""Every family x every pass: runs, counts as planned, exact save/load, exact pass-through."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moeexport
from moeexport.adapters import adapter_for
from moeexport.adapters.declaration import NOAUX_TC
from moeexport.adapters.surgery import decoder_layers, keep_experts, moe_block, structure
from moeexport.calibration.sources import CalibrationConfig
from moeexport.compress import StatisticsProvider, compress
from moeexport.errors import MoeExportError
from moeexport.passes.trim import (BlockDrop, BlockDropOptions, ExpertDropOptions, ExpertDrop, LayerDrop, LayerDropOptions,
                                   _beam_by_damage)
from moeexport.recipe import parse_recipe
from tests.tiny_models import COMMON, FAMILIES, TINY_CONFIGS, random_tokens, tiny_model

RECIPES = {
    "block_drop": [{"block_drop": {"n": 1}}],
    "block_drop_consecutive": [{"block_drop": {"n": 2, "mode": "consecutive", "score": "similarity"}}],
    "block_drop_similarity": [{"block_drop": {"n": 1, "score": "similarity"}}],
    "layer_drop_similarity": [{"layer_drop": {"n": 1, "score": "similarity"}}],
    "layer_drop": [{"layer_drop": {"n": 1}}],
    "expert_drop_layer_frequency": [{"expert_drop": {"keep": 2, "scope": "layer", "score": "frequency"}}],
    "expert_drop_global_routing_mass": [{"expert_drop": {"keep": 2, "scope": "global", "score": "routing_mass"}}],
    "expert_drop_global_reap": [{"expert_drop": {"keep": 3, "scope": "global", "score": "reap"}}],
    "expert_drop_random": [{"expert_drop": {"keep": 1, "score": "random"}}],
    "all_three": [{"block_drop": {"n": 1}}, {"layer_drop": {"n": 1}}, {"expert_drop": {"keep": 3, "scope": "global"}}],
}


def _scores_groups_by_best_two(family: str) -> bool:
    """DeepSeek-V3's router (NOAUX_TC) scores its expert groups by their best two experts: Expert Drop refuses
    unequal groups and layers left with fewer than two (tests/test_family_deepseek3.py), so a layer of it is
    never emptied and some recipes here are refused for it."""
    config = AutoConfig.for_model(family, **(COMMON | TINY_CONFIGS[family]))
    return adapter_for(config).model_config(config).routing.method == NOAUX_TC


EMPTIABLE = [family for family in FAMILIES if not _scores_groups_by_best_two(family)]


def _provider(model) -> StatisticsProvider:
    return StatisticsProvider(None, CalibrationConfig(), "tiny", cache_dir=None, tokens=random_tokens(6, 32, seed=1))


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


@pytest.mark.parametrize("recipe_name", sorted(RECIPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_pass_runs_counts_and_round_trips(family, recipe_name, tmp_path):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    before = structure(adapter, model)
    try:
        result = compress(model, parse_recipe({"passes": RECIPES[recipe_name]}), _provider(model))
    except MoeExportError as refusal:  # a keep its expert groups cannot take, refused before anything changed
        assert _scores_groups_by_best_two(family) and "expert_drop" in str(refusal), refusal
        return
    after = structure(adapter, model)
    tokens = random_tokens(2, 16, seed=7)
    logits = _logits(model, tokens)
    assert torch.isfinite(logits).all()

    expected_blocks = len(before) - sum(len(s.plan.drop) for s in result.steps if s.name == "block_drop")
    assert len(after) == expected_blocks == model.config.num_hidden_layers
    assert sorted(i for i in result.new_block_index if i is not None) == list(range(expected_blocks))
    for step in result.steps:
        if step.name == "expert_drop":
            for layer, kept in step.plan.keep.items():
                assert after[layer].num_experts == len(kept)
                assert after[layer].top_k == min(model.config.num_experts_per_tok, len(kept))
        if step.name == "layer_drop":
            assert all(after[layer].kind == "dropped" for layer in step.plan.drop)
    assert [s.kind for s in after].count("dropped") == sum(
        len(s.plan.drop) for s in result.steps if s.name == "layer_drop"
    )

    saved = moeexport.save(model, tmp_path / "out", result.manifest())
    reloaded = moeexport.load(saved)
    assert structure(adapter, reloaded) == after
    assert torch.equal(_logits(reloaded, tokens), logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_transformers_loads_block_drop_and_uniform_expert_drop(family, tmp_path):
    from moeexport.modelio import EXPERTS_IMPLEMENTATION

    model = tiny_model(family)
    groups = adapter_for(model.config).model_config(model.config).routing.groups
    keep = 3 if groups == 1 else 2 * groups  # two of each group where the router chooses within groups
    recipe = parse_recipe({"passes": [{"block_drop": {"n": 1}}, {"expert_drop": {"keep": keep, "scope": "layer"}}]})
    compress(model, recipe, _provider(model))
    saved = moeexport.save(model, tmp_path / "out", {})
    assert (saved / "model.safetensors").is_file() and not (saved / "moeexport.safetensors").exists()
    stock = AutoModelForCausalLM.from_pretrained(saved, experts_implementation=EXPERTS_IMPLEMENTATION).eval()
    tokens = random_tokens(2, 16, seed=3)
    assert torch.equal(_logits(stock, tokens), _logits(model, tokens))


@pytest.mark.parametrize("family", FAMILIES)
def test_non_uniform_checkpoint_is_not_silently_loadable_by_stock_transformers(family, tmp_path):
    model = tiny_model(family)
    compress(model, parse_recipe({"passes": [{"layer_drop": {"n": 1}}]}), _provider(model))
    saved = moeexport.save(model, tmp_path / "out", {})
    assert not (saved / "model.safetensors").exists()
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(saved)


def _capture_moe_input_and_layer_output(adapter, model, layer, tokens):
    """(residual stream entering the MoE sublayer, decoder layer output) of one layer."""
    layer_module = decoder_layers(adapter, model)[layer]
    seen = {}
    hooks = [
        getattr(layer_module, adapter.moe_norm).register_forward_hook(lambda m, a, o: seen.setdefault("x", a[0])),
        layer_module.register_forward_hook(lambda m, a, o: seen.setdefault("out", o[0] if isinstance(o, tuple) else o)),
    ]
    _logits(model, tokens)
    for hook in hooks:
        hook.remove()
    return seen["x"], seen["out"]


@pytest.mark.parametrize("family", EMPTIABLE)
def test_layer_with_all_experts_dropped_passes_through(family):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    layer = next(i for i, s in enumerate(structure(adapter, model)) if s.kind == "moe")
    reference = copy.deepcopy(model)
    keep_experts(adapter, model, layer, [])
    assert structure(adapter, model)[layer].num_experts == 0
    tokens = random_tokens(2, 16, seed=5)
    residual, output = _capture_moe_input_and_layer_output(adapter, model, layer, tokens)
    beside = adapter.model_config(model.config).routing.dense_mlp_beside
    if not (structure(adapter, reference)[layer].shared_experts or beside):
        assert torch.equal(output, residual)  # exact pass-through, not residual + norm(residual)
    else:
        # only the shared experts (or the dense MLP beside the experts) remain: same as the original with every
        # routed expert silenced
        moe_block(adapter, reference, layer).experts.down_proj.data.zero_()
        _, reference_output = _capture_moe_input_and_layer_output(adapter, reference, layer, tokens)
        torch.testing.assert_close(output, reference_output, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", EMPTIABLE)
def test_global_expert_drop_can_empty_a_layer_and_the_model_still_runs(family, tmp_path):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    layers = structure(adapter, model)
    moe_layers = [i for i, s in enumerate(layers) if s.kind == "moe"]
    statistics = _provider(model).statistics(model, [])
    starved = moe_layers[0]
    # frequencies are per-layer shares: the starved layer's best expert (25%) ranks below
    # the other layers' two busy experts (50% each), so keeping 1 on average empties it
    for index in moe_layers:
        statistics.layers[index].expert_tokens = [1, 1, 1, 1] if index == starved else [0, 0, 500, 500]
    options = ExpertDropOptions(keep=1, scope="global", score="frequency", allow_empty_layers=True)
    plan = ExpertDrop().plan(statistics, layers, options)
    assert plan.keep[starved] == []
    assert sum(len(k) for k in plan.keep.values()) == len(moe_layers)
    ExpertDrop().apply(model, plan)
    tokens = random_tokens(2, 16, seed=2)
    assert torch.isfinite(_logits(model, tokens)).all()
    reloaded = moeexport.load(moeexport.save(model, tmp_path / "out", {}))
    assert torch.equal(_logits(reloaded, tokens), _logits(model, tokens))


def test_global_expert_drop_min_keep_spares_each_layers_best():
    model = tiny_model("mixtral")
    adapter = adapter_for(model.config)
    layers = structure(adapter, model)
    statistics = _provider(model).statistics(model, [])
    for index in range(4):  # layer 0 would lose everything to the global ranking
        statistics.layers[index].reap = [0.1, 0.2, 0.3, 0.4] if index == 0 else [5.0, 6.0, 7.0, 8.0]
    options = ExpertDropOptions(keep=2, scope="global", score="reap", min_keep=2)
    plan = ExpertDrop().plan(statistics, layers, options)
    assert plan.keep[0] == [2, 3]
    assert sum(len(kept) for kept in plan.keep.values()) == 8
    with pytest.raises(MoeExportError, match="min_keep=3 is more than keep=2"):
        ExpertDrop().check(ExpertDropOptions(keep=2, scope="global", min_keep=3), layers)


def test_expert_drop_keeps_the_highest_scores_and_clamps_top_k():
    model = tiny_model("mixtral")
    adapter = adapter_for(model.config)
    statistics = _provider(model).statistics(model, [])
    statistics.layers[0].reap = [0.1, 0.4, 0.2, 0.3]  # the default score
    plan = ExpertDrop().plan(statistics, structure(adapter, model), ExpertDropOptions(keep=1))
    assert plan.keep[0] == [1] and plan.drop[0] == [0, 2, 3]
    ExpertDrop().apply(model, plan)
    assert structure(adapter, model)[0].top_k == 1
    assert torch.isfinite(_logits(model, random_tokens(1, 8))).all()


def test_global_reap_compares_absolute_saliency_across_layers():
    model = tiny_model("mixtral")
    adapter = adapter_for(model.config)
    layers = structure(adapter, model)
    statistics = _provider(model).statistics(model, [])
    for index in range(4):  # layer 0's experts write 10x more than the others'
        statistics.layers[index].reap = [10.0, 11.0, 12.0, 13.0] if index == 0 else [1.0, 2.0, 3.0, 4.0]
    plan = ExpertDrop().plan(statistics, layers, ExpertDropOptions(keep=3, scope="global", score="reap"))
    assert plan.keep[0] == [0, 1, 2, 3]
    assert sum(len(kept) for kept in plan.keep.values()) == 12


def test_consecutive_block_drop_drops_exactly_the_window_it_scored():
    model = tiny_model("mixtral")
    adapter = adapter_for(model.config)
    statistics = _provider(model).statistics(model, [])
    # windows of width 2 start at blocks 0, 1, 2; the one starting at block 1 is the most redundant
    for start, row in enumerate(statistics.block_pair_similarity):
        if len(row) >= 2:
            row[1] = 0.99 if start == 1 else 0.5
    plan = BlockDrop().plan(statistics, structure(adapter, model), BlockDropOptions(n=2, mode="consecutive", score="similarity"))
    assert plan.drop == [1, 2]  # blocks 1 and 2: input of block 1 vs output of block 2


def test_discrete_block_and_layer_drop_pick_the_most_similar():
    model = tiny_model("olmoe")
    adapter = adapter_for(model.config)
    layers = structure(adapter, model)
    statistics = _provider(model).statistics(model, [])
    for index, similarity in enumerate([0.1, 0.9, 0.3, 0.8]):
        statistics.layers[index].block_similarity = similarity
        statistics.layers[index].moe_similarity = 1 - similarity
    assert BlockDrop().plan(statistics, layers, BlockDropOptions(n=2, score="similarity")).drop == [1, 3]
    assert LayerDrop().plan(statistics, layers, LayerDropOptions(n=2, score="similarity")).drop == [0, 2]


def test_block_drop_renumbers_the_kv_cache_slots():
    model = tiny_model("mixtral")
    compress(model, parse_recipe({"passes": [{"block_drop": {"n": 2, "score": "random"}}]}), None)
    prompt = random_tokens(1, 6, seed=4)
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    # greedy decoding through the KV cache agrees with recomputing the whole sequence
    full = _logits(model, generated[:, :-1])
    assert torch.equal(full[0, prompt.shape[1] - 1 :].argmax(-1), generated[0, prompt.shape[1] :])


@pytest.mark.parametrize(
    "passes, message",
    [
        ([{"block_drop": {"n": 4}}], "has 4 blocks"),
        ([{"layer_drop": {"n": 5}}], "MoE layers left"),
        ([{"expert_drop": {"keep": 5}}], "experts"),
        ([{"block_drop": {"n": 3}}, {"block_drop": {"n": 1}}], "has 1 blocks"),
    ],
)
def test_recipes_that_remove_more_than_exists_are_refused(passes, message):
    model = tiny_model("mixtral")
    with pytest.raises(MoeExportError, match=message):
        compress(model, parse_recipe({"passes": passes}), _provider(model))


def test_random_selection_is_seeded():
    plans = []
    for _ in range(2):
        model = tiny_model("mixtral")
        recipe = parse_recipe({"passes": [{"expert_drop": {"keep": 2, "score": "random", "seed": 3}}]})
        plans.append(compress(model, recipe, None).steps[0].plan.keep)
    assert plans[0] == plans[1]


def test_a_measured_drop_of_two_finds_the_best_pair_greedy_would_miss():
    """The best single removal (0) is in no good pair: a beam over the measured damage keeps the runners-up."""
    singles = {0: 1.0, 1: 1.1, 2: 1.2, 3: 2.0}
    pairs = {frozenset({1, 2}): 1.5}

    class Scorer:
        def damage(self, removals, metric):
            layers = [frozenset(item.layer for item in removal) for removal in removals]
            return [singles[min(chosen)] if len(chosen) == 1 else pairs.get(chosen, 3.0) for chosen in layers]

    chosen, damage = _beam_by_damage(Scorer(), [0, 1, 2, 3], 2, "block", "kl")
    assert sorted(chosen) == [1, 2] and damage == [1.1, 1.5]
    assert _beam_by_damage(Scorer(), [0, 1, 2, 3], 1, "block", "kl") == ([0], [1.0])
