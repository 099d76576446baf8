"""Expert Slimming: prune (Wanda, SparseGPT, magnitude; unstructured and N:M) and quantize (GPTQ, RTN)
inside the experts, the on-grid weight representation, and experts that saw no calibration tokens."""

from __future__ import annotations

from dataclasses import replace

import copy
from pathlib import Path

import pytest
import torch
import yaml

import moeexport
from moeexport.adapters import adapter_for
from moeexport.adapters.surgery import moe_block, structure
from moeexport.calibration.sources import CalibrationConfig
from moeexport.cli import main
from moeexport.compress import StatisticsProvider, compress
from moeexport.errors import MoeExportError
from moeexport.passes.quantize import GRID_ATTRIBUTE, gptq
from moeexport.passes.slimming import _reverse_in_place, inverse_hessian_factor
from moeexport.quantization import WeightGrid, dequantize, quantize_rtn, recover_grid, weight_grid
from moeexport.recipe import load_recipe, parse_recipe
from tests.conftest import CORPUS, FIXTURE, needs_shared
from moeexport.adapters.experts import expert_stacks
from tests.tiny_models import FAMILIES, random_tokens, tiny_model

ISSUE_RECIPE = """
passes:
  - prune: {method: wanda, sparsity: 0.5}  # or sparsegpt; pattern: "2:4"
  - quantize: {method: gptq, bits: 4, group_size: 128}      # or rtn; bits: 8
"""


def _provider(count: int = 6, length: int = 32) -> StatisticsProvider:
    return StatisticsProvider(None, CalibrationConfig(), "tiny", cache_dir=None, tokens=random_tokens(count, length, seed=1))


def _slim(model, step: dict, provider=None):
    result = compress(model, parse_recipe({"passes": [step]}), provider or _provider())
    return result.steps[0].plan


def _experts(model, layer: int):
    adapter = adapter_for(model.config)
    return getattr(moe_block(adapter, model, layer), adapter.experts)


def _expert_weights(model):
    """Every routed expert matrix [N, K] (outputs, inputs) of the model, whatever orientation its layout stores."""
    adapter = adapter_for(model.config)
    layout = adapter.expert_layout(model.config)
    first, down = expert_stacks(replace(layout, biases=False))  # the gated (or the one) projection and the down one
    matrices = []
    for layer in range(model.config.num_hidden_layers):
        block = moe_block(adapter, model, layer)
        if hasattr(block, adapter.router):
            experts = getattr(block, adapter.experts)
            matrices += [*getattr(experts, first).data, *getattr(experts, down).data]
    return [matrix.T for matrix in matrices] if layout.transposed else matrices


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


# --- recipes and options ----------------------------------------------------------------


def test_the_issue_recipe_parses_exactly_as_written():
    recipe = parse_recipe(yaml.safe_load(ISSUE_RECIPE))
    prune, quantize = recipe.steps
    assert (prune.name, prune.options.method, prune.options.sparsity, prune.options.pattern) == ("prune", "wanda", 0.5, None)
    assert (quantize.options.method, quantize.options.bits, quantize.options.group_size) == ("gptq", 4, 128)
    variants = parse_recipe(yaml.safe_load(
        'passes:\n  - prune: {method: sparsegpt, sparsity: 0.5, pattern: "2:4"}\n  - quantize: {method: rtn, bits: 8}\n'
    ))
    assert variants.steps[0].options.pattern == "2:4" and variants.steps[1].options.bits == 8
    assert variants.steps[1].options.group_size == 128 and not variants.steps[1].options.shared_experts
    example = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "slim.yaml")
    assert [step.name for step in example.steps] == ["prune", "quantize"]


