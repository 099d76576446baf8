"""Input moments measured on a streamed model (one layer, one expert at a time): the importance matrix and Wanda.

A streamed build (`stream=True`, what a small --max-memory forces) writes the same bytes as an in-memory one."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import moeexport
from moeexport import BuildOptions, CalibrationOptions
from moeexport.calibration.moments import input_moments
from moeexport.checkpoint_files import DEMO_MODEL
from moeexport.errors import MoeExportError
from moeexport.modelio import load, load_streamed
from moeexport.pipeline import CompressOptions, memory_plan
from moeexport.recipe import parse_recipe
from moeexport.streaming import stream_of
from tests.conftest import CORPUS, FIXTURE, needs_shared
from tests.family_checks import HELD_OUT, saved_with_demo_tokenizer
from tests.tiny_models import random_tokens, tiny_model

EMPTY = {"passes": []}
EXPERT_DROP = {"passes": [{"expert_drop": {"keep": 3, "scope": "layer"}}]}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build(model, recipe, quant: str, out: Path, stream: bool, calibration: Path, eval_text: Path, **target):
    options = BuildOptions(out=str(out), quant=quant, stream=stream, profile=False, measure_quality=False,
                           validation_windows=(2, 48), target_options=target, eval_text=str(eval_text),
                           calibration=CalibrationOptions(source=str(calibration), samples=4, length=64))
    return moeexport.build(model, recipe, "gguf", options)


def _same_artifact(model, recipe, quant: str, tmp_path: Path, calibration: Path, eval_text: Path, **target):
    """The in-memory and the streamed build's reports, after checking that their artifacts are the same bytes."""
    reports = [_build(model, recipe, quant, tmp_path / f"stream-{stream}", stream, calibration, eval_text, **target)
               for stream in (False, True)]
    whole, streamed = reports
    assert whole.ok and streamed.ok
    assert not whole.compression.memory["streamed"] and streamed.compression.memory["streamed"]
    artifact = Path(whole.artifact["path"]).name
    assert _sha256(Path(whole.out) / artifact) == _sha256(Path(streamed.out) / artifact)
    return whole, streamed


# --- the importance matrix ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_streamed_moments_are_the_in_memory_moments_exactly(family, tmp_path):
    model = tiny_model(family)
    model.save_pretrained(tmp_path)
    tokens = random_tokens(5, 24)
    whole = input_moments(load(tmp_path), tokens, batch_size=2)
    streamed_model = load_streamed(tmp_path)
    streamed = input_moments(streamed_model, tokens, batch_size=2)
    assert stream_of(streamed_model).layers_read == model.config.num_hidden_layers  # each layer read once
    assert whole.sums.keys() == streamed.sums.keys() and (-1, "output_in") in whole.sums
    for key in whole.sums:
        assert torch.equal(whole.sums[key], streamed.sums[key]), key
        assert torch.equal(torch.as_tensor(whole.counts[key]), torch.as_tensor(streamed.counts[key])), key
    experts = [key for key in whole.sums if key[1] == "experts_in"]
    assert experts and all(int(whole.counts[key].sum()) == tokens.numel() * 2 for key in experts)  # top-2


@pytest.mark.parametrize("recipe", [EMPTY, EXPERT_DROP], ids=["empty", "expert_drop"])
def test_a_streamed_imatrix_build_of_a_tiny_model_writes_the_in_memory_builds_bytes(recipe, tmp_path):
    source = saved_with_demo_tokenizer(tiny_model("qwen2_moe", vocab_size=2048, hidden_size=64, mlp_only_layers=[]), tmp_path / "src")
    whole, streamed = _same_artifact(source, recipe, "q4_k_m", tmp_path, HELD_OUT, HELD_OUT, imatrix=True)
    assert streamed.timings.get("imatrix") is not None


@needs_shared
@pytest.mark.parametrize("recipe", [EMPTY, EXPERT_DROP], ids=["empty", "expert_drop"])
def test_a_streamed_imatrix_build_of_the_fixture_writes_the_in_memory_builds_bytes(recipe, tmp_path):
    whole, _ = _same_artifact(FIXTURE, recipe, "q4_k_m", tmp_path, CORPUS / "calib.txt", CORPUS / "dev.txt",
                              imatrix=True)
    if recipe is not EMPTY:
        return
    plain = _build(FIXTURE, recipe, "q4_k_m", tmp_path / "plain", False, CORPUS / "calib.txt", CORPUS / "dev.txt")
    artifact = Path(whole.artifact["path"]).name
    assert _sha256(Path(whole.out) / artifact) != _sha256(Path(plain.out) / artifact)  # the imatrix weighed it


def test_the_memory_plan_counts_the_moments_it_holds():
    options = CompressOptions(out="unused", stream=True, eval_text=str(HELD_OUT),
                              calibration=CalibrationOptions(source=str(HELD_OUT)))
    recipe = parse_recipe(EMPTY)
    without, measured = (memory_plan("demo", recipe, options, observes=True, moments=moments)
                         for moments in (False, True))
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    experts = config["num_local_experts"] * config["num_hidden_layers"]
    # at least one hidden-wide and one intermediate-wide float64 vector per expert
    assert measured.streamed_bytes - without.streamed_bytes >= experts * (config["hidden_size"] +
                                                                          config["intermediate_size"]) * 8


