"""`repair: refit`: Expert Drop rebuilds the kept experts from their own and the dropped experts' neurons, fit to
the original model's output after each layer; Block and Layer Drop refit the attention output projection that
absorbs what they removed."""

from __future__ import annotations

import copy
import os
import json

import pytest
import torch

from moeexport import CalibrationOptions
from moeexport.adapters import adapter_for
from moeexport.checkpoint_files import DEMO_MODEL
from moeexport.calibration.sources import CalibrationConfig
from moeexport.compress import StatisticsProvider, compress
from moeexport.passes import repair
from moeexport.passes.trim import BlockDrop, BlockDropPlan
from moeexport.pipeline import CompressOptions, memory_plan
from moeexport.recipe import parse_recipe
from tests.conftest import CORPUS, FIXTURE, needs_shared
from tests.family_checks import HELD_OUT
from tests.test_selection import _kl
from tests.test_streamed_moments import _same_artifact
from tests.tiny_models import random_tokens, tiny_model

DROP = {"keep": 2, "score": "random", "seed": 4}


def _dropped(model, tokens, step="expert_drop", **options):
    """The drop as `options` say; without `repair`, the plain drop (repair: none) the refits are measured against."""
    provider = StatisticsProvider(None, CalibrationConfig(), "tiny", cache_dir=None, tokens=tokens)
    model = copy.deepcopy(model)
    defaults = {**(DROP if step == "expert_drop" else {}), "repair": "none"}
    plan = compress(model, parse_recipe({"passes": [{step: {**defaults, **options}}]}), provider).steps[0].plan
    return model, plan


def _per_expert_only(monkeypatch) -> None:
    """Every layer's joint rebuild system made too large: each is rebuilt one kept expert at a time."""
    monkeypatch.setattr(repair, "MAX_GRAM_BYTES", 1000)