@pytest.mark.parametrize(
    "step, message",
    [
        ({"quantize": {"method": "gptq", "bits": 3}}, "bits: Input should be 4 or 8"),
        ({"quantize": {"method": "awq", "bits": 4}}, "method: Input should be 'gptq' or 'rtn'"),
        ({"prune": {"method": "wanda", "sparsity": 1.5}}, "sparsity: Input should be less than 1"),
        ({"prune": {"method": "wanda", "sparsity": 0}}, "sparsity: Input should be greater than 0"),
        ({"prune": {"method": "wanda"}}, "give sparsity .* or pattern"),
        ({"prune": {"method": "wanda", "pattern": "4:2"}}, "pattern must be 'N:M' with 0 < N < M"),
        ({"prune": {"method": "wanda", "pattern": "2-4"}}, "pattern must be 'N:M'"),
        ({"prune": {"method": "wanda", "sparsity": 0.3, "pattern": "2:4"}}, "contradicts pattern 2:4"),
    ],
)
def test_bad_options_are_one_line_errors(step, message):
    with pytest.raises(MoeExportError, match=message) as error:
        parse_recipe({"passes": [step]})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "step, message",
    [
        ({"quantize": {"method": "rtn", "bits": 4, "group_size": 128}}, "group_size 128 does not divide the expert input \\(hidden size\\) 32"),
        ({"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}, "group_size 32 does not divide the expert intermediate size 48"),
        ({"prune": {"method": "sparsegpt", "pattern": "2:5"}}, "groups of 5 do not divide the expert input \\(hidden size\\) 32"),
    ],
)
def test_options_that_do_not_fit_the_widths_fail_before_calibration(step, message):
    model = tiny_model("mixtral")
    before = copy.deepcopy(model.state_dict())
    provider = _provider()
    with pytest.raises(MoeExportError, match=message) as error:
        compress(model, parse_recipe({"passes": [step]}), provider)
    assert "\n" not in str(error.value) and provider._tokens is not None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_quantize_refuses_bfloat16_experts():
    model = tiny_model("mixtral").to(torch.bfloat16)
    with pytest.raises(MoeExportError, match="needs float32 expert weights.*--dtype float32"):
        _slim(model, {"quantize": {"method": "rtn", "bits": 8, "group_size": 16}})


# --- pruning -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
@pytest.mark.parametrize("sparsity", [0.5, 0.25])
def test_unstructured_sparsity_is_exact(method, sparsity):
    model = tiny_model("mixtral")
    plan = _slim(model, {"prune": {"method": method, "sparsity": sparsity, "min_tokens": 1}})
    for weight in _expert_weights(model):
        rows, width = weight.shape
        zeros = (weight == 0).sum(dim=1)
        if method == "sparsegpt":  # one mask per block of 128 columns, chosen across rows
            assert int(zeros.sum()) == int(rows * width * sparsity)
        else:  # Wanda and magnitude: per output row
            assert (zeros == int(width * sparsity)).all()
    assert plan.outcome.zeros == sum(int((w == 0).sum()) for w in _expert_weights(model))
    assert plan.outcome.matrices == 2 * 4 * 4


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_two_of_four_pattern_holds_in_every_group_of_four(method, family):
    model = tiny_model(family)
    plan = _slim(model, {"prune": {"method": method, "pattern": "2:4", "shared_experts": True}})
    for weight in _expert_weights(model):
        groups = weight.reshape(weight.shape[0], -1, 4)
        assert ((groups == 0).sum(dim=-1) == 2).all()
    assert plan.settings["sparsity"] == 0.5 and abs(plan.outcome.zeros / plan.outcome.weights - 0.5) < 1e-9
    assert torch.isfinite(_logits(model, random_tokens(1, 8))).all()


def _anisotropic_tiny_mixtral():
    """Input columns of very different sizes, as in trained models: where Wanda differs from magnitude."""
    model = tiny_model("mixtral")
    generator = torch.Generator().manual_seed(5)
    for layer in model.model.layers:
        layer.post_attention_layernorm.weight.data = torch.rand(32, generator=generator) * 4 + 0.05
    return model


def test_wanda_and_sparsegpt_beat_magnitude_pruning_on_output_error():
    original = _anisotropic_tiny_mixtral()
    held_out = random_tokens(4, 32, seed=9)
    reference = _logits(original, held_out)
    error = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(original)
        _slim(model, {"prune": {"method": method, "sparsity": 0.5, "min_tokens": 1}}, _provider(16, 32))
        error[method] = (_logits(model, held_out) - reference).pow(2).mean().item()
    assert error["wanda"] < error["magnitude"] and error["sparsegpt"] < error["magnitude"], error


# --- quantization ------------------------------------------------------------------------


def _correlated_inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=generator) / width**0.5
    scales = torch.rand(width, generator=generator) * 3 + 0.1
    return (torch.randn(tokens, width, generator=generator) @ mixing) * scales