# --- pruning and GPTQ ------------------------------------------------------------------------------------------------

PRUNED_THEN_DROPPED = {"passes": [{"prune": {"method": "wanda", "sparsity": 0.5, "min_tokens": 50}},
                                  {"expert_drop": {"keep": 3, "scope": "layer"}}]}


@pytest.mark.parametrize("family, recipe", [
    ("mixtral", PRUNED_THEN_DROPPED),
    ("qwen2_moe", {"passes": [{"expert_drop": {"keep": 3, "scope": "layer"}},  # a dense layer; shared experts
                              {"prune": {"method": "wanda", "pattern": "2:4"}}]}),
    ("gpt_oss", {"passes": [{"prune": {"method": "wanda", "sparsity": 0.5}}]}),  # stacks stored transposed
    ("mixtral", {"passes": [{"prune": {"method": "magnitude", "sparsity": 0.25}}]}),
    ("mixtral", {"passes": [{"prune": {"method": "sparsegpt", "sparsity": 0.5, "min_tokens": 50}},
                            {"expert_drop": {"keep": 3, "scope": "layer"}}]}),
    ("gpt_oss", {"passes": [{"prune": {"method": "sparsegpt", "pattern": "2:4"}}]}),
    ("mixtral", {"passes": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 8, "min_tokens": 50}}]}),
    ("qwen2_moe", {"passes": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 8, "act_order": True}}]}),
], ids=["mixtral-wanda-then-drop", "qwen2_moe-drop-then-wanda-2:4", "gpt_oss-wanda", "mixtral-magnitude",
        "mixtral-sparsegpt-then-drop", "gpt_oss-sparsegpt-2:4", "mixtral-gptq", "qwen2_moe-gptq-act-order"])
def test_a_streamed_slimming_saves_the_in_memory_passes_weights_and_outcome(family, recipe, tmp_path):
    from moeexport.calibration.sources import CalibrationConfig
    from moeexport.compress import StatisticsProvider, compress
    from moeexport.modelio import save

    tiny_model(family).save_pretrained(tmp_path / "source")
    calibration = random_tokens(4, 32)
    saved, outcomes = [], []
    for loader in (load, load_streamed):
        lm = loader(tmp_path / "source")
        provider = StatisticsProvider(None, CalibrationConfig(), "tiny", cache_dir=None, tokens=calibration)
        result = compress(lm, parse_recipe(recipe), provider)
        outcomes.append(next(step.plan.outcome for step in result.steps if step.name in ("prune", "quantize")))
        save(lm, tmp_path / loader.__name__, {})
        saved.append(load(tmp_path / loader.__name__).state_dict())
    (whole, streamed), (in_memory, as_read) = saved, outcomes
    assert whole.keys() == streamed.keys()
    for name in whole:
        assert torch.equal(whole[name], streamed[name]), name
    assert in_memory.zeros > 0 and as_read.zeros is None  # a streamed expert is rewritten as it is read
    assert (in_memory.tokens_seen, in_memory.fallbacks, in_memory.matrices, in_memory.weights,
            in_memory.output_error) == (as_read.tokens_seen, as_read.fallbacks, as_read.matrices, as_read.weights,
                                        as_read.output_error)
    if "min_tokens" in str(recipe):
        assert in_memory.fallbacks  # some experts saw fewer than 50 tokens: the data-free method instead, listed


WANDA = {"passes": [{"prune": {"method": "wanda", "sparsity": 0.5}}]}


@needs_shared
@pytest.mark.parametrize("recipe, quant", [
    (WANDA, "f32"), (WANDA, "q4_k_m"),
    ({"passes": [{"prune": {"method": "sparsegpt", "sparsity": 0.5}}]}, "f32"),
    ({"passes": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}]}, "q4_0"),  # its codes, carried
], ids=["wanda-f32", "wanda-q4_k_m", "sparsegpt-f32", "gptq-q4_0"])
def test_a_streamed_slimming_build_of_the_fixture_writes_the_in_memory_builds_bytes(recipe, quant, tmp_path):
    whole, streamed = _same_artifact(FIXTURE, recipe, quant, tmp_path, CORPUS / "calib.txt", CORPUS / "dev.txt")
    (in_memory,), (as_read,) = (report.compression.passes for report in (whole, streamed))
    assert in_memory["plan"]["outcome"]["zeros"] > 0 and as_read["plan"]["outcome"]["zeros"] is None
    del in_memory["plan"]["outcome"]["zeros"], as_read["plan"]["outcome"]["zeros"]
    assert in_memory["plan"] == as_read["plan"] and in_memory["plan"]["outcome"]["tokens_seen"]


