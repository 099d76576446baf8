"""DeepSeek-V3 (`deepseek_v3`) and GLM-4.7-Flash (`glm4_moe_lite`): sigmoid scores, a selection-only bias, expert
groups, routed scaling, shared experts, dense first layers and multi-head latent attention, through every pass and
into llama.cpp's deepseek2 and ONNX.

The tiny DeepSeek-V3 routes within the best 1 of 2 groups of 4 experts (so groups matter); the tiny GLM-4.7-Flash
has one group of 6, as the real one. Both have a random e_score_correction_bias (tests/tiny_models.py)."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moeexport.adapters import adapter_for
from moeexport.adapters.declaration import FFNWidths
from moeexport.adapters.routing import route
from moeexport.adapters.surgery import drop_blocks, structure
from moeexport.backends import gguf as gguf_backend
from moeexport.backends import onnx as onnx_backend
from moeexport.calibration.sources import CalibrationConfig
from moeexport.compress import StatisticsProvider, compress
from moeexport.errors import MoeExportError
from moeexport.modelio import load, load_streamed, save
from moeexport.recipe import parse_recipe
from moeexport.validate import TorchRunner, compare
from tests import family_checks as checks
from tests.tiny_models import random_tokens, tiny_model

FAMILIES = ("deepseek_v3", "glm4_moe_lite")
KEEP = {"deepseek_v3": 4, "glm4_moe_lite": 3}  # half the experts; for DeepSeek-V3 two of each group's four


def _dense(weights: torch.Tensor, index: torch.Tensor, experts: int) -> torch.Tensor:
    return torch.zeros(len(index), experts).scatter(1, index, weights.float())


def _moe_views(model):
    return [view for view in adapter_for(model.config).layer_views(model) if view.kind == "moe"]


def _provider(count: int = 4) -> StatisticsProvider:
    return StatisticsProvider(None, CalibrationConfig(), "tiny", cache_dir=None, tokens=random_tokens(count, 32))


# --- the adapters ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_route_with_the_view_s_selection_bias_is_the_family_s_own_router(family):
    model = tiny_model(family)
    config = adapter_for(model.config).model_config(model.config)
    tokens = torch.randn(128, config.hidden_size, generator=torch.Generator().manual_seed(1))
    biased_differs = grouped_differs = False
    for view in _moe_views(model):
        logits, weights, index = view.router(tokens)
        bias = view.selection_bias
        assert bias is not None and bias.shape == (config.num_experts,)
        own = _dense(*route(config.routing, logits, view.top_k, selection_bias=bias), config.num_experts)
        assert (own - _dense(weights, index, config.num_experts)).abs().max() <= 1e-6
        unbiased = _dense(*route(config.routing, logits, view.top_k), config.num_experts)
        ungrouped = _dense(*route(replace(config.routing, groups=1), logits, view.top_k, selection_bias=bias),
                           config.num_experts)
        biased_differs |= not torch.equal(own != 0, unbiased != 0)
        grouped_differs |= not torch.equal(own != 0, ungrouped != 0)
    assert biased_differs  # the selection bias really chooses
    assert grouped_differs == (family == "deepseek_v3")  # and the groups, where there are several
    assert config.routing.scale == model.config.routed_scaling_factor and config.routing.renormalize


@pytest.mark.parametrize("family", FAMILIES)
def test_the_family_s_own_config_values_rebuild_its_config(family):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    config = adapter.model_config(model.config)
    dense = tuple(i for i, spec in enumerate(structure(adapter, model)) if spec.kind == "dense")
    widths = FFNWidths(expert=24, shared=24, dense_layers=dense)
    values = adapter.config_values(config, model.config.num_hidden_layers, widths, tied=False)
    rebuilt = AutoConfig.for_model(**values)
    assert adapter.model_config(rebuilt) == config
    model = AutoModelForCausalLM.from_config(rebuilt)
    assert tuple(i for i, spec in enumerate(structure(adapter, model)) if spec.kind == "dense") == dense == (0,)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("drop", [[0], [2]])
def test_block_drop_renumbers_the_dense_first_layers_and_transformers_reloads_the_model(family, drop, tmp_path):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    kinds = [spec.kind for spec in structure(adapter, model)]
    drop_blocks(adapter, model, drop)
    kept = [kind for i, kind in enumerate(kinds) if i not in drop]
    assert [spec.kind for spec in structure(adapter, model)] == kept
    reloaded = checks.reloaded(model, tmp_path / "saved")
    assert [spec.kind for spec in structure(adapter, reloaded)] == kept
    tokens = random_tokens(2, 16)
    assert torch.equal(checks.logits(model, tokens), checks.logits(reloaded, tokens))


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_drop_never_takes_a_dense_layer(family):
    model = tiny_model(family)
    step = {"layer_drop": {"n": 3, "score": "random", "allow_empty_layers": True}}
    result = compress(model, parse_recipe({"passes": [step]}), None)
    assert result.steps[0].plan.drop == [1, 2, 3]
    assert [spec.kind for spec in structure(adapter_for(model.config), model)] == ["dense"] + ["dropped"] * 3


# --- Expert Drop under expert groups ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_expert_drop_keeps_each_group_equal_and_slices_the_selection_bias(family, tmp_path):
    model = tiny_model(family)
    before = {view.index: view.selection_bias.clone() for view in _moe_views(model)}
    result = compress(model, parse_recipe({"passes": [{"expert_drop": {"keep": KEEP[family], "score": "random"}}]}),
                      None)
    plan = result.steps[0].plan
    groups = adapter_for(model.config).model_config(model.config).routing.groups
    for view in _moe_views(model):
        kept = plan.keep[view.index]
        size = len(before[view.index]) // groups
        assert [sum(e // size == g for e in kept) for g in range(groups)] == [KEEP[family] // groups] * groups
        assert torch.equal(view.selection_bias, before[view.index][kept])
        assert len(view.shared_experts) == 1  # shared experts are never taken
    reloaded = checks.reloaded(model, tmp_path / "saved")  # the router's own rule on the kept rows: transformers agrees
    tokens = random_tokens(2, 16)
    assert torch.equal(checks.logits(model, tokens), checks.logits(reloaded, tokens))


@pytest.mark.parametrize(("family", "step", "overrides", "message"), [
    ("deepseek_v3", {"keep": 4, "scope": "global", "min_keep": 2}, {},
     "scope: global drops different numbers of experts per group"),
    ("deepseek_v3", {"keep": 4, "score": "kl"}, {},
     "removes experts one at a time, which cannot keep the groups equal"),
    ("deepseek_v3", {"keep": 3}, {}, "choose keep a multiple of 2, at least 4"),
    ("deepseek_v3", {"keep": 2}, {}, "choose keep a multiple of 2, at least 4"),
    ("deepseek_v3", {"keep": 4}, {"num_experts_per_tok": 3}, "would hold fewer than its top-3: keep at least 6"),
    # one group: still scored by its best two, so no layer may keep fewer than two (nor be emptied)
    ("glm4_moe_lite", {"keep": 1}, {}, "fewer than 2 experts.*keep at least 2"),
    ("glm4_moe_lite", {"keep": 0, "allow_empty_layers": True}, {}, "fewer than 2 experts.*keep at least 2"),
    ("glm4_moe_lite", {"keep": 3, "scope": "global"}, {}, "fewer than 2 experts.*add min_keep: 2"),
])
def test_expert_drop_that_would_leave_groups_unequal_or_unusable_is_refused(family, step, overrides, message):
    model = tiny_model(family, **overrides)
    with pytest.raises(MoeExportError, match=message):
        compress(model, parse_recipe({"passes": [{"expert_drop": step | {"score": step.get("score", "random")}}]}),
                 None)


def test_a_global_expert_drop_that_keeps_two_everywhere_runs_under_one_group(tmp_path):
    model = tiny_model("glm4_moe_lite")
    recipe = {"expert_drop": {"keep": 3, "scope": "global", "min_keep": 2, "score": "routing_mass"}}
    result = compress(model, parse_recipe({"passes": [recipe]}), _provider())
    kept = [len(k) for k in result.steps[0].plan.keep.values()]
    assert min(kept) >= 2 and sum(kept) == 9
    tokens = random_tokens(2, 16)
    assert torch.equal(checks.logits(model, tokens), checks.logits(load(save(model, tmp_path / "out", {})), tokens))


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_and_refit_repair_are_refused_by_name(family):
    for layout in ("grouped", "alias"):
        recipe = parse_recipe({"passes": [{"merge": {"keep": 2, "layout": layout}}]})
        with pytest.raises(MoeExportError, match="experts cannot be merged .*e_score_correction_bias"):
            compress(tiny_model(family), recipe, _provider())
    recipe = parse_recipe({"passes": [{"expert_drop": {"keep": KEEP[family], "score": "random", "repair": "refit"}}]})
    if family == "glm4_moe_lite":  # one group: top-k over all experts, which refit reroutes exactly (fam-glm-ernie)
        compress(tiny_model(family), recipe, _provider())
        return
    with pytest.raises(MoeExportError, match="rebuild needs greedy top-k routing"):
        compress(tiny_model(family), recipe, _provider())


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_and_gptq_work_on_the_family(family):
    tokens = random_tokens(2, 16)
    for passes in ([{"prune": {"method": "wanda", "sparsity": 0.5}}],
                   [{"quantize": {"method": "gptq", "bits": 4, "group_size": 8}}]):
        model = tiny_model(family)
        reference = checks.logits(model, tokens)
        compress(model, parse_recipe({"passes": passes}), _provider())
        changed = checks.logits(model, tokens)
        assert torch.isfinite(changed).all() and not torch.equal(changed, reference), passes


def test_reap_saliency_weighs_by_the_routed_weights_after_scaling():
    """REAP is mean(routing weight x ||expert output||): the weights the family mixes with, routed_scaling_factor
    included, so doubling the factor doubles every saliency of the first MoE layer (whose input and choice of
    experts it does not change; later layers see another residual stream)."""
    saliencies = []
    for scale in (2.5, 5.0):
        model = tiny_model("deepseek_v3", routed_scaling_factor=scale)
        statistics = _provider().statistics(model, [])
        saliencies.append(np.array(statistics.layers[1].reap))
    assert saliencies[0].min() >= 0 and saliencies[0].max() > 0
    np.testing.assert_allclose(saliencies[1], 2 * saliencies[0], rtol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_streamed_build_is_the_in_memory_one(family, tmp_path):
    tiny_model(family).save_pretrained(tmp_path / "source")
    recipe = {"passes": [{"block_drop": {"n": 1, "score": "random"}},
                         {"expert_drop": {"keep": KEEP[family], "score": "reap"}}]}
    results = []
    for loader in (load, load_streamed):
        lm = loader(tmp_path / "source")
        compress(lm, parse_recipe(recipe), _provider())
        save(lm, tmp_path / loader.__name__, {})
        results.append(load(tmp_path / loader.__name__))
    tokens = random_tokens(2, 20)
    assert torch.equal(*(checks.logits(lm, tokens) for lm in results))


# --- GGUF (llama.cpp deepseek2) --------------------------------------------------------------------------------

def _demo_vocabulary(family, **overrides):
    from moeexport.checkpoint_files import DEMO_MODEL

    model = tiny_model(family, vocab_size=2048, **overrides)
    model.config.name_or_path = str(DEMO_MODEL)
    return model


def _fields(path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    return {field.name: field.contents() for field in reader.fields.values()}, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_matches_transformers_own_model_of_the_saved_compressed_checkpoint(family, tmp_path):
    model = _demo_vocabulary(family)
    compress(model, parse_recipe({"passes": [{"expert_drop": {"keep": KEEP[family], "score": "random"}}]}), None)
    artifact = gguf_backend.export(model, tmp_path / "m.gguf")
    assert artifact.architecture == "deepseek2" and artifact.representation == "uniform"
    reloaded = checks.reloaded(model, tmp_path / "saved")
    windows = random_tokens(2, 48, seed=9) * 16
    fidelity = compare(TorchRunner(reloaded), gguf_backend.Runner(artifact.path, context=48), windows)
    assert fidelity.max_abs_logit <= 1e-3 and fidelity.top1_agreement == 1.0, fidelity

    fields, tensors = _fields(artifact.path)
    routing = adapter_for(model.config).model_config(model.config).routing
    assert fields["deepseek2.expert_gating_func"] == 2  # sigmoid
    assert fields["deepseek2.expert_weights_norm"] is True
    assert fields["deepseek2.expert_weights_scale"] == pytest.approx(routing.scale)
    assert fields["deepseek2.leading_dense_block_count"] == 1
    grouped = family == "deepseek_v3"  # the tiny GLM has one group: no group keys (llama.cpp needs used < count)
    assert fields.get("deepseek2.expert_group_count") == (2 if grouped else None)
    assert fields.get("deepseek2.expert_group_used_count") == (1 if grouped else None)
    for view in _moe_views(model):
        stored = np.asarray(tensors[f"blk.{view.index}.exp_probs_b.bias"].data)
        assert np.array_equal(stored, view.selection_bias.float().numpy())


def test_gguf_layer_drop_writes_a_zero_moe_stand_in_in_deepseek2(tmp_path):
    model = _demo_vocabulary("deepseek_v3")
    full = gguf_backend.export(model, tmp_path / "full.gguf")
    dropped = copy.deepcopy(model)
    compress(dropped, parse_recipe({"passes": [{"layer_drop": {"n": 1, "score": "random"}}]}), None)
    artifact = gguf_backend.export(dropped, tmp_path / "m.gguf")
    assert artifact.architecture == "deepseek2" and "zero experts for MoE-less layers" in artifact.representation
    windows = random_tokens(2, 48, seed=9) * 16
    fidelity = compare(TorchRunner(dropped), gguf_backend.Runner(artifact.path, context=48), windows)
    assert fidelity.max_abs_logit <= 1e-3 and fidelity.top1_agreement == 1.0, fidelity
    assert artifact.path.stat().st_size < full.path.stat().st_size


def test_gguf_refuses_what_deepseek2_would_compute_otherwise(tmp_path):
    model = _demo_vocabulary("deepseek_v3")
    model.config.rope_interleave = False
    with pytest.raises(MoeExportError, match="rope_interleave: false"):
        gguf_backend.export(model, tmp_path / "a.gguf")
    grouped_v2 = _demo_vocabulary("deepseek_v2", n_routed_experts=8, topk_method="group_limited_greedy", n_group=4,
                                  topk_group=2)
    with pytest.raises(MoeExportError, match="sum of its best two experts.*by its best one"):
        gguf_backend.export(grouped_v2, tmp_path / "b.gguf")
    # YaRN: tests/test_gguf_input_families.py
    lite_shaped = _demo_vocabulary("glm4_moe_lite", num_hidden_layers=27)  # with a q LoRA, but 27 layers
    with pytest.raises(MoeExportError, match="27 layers for a 'Lite' variant without a q LoRA"):
        gguf_backend.export(lite_shaped, tmp_path / "c.gguf")


# --- ONNX ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("moe_ops", ["contrib", "plain"])
@pytest.mark.parametrize("overrides", [{}, {"norm_topk_prob": False}, {"rope_interleave": False}],
                         ids=["renormalized", "not-renormalized", "rope-half"])
def test_onnx_lowers_the_selection_bias_and_groups_within_1e_4(overrides, moe_ops, tmp_path):
    model = tiny_model("deepseek_v3", **overrides)
    compress(model, parse_recipe({"passes": [{"expert_drop": {"keep": 4, "score": "random"}}]}), None)
    artifact = onnx_backend.export(model, tmp_path / "m.onnx", moe_ops=moe_ops)
    fidelity = compare(TorchRunner(model), onnx_backend.Runner(artifact.path), random_tokens(2, 24))
    assert fidelity.max_abs_logit <= 1e-4 and fidelity.top1_agreement == 1.0, fidelity


@pytest.mark.parametrize("moe_ops", ["contrib", "plain"])
def test_onnx_lowers_groups_scored_by_their_best_expert_too(moe_ops, tmp_path):
    """DeepSeek-V2's group_limited_greedy: softmax scores, no selection bias, a group scored by its best expert."""
    model = tiny_model("deepseek_v2", n_routed_experts=8, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                       routed_scaling_factor=2.5)
    assert adapter_for(model.config).model_config(model.config).routing.group_score == "max"
    artifact = onnx_backend.export(model, tmp_path / "m.onnx", moe_ops=moe_ops)
    fidelity = compare(TorchRunner(model), onnx_backend.Runner(artifact.path), random_tokens(2, 24))
    assert fidelity.max_abs_logit <= 1e-4 and fidelity.top1_agreement == 1.0, fidelity