@pytest.mark.parametrize("count", [1, 10, 11, 12])
def test_reversing_in_place_a_chunk_at_a_time(count):
    values = torch.arange(count, dtype=torch.float32)
    _reverse_in_place(values, chunk=3)
    assert torch.equal(values, torch.arange(count, dtype=torch.float32).flip(0))


@pytest.mark.parametrize("ordered", [False, True])
def test_inverse_hessian_factor_is_the_upper_cholesky_factor_of_the_damped_inverse(ordered):
    inputs = _correlated_inputs(256, 67, seed=2)  # odd width: the in-place reversal has a middle element
    inputs[:, 5] = 0  # an input never seen
    gram = (inputs.T @ inputs)[None].repeat(2, 1, 1)
    order = torch.stack([torch.randperm(67, generator=torch.Generator().manual_seed(seed)) for seed in (3, 4)])
    damped = gram.double()[torch.arange(2)[:, None, None], order[:, :, None], order[:, None, :]] if ordered else gram.double()
    diagonal = damped.diagonal(dim1=-2, dim2=-1)
    diagonal[diagonal == 0] = 1.0
    diagonal += 0.01 * diagonal.mean(dim=-1, keepdim=True)
    factor = inverse_hessian_factor(gram, 0.01, order if ordered else None)
    assert torch.equal(factor, factor.triu())
    assert torch.allclose(factor.double().transpose(1, 2) @ factor.double(), torch.linalg.inv(damped), rtol=1e-4, atol=1e-7)
    # without an order no second Gram-sized buffer: the factor is where the Gram matrices were
    assert (factor.data_ptr() == gram.data_ptr()) == (not ordered)


@pytest.mark.parametrize("method", [{"method": "gptq", "bits": 4, "group_size": 16},
                                    {"method": "gptq", "bits": 4, "group_size": 16, "act_order": True},
                                    {"method": "sparsegpt", "sparsity": 0.5}])
def test_a_solvers_output_error_from_its_loss_is_the_one_its_gram_matrix_gives(method):
    from calibration.expert_inputs import output_error
    from moeexport.passes import PASSES
    from moeexport.passes.slimming import SlimmingPlan

    step = PASSES["quantize" if method["method"] == "gptq" else "prune"]
    options = step.Options(**method)
    plan = SlimmingPlan(method["method"], step.settings(options), {0: 2}, False, 1, step.fallback)
    inputs = _correlated_inputs(512, 64, seed=5)
    inputs[:, 7] = 0  # an input never seen: the damping adds 1 there
    weight = torch.randn(2, 48, 64, generator=torch.Generator().manual_seed(6)) * 0.05
    gram = inputs.T @ inputs
    new, errors = step._solve_measured(weight, gram[None].repeat(2, 1, 1), plan)
    expected = [output_error(new[i] - weight[i], weight[i], gram) for i in range(2)]
    assert all(0 < error for error in expected)
    assert errors == pytest.approx(expected, rel=1e-3)




@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_layer_error_is_at_most_round_to_nearest(bits, act_order):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=generator) * 0.05
    inputs = _correlated_inputs(512, 64, seed=1)
    gram = inputs.T @ inputs

    def layer_error(quantized):
        return ((weight - quantized) @ inputs.T).pow(2).sum().item()

    codes, scales, _ = gptq(weight[None], gram[None], bits, 16, damp=0.01, act_order=act_order)
    codes, scales = codes[0], scales[0]
    rtn_codes, rtn_scales = quantize_rtn(weight, bits, 16)
    gptq_weight = dequantize(codes, scales, 16)
    assert layer_error(gptq_weight) < 0.8 * layer_error(dequantize(rtn_codes, rtn_scales, 16))
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and low <= int(codes.min()) and int(codes.max()) <= high
    recovered_codes, recovered_scales = recover_grid(gptq_weight, bits, 16)
    assert torch.equal(dequantize(recovered_codes, recovered_scales, 16), gptq_weight)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [8, 32])
