"""Streamed models (one decoder layer at a time from disk) compute and write exactly what in-memory ones do."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import moeexport
from moeexport import BuildOptions, CalibrationOptions
from moeexport.calibration.sources import CalibrationConfig
from moeexport.compress import StatisticsProvider, compress
from moeexport.errors import MoeExportError
from moeexport.memory import GIB, Workload, parse_size, plan
from moeexport.checkpoint_files import DEMO_MODEL, read_headers, weight_files
from moeexport.modelio import load, load_streamed, save
from moeexport.pipeline import CompressOptions, _calibration_source, memory_plan
from moeexport.recipe import parse_recipe
from moeexport.streaming import is_streamed, logits, stream_of
from tests.conftest import CORPUS, FIXTURE, needs_shared
from tests.tiny_models import FAMILIES, random_tokens, tiny_model

HELD_OUT = Path(__file__).with_name("held_out_text.txt")
TRIM = {"passes": [{"block_drop": {"n": 1}}, {"layer_drop": {"n": 1}},
                   {"expert_drop": {"keep": 6, "scope": "global", "score": "reap", "min_keep": 2}}]}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_streamed_model_computes_the_in_memory_models_logits_bit_for_bit(family, tmp_path):
    model = tiny_model(family)
    model.save_pretrained(tmp_path)  # the layout transformers saves (Mixtral: per-expert w1/w2/w3)
    tokens = random_tokens(3, 24)
    streamed = load_streamed(tmp_path)
    assert is_streamed(streamed) and all(p.is_meta for p in streamed.model.layers.parameters())
    expected = load(tmp_path)(input_ids=tokens, use_cache=False).logits.numpy()
    assert np.array_equal(logits(streamed, tokens), expected)
    assert stream_of(streamed).layers_read == model.config.num_hidden_layers


def test_a_streamed_forward_of_the_quality_windows_reads_each_expert_once(tmp_path, expert_reads):
    tiny_model("mixtral").save_pretrained(tmp_path)
    tokens = random_tokens(16, 8)  # more windows than one batch of 8 in memory
    expected = load(tmp_path)(input_ids=tokens, use_cache=False).logits.numpy()
    assert np.array_equal(logits(load_streamed(tmp_path), tokens), expected)
    assert expert_reads and len(expert_reads) == len(set(expert_reads))


def test_a_streamed_model_with_a_head_tied_to_its_embeddings_reads_them_for_the_head(tmp_path):
    tiny_model("qwen3_moe", tie_word_embeddings=True).save_pretrained(tmp_path)
    tokens = random_tokens(2, 16)
    expected = load(tmp_path)(input_ids=tokens, use_cache=False).logits.numpy()
    assert np.array_equal(logits(load_streamed(tmp_path), tokens), expected)


@pytest.mark.parametrize("where", ["model.layers.1.mlp.experts.down_proj", "model.layers.1.self_attn.q_proj.weight"])
def test_a_streamed_model_refuses_non_finite_weights_when_it_reads_them(where, tmp_path):
    model = tiny_model("mixtral")
    with torch.no_grad():
        model.get_parameter(where).view(-1)[7] = float("nan")
    model.save_pretrained(tmp_path)
    tokens = random_tokens(2, 8)
    for _ in range(2):  # checked once, and still refused when read again
        with pytest.raises(MoeExportError, match="non-finite"):
            logits(load_streamed(tmp_path), tokens)
    assert logits(load_streamed(tmp_path, allow_nonfinite=True), tokens).shape == (2, 8, 128)  # let through


def test_a_streamed_layer_reads_only_the_experts_it_keeps(tmp_path):
    from moeexport.adapters import adapter_for
    from moeexport.adapters.surgery import keep_experts
    from moeexport.streaming import layer_views

    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path)
    streamed, whole = load_streamed(tmp_path), load(tmp_path)
    for lm in (streamed, whole):
        keep_experts(adapter_for(lm.config), lm, 1, [3, 0])
    assert stream_of(streamed).edits[1].experts == (3, 0)
    read = [(view.index, view.experts.gate_up_proj[1]) for view in layer_views(streamed)]  # slot 1 = expert 0
    whole_view = adapter_for(whole.config).layer_view(whole, 1)
    assert torch.equal(read[1][1], whole_view.experts.gate_up_proj[1]) and whole_view.experts.num_experts == 2
    tokens = random_tokens(2, 16)
    assert np.array_equal(logits(streamed, tokens), whole(input_ids=tokens, use_cache=False).logits.numpy())
    skeleton = adapter_for(streamed.config).layer_view(streamed, 1)
    assert skeleton.experts.gate_up_proj.is_meta and skeleton.attention.q_proj.weight.is_meta  # nothing stays


@pytest.mark.parametrize("recipe", [
    {"passes": [{"block_drop": {"n": 1}}, {"layer_drop": {"n": 1}},
                {"expert_drop": {"keep": 3, "scope": "global", "score": "reap", "min_keep": 2}}]},  # manifest form
    {"passes": [{"expert_drop": {"keep": 2, "scope": "layer"}}]},  # stock form, in the hub's layout
    {"passes": [{"block_drop": {"n": 1}}, {"quantize": {"method": "rtn", "bits": 4, "group_size": 16}}]},
])
def test_a_streamed_save_is_a_checkpoint_that_loads_to_the_same_model(recipe, tmp_path):
    tiny_model("mixtral").save_pretrained(tmp_path / "source")
    calibration = random_tokens(4, 32)
    results = []
    for loader in (load, load_streamed):
        lm = loader(tmp_path / "source")
        provider = StatisticsProvider(None, CalibrationConfig(), "tiny", cache_dir=None, tokens=calibration)
        compress(lm, parse_recipe(recipe), provider)
        out = tmp_path / loader.__name__
        save(lm, out, {})
        results.append(load(out))
    tokens = random_tokens(2, 20)
    whole, streamed = (lm(input_ids=tokens, use_cache=False).logits for lm in results)
    assert torch.equal(whole, streamed)


CARRIED = {"passes": [{"expert_drop": {"keep": 6, "scope": "layer"}},
                      {"quantize": {"method": "rtn", "bits": 8, "group_size": 32}}]}


@needs_shared
@pytest.mark.parametrize("target, quant, recipe", [
    ("gguf", "f32", TRIM), ("onnx", "int4", TRIM),  # K-quants: tests/test_gguf.py
    ("gguf", "q8_0", CARRIED),  # the quantize pass's codes, rounded as each expert is read, carried exactly
])
def test_streamed_and_in_memory_builds_of_the_fixture_write_the_same_bytes_and_statistics(target, quant, recipe,
                                                                                          tmp_path):
    reports = {}
    for stream in (False, True):
        options = BuildOptions(out=str(tmp_path / f"stream-{stream}"), quant=quant, stream=stream,
                               calibration=CalibrationOptions(source=str(CORPUS / "calib.txt"), samples=8, length=128),
                               eval_text=str(CORPUS / "dev.txt"), profile=False)
        reports[stream] = moeexport.build(FIXTURE, recipe, target, options)
    whole, streamed = reports[False], reports[True]
    assert whole.ok and streamed.ok
    assert not whole.compression.memory["streamed"] and streamed.compression.memory["streamed"]
    # plans and the statistics they quote; a streamed quantize rounds as it reads, so counts no zeros
    assert _without_zero_counts(whole.compression.passes) == _without_zero_counts(streamed.compression.passes)
    # quality is scored on batches of another size when streamed: the same numbers up to summation order
    for key, value in whole.compression.quality_vs_source.items():
        assert streamed.compression.quality_vs_source[key] == (pytest.approx(value, rel=1e-6)
                                                               if isinstance(value, float) else value)
    assert whole.artifact["files"].keys() == streamed.artifact["files"].keys()
    for name in whole.artifact["files"]:
        assert _sha256(Path(whole.out) / name) == _sha256(Path(streamed.out) / name), name


def _without_zero_counts(passes: list[dict]) -> list[dict]:
    def plain(step: dict) -> dict:
        outcome = step["plan"].get("outcome") or {}
        if "zeros" not in outcome:
            return step
        return step | {"plan": step["plan"] | {"outcome": outcome | {"zeros": None}}, "summary": step["summary"][:1]}

    return [plain(step) for step in passes]


def test_size_parsing_takes_decimal_and_binary_units():
    assert parse_size("4GB") == 4 * 10**9 and parse_size("3.5GiB") == int(3.5 * GIB) and parse_size("800MB") == 8e8
    for bad in ("", "lots", "-1GB", "4 parsecs"):
        with pytest.raises(MoeExportError, match="--max-memory"):
            parse_size(bad)


def test_a_model_that_cannot_fit_is_refused_at_once_with_what_to_change():
    headers = read_headers(weight_files(DEMO_MODEL))
    started = time.perf_counter()
    options = CompressOptions(out="unused", max_memory=10**6, eval_text=str(HELD_OUT),
                              calibration=CalibrationOptions(source=str(HELD_OUT)))
    with pytest.raises(MoeExportError, match=r"does not fit --max-memory .* raise --max-memory to") as error:
        memory_plan("demo", parse_recipe(TRIM), options)
    assert time.perf_counter() - started < 1.0 and "\n" not in str(error.value)
    fits = plan(headers, 256, 2048, 64 * GIB, Workload())
    assert not fits.streamed and fits.dtype == "float32"
    squeezed = plan(headers, 256, 2048, fits.in_memory_bytes - 1, Workload(), storage_dtype="bfloat16")
    assert squeezed.streamed and squeezed.streamed_bytes <= squeezed.budget


def test_the_command_line_refuses_a_model_that_cannot_fit_before_importing_torch():
    import subprocess
    import sys

    code = ("import sys; from moeexport.cli import main; status = main(['build', 'demo', '--recipe', 'r.yaml', "
            "'--target', 'gguf', '--out', 'never', '--max-memory', '1MB']); "
            "print('torch' in sys.modules); sys.exit(status)")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout.strip() == "False", done.stderr
    assert done.stderr.count("\n") == 1 and "does not fit --max-memory" in done.stderr
    assert time.perf_counter() - started < 5  # a process start: well under a second here when idle


def test_a_streamed_run_refuses_what_it_cannot_do_before_any_work():
    streamed = CompressOptions(out="unused", stream=True, eval_text=str(HELD_OUT))
    with pytest.raises(MoeExportError, match="merge cannot run streamed"):
        memory_plan("demo", parse_recipe({"passes": [{"merge": {"keep": 4}}]}), streamed)
    with pytest.raises(MoeExportError, match="quantize cannot run streamed"):
        memory_plan("demo", parse_recipe({"passes": [{"quantize": {"method": "gptq", "bits": 4,
                                                                   "shared_experts": True}}]}), streamed)
    with pytest.raises(MoeExportError, match="pass --calib FILE"):
        memory_plan("demo", parse_recipe(TRIM), streamed)
    memory_plan("demo", parse_recipe({"passes": [{"layer_drop": {"n": 1, "score": "random"}}]}), streamed)
    no_text = CompressOptions(out="unused", stream=True, calibration=CalibrationOptions(source=str(HELD_OUT)))
    with pytest.raises(MoeExportError, match="--eval-text FILE"):
        memory_plan("demo", parse_recipe(TRIM), no_text)
    no_eval = moeexport.BuildOptions(out="unused", stream=True, measure_quality=False,
                                     calibration=CalibrationOptions(source=str(HELD_OUT)))
    with pytest.raises(MoeExportError, match=r"validating the artifact .* \(--no-eval skips only the quality check\)"):
        memory_plan("demo", parse_recipe(TRIM), no_eval)


@dataclass
class _Plan:
    parameters: int


class _Notes(list):
    def note(self, message):
        self.append(message)


def test_large_models_need_calibration_and_held_out_text_files():
    large, small = _Plan(2 * 10**9), _Plan(10**6)
    with pytest.raises(MoeExportError, match=r"2\.0 B parameters: sampling calibration text .* --calib FILE"):
        _calibration_source(large, True, CompressOptions(eval_text="x"), _Notes())
    notes = _Notes()
    asked = CompressOptions(eval_text="x", calibration=CalibrationOptions(source="model"))
    assert _calibration_source(large, True, asked, notes).source == "model" and "takes long" in notes[0]
    with pytest.raises(MoeExportError, match="--eval-text FILE"):
        _calibration_source(large, True, CompressOptions(calibration=CalibrationOptions(source="c.txt")), _Notes())
    assert _calibration_source(large, False, CompressOptions(measure_quality=False), _Notes()).source == "model"
    assert _calibration_source(small, True, CompressOptions(), _Notes()).source == "model"


def test_the_cli_streams_a_build_within_max_memory_and_says_so(tmp_path, capsys):
    from moeexport.cli import main

    out = tmp_path / "streamed"
    code = main(["build", "demo", "--recipe", str(Path(moeexport.__file__).parents[1] / "recipes" / "trim.yaml"),
                 "--target", "gguf", "--out", str(out), "--stream", "--max-memory", "8GB", "--calib", str(HELD_OUT),
                 "--calib-samples", "8", "--calib-length", "64", "--eval-text", str(HELD_OUT), "--json", "--save-checkpoint"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"] and report["compression"]["memory"]["streamed"]
    assert report["compression"]["memory"]["budget"] == 8 * 10**9
    assert (out / "compressed" / "moeexport.safetensors.index.json").is_file()
