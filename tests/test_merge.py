"""The merge pass: fewer experts in config and file (or, layout alias, all of them), alignment is
function-preserving, and MC-SMoE's low-rank + sparse compression does what it says."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig

import moeexport
from moeexport.adapters import adapter_for
from moeexport.adapters.surgery import moe_block, structure
from moeexport.calibration.sources import CalibrationConfig
from moeexport.compress import StatisticsProvider, compress
from moeexport.errors import MoeExportError
from moeexport.passes.merge import CompressOptions, Merge, MergeOptions, _aligned, _group, _low_rank_plus_sparse
from moeexport.recipe import load_recipe, parse_recipe
from tests.tiny_models import FAMILIES, random_tokens, tiny_model

# gpt-oss's biased, interleaved, transposed experts are refused by name (tests/test_family_gpt_oss.py)
MERGED_FAMILIES = [family for family in FAMILIES if family != "gpt_oss"]

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _stored_expert_counts(weights_file: Path) -> list[int]:
    """Routed experts per layer in a weights file: fused [E, ...] tensors (manifest) or one set per expert (stock)."""
    stored = set()
    with safe_open(weights_file, "pt") as weights:
        for name in weights.keys():
            match = re.search(r"layers\.(\d+)\..*\.experts\.(?:(\d+)\.|gate_up_proj$)", name)
            if match and match[2] is not None:
                stored.add((int(match[1]), int(match[2])))
            elif match:
                stored.update((int(match[1]), e) for e in range(weights.get_slice(name).get_shape()[0]))
    layers = sorted({layer for layer, _ in stored})
    return [sum(layer == stored_layer for stored_layer, _ in stored) for layer in layers]


def _provider():
    return StatisticsProvider(None, CalibrationConfig(), "tiny", cache_dir=None, tokens=random_tokens(6, 32, seed=1))


@pytest.mark.parametrize(
    "options", [{"keep": 2}, {"keep": 2, "scope": "global"}, {"keep": 3, "router": "dominant"}, {"keep": 2, "layout": "alias"}]
)
@pytest.mark.parametrize("family", MERGED_FAMILIES)
def test_merge_sets_the_expert_count_in_model_config_and_file(family, options, tmp_path):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    result = compress(model, parse_recipe({"passes": [{"merge": options}]}), _provider())
    plan = result.steps[0].plan
    after = structure(adapter, model)
    alias = options.get("layout") == "alias"
    for layer, groups in plan.groups.items():
        assert after[layer].num_experts == (4 if alias else len(groups))
        assert sorted(e for g in groups for e in g) == list(range(4))  # every expert lands in one group
    if options.get("scope") != "global":
        assert {s.num_experts for s in after if s.kind == "moe"} == {4 if alias else options["keep"]}
    tokens = random_tokens(2, 12, seed=3)
    logits = model(input_ids=tokens).logits
    assert torch.isfinite(logits).all()
    saved = moeexport.save(model, tmp_path / "out", result.manifest())
    manifest = json.loads((saved / "moeexport.json").read_text())
    config = AutoConfig.from_pretrained(saved)
    counts = [spec["num_experts"] for spec in manifest["layers"] if spec["kind"] == "moe"]
    assert counts == [spec.num_experts for spec in after if spec.kind == "moe"]
    assert getattr(config, adapter.num_experts_key) == max(counts)
    assert _stored_expert_counts(saved / manifest["weights"]) == counts
    reloaded = moeexport.load(saved)
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


def test_compress_option_parses_exactly_as_the_recipe_writes_it():
    recipe = parse_recipe({"passes": [{"merge": {"keep": 4, "compress": {"rank": 32, "sparsity": 0.9}}}]})
    options = recipe.steps[0].options
    assert options.compress == CompressOptions(rank=32, sparsity=0.9)
    assert recipe.to_dict()["passes"][0]["merge"]["compress"] == {"rank": 32, "sparsity": 0.9}
    example = load_recipe(RECIPES / "merge.yaml").steps
    assert [step.name for step in example] == ["merge"] and example[0].options.compress is not None


@pytest.mark.parametrize(
    "compress, field",
    [
        ({"rank": 0, "sparsity": 0.5}, "compress.rank"),
        ({"rank": 4, "sparsity": 1.0}, "compress.sparsity"),
        ({"rank": 4, "sparsity": -0.1}, "compress.sparsity"),
        ({"rank": 4}, "compress.sparsity"),
        ({"rank": 4, "sparsity": 0.5, "score": "wanda"}, "compress.score"),
    ],
)
def test_bad_compress_options_are_one_line_errors(compress, field):
    with pytest.raises(MoeExportError, match=f"\\(merge\\): {field}: ") as error:
        parse_recipe({"passes": [{"merge": {"keep": 2, "compress": compress}}]})
    assert "\n" not in str(error.value)


def test_rank_larger_than_the_expert_matrices_is_refused_before_any_change():
    model = tiny_model("mixtral")  # experts are 48 x 32 (gate, up) and 32 x 48 (down)
    before = copy.deepcopy(model.state_dict())
    recipe = parse_recipe({"passes": [{"merge": {"keep": 2, "compress": {"rank": 33, "sparsity": 0.5}}}]})
    with pytest.raises(MoeExportError, match="merge compress rank=33 but expert matrices are 48x32 \\(rank at most 32\\)$"):
        compress(model, recipe, _provider())
    assert all(torch.equal(model.state_dict()[name], value) for name, value in before.items())


def test_low_rank_plus_sparse_is_the_best_rank_r_part_and_the_largest_residual_entries():
    weight = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    rank, sparsity = 5, 0.8
    low_rank, sparse = _low_rank_plus_sparse(weight, rank, sparsity)
    singular = torch.linalg.svdvals(weight.double())
    assert (torch.linalg.svdvals(low_rank.double())[rank:] < 1e-5 * singular[0]).all()  # rank(W - S) <= r
    best_error = singular[rank:].square().sum().sqrt()  # Eckart-Young: no rank-r matrix is closer
    torch.testing.assert_close(torch.linalg.norm((weight - low_rank).double()), best_error, rtol=1e-5, atol=0)
    residual = weight - low_rank
    kept = sparse != 0
    assert kept.sum() == round((1 - sparsity) * weight.numel())
    torch.testing.assert_close(sparse[kept], residual[kept])
    assert residual[kept].abs().min() >= residual[~kept].abs().max()


def test_compress_covers_every_merged_expert_and_reports_effective_parameters():
    """keep 3 of 4: one group of two and two singletons, all compressed (MC-SMoE compresses every expert of
    the merged layers)."""
    original = tiny_model("mixtral")
    merged, compressed = copy.deepcopy(original), copy.deepcopy(original)
    statistics = _provider().statistics(original, [])
    layers = structure(adapter_for(original.config), original)
    rank, sparsity = 4, 0.75
    plan = Merge().plan(statistics, layers, MergeOptions(keep=3, compress=CompressOptions(rank=rank, sparsity=sparsity)))
    Merge().apply(merged, dataclasses.replace(plan, compress=None, compressed_parameters={}))
    Merge().apply(compressed, plan)
    per_matrix = rank * (48 + 32) + round((1 - sparsity) * 48 * 32)
    assert plan.compressed_parameters == {layer: [3 * 3 * per_matrix, 3 * 3 * 48 * 32] for layer in plan.groups}
    assert f"effective {4 * 9 * per_matrix:,} of {4 * 9 * 48 * 32:,}" in plan.describe()[-1]
    for layer in plan.groups:
        for name in ("gate_up_proj", "down_proj"):
            exact = getattr(moe_block(adapter_for(merged.config), merged, layer).experts, name)
            approximate = getattr(moe_block(adapter_for(compressed.config), compressed, layer).experts, name)
            unchanged = ((approximate - exact).abs() <= 1e-5).flatten(1).float().mean(1)
            # S restores the kept (1 - sparsity) of every matrix exactly, singleton experts included
            assert ((unchanged >= 1 - sparsity) & (unchanged < 1 - sparsity + 0.05)).all()


@pytest.mark.parametrize("family", MERGED_FAMILIES)
def test_alias_layout_is_the_grouped_merge_behind_the_untouched_router(family):
    """Alias keeps E router rows and slots; routed to a member's slot it computes what the grouped merge
    computes routed to that member's group."""
    original = tiny_model(family)
    adapter = adapter_for(original.config)
    statistics = _provider().statistics(original, [])
    layers = structure(adapter, original)
    grouped, alias = copy.deepcopy(original), copy.deepcopy(original)
    plan = Merge().plan(statistics, layers, MergeOptions(keep=2))
    Merge().apply(grouped, plan)
    Merge().apply(alias, dataclasses.replace(plan, layout="alias"))
    hidden = torch.randn(16, original.config.hidden_size, generator=torch.Generator().manual_seed(0))
    slot = torch.randint(0, 4, (16, 2), generator=torch.Generator().manual_seed(1))
    gate = torch.rand(16, 2, generator=torch.Generator().manual_seed(2))
    for layer, groups in plan.groups.items():
        group_of = torch.tensor([next(g for g, group in enumerate(groups) if e in group) for e in range(4)])
        original_block, alias_block = moe_block(adapter, original, layer), moe_block(adapter, alias, layer)
        assert torch.equal(getattr(alias_block, adapter.router).weight, getattr(original_block, adapter.router).weight)
        alias_out = getattr(alias_block, adapter.experts)(hidden, slot, gate)
        grouped_out = getattr(moe_block(adapter, grouped, layer), adapter.experts)(hidden, group_of[slot], gate)
        torch.testing.assert_close(alias_out, grouped_out, rtol=0, atol=1e-6)
    assert structure(adapter, alias) == layers


def test_alias_layout_rejects_a_router_choice():
    with pytest.raises(MoeExportError, match="layout=alias keeps every router row"):
        compress(tiny_model("mixtral"), parse_recipe({"passes": [{"merge": {"keep": 2, "layout": "alias",
                                                                            "router": "dominant"}}]}), _provider())