def test_recover_grid_gives_back_round_to_nearest_codes_and_scales_exactly(bits, group_size):
    weight = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(2)) * 0.1
    weight[0, 0, :group_size] = 0.0  # an all-zero group
    codes, scales = quantize_rtn(weight, bits, group_size)
    on_grid = dequantize(codes, scales, group_size)
    recovered_codes, recovered_scales = recover_grid(on_grid, bits, group_size)
    assert torch.equal(recovered_codes, codes) and torch.equal(recovered_scales, scales)
    assert recovered_scales[0, 0, 0] == 1.0 and torch.isfinite(scales).all() and (scales > 0).all()
    assert recovered_codes.shape == weight.shape and recovered_scales.shape == (3, 16, 64 // group_size)


def test_recover_grid_refuses_weights_off_the_grid():
    codes, scales = quantize_rtn(torch.randn(8, 32), 4, 16)
    on_grid = dequantize(codes, scales, 16)
    off_grid = on_grid.clone()
    off_grid[3, 20] += scales[3, 1] * 0.3
    with pytest.raises(MoeExportError, match="not on a symmetric int4 grid with group_size 16 .*row 3, group 1"):
        recover_grid(off_grid, 4, 16)
    with pytest.raises(MoeExportError, match="not on a symmetric int4 grid"):
        recover_grid(on_grid.to(torch.bfloat16), 4, 16)
    with pytest.raises(MoeExportError, match="group_size 12 does not divide the input width 32"):
        recover_grid(on_grid, 4, 12)


@pytest.mark.parametrize("method", ["gptq", "rtn"])
@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_leaves_every_target_on_the_grid_and_records_it(method, family):
    model = tiny_model(family)
    original = copy.deepcopy(model)
    plan = _slim(model, {"quantize": {"method": method, "bits": 4, "group_size": 8, "shared_experts": True}})
    grid = getattr(model.config, GRID_ATTRIBUTE)
    has_shared = any(spec.shared_experts for spec in structure(adapter_for(model.config), model))
    targets = "experts+shared_experts" if has_shared else "experts"
    assert grid == {"bits": 4, "group_size": 8, "method": method, "targets": targets}
    assert weight_grid(model) == WeightGrid(bits=4, group_size=8, method=method, targets=targets)
    assert WeightGrid.from_dict(weight_grid(model).to_dict()) == weight_grid(model)
    for weight in _expert_weights(model):
        codes, scales = recover_grid(weight, 4, 8)
        assert torch.isfinite(scales).all() and (scales > 0).all()
    adapter = adapter_for(model.config)
    for layer in range(model.config.num_hidden_layers):
        if hasattr(moe_block(adapter, model, layer), adapter.router):  # the router stays exactly as it was
            assert torch.equal(adapter.layer_view(model, layer).router_weight,
                               adapter.layer_view(original, layer).router_weight)
    assert torch.equal(model.get_input_embeddings().weight, original.get_input_embeddings().weight)
    assert (plan.outcome.tokens_seen != {}) == (method == "gptq")


def test_gptq_beats_round_to_nearest_on_the_tiny_model_output():
    original = _anisotropic_tiny_mixtral()
    held_out = random_tokens(4, 32, seed=9)
    reference = _logits(original, held_out)
    error, reported = {}, {}
    for method in ("rtn", "gptq"):
        model = copy.deepcopy(original)
        plan = _slim(model, {"quantize": {"method": method, "bits": 4, "group_size": 16, "min_tokens": 1}}, _provider(16, 32))
        error[method] = (_logits(model, held_out) - reference).pow(2).mean().item()
        reported[method] = plan.outcome.output_error
    assert error["gptq"] < error["rtn"], error
    assert reported["rtn"] is None and 0 < reported["gptq"] < 0.05


# --- an expert that never sees a calibration token --------------------------------------


def _model_with_an_unrouted_expert():
    """Layer 1 of a 5-expert top-2 model: experts 0/1 and 2/3 have opposite router rows, so exactly
    two logits are positive for every token, and expert 4 (router row zero, logit 0) is never chosen."""
    model = tiny_model("mixtral", num_local_experts=5)
    router = model.model.layers[1].mlp.gate
    generator = torch.Generator().manual_seed(3)
    first, second = torch.randn(2, 32, generator=generator)
    router.weight.data = torch.stack([first, -first, second, -second, torch.zeros(32)])
    return model


@pytest.mark.parametrize("step", [
    {"quantize": {"method": "gptq", "bits": 4, "group_size": 16, "min_tokens": 1}},
    {"quantize": {"method": "gptq", "bits": 8, "group_size": 8}},
    {"prune": {"method": "sparsegpt", "sparsity": 0.5, "min_tokens": 1}},
    {"prune": {"method": "wanda", "pattern": "2:4", "min_tokens": 1}},
])
def test_an_expert_without_calibration_tokens_gets_the_fallback_and_is_reported(step):
    model = _model_with_an_unrouted_expert()
    plan = _slim(model, step)
    assert plan.outcome.tokens_seen[1][4] == 0 and all(count > 0 for count in plan.outcome.tokens_seen[1][:4])
    assert {"layer": 1, "expert": 4, "tokens": 0} in plan.outcome.fallbacks
    assert any("layer 1 expert 4 (0 tokens)" in line for line in plan.describe())
    experts = _experts(model, 1)
    for weight in (experts.gate_up_proj.data[4], experts.down_proj.data[4]):
        assert torch.isfinite(weight).all() and weight.abs().sum() > 0
        if "quantize" in step:
            bits, group_size = step["quantize"]["bits"], step["quantize"]["group_size"]
            codes, scales = recover_grid(weight, bits, group_size)
            assert torch.isfinite(scales).all() and (scales > 0).all()
            assert torch.equal(dequantize(*quantize_rtn(weight, bits, group_size), group_size), weight)  # it is RTN
    assert torch.isfinite(_logits(model, random_tokens(2, 16))).all()


# --- persistence and the command line ---------------------------------------------------


def test_a_quantized_checkpoint_keeps_its_grid_through_save_and_load(tmp_path):
    model = tiny_model("mixtral")
    _slim(model, {"quantize": {"method": "gptq", "bits": 4, "group_size": 16, "min_tokens": 1}})
    out = moeexport.modelio.save(model, tmp_path / "quantized", manifest={})
    reloaded = moeexport.modelio.load(out)
    assert getattr(reloaded.config, GRID_ATTRIBUTE) == {"bits": 4, "group_size": 16, "method": "gptq", "targets": "experts"}
    assert weight_grid(reloaded) == weight_grid(model) == WeightGrid(4, 16, "gptq", "experts")
    for before, after in zip(_expert_weights(model), _expert_weights(reloaded)):
        codes, scales = recover_grid(after, 4, 16)
        assert torch.equal(dequantize(codes, scales, 16), before)
    tokens = random_tokens(2, 16)
    assert torch.equal(_logits(reloaded, tokens), _logits(model, tokens))


def test_dry_run_prints_targets_tokens_and_fallbacks(tmp_path, capsys):
    recipe = tmp_path / "slim.yaml"
    recipe.write_text("passes:\n  - prune: {method: wanda, sparsity: 0.5}\n  - quantize: {method: gptq, bits: 4, group_size: 64}\n")
    out = tmp_path / "never"
    arguments = ["compress", "demo", "--recipe", str(recipe), "--out", str(out), "--dry-run", "--calib-samples", "4", "--calib-length", "64"]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "targeted 32 routed experts in 4 MoE layers: wanda" in printed and "gptq bits=4 group_size=64" in printed
    assert "calibration tokens per expert" in printed and "fallback round-to-nearest for" in printed
    assert "nothing written" in printed and not out.exists()


# --- the fixture -----------------------------------------------------------------------


@needs_shared
def test_gptq_int4_beats_round_to_nearest_on_the_fixture():
    from moeexport.evaluate import eval_windows, evaluate
    from moeexport.modelio import load, load_tokenizer

    original, tokenizer = load(FIXTURE), load_tokenizer(FIXTURE)
    calibration = CalibrationConfig(str(CORPUS / "calib.txt"), num_sequences=8, sequence_length=128)
    windows = eval_windows(tokenizer, str(CORPUS / "dev.txt"), 128, 4)
    kl = {}
    for method in ("rtn", "gptq"):
        model = copy.deepcopy(original)
        provider = StatisticsProvider(tokenizer, calibration, "fixture", cache_dir=None)
        _slim(model, {"quantize": {"method": method, "bits": 4, "group_size": 128}}, provider)
        kl[method] = evaluate(model, windows, reference=original).kl
    assert kl["gptq"] < kl["rtn"], kl