def test_the_memory_plan_counts_one_experts_gram_matrices_for_gptq_and_sparsegpt():
    options = CompressOptions(out="unused", stream=True, eval_text=str(HELD_OUT),
                              calibration=CalibrationOptions(source=str(HELD_OUT)))
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    rtn, gptq, sparsegpt = (memory_plan("demo", parse_recipe({"passes": [step]}), options) for step in (
        {"quantize": {"method": "rtn", "bits": 4, "group_size": 32}},
        {"quantize": {"method": "gptq", "bits": 4, "group_size": 32}},
        {"prune": {"method": "sparsegpt", "sparsity": 0.5}}))
    # the down projection's intermediate x intermediate float32 Gram matrix, at least, besides the moments
    assert gptq.streamed_bytes - rtn.streamed_bytes >= config["intermediate_size"] ** 2 * 4
    assert sparsegpt.streamed_bytes == gptq.streamed_bytes


def test_the_memory_plan_counts_the_disk_the_passes_spill_to_and_refuses_a_disk_without_room(monkeypatch):
    """GPTQ's experts and Expert Drop's rebuilt ones wait on disk when streamed: a float32 copy of each expert kept
    by then, plus the refit's target hidden states; a temporary directory too small is refused before any work."""
    from moeexport import memory

    options = CompressOptions(out="unused", stream=True, eval_text=str(HELD_OUT),
                              calibration=CalibrationOptions(source=str(HELD_OUT), samples=4, length=64))
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    experts = config["num_local_experts"]
    gptq = {"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}
    drop = {"expert_drop": {"keep": experts // 2, "repair": "refit"}}
    rtn_plan, gptq_plan, both_plan = (memory_plan("demo", parse_recipe({"passes": passes}), options) for passes in (
        [{"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}], [gptq], [drop, gptq]))
    expert_bytes = (config["num_hidden_layers"] * experts * 3 * config["hidden_size"] * config["intermediate_size"]
                    * 4)
    assert rtn_plan.spill_bytes == 0 and gptq_plan.spill_bytes == expert_bytes
    targets = 4 * 64 * config["hidden_size"] * 4 * config["num_hidden_layers"]  # float32: the demo computes in it
    assert both_plan.spill_bytes == expert_bytes // 2 * 2 + targets  # rebuilt half, then GPTQ's of the same half
    assert f"{both_plan.spill_bytes / 1e9:.1f} GB on disk in {both_plan.spill_dir}" in both_plan.describe()

    monkeypatch.setattr(memory.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(expert_bytes, 0, expert_bytes - 1))
    with pytest.raises(MoeExportError, match=r"write up to .* GB to .* while streaming.*set TMPDIR"):
        memory_plan("demo", parse_recipe({"passes": [gptq]}), options)


def test_a_gguf_input_is_measured_for_its_importance_matrix_as_it_is_read(demo_gguf_of, tmp_path):
    """The demo's random weights put q4_k_m's KL near its tolerance either way: quality is judged on the fixture;
    here, that the streamed GGUF input was measured and its matrix weighed every expert tensor written."""
    import gguf

    from moeexport.backends.gguf import imatrix_file

    out = tmp_path / "out"
    report = _build(demo_gguf_of("q8_0"), EMPTY, "q4_k_m", out, True, HELD_OUT, HELD_OUT, imatrix=True)
    assert report.compression.memory["streamed"] and "imatrix" in report.timings
    assert report.artifact["imatrix"]["source"] == "measured" and report.validation["tokens"] > 0
    written = imatrix_file.read(out / imatrix_file.FILE_NAME)
    artifact = gguf.GGUFReader(report.artifact["path"])
    experts = {t.name.removesuffix(".weight") for t in artifact.tensors if "_exps.weight" in t.name}
    assert experts and experts <= {name.removesuffix(".weight") for name in written.entries}
    assert written.chunk_count == 4 and written.chunk_size == 64


def test_a_streamed_bf16_gptq_build_carries_its_codes_into_q4_0(tmp_path):
    """A bf16 checkpoint computed in bf16 (a real-width streamed build): the quantize pass's grid values are
    code x float32 scale, which bf16 cannot hold, so the stream reads them in float32 and the q4_0 file carries
    the codes (recover_grid refuses weights off the grid)."""
    moeexport.load("demo").to(torch.bfloat16).save_pretrained(tmp_path / "source")
    for tokenizer_file in Path(moeexport.__file__).with_name("demo").glob("tokenizer*"):
        shutil.copy(tokenizer_file, tmp_path / "source" / tokenizer_file.name)
    recipe = {"passes": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}]}
    options = BuildOptions(out=str(tmp_path / "out"), quant="q4_0", stream=True, dtype="bfloat16", profile=False,
                           measure_quality=False, validation_windows=(2, 48), eval_text=str(HELD_OUT),
                           calibration=CalibrationOptions(source=str(HELD_OUT), samples=4, length=64))
    report = moeexport.build(str(tmp_path / "source"), parse_recipe(recipe), "gguf", options)
    assert report.compression.memory["streamed"] and report.compression.memory["dtype"] == "bfloat16"
    # written from the grid (recover_grid refuses weights off it); the demo's random weights leave q4_0's KL
    # near its tolerance, so the verdict is not what this checks
    assert report.artifact["file_bytes"] > 0
    assert not any("re-quantizes" in note for note in report.artifact["fallbacks"]), report.artifact["fallbacks"]
