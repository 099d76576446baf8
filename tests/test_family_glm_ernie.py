"""GLM-4.5 / 4.6 (glm4_moe) and ERNIE-4.5-MoE (ernie4_5_moe): routing with a selection bias, dense layers after
Block Drop, GGUF in their own llama.cpp architectures (against transformers' own model of the saved checkpoint),
padding and refusals, streamed builds."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

import moeexport
from moeexport.adapters import adapter_for
from moeexport.adapters.families import _renumber_ernie_moe_layers
from moeexport.adapters.routing import route
from moeexport.adapters.surgery import keep_experts, structure
from moeexport.backends import gguf as gguf_backend
from moeexport.calibration.sources import CalibrationConfig
from moeexport.checkpoint_files import DEMO_MODEL
from moeexport.compress import StatisticsProvider, compress
from moeexport.errors import MoeExportError
from moeexport.modelio import load, load_streamed
from moeexport.recipe import parse_recipe
from moeexport.validate import TorchRunner, compare
from tests.test_gguf import _tiny_with_demo_vocabulary
from tests import family_checks as checks
from tests.tiny_models import random_tokens, tiny_model

FAMILIES = ["glm4_moe", "ernie4_5_moe"]
UNIFORM_TRIM = [{"block_drop": {"n": 1, "score": "random"}}, {"expert_drop": {"keep": 3, "score": "random"}}]


def _compress(model, passes, seed=1):
    provider = StatisticsProvider(None, CalibrationConfig(), "tiny", cache_dir=None, tokens=random_tokens(4, 32, seed=seed))
    compress(model, parse_recipe({"passes": passes}), provider)
    return model


def _router_inputs(model, layer: int) -> torch.Tensor:
    return torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(layer))


@pytest.mark.parametrize("family", FAMILIES)
def test_route_with_the_views_selection_bias_is_the_routers_own_choice_and_the_bias_matters(family):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    rule = adapter.model_config(model.config).routing
    changed = 0
    for drop in (False, True):
        if drop:  # Expert Drop slices the selection bias with the router rows
            for view in adapter.layer_views(model):
                if view.kind == "moe":
                    keep_experts(adapter, model, view.index, [3, 0, 2])
        for view in (v for v in adapter.layer_views(model) if v.kind == "moe"):
            x = _router_inputs(model, view.index)
            logits, weights, index = view.router(x)
            assert view.selection_bias.shape == (view.num_experts,)
            own_weights, own_index = route(rule, logits, view.top_k, selection_bias=view.selection_bias)
            # routers return their k unsorted: compare each token's (expert, weight) pairs
            order, own_order = index.argsort(dim=-1), own_index.argsort(dim=-1)
            assert torch.equal(index.gather(-1, order), own_index.gather(-1, own_order))
            torch.testing.assert_close(weights.gather(-1, order), own_weights.gather(-1, own_order))
            _, unbiased = route(rule, logits, view.top_k)
            changed += int((unbiased.sort(-1).values != own_index.sort(-1).values).any(-1).sum())
    assert changed > 0  # the tiny models' random selection bias changes some tokens' experts


def _ernie_config(start, end, interval, layers):
    return SimpleNamespace(moe_layer_start_index=start, moe_layer_end_index=end, moe_layer_interval=interval,
                           num_hidden_layers=layers)


@pytest.mark.parametrize("kept, expected", [
    ([1, 2, 3, 4, 5], (0, 2, 1)),  # the leading dense layer gone: MoE from the start
    ([0, 1, 2, 3], (1, 3, 1)),  # the trailing dense layers gone
    ([0, 2, 4, 5], (1, 1, 1)),  # a dense layer before, and two after, the one MoE layer left
])
def test_ernie_block_drop_rewrites_its_moe_layer_rule_for_the_survivors(kept, expected):
    config = _ernie_config(1, 3, 1, 6)  # dense 0, MoE 1-3, dense 4-5
    _renumber_ernie_moe_layers(config, kept)
    assert (config.moe_layer_start_index, config.moe_layer_end_index, config.moe_layer_interval) == expected


def test_ernie_block_drop_keeps_an_interval_pattern_or_refuses_one_no_rule_states():
    config = _ernie_config(0, 7, 2, 8)  # MoE in layers 1, 3, 5, 7
    _renumber_ernie_moe_layers(config, [0, 1, 4, 5, 6, 7])  # kinds d m d m d m: interval 2 again
    assert (config.moe_layer_start_index, config.moe_layer_end_index, config.moe_layer_interval) == (0, 5, 2)
    with pytest.raises(MoeExportError, match="no start/end/interval rule"):
        _renumber_ernie_moe_layers(_ernie_config(0, 5, 2, 6), [0, 2, 3, 4, 5])  # kinds d d m d m


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("passes", [[], UNIFORM_TRIM], ids=["full", "block_and_expert_drop"])
def test_gguf_matches_transformers_own_model_of_the_saved_checkpoint(family, passes, tmp_path):
    model = _compress(_tiny_with_demo_vocabulary(family), passes)
    saved = moeexport.save(model, tmp_path / "ckpt", {})
    stock = AutoModelForCausalLM.from_pretrained(saved).eval()  # transformers' own model of what was saved
    artifact = gguf_backend.export(load(saved), tmp_path / "m.gguf")
    assert artifact.architecture == {"glm4_moe": "glm4moe", "ernie4_5_moe": "ernie4_5-moe"}[family]
    assert artifact.representation == "uniform"
    windows = random_tokens(2, 48, seed=9) * 16
    fidelity = compare(TorchRunner(stock), gguf_backend.Runner(artifact.path, context=48), windows)
    assert fidelity.max_abs_logit <= 1e-3 and fidelity.top1_agreement == 1.0, fidelity


def test_glm_group_limited_routing_survives_an_equal_per_group_expert_drop_in_glm4moe(tmp_path):
    """With n_group 2, Expert Drop keeps the same number in each group (or refuses), and glm4moe's file routes
    within the best group as transformers does, before and after."""
    model = _tiny_with_demo_vocabulary("glm4_moe", n_routed_experts=8, n_group=2, topk_group=1)
    windows = random_tokens(2, 48, seed=9) * 16
    for passes in ([], [{"expert_drop": {"keep": 4, "scope": "layer", "score": "reap"}}]):
        model = _compress(model, passes)
        artifact = gguf_backend.export(model, tmp_path / "m.gguf", overwrite=True)
        fidelity = compare(TorchRunner(model), gguf_backend.Runner(artifact.path, context=48), windows)
        assert fidelity.max_abs_logit <= 1e-3 and fidelity.top1_agreement == 1.0, fidelity
    assert {spec.num_experts for spec in structure(adapter_for(model.config), model) if spec.kind == "moe"} == {4}
    with pytest.raises(MoeExportError, match="keep=3 cannot keep the same number"):
        _compress(model, [{"expert_drop": {"keep": 3, "scope": "layer", "score": "reap"}}])


def _non_uniform(model):
    """The model with 3, 2 and 4 experts left in its MoE layers."""
    adapter = adapter_for(model.config)
    moe = [view.index for view in adapter.layer_views(model) if view.kind == "moe"]
    keep_experts(adapter, model, moe[0], [2, 0, 3])
    keep_experts(adapter, model, moe[1], [1, 3])
    assert [spec.num_experts for spec in structure(adapter, model) if spec.kind == "moe"] == [3, 2, 4]
    return model


def test_glm_non_uniform_expert_counts_are_padded_exactly_in_glm4moe(tmp_path):
    model = _non_uniform(_tiny_with_demo_vocabulary("glm4_moe"))
    artifact = gguf_backend.export(model, tmp_path / "m.gguf")
    assert artifact.architecture == "glm4moe" and "never-selected pads" in artifact.representation
    fidelity = compare(TorchRunner(model), gguf_backend.Runner(artifact.path, context=48), random_tokens(2, 48, seed=9) * 16)
    assert fidelity.max_abs_logit <= 1e-3 and fidelity.top1_agreement == 1.0, fidelity


def test_ernie_non_uniform_expert_counts_are_refused(tmp_path):
    model = _non_uniform(_tiny_with_demo_vocabulary("ernie4_5_moe"))
    with pytest.raises(MoeExportError, match="per-layer expert counts .* differ"):
        gguf_backend.export(model, tmp_path / "m.gguf")


def test_glm_without_shared_experts_is_refused_by_glm4moe_which_always_runs_them(tmp_path):
    with pytest.raises(MoeExportError, match="runs shared experts in every MoE layer"):
        gguf_backend.export(_tiny_with_demo_vocabulary("glm4_moe", n_shared_experts=0), tmp_path / "m.gguf")


def test_ernie_biases_the_lowerings_drop_are_refused(tmp_path):
    from moeexport.backends import onnx as onnx_backend

    biased = _tiny_with_demo_vocabulary("ernie4_5_moe", use_bias=True)
    with pytest.raises(MoeExportError, match="biases on its attention output or MLP projections"):
        gguf_backend.export(biased, tmp_path / "m.gguf")
    with pytest.raises(MoeExportError, match=r"layers \[0, 1, 2, 3\] have biases on their dense or shared MLP"):
        onnx_backend.export(biased, tmp_path / "m.onnx")


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_drop_is_a_silent_moe_layer_whose_zero_experts_cost_few_bytes(family, tmp_path):
    base = _tiny_with_demo_vocabulary(family)
    full = gguf_backend.export(base, tmp_path / "full.gguf")
    dropped = _compress(_tiny_with_demo_vocabulary(family), [{"layer_drop": {"n": 1, "score": "random"}}])
    artifact = gguf_backend.export(dropped, tmp_path / "dropped.gguf")
    assert artifact.representation.startswith("zero experts for MoE-less layers")
    fidelity = compare(TorchRunner(dropped), gguf_backend.Runner(artifact.path, context=48), random_tokens(2, 48, seed=9) * 16)
    assert fidelity.max_abs_logit <= 1e-3 and fidelity.top1_agreement == 1.0, fidelity
    # the dropped layer's f32 experts, router and shared experts become Q1_0/Q4_0 zeros: most bytes are gone
    view = next(v for v in adapter_for(base.config).layer_views(base) if v.kind == "moe")
    layer_bytes = 4 * sum(t.numel() for t in (view.experts.gate_up_proj, view.experts.down_proj, *(
        p for m in view.shared_experts for p in m.parameters())))
    assert full.path.stat().st_size - artifact.path.stat().st_size >= 0.7 * layer_bytes


@pytest.mark.parametrize("family", FAMILIES)
def test_a_streamed_build_writes_the_in_memory_builds_gguf(family, tmp_path):
    source = tmp_path / "source"
    _tiny_with_demo_vocabulary(family).save_pretrained(source)
    for name in ("tokenizer.model", "tokenizer_config.json"):  # the vocabulary the GGUF takes
        shutil.copyfile(DEMO_MODEL / name, source / name)
    trim = [{"block_drop": {"n": 1}}, {"layer_drop": {"n": 1}},
            {"expert_drop": {"keep": 3, "scope": "global", "score": "reap", "min_keep": 2}}]
    files = []
    for loader in (load, load_streamed):
        lm = _compress(loader(source), trim)
        files.append(gguf_backend.export(lm, tmp_path / f"{loader.__name__}.gguf").path.read_bytes())
    assert files[0] == files[1]


# what ours writes that the converter leaves to llama.cpp's defaults (same values), and moeexport's own records
OUR_EXTRA_KEYS = {"attention.key_length", "attention.value_length", "rope.dimension_count", "vocab_size",
                  "expert_shared_feed_forward_length"}


@pytest.fixture(scope="module")
def convert(tmp_path_factory):
    """(checkpoint, outtype, extra arguments, out) -> llama.cpp's converter's file (tools/compare_with_converter.py's
    download), reading the checkpoint's SentencePiece vocabulary: the tiny models borrow the demo model's, which
    GLM's BPE reader does not know, and the vocabulary is not what these tests compare."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    tool_path = Path(__file__).resolve().parents[1] / "tools" / "compare_with_converter.py"
    spec = importlib.util.spec_from_file_location("compare_with_converter", tool_path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tree = tool.fetch_converter(tmp_path_factory.mktemp("converter"))

    def run(checkpoint, outtype, extra, out):
        subprocess.run([sys.executable, "-c", tool.SENTENCEPIECE_CONVERTER, str(checkpoint), "--outtype", outtype,
                        *extra, "--outfile", str(out)], check=True, capture_output=True,
                       env=os.environ | {"PYTHONPATH": os.pathsep.join([str(tree), str(tree / "gguf-py")])})
        return out
    return run


@pytest.mark.parametrize("family", FAMILIES)
def test_the_uncompressed_f16_gguf_is_the_converters_tensor_for_tensor_and_key_for_key(family, convert, tmp_path):
    from gguf import GGUFReader

    checkpoint = tmp_path / "ckpt"
    tiny_model(family, vocab_size=2048).save_pretrained(checkpoint)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(DEMO_MODEL / name, checkpoint / name)
    no_mtp = ["--no-mtp"] if family == "glm4_moe" else []  # moeexport writes no next-token-prediction layers
    theirs = convert(checkpoint, "f16", no_mtp, tmp_path / "theirs.gguf")
    ours = gguf_backend.export(load(checkpoint), tmp_path / "ours.gguf", quant="f16").path
    their_file, our_file = GGUFReader(theirs), GGUFReader(ours)
    their_tensors = {t.name: t for t in their_file.tensors}
    our_tensors = {t.name: t for t in our_file.tensors}
    tied = bool(load(checkpoint).config.tie_word_embeddings)
    assert set(our_tensors) - set(their_tensors) == ({"output.weight"} if tied else set())  # ours writes the tied head
    assert set(their_tensors) <= set(our_tensors)
    # (the converter keeps ERNIE's selection bias [1, E] as HF stores it, ours is llama.cpp's [E]: equal up to unit dims)
    checks.assert_tensors_as_the_converters(our_tensors, their_tensors)
    their_keys, our_keys = checks.architecture_keys(their_file), checks.architecture_keys(our_file)
    if their_keys.get("expert_group_count") == 1:  # one group is no grouping: ours leaves both keys out
        assert "expert_group_count" not in our_keys and their_keys.pop("expert_group_used_count") == 1
        their_keys.pop("expert_group_count")
    assert set(our_keys) - set(their_keys) <= OUR_EXTRA_KEYS
    assert {key: our_keys.get(key) for key in their_keys} == their_keys


@pytest.mark.parametrize("family", FAMILIES)
def test_moeexport_reads_the_converters_f32_gguf_back_as_the_model_it_came_from(family, convert, tmp_path):
    """GGUF input: the converter's file (GLM's with its next-token-prediction block count, which the reader leaves
    out) loads as the source model, selection bias, shared experts and dense layers included."""
    checkpoint = tmp_path / "ckpt"
    source = tiny_model(family, vocab_size=2048)
    source.save_pretrained(checkpoint)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(DEMO_MODEL / name, checkpoint / name)
    read = load(convert(checkpoint, "f32", [], tmp_path / "theirs.gguf"))
    assert structure(adapter_for(read.config), read) == structure(adapter_for(source.config), source)
    tokens = random_tokens(2, 24, seed=4) * 16
    with torch.no_grad():
        difference = (read(input_ids=tokens).logits - source(input_ids=tokens).logits).abs().max().item()
    assert difference <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_measured_expert_drop_and_refit_route_with_the_selection_bias(family):
    measured = _compress(tiny_model(family), [{"expert_drop": {"keep": 3, "scope": "layer", "score": "kl"}}])
    assert {spec.num_experts for spec in structure(adapter_for(measured.config), measured) if spec.kind == "moe"} == {3}
    model = tiny_model(family)
    provider = StatisticsProvider(None, CalibrationConfig(), "tiny", cache_dir=None, tokens=random_tokens(6, 32, seed=1))
    result = compress(model, parse_recipe({"passes": [{"expert_drop": {"keep": 3, "scope": "layer",
                                                                        "score": "frequency", "repair": "refit"}}]}),
                      provider)
    errors = result.steps[0].plan.repair_error
    assert errors and all(rebuilt <= dropped for dropped, rebuilt in errors.values())


def test_reap_saliency_weighs_experts_by_the_routed_weights_glm_mixes_with():
    """GLM-4.5 multiplies its routed weights by routed_scaling_factor; REAP's saliency sees them so."""
    reap = []
    for scale in (1.0, 2.5):
        model = tiny_model("glm4_moe", routed_scaling_factor=scale)
        provider = StatisticsProvider(None, CalibrationConfig(), "tiny", cache_dir=None, tokens=random_tokens(6, 32, seed=1))
        statistics = provider.statistics(model, [])
        reap.append(torch.tensor([layer.reap for layer in statistics.layers if layer.kind == "moe"]))
    assert reap[0].gt(0).all()
    # the first MoE layer sees the same inputs either way (later ones see the scaled model's outputs)
    torch.testing.assert_close(reap[1][0], 2.5 * reap[0][0], rtol=1e-5, atol=0)


@pytest.mark.parametrize("moe_ops", ["contrib", "plain", "plain-routed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_of_the_trimmed_model_matches_torch_in_fp32(family, moe_ops, tmp_path):
    """Partial rotary, q/k/v biases and q/k norms (GLM), interleaved RoPE pairs (ERNIE), the selection bias and
    sigmoid scores, after Block Drop, Layer Drop and an Expert Drop that leaves the layers' counts different."""
    from tests.test_onnx import _assert_matches, _exercised

    from moeexport.backends import onnx as onnx_backend

    model = _compress(_exercised(family), [{"block_drop": {"n": 1, "score": "random"}},
                                           {"layer_drop": {"n": 1, "score": "random"}}])
    adapter = adapter_for(model.config)
    moe = [view.index for view in adapter.layer_views(model) if view.kind == "moe"]
    keep_experts(adapter, model, moe[0], [3, 1])  # 2 left here, 4 in the other MoE layer
    assert [spec.num_experts for spec in structure(adapter, model) if spec.kind != "dense"] == [0, 2, 4]
    artifact = onnx_backend.export(model, tmp_path / "m.onnx", moe_ops=moe_ops)
    _assert_matches(model, artifact.path, random_tokens(2, 24))


def test_glm_hub_checkpoints_next_token_prediction_layer_is_skipped_as_transformers_skips_it(tmp_path):
    """GLM-4.5-Air's hub checkpoint stores a next-token-prediction layer after its 46 decoder layers
    (model.layers.46.*); transformers leaves it out of the model, and so do moeexport's load and streamed load."""
    from safetensors.torch import load_file, save_file

    from moeexport.streaming import logits

    model = tiny_model("glm4_moe", num_hidden_layers=46)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights |= {"model.layers.46.eh_proj.weight": torch.randn(32, 64), "model.layers.46.enorm.weight": torch.ones(32),
                "model.layers.46.mlp.experts.0.down_proj.weight": torch.randn(32, 24)}
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    tokens = random_tokens(2, 12)
    expected = model(input_ids=tokens).logits
    assert torch.equal(load(tmp_path)(input_ids=tokens).logits, expected)
    assert torch.equal(torch.from_numpy(logits(load_streamed(tmp_path), tokens)), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_to_gguf_carries_the_q8_0_tensors_and_rewrites_the_sliced_selection_bias(family, tmp_path):
    model = _tiny_with_demo_vocabulary(family)
    source = gguf_backend.export(model, tmp_path / "source.gguf", quant="q8_0").path
    unrepaired = [{"block_drop": {"n": 1, "score": "random", "repair": "none"}},  # a refit is rewritten, not carried
                  {"expert_drop": {"keep": 3, "score": "random", "repair": "none"}}]
    trimmed = _compress(load_streamed(source), unrepaired)
    artifact = gguf_backend.export(trimmed, tmp_path / "keep.gguf", quant="keep")
    assert "carried byte for byte" in artifact.representation
    # the bias is F32 and sliced to the kept experts (never carried: a pad's would have to be -1e9, not zeros)
    assert artifact.fallbacks and all("exp_probs_b" in line for line in artifact.fallbacks)
    fidelity = compare(TorchRunner(trimmed), gguf_backend.Runner(artifact.path, context=48),
                       random_tokens(2, 48, seed=9) * 16)
    assert fidelity.failures(gguf_backend.TOLERANCES["q8_0"]) == []
