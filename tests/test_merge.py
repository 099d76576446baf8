"""The M-SMoE merge pass: fewer experts in config and file, alignment is function-preserving."""

from __future__ import annotations

import pytest
import torch

import moeexport
from moeexport.adapters import adapter_for
from moeexport.adapters.base import moe_block, structure
from moeexport.calibration.sources import CalibrationConfig
from moeexport.compress import StatisticsProvider, compress
from moeexport.passes.merge import Merge, MergeOptions, _aligned, _group
from moeexport.recipe import parse_recipe
from tests.tiny_models import FAMILIES, random_tokens, tiny_model


def _provider():
    return StatisticsProvider(None, CalibrationConfig(), "tiny", cache_dir=None, tokens=random_tokens(6, 32, seed=1))


@pytest.mark.parametrize("options", [{"keep": 2}, {"keep": 2, "scope": "global"}, {"keep": 3, "router": "dominant"}])
@pytest.mark.parametrize("family", FAMILIES)
def test_merge_shrinks_every_moe_layer_and_round_trips(family, options, tmp_path):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    result = compress(model, parse_recipe({"passes": [{"merge": options}]}), _provider())
    plan = result.steps[0].plan
    after = structure(adapter, model)
    for layer, groups in plan.groups.items():
        assert after[layer].num_experts == len(groups)
        assert sorted(e for g in groups for e in g) == list(range(4))  # every expert lands in one group
    if options.get("scope") != "global":
        assert {s.num_experts for s in after if s.kind == "moe"} == {options["keep"]}
    tokens = random_tokens(2, 12, seed=3)
    logits = model(input_ids=tokens).logits
    assert torch.isfinite(logits).all()
    reloaded = moeexport.load(moeexport.save(model, tmp_path / "out", result.manifest()))
    assert torch.equal(reloaded(input_ids=tokens).logits, logits)


def test_alignment_undoes_a_neuron_permutation():
    model = tiny_model("mixtral")
    experts = moe_block(adapter_for(model.config), model, 0).experts
    gate_up, down = experts.gate_up_proj.data[0], experts.down_proj.data[0]
    width = down.shape[1]
    permutation = torch.randperm(width, generator=torch.Generator().manual_seed(0))
    shuffled_gate_up = torch.cat([gate_up[:width][permutation], gate_up[width:][permutation]])
    aligned_gate_up, aligned_down = _aligned(gate_up, down, shuffled_gate_up, down[:, permutation])
    assert torch.equal(aligned_gate_up, gate_up) and torch.equal(aligned_down, down)


def test_merging_identical_experts_changes_nothing():
    """Four copies of one expert with one router row merge into one expert computing the same thing."""
    model = tiny_model("mixtral")
    adapter = adapter_for(model.config)
    block = moe_block(adapter, model, 1)
    block.experts.gate_up_proj.data[:] = block.experts.gate_up_proj.data[0]
    block.experts.down_proj.data[:] = block.experts.down_proj.data[0]
    tokens = random_tokens(2, 12, seed=5)
    before = model(input_ids=tokens).logits
    statistics = _provider().statistics(model, [])
    layers = structure(adapter, model)
    plan = Merge().plan(statistics, layers, MergeOptions(keep=1))
    plan.groups = {1: plan.groups[1]}
    Merge().apply(model, plan)
    torch.testing.assert_close(model(input_ids=tokens).logits, before, rtol=0, atol=1e-5)


def test_grouping_follows_frequency_then_router_similarity():
    frequency = [0.4, 0.1, 0.3, 0.2]
    similarity = [[1, 0, 0, 0], [0.9, 1, 0.1, 0], [0, 0.1, 1, 0.8], [0.2, 0, 0.7, 1]]
    assert _group(frequency, similarity, 2) == [[0, 1], [2, 3]]
