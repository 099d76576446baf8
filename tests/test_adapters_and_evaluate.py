"""The adapter registry is complete; evaluation numbers are right."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig

from moeexport.adapters import adapter_for, supported_families
from moeexport.errors import MoeExportError
from moeexport.evaluate import evaluate
from tests.tiny_models import TINY_CONFIGS, random_tokens, tiny_model


def test_every_registered_family_has_a_tiny_model_in_the_tests_and_vice_versa():
    assert set(supported_families()) == set(TINY_CONFIGS)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_layer_views_hand_out_each_family_s_modules(model_type):
    """The views find routers, experts, norms and shared experts, so passes and backends never name them."""
    from moeexport.adapters.surgery import drop_moe_sublayer, keep_experts

    model = tiny_model(model_type)
    adapter = adapter_for(model.config)
    config = adapter.model_config(model.config)
    views = adapter.layer_views(model)
    assert [view.index for view in views] == list(range(model.config.num_hidden_layers))
    moe = [view for view in views if view.kind == "moe"]
    latent = model_type in ("deepseek_v2", "deepseek_v3", "glm4_moe_lite")
    has_shared = model_type in ("qwen2_moe", "glm4_moe", "ernie4_5_moe", "nemotron_h", "qwen3_5_moe_text") or latent
    for view in moe:
        assert view.num_experts == config.num_experts and view.top_k == config.top_k
        first_stack = view.experts.gate_up_proj if view.layout.gated else view.experts.up_proj  # ungated: Nemotron-H
        assert first_stack.shape[0] == view.router_weight.shape[0]
        assert len(view.shared_experts) == int(has_shared)
        assert (view.shared_expert_gate is not None) == (model_type in ("qwen2_moe", "qwen3_5_moe_text"))
    assert config.shared_expert_count == int(has_shared)
    assert (config.latent is not None) == latent
    assert config.routing == adapter.routing(model.config)
    assert config.routing.method == ("noaux_tc" if model_type in ("deepseek_v3", "glm4_moe_lite", "glm4_moe", "nemotron_h")
                                     else "greedy")
    for view in views:
        if view.kind == "dense":
            assert view.router is None and view.experts is None and view.shared_experts == ()

    first, second = moe[0].index, moe[1].index
    keep_experts(adapter, model, first, [])  # no routed experts left: the view says so, shared experts stay
    drop_moe_sublayer(adapter, model, second)
    emptied, dropped = adapter.layer_view(model, first), adapter.layer_view(model, second)
    assert emptied.kind == "moe" and emptied.experts is None and emptied.num_experts == 0
    assert len(emptied.shared_experts) == int(has_shared)
    assert dropped.kind == "dropped" and dropped.router is None and dropped.shared_experts == ()


def test_dense_and_unknown_models_are_refused_with_the_supported_list():
    dense = AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(MoeExportError, match="dense \\(non-MoE\\).*Mixtral \\(mixtral\\)"):
        adapter_for(dense)
    unsupported_moe = AutoConfig.for_model("jetmoe")
    with pytest.raises(MoeExportError, match="unsupported model_type 'jetmoe'"):
        adapter_for(unsupported_moe)


def test_group_limited_deepseek_routing_refuses_expert_drop():
    from moeexport.compress import compress
    from moeexport.recipe import parse_recipe

    model = tiny_model("deepseek_v2")
    model.config.topk_method = "group_limited_greedy"
    recipe = parse_recipe({"passes": [{"expert_drop": {"keep": 2, "score": "random"}}]})
    with pytest.raises(MoeExportError, match="use Block Drop or Layer Drop"):
        compress(model, recipe, None)


def test_evaluating_a_model_against_itself():
    model = tiny_model("qwen3_moe")
    tokens = random_tokens(3, 10)
    result = evaluate(model, tokens, reference=model, batch_size=2)
    assert result.tokens == 3 * 9
    assert result.kl == pytest.approx(0.0, abs=1e-6)
    assert result.top1_agreement == 1.0
    with torch.no_grad():
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss.item()
    assert result.perplexity == pytest.approx(math.exp(loss), rel=1e-5)
    assert result.reference_perplexity == pytest.approx(result.perplexity)


def test_kl_is_positive_for_a_different_model():
    tokens = random_tokens(2, 10)
    result = evaluate(tiny_model("mixtral", seed=1), tokens, reference=tiny_model("mixtral", seed=2))
    assert result.kl > 0 and result.top1_agreement < 1


def test_non_finite_artifact_logits_fail_validation():
    import numpy as np

    from moeexport.validate import Tolerance, compare

    class Fixed:
        def __init__(self, value):
            self.value = value

        def logits(self, window):
            return np.full((len(window), 8), self.value, dtype=np.float32)

    fidelity = compare(Fixed(0.0), Fixed(np.nan), torch.zeros(1, 4, dtype=torch.long))
    assert fidelity.failures(Tolerance(max_abs_logit=1e-3)) != []
