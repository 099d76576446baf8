"""Gemma 4 MoE (the text model): read, compressed by the passes that fit it (or refused by name), and written in
llama.cpp's own gemma4 architecture, checked against transformers' own model of what moeexport saved."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import moeexport
from moeexport.adapters import adapter_for
from moeexport.adapters.surgery import keep_experts, structure
from moeexport.calibration.observers import observe
from moeexport.calibration.sources import CalibrationConfig
from moeexport.compress import StatisticsProvider, compress
from moeexport.errors import MoeExportError
from moeexport.modelio import EXPERTS_IMPLEMENTATION, load
from moeexport.recipe import parse_recipe
from tests.tiny_models import random_tokens, tiny_model

TRIMMED = [{"block_drop": {"n": 1, "score": "random"}}, {"expert_drop": {"keep": 3, "score": "random"}}]


def _provider() -> StatisticsProvider:
    return StatisticsProvider(None, CalibrationConfig(), "tiny", cache_dir=None, tokens=random_tokens(6, 32, seed=1))


def _logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


def _stock(directory: Path):
    return AutoModelForCausalLM.from_pretrained(directory, experts_implementation=EXPERTS_IMPLEMENTATION).eval()


# --- reading, the passes --------------------------------------------------------------------------------------------

def test_a_saved_gemma4_loads_with_its_experts_router_scales_and_per_layer_head_widths(tmp_path):
    model = tiny_model("gemma4_text")
    model.save_pretrained(tmp_path)
    loaded = load(tmp_path)
    tokens = random_tokens(2, 24)
    assert torch.equal(_logits(loaded, tokens), _logits(model, tokens))
    views = adapter_for(loaded.config).layer_views(loaded)
    assert [view.kind for view in views] == ["moe"] * 4 and {view.num_experts for view in views} == {4}
    assert {view.top_k for view in views} == {2}
    assert [view.attention.head_dim for view in views] == [16, 16, 16, 32]  # the full-attention layer's own


def test_expert_drop_slices_the_router_rows_and_per_expert_scale_with_their_experts():
    model = tiny_model("gemma4_text")
    original = copy.deepcopy(model)
    keep = [3, 1, 0]
    keep_experts(adapter_for(model.config), model, 1, keep)
    router, before = model.model.layers[1].router, original.model.layers[1].router
    index = torch.tensor(keep)
    for now, then in ((router.proj.weight, before.proj.weight), (router.per_expert_scale, before.per_expert_scale),
                      (model.model.layers[1].experts.gate_up_proj, original.model.layers[1].experts.gate_up_proj),
                      (model.model.layers[1].experts.down_proj, original.model.layers[1].experts.down_proj)):
        assert torch.equal(now, then[index])

    def masked(module, args, output):  # the original router with expert 2 removed: the k best of the rest
        probabilities = output[0].clone()
        probabilities[:, 2] = 0
        weights, chosen = probabilities.topk(2, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        return probabilities, weights * module.per_expert_scale[chosen], chosen

    before.register_forward_hook(masked)
    tokens = random_tokens(2, 24)
    torch.testing.assert_close(_logits(model, tokens), _logits(original, tokens), rtol=0, atol=1e-5)
    assert (_logits(model, tokens) - _logits(tiny_model("gemma4_text"), tokens)).abs().max() > 1e-3


def test_reap_weighs_each_expert_by_its_scaled_routing_weight_on_the_experts_own_normed_input():
    model = tiny_model("gemma4_text")
    tokens = random_tokens(4, 16)
    statistics = observe(model, tokens, key="k", calibration={}, batch_size=8)
    layer = model.model.layers[2]
    seen = {}
    handle = layer.router.register_forward_hook(lambda module, args, output: seen.update(x=args[0], out=output))
    _logits(model, tokens)
    handle.remove()
    probabilities, weights, index = seen["out"]  # per_expert_scale is in the weights the layer mixes with
    x = layer.pre_feedforward_layernorm_2(seen["x"])
    for expert in range(4):
        rows, slot = torch.where(index == expert)
        alone = layer.experts(x[rows], torch.full((len(rows), 1), expert), torch.ones(len(rows), 1))
        expected = (weights[rows, slot].double() * alone.double().norm(dim=-1)).mean()
        assert statistics.layers[2].reap[expert] == pytest.approx(float(expected), rel=1e-5)
    # the routing mass is the router's own softmax scores
    mass = probabilities.double().mean(0)
    assert statistics.layers[2].routing_mass == pytest.approx(mass.tolist(), rel=1e-6)


def test_block_and_uniform_expert_drop_save_a_checkpoint_transformers_loads_to_the_same_model(tmp_path):
    model = tiny_model("gemma4_text")
    recipe = parse_recipe({"passes": [{"block_drop": {"n": 1, "score": "random"}},
                                      {"expert_drop": {"keep": 3, "score": "reap"}}]})
    result = compress(model, recipe, _provider())
    kept = [old for old, new in enumerate(result.new_block_index) if new is not None]
    full = [new for new, old in enumerate(kept) if old == 3]
    assert [spec.num_experts for spec in structure(adapter_for(model.config), model)] == [3, 3, 3]
    stock = _stock(moeexport.save(model, tmp_path / "out", result.manifest()))
    assert stock.config.num_experts == 3 and stock.config.num_hidden_layers == 3
    assert [layer.self_attn.head_dim for layer in stock.model.layers] == [32 if i in full else 16 for i in range(3)]
    tokens = random_tokens(2, 24)
    assert torch.equal(_logits(stock, tokens), _logits(model, tokens))


def test_layer_drop_leaves_the_dense_mlp_with_its_norms_and_moexport_reloads_it(tmp_path):
    model = tiny_model("gemma4_text")
    original = copy.deepcopy(model)
    result = compress(model, parse_recipe({"passes": [{"layer_drop": {"n": 1, "score": "random"}}]}), _provider())
    kinds = [spec.kind for spec in structure(adapter_for(model.config), model)]
    dropped = kinds.index("dropped")
    assert kinds.count("dropped") == 1
    layer, before = model.model.layers[dropped], original.model.layers[dropped]
    assert not hasattr(layer, "experts") and not hasattr(layer, "post_feedforward_layernorm_1")
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # what the layer adds after attention: post-norm(MLP(pre-norm(h))), the experts gone
        expected = before.post_feedforward_layernorm(before.mlp(before.pre_feedforward_layernorm(x)))
        torch.testing.assert_close(layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x))),
                                   expected, rtol=0, atol=0)
    tokens = random_tokens(2, 24)
    saved = load(moeexport.save(model, tmp_path / "out", result.manifest()))
    assert torch.equal(_logits(saved, tokens), _logits(model, tokens))


def test_merge_is_refused_by_name():
    with pytest.raises(MoeExportError, match="Gemma 4 MoE.*experts cannot be merged.*per_expert_scale.*Expert Drop"):
        compress(tiny_model("gemma4_text"), parse_recipe({"passes": [{"merge": {"keep": 2}}]}), _provider())