@pytest.mark.parametrize("joint", [True, False], ids=["joint", "per-expert"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_refit_brings_the_dropped_model_closer_to_the_original(family, joint, monkeypatch):
    if not joint:
        _per_expert_only(monkeypatch)
    model = tiny_model(family)
    tokens = random_tokens(8, 32, seed=3)
    dropped, plain = _dropped(model, tokens)
    refit, plan = _dropped(model, tokens, repair="refit", ridge=1e-3)
    assert plan.keep == plain.keep and plain.repair_error == {}
    assert set(plan.repair_error) == set(plan.keep)
    assert plan.rebuilt_per_expert == ([] if joint else sorted(plan.keep))
    assert all(after < before for before, after in plan.repair_error.values())
    assert "refit" in " ".join(plan.describe())
    assert _kl(model, refit, tokens) < 0.8 * _kl(model, dropped, tokens)  # on the tokens it was fit to


def test_the_per_expert_rebuilds_block_descent_reaches_its_one_block_solution(monkeypatch):
    _per_expert_only(monkeypatch)
    model, tokens = tiny_model("mixtral"), random_tokens(8, 32, seed=3)
    whole, _ = _dropped(model, tokens, repair="refit", ridge=1e-3)
    monkeypatch.setattr(repair._PerExpertRebuild, "BLOCK", 8)  # the tiny experts' 32 neurons in 4 blocks
    monkeypatch.setattr(repair._PerExpertRebuild, "SWEEPS", 200)
    blocked, _ = _dropped(model, tokens, repair="refit", ridge=1e-3)
    for name, weight in whole.named_parameters():
        assert torch.allclose(weight, blocked.get_parameter(name), rtol=1e-3, atol=1e-4), name


def _neurons(model, layer: int) -> list[list[torch.Tensor]]:
    """Per expert of a MoE layer, each ffn neuron's gate, up and down rows as one vector."""
    view = adapter_for(model.config).layer_view(model, layer)
    gate_up, down = view.experts.gate_up_proj, view.experts.down_proj
    ffn = down.shape[-1]
    return [[torch.cat([gate_up[e, i], gate_up[e, ffn + i], down[e, :, i]]) for i in range(ffn)]
            for e in range(len(down))]


@pytest.mark.parametrize("joint", [True, False], ids=["joint", "per-expert"])
def test_a_large_ridge_rebuilds_the_kept_experts_from_unchanged_original_neurons(joint, monkeypatch):
    """The ridge pulls every chosen neuron's down row to its own: each rebuilt expert is then ffn of the layer's
    original neurons, its own or a dropped expert's (as many as the plan says it borrowed), whole."""
    if not joint:
        _per_expert_only(monkeypatch)
    model = tiny_model("mixtral")
    tokens = random_tokens(4, 16, seed=2)
    refit, plan = _dropped(model, tokens, repair="refit", ridge=1e9)
    assert sum(map(sum, plan.borrowed.values())) > 0
    for layer, kept in plan.keep.items():
        original = _neurons(model, layer)
        for slot, (expert, rebuilt) in enumerate(zip(kept, _neurons(refit, layer))):
            sources = [next(e for e in range(len(original)) if any(torch.allclose(neuron, other, atol=1e-6)
                                                                   for other in original[e]))
                       for neuron in rebuilt]
            assert all(source == expert or source in plan.drop[layer] for source in sources)
            assert sum(source != expert for source in sources) == plan.borrowed[layer][slot]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_layer_drop_refit_absorbs_the_dropped_sublayer_in_the_attention_before_it(family):
    model = tiny_model(family)
    tokens = random_tokens(8, 32, seed=5)
    options = {"n": 1, "score": "random", "seed": 1}
    dropped, plain = _dropped(model, tokens, "layer_drop", **options)
    refit, plan = _dropped(model, tokens, "layer_drop", **options, repair="refit", ridge=1e-3)
    assert plan.drop == plain.drop and plain.repair_error == {}
    assert set(plan.repair_error) == set(plan.drop)
    assert all(after < before for before, after in plan.repair_error.values())
    assert _kl(model, refit, tokens) < 0.9 * _kl(model, dropped, tokens)
    changed = [name for name, weight in refit.named_parameters() if not torch.equal(weight, dropped.get_parameter(name))]
    assert changed and all(name.endswith("o_proj.weight") for name in changed)


def test_block_drop_refit_repairs_the_next_kept_block_and_reports_a_last_block_it_cannot():
    model = tiny_model("mixtral")  # blocks 0-3: dropping 1 and 3 leaves 0, 2 (now 1)
    tokens = random_tokens(8, 32, seed=6)
    dropped, refit = copy.deepcopy(model), copy.deepcopy(model)
    BlockDrop().apply(dropped, BlockDropPlan([1, 3], [None, None]))
    plan = BlockDrop().apply(refit, BlockDropPlan([1, 3], [None, None], repair="refit", ridge=1e-3), tokens)
    assert list(plan.repair_error) == [2] and plan.unrepaired == [3]  # block 2's attention absorbs block 1
    before, after = plan.repair_error[2]
    assert after < before
    assert "not repaired: [3]" in " ".join(plan.describe())
    assert _kl(model, refit, tokens) < _kl(model, dropped, tokens)


def test_layer_drop_refit_with_a_large_ridge_is_the_plain_drop():
    model = tiny_model("mixtral")
    tokens = random_tokens(4, 16, seed=2)
    dropped, _ = _dropped(model, tokens, "layer_drop", n=2, score="random")
    refit, _ = _dropped(model, tokens, "layer_drop", n=2, score="random", repair="refit", ridge=1e9)
    assert _kl(dropped, refit, tokens) < 1e-8


def test_forward_selection_takes_the_columns_that_span_the_target_and_fills_a_silent_group():
    """Groups of 6 columns, 2 to take from each: the target is made of columns 1, 4 (group 0) and 7, 9 (group 1)
    plus a little noise, so greedy selection must take exactly those; group 2's columns are all zero (an expert
    no token reaches) and it takes its first two."""
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(200, 18, generator=generator, dtype=torch.float64)
    z[:, 12:] = 0
    y = z[:, [1, 4, 7, 9]] @ torch.randn(4, 3, generator=generator, dtype=torch.float64)
    y += 1e-3 * torch.randn(y.shape, generator=generator, dtype=torch.float64)
    group = torch.tensor([0] * 6 + [1] * 6 + [2] * 6)
    chosen = repair._forward_selection(z.T @ z, z.T @ y, group, quota=2, damping=1e-6)
    assert chosen.tolist() == [1, 4, 7, 9, 12, 13]


# --- streamed -------------------------------------------------------------------------------------------------------

TRIM_REFIT = {"passes": [{"block_drop": {"n": 1, "repair": "refit"}}, {"layer_drop": {"n": 1, "repair": "refit"}}]}
EXPERT_REFIT = {"passes": [{"expert_drop": {"keep": 4, "scope": "global", "min_keep": 2, "repair": "refit"}}]}
REFIT_SUMMARY = {"trim": "refit the attention output projection", "experts": "refit the kept experts"}


@pytest.mark.parametrize("recipe", ["trim", "experts"])
@pytest.mark.parametrize("model", ["demo", pytest.param("fixture", marks=needs_shared)])
def test_a_streamed_refit_writes_the_in_memory_builds_bytes(model, recipe, tmp_path):
    """A refit attention output projection, or rebuilt experts, wait on disk for every later read of their
    streamed layer, which is read in again as rebuilt before the next layer's inputs are computed."""
    steps = TRIM_REFIT if recipe == "trim" else EXPERT_REFIT
    if model == "fixture":
        whole, streamed = _same_artifact(FIXTURE, steps, "f32", tmp_path, CORPUS / "calib.txt", CORPUS / "dev.txt")
    else:
        whole, streamed = _same_artifact(model, steps, "f32", tmp_path, HELD_OUT, HELD_OUT)
    for report in (whole, streamed):
        lines = [line for step in report.compression.passes for line in step["summary"]]
        assert any(REFIT_SUMMARY[recipe] in line for line in lines), lines


def test_the_memory_plan_counts_a_trim_refits_system_and_targets():
    options = CompressOptions(out="unused", stream=True, eval_text=str(HELD_OUT),
                              calibration=CalibrationOptions(source=str(HELD_OUT), samples=8, length=64))
    plain, refit = (memory_plan("demo", parse_recipe({"passes": [{"block_drop": {"n": 2, "score": "random",
                                                                                "repair": repair}}]}), options)
                    for repair in ("none", "refit"))
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    # the normal equations of the o_proj (float64) and one more copy of the calibration hidden states (the
    # targets wait on disk: residuals_at)
    assert refit.streamed_bytes - plain.streamed_bytes >= 4 * config["hidden_size"] ** 2 * 8 + 8 * 64 * config["hidden_size"] * 4


def test_a_streamed_models_target_residuals_wait_on_disk_and_read_back_as_computed():
    from moeexport.modelio import load, load_streamed
    from moeexport.streaming import SpilledBatches

    tokens = random_tokens(3, 16)
    points = {0: "attention", 1: "output"}
    whole, streamed = (repair.residuals_at(loader(DEMO_MODEL), points, tokens) for loader in (load, load_streamed))
    for layer in points:
        assert isinstance(streamed[layer], SpilledBatches) and len(streamed[layer]) == len(whole[layer]) > 0
        for expected, read in zip(whole[layer], streamed[layer], strict=True):
            assert torch.equal(expected, read)


def test_spilled_tensors_keep_every_key_when_one_is_put_again():
    """A layer refit twice (Block Drop's refit, then Layer Drop's) replaces its file, and no other key's."""
    from moeexport.streaming import SpilledTensors

    spilled = SpilledTensors()
    spilled.put("a", torch.zeros(2))
    spilled.put("a", torch.ones(2))
    spilled.put("b", torch.full((2,), 2.0))
    assert torch.equal(spilled.tensor("a"), torch.ones(2)) and torch.equal(spilled.tensor("b"), torch.full((2,), 2.0))



def test_a_killed_runs_spill_is_removed_by_the_next_run_and_a_live_ones_is_not(tmp_path, monkeypatch):
    import tempfile

    from moeexport import streaming

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / f"{streaming.SPILL_PREFIX}{_exited_pid()}-abc"  # a run that exited without cleaning up
    live = tmp_path / f"{streaming.SPILL_PREFIX}{os.getpid()}-def"
    unrelated = tmp_path / "moeexport-spilled-abc"  # no pid: not ours to judge
    for directory in (dead, live, unrelated):
        directory.mkdir()
        (directory / "0.safetensors").write_bytes(b"x")
    streaming.remove_spills_of_dead_runs.cache_clear()
    spilled = streaming.SpilledTensors()
    assert not dead.exists() and live.exists() and unrelated.exists()
    assert spilled.directory.parent == tmp_path and spilled.directory.name.startswith(f"moeexport-spilled-{os.getpid()}-")


def _exited_pid() -> int:
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid

# --- repair: auto, the default ----------------------------------------------------------------------------------------

DROPS = [{"block_drop": {"n": 1}}, {"layer_drop": {"n": 1}}, {"expert_drop": {"keep": 2}}]


@pytest.mark.parametrize("family, decided", [
    ("mixtral", ["refit", "refit", "refit"]),
    # DeltaNet layers have no output projection to absorb a drop; the experts are rebuilt as any
    ("qwen3_5_moe_text", ["none", "none", "refit"]),
    ("gpt_oss", ["refit", "refit", "none"]),  # experts with biases, gate and up interleaved
    ("deepseek_v3", ["refit", "refit", "none"]),  # routing within expert groups
    ("gemma4_text", ["refit", "refit", "none"]),  # a per-expert scale on the routing weights
    ("nemotron_h", ["none", "none", "none"]),  # Mamba layers; ReLU² experts without a gate
])
def test_repair_auto_is_a_refit_where_the_model_takes_one_and_says_why_not(family, decided):
    from moeexport.compress import resolve_recipe

    config = tiny_model(family).config
    recipe, decisions = resolve_recipe(parse_recipe({"passes": DROPS}), config)
    assert [step.options.repair for step in recipe.steps] == decided
    for line, repair_kind in zip(decisions, decided, strict=True):
        assert line == "repair: auto -> refit" if repair_kind == "refit" else line.startswith("repair: auto -> none (")
    explicit, said = resolve_recipe(parse_recipe({"passes": [{"expert_drop": {"keep": 2, "repair": "none"}}]}), config)
    assert explicit.steps[0].options.repair == "none" and said == [""]


def test_repair_auto_without_calibration_data_is_none_and_the_default_drop_refits_on_the_demo(tmp_path):
    from moeexport.compress import resolve_recipe
    from moeexport.pipeline import compress as compress_command

    model = tiny_model("mixtral")
    recipe, decisions = resolve_recipe(parse_recipe({"passes": DROPS}), model.config, calibrated=False)
    assert {step.options.repair for step in recipe.steps} == {"none"}
    assert all("no calibration tokens" in line for line in decisions)
    compress(model, parse_recipe({"passes": [{"expert_drop": {"keep": 2, "score": "random"}}]}), None)  # no raise

    report = compress_command(DEMO_MODEL, {"passes": [{"expert_drop": {"keep": 2}}]},
                              CompressOptions(out=str(tmp_path / "out"), measure_quality=False))
    (step,) = report.passes
    assert step["options"]["repair"] == "refit" and step["plan"]["repair_error"]
    assert step["summary"][0] == "repair: auto -> refit"