# --- the synthetic GLM-4.7-Flash checkpoint (tools/make_synthetic_checkpoint.py) ------------------------------

GLM_AT_TEST_WIDTHS = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                          vocab_size=2048, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32,
                          kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)


def _synthetic_tool():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "make_synthetic_checkpoint.py"
    spec = importlib.util.spec_from_file_location("make_synthetic_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_glm_4_7_flash_preset_is_the_hub_layout_and_streams_to_the_same_gguf(tmp_path):
    import json

    tool = _synthetic_tool()
    settings = [arg for key, value in GLM_AT_TEST_WIDTHS.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    assert tool.main(["glm-4.7-flash", str(tmp_path / "ckpt"), "--layers", "2", *settings]) == 0
    index = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert index["mlp_layer_types"] == ["dense", "sparse"] and index["n_routed_experts"] == 8
    names = {name for name, _ in tool.tensor_specs(tool.make_config("glm-4.7-flash", 2, GLM_AT_TEST_WIDTHS))}
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names  # per expert, as the hub stores them
    assert {"model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.0.mlp.gate_proj.weight",
            "model.layers.1.mlp.shared_experts.up_proj.weight", "model.layers.0.self_attn.q_a_proj.weight"} <= names
    recipe = parse_recipe({"passes": [{"expert_drop": {"keep": 4, "score": "random"}}]})
    files = []
    for loader in (load, load_streamed):
        lm = loader(tmp_path / "ckpt")
        compress(lm, recipe, None)
        files.append(gguf_backend.export(lm, tmp_path / f"{loader.__name__}.gguf", quant="q8_0").path.read_bytes())
    assert files[0] == files[1]
