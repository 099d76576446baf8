"""The layer-by-layer observer: exact carry-forward, and each statistic against a brute-force value."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeexport.adapters import adapter_for
from moeexport.adapters.surgery import decoder_layers, structure
from moeexport.calibration.observers import Statistics, observe
from moeexport.streaming import first_layer_inputs, run_layer
from moeexport.calibration.sources import CalibrationConfig
from moeexport.compress import StatisticsProvider
from tests.tiny_models import FAMILIES, random_tokens, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_carrying_activations_layer_by_layer_equals_the_full_forward(family):
    model = tiny_model(family)
    layers = decoder_layers(adapter_for(model.config), model)
    tokens = random_tokens(2, 20)
    hidden, kwargs = first_layer_inputs(model, tokens)
    for layer in layers:
        hidden = run_layer(layer, hidden, kwargs)  # each layer called as the model calls it (masks differ)
    with torch.no_grad():
        full = model(tokens, output_hidden_states=True, use_cache=False).hidden_states
    assert torch.equal(adapter_for(model.config).model_view(model).final_norm(hidden), full[-1])


@pytest.mark.parametrize("family", FAMILIES)
def test_statistics_are_consistent(family, tmp_path):
    model = tiny_model(family)
    tokens = random_tokens(4, 16)
    statistics = observe(model, tokens, key="k", calibration={}, batch_size=3)
    specs = structure(adapter_for(model.config), model)
    assert [layer.kind for layer in statistics.layers] == [spec.kind for spec in specs]
    for spec, layer in zip(specs, statistics.layers):
        assert -1 <= layer.block_similarity <= 1
        if spec.kind != "moe":
            continue
        assert sum(layer.expert_tokens) == tokens.numel() * spec.top_k  # tokens seen per expert
        assert sum(layer.routing_mass) == pytest.approx(1.0)
        assert sum(layer.expert_frequency()) == pytest.approx(1.0)
        similarity = torch.tensor(layer.router_logit_similarity)
        assert torch.allclose(similarity.diagonal(), torch.ones(spec.num_experts, dtype=similarity.dtype))
        assert all(score >= 0 for score in layer.reap)
    statistics.save(tmp_path / "s.json")
    assert Statistics.load(tmp_path / "s.json") == statistics


def test_reap_and_moe_similarity_match_brute_force():
    model = tiny_model("mixtral")
    tokens = random_tokens(2, 12)
    statistics = observe(model, tokens, key="k", calibration={})
    layer = model.model.layers[1]
    captured = {}
    hook = layer.post_attention_layernorm.register_forward_hook(lambda m, a, o: captured.update(x=a[0], normed=o))
    with torch.no_grad():
        model(tokens, use_cache=False)
        hook.remove()
        x, normed = captured["x"].reshape(-1, 32), captured["normed"].reshape(-1, 32)
        logits = normed @ layer.mlp.gate.weight.T
        weights, index = logits.softmax(-1).topk(2, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        experts = layer.mlp.experts
        saliency = torch.zeros(4, dtype=torch.float64)
        counts = torch.zeros(4)
        for token in range(len(normed)):
            for slot in range(2):
                e = index[token, slot]
                gate, up = (experts.gate_up_proj[e] @ normed[token]).chunk(2)
                out = experts.down_proj[e] @ (F.silu(gate) * up)
                saliency[e] += weights[token, slot] * out.norm()
                counts[e] += 1
        moe_out = layer.mlp(normed.reshape(2, 12, 32)).reshape(-1, 32)
    expected_reap = saliency / counts.clamp_min(1)
    assert torch.allclose(torch.tensor(statistics.layers[1].reap, dtype=torch.float64), expected_reap, rtol=1e-4)
    assert statistics.layers[1].expert_tokens == counts.long().tolist()
    expected_similarity = F.cosine_similarity(x, x + moe_out, dim=-1).mean().item()
    assert statistics.layers[1].moe_similarity == pytest.approx(expected_similarity, rel=1e-5)


def test_a_streamed_layer_takes_reap_from_its_forward_reading_each_expert_once(tmp_path, expert_reads):
    from moeexport.modelio import load_streamed

    tiny_model("mixtral").save_pretrained(tmp_path)
    tokens = random_tokens(3, 12)
    in_memory = observe(tiny_model("mixtral"), tokens, key="k", calibration={}, batch_size=3)
    streamed = observe(load_streamed(tmp_path), tokens, key="k", calibration={}, batch_size=3)

    assert streamed == in_memory  # REAP included, to the bit: observed in the forward or recomputed alike
    assert expert_reads and len(expert_reads) == len(set(expert_reads))  # one batch: every expert matrix read once


def test_block_pair_similarity_covers_windows_up_to_the_limit():
    model = tiny_model("qwen3_moe")
    statistics = observe(model, random_tokens(2, 8), key="k", calibration={}, max_block_window=2)
    assert [len(row) for row in statistics.block_pair_similarity] == [2, 2, 2, 1]
    assert statistics.window_similarity(1, 1) == statistics.layers[1].block_similarity
    with pytest.raises(Exception, match="--max-block-window 3"):
        statistics.window_similarity(0, 3)


def test_statistics_are_cached_by_model_state_and_calibration(tmp_path):
    model = tiny_model("mixtral")

    def provider():
        return StatisticsProvider(None, CalibrationConfig(), "src", cache_dir=tmp_path, tokens=random_tokens(2, 8))

    first = provider()
    a = first.statistics(model, history=[])
    first.statistics(model, history=[{"name": "block_drop"}])
    assert first.observations == 2
    second = provider()
    assert second.statistics(model, history=[]) == a
    assert second.observations == 0  # reused from disk
