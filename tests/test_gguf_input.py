"""A GGUF as MODEL: moeexport.load reads it back exactly, and GGUF -> GGUF builds carry every kept tensor's bytes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import moeexport
from moeexport.adapters import adapter_for
from moeexport.adapters.surgery import structure
from moeexport.backends import gguf as gguf_backend
from moeexport.backends.gguf.reader import GGUFFile, carried_codes
from moeexport.backends.gguf.writer import _permute_rows
from moeexport.compress import compress
from moeexport.errors import MoeExportError
from moeexport.checkpoint_files import DEMO_MODEL
from moeexport.recipe import parse_recipe
from moeexport.source import open_source
from tests.conftest import CORPUS, FIXTURE, needs_shared
from tests.tiny_models import random_tokens, tiny_model

HELD_OUT = Path(__file__).with_name("held_out_text.txt")
TRIMS = {
    "full": [],
    "trimmed": [{"block_drop": {"n": 1, "score": "random"}}, {"layer_drop": {"n": 1, "score": "random"}},
                {"expert_drop": {"keep": 3, "scope": "layer", "score": "random"}}],
    "non_uniform": [{"expert_drop": {"keep": 3, "scope": "global", "score": "random", "min_keep": 2}}],
}
# unrepaired: a refit's weights are rewritten in the input's type, never carried (tests/test_repair.py has those)
TRIM_AND_DROP = {"passes": [{"layer_drop": {"n": 1, "repair": "none"}},
                            {"expert_drop": {"keep": 6, "scope": "layer", "score": "reap", "repair": "none"}}]}


def _tiny(family: str):
    overrides = {"mlp_only_layers": []} if family == "qwen2_moe" else {}  # its hosts need MoE in every layer
    model = tiny_model(family, vocab_size=2048, **overrides)
    model.config.name_or_path = str(DEMO_MODEL)  # the GGUF borrows the demo's vocabulary
    return model


def _compressed(model, passes):
    model = copy.deepcopy(model)
    compress(model, parse_recipe({"passes": passes}), None)
    return model


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def _cases():
    for family in sorted(gguf_backend.ARCHITECTURES):
        if gguf_backend.ARCHITECTURES[family].unread:
            continue  # refused by name
        if gguf_backend.ARCHITECTURES[family].sigmoid_gated:
            continue  # read back with trims their expert groups allow: tests/test_gguf_input_families.py
        for trim in TRIMS:
            if trim == "non_uniform" and gguf_backend.ARCHITECTURES[family].padded_host is None:
                continue  # per-layer counts need a padded host (step35, hy_v3)
            yield family, trim


@pytest.mark.parametrize("family,trim", list(_cases()))
def test_load_reads_a_gguf_back_as_the_model_it_was_written_from(family, trim, tmp_path):
    model = _compressed(_tiny(family), TRIMS[trim])
    written = gguf_backend.export(model, tmp_path / "m.gguf")
    loaded = moeexport.load(written.path)
    assert structure(adapter_for(loaded.config), loaded) == structure(adapter_for(model.config), model)
    tokens = random_tokens(2, 32, seed=3) * 16
    difference = (_logits(loaded, tokens) - _logits(model, tokens)).abs().max().item()
    assert difference <= 1e-4, (family, trim, written.architecture, difference)


def test_the_tokenizer_comes_from_the_gguf_metadata(tmp_path):
    written = gguf_backend.export(moeexport.load("demo"), tmp_path / "m.gguf", quant="q8_0")
    text = "Once upon a time, Lily said: \"Hello, world!\" and 42 birds flew away.\nThe end."
    assert moeexport.load_tokenizer(written.path)(text).input_ids == moeexport.load_tokenizer("demo")(text).input_ids


def _carried_build(model, tmp_path, recipe=TRIM_AND_DROP, calib=HELD_OUT, eval_text=HELD_OUT, **options):
    """A build of MODEL to GGUF (a GGUF is streamed, so calibration and held-out text come from files)."""
    calibration = moeexport.CalibrationOptions(source=str(calib), samples=8, length=64)
    options = moeexport.BuildOptions(out=str(tmp_path / "out"), calibration=calibration, eval_text=str(eval_text),
                                     **options)
    return moeexport.build(model, recipe, "gguf", options)


def _expert_slots(source: GGUFFile, output: GGUFFile, name: str) -> list[int | None]:
    """For each expert of an output stack, the input expert whose bytes it holds (None: none)."""
    given, made = source.raw(name), output.raw(name)
    return [next((i for i in range(len(given)) if np.array_equal(given[i], made[j])), None) for j in range(len(made))]


def _assert_codes_carried(source_path, report) -> None:
    """Every tensor of the output is the input's, byte for byte, or the zeros of a layer without MoE."""
    source, output = GGUFFile(source_path), GGUFFile(report.artifact["path"])
    silent = [i for i, layer in enumerate(report.compression.layers_after) if layer["kind"] == "dropped"]
    assert silent, "the recipe drops a MoE sublayer"
    codes = carried_codes(source_path, report.artifact["path"])
    for name, tensor in output.tensors.items():
        block = int(name.split(".")[1]) if name.startswith("blk.") else None
        kind = name.split(".", 2)[-1]
        host_needs_it = not any(stored.endswith(kind) for stored in source.tensors)  # e.g. step35's shared expert
        if host_needs_it or block in silent and ("_exps" in name or "ffn_gate_inp" in name or "ffn_norm" in name):
            assert codes[name] == "zeros" or "ffn_norm" in name, name  # stand-in zeros (and a norm of ones)
            continue
        assert codes[name] == "carried" and tensor.qtype == source.tensors[name].qtype, name
        if "_exps" in name or name.endswith("ffn_gate_inp.weight"):
            slots = _expert_slots(source, output, name)
            assert None not in slots and len(set(slots)) == len(slots) == 6, (name, slots)
        elif name.endswith((".attn_q.weight", ".attn_k.weight")) and output.architecture != source.architecture:
            rows = torch.arange(output.tensors[name].shape[0])
            rows = _permute_rows(rows, len(rows) // output.value("attention.key_length"))  # HF row of each NORM row
            assert np.array_equal(output.raw(name), source.raw(name)[rows.argsort()]), name  # NORM -> NEOX rows
        else:
            assert np.array_equal(output.raw(name), source.raw(name)), name


def test_gguf_to_gguf_carries_every_kept_tensor_byte_for_byte(tmp_path):
    source = gguf_backend.export(moeexport.load("demo"), tmp_path / "demo-q8_0.gguf", quant="q8_0").path
    report = _carried_build(source, tmp_path)
    assert report.quant == "keep" and report.ok, report.validation
    assert "carried byte for byte" in report.artifact["representation"] and not report.artifact["fallbacks"]
    _assert_codes_carried(source, report)
    assert not (tmp_path / "out" / "compressed").exists()  # the artifact is the compressed model
    assert report.validation["kl"] <= 1e-3
    assert gguf_backend.TARGET.tolerance("keep", open_source(source)) == gguf_backend.TOLERANCES["q8_0"]


@needs_shared
def test_fixture_q4_k_m_gguf_to_gguf_matches_the_dequantized_torch_model(tmp_path):
    """The issue's case: Layer Drop 1 + REAP Expert Drop to 6 of the fixture's own q4_k_m export."""
    source = gguf_backend.export(moeexport.load(FIXTURE), tmp_path / "fixture-q4_k_m.gguf", quant="q4_k_m").path
    report = _carried_build(source, tmp_path, calib=CORPUS / "calib.txt", eval_text=CORPUS / "dev.txt")
    _assert_codes_carried(source, report)
    # llama.cpp rounds activations to 8 bits for its K-quant dot products: that is all that is left
    assert report.ok and report.validation["kl"] < 5e-3, report.validation


def test_a_quantize_pass_rewrites_only_the_experts_it_changed(tmp_path):
    source = gguf_backend.export(moeexport.load("demo"), tmp_path / "demo-q8_0.gguf", quant="q8_0").path
    recipe = {"passes": [{"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}]}
    report = _carried_build(source, tmp_path, recipe=recipe)
    rewritten = [line.split(":")[0] for line in report.artifact["fallbacks"]]
    assert rewritten and all("_exps" in name for name in rewritten)
    codes = carried_codes(source, report.artifact["path"])
    assert sorted(name for name, code in codes.items() if code == "rewritten") == sorted(rewritten)
    assert all("a pass rewrote its experts" in line for line in report.artifact["fallbacks"])
    output = GGUFFile(report.artifact["path"])
    assert all(output.tensors[name].qtype == GGUFFile(source).tensors[name].qtype for name in rewritten)


def test_a_refit_rewrites_only_the_attention_output_it_solved(tmp_path):
    source = gguf_backend.export(moeexport.load("demo"), tmp_path / "demo-q8_0.gguf", quant="q8_0").path
    recipe = {"passes": [{"layer_drop": {"n": 1, "score": "random", "seed": 1, "repair": "refit"}}]}
    report = _carried_build(source, tmp_path, recipe=recipe)
    assert report.ok, report.validation
    dropped = report.compression.passes[0]["plan"]["drop"]
    assert report.artifact["fallbacks"] == [f"blk.{dropped[0]}.attn_output.weight: rewritten (a repair refit it)"]
    codes = carried_codes(source, report.artifact["path"])
    assert codes[f"blk.{dropped[0]}.attn_output.weight"] == "rewritten"
    assert GGUFFile(report.artifact["path"]).tensors[f"blk.{dropped[0]}.attn_output.weight"].qtype == \
        GGUFFile(source).tensors[f"blk.{dropped[0]}.attn_output.weight"].qtype
    others = {name: code for name, code in codes.items()
              if "attn_output" not in name and name != f"blk.{dropped[0]}.ffn_norm.weight"}  # its norm: ones
    assert set(others.values()) == {"carried", "zeros"}, others


def test_what_a_gguf_input_cannot_do_is_refused_by_name(tmp_path):
    source = gguf_backend.export(moeexport.load("demo"), tmp_path / "demo.gguf", quant="q8_0").path
    with pytest.raises(MoeExportError, match="compress the model's safetensors checkpoint instead"):
        _carried_build(source, tmp_path, recipe={"passes": [{"merge": {"keep": 4}}]})
    with pytest.raises(MoeExportError, match="carries the tensors of an input GGUF"):
        _carried_build("demo", tmp_path, recipe={"passes": []}, quant="keep")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(source.read_bytes()[:4096])
    with pytest.raises(MoeExportError, match="truncated|not a readable GGUF"):
        moeexport.load(truncated)


def test_a_stock_padded_host_is_not_read_as_one_of_ours(tmp_path):
    import gguf

    source = gguf_backend.export(_compressed(_tiny("mixtral"), TRIMS["non_uniform"]), tmp_path / "m.gguf").path
    reader, copy_path = gguf.GGUFReader(source), tmp_path / "stock.gguf"
    writer = gguf.GGUFWriter(str(copy_path), "step35")
    for name, field in reader.fields.items():
        if not name.startswith(("GGUF.", "general.architecture", "moeexport.")):
            value_type = field.types[0]
            writer.add_key_value(name, field.contents(), value_type,
                                 sub_type=field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(MoeExportError, match="stock step35 model"):
        moeexport.load(copy_path)
    assert json.loads(GGUFFile(source).metadata["moeexport.layers"])[0]["kind"] == "moe"


def test_the_command_line_builds_a_gguf_from_a_gguf(tmp_path, capsys):
    from moeexport.cli import main

    source = gguf_backend.export(moeexport.load("demo"), tmp_path / "demo-q8_0.gguf", quant="q8_0").path
    recipe = tmp_path / "trim.yaml"
    recipe.write_text("passes:\n  - expert_drop: {keep: 6, scope: layer, score: frequency}\n")
    argv = ["build", str(source), "--recipe", str(recipe), "--target", "gguf", "--out", str(tmp_path / "out"),
            "--calib", str(HELD_OUT), "--calib-samples", "4", "--eval-text", str(HELD_OUT), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quant"] == "keep" and report["ok"] and report["quality_vs_input"]["tokens"] > 0
    assert Path(report["artifact"]["path"]).name == "model-keep.gguf"


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                                  "IQ4_NL", "IQ4_XS", "MXFP4", "BF16"])
def test_ggmls_dequantizer_gives_gguf_pys_values_bit_for_bit(name):
    """The reader dequantizes with ggml's own to_float (ten times as fast as gguf-py's numpy); rows that llama.cpp
    quantized come back as gguf-py computes them."""
    import gguf

    from moeexport.backends.gguf import ggml

    qtype = gguf.GGMLQuantizationType[name]
    values = np.random.default_rng(0).standard_normal((37, 512), dtype=np.float32)
    stored = ggml.quantize_rows(int(qtype), values)
    ours = ggml.dequantize_rows(int(qtype), stored, np.empty_like(values))
    assert np.array_equal(ours.view(np.uint32), gguf.quants.dequantize(stored, qtype).view(np.uint32))
    assert np.corrcoef(ours.ravel(), values.ravel())[0, 1] > 0.9  # the values, not garbage of the right size


def test_the_writers_q1_0_zeros_read_back_as_zeros():
    from moeexport.backends.gguf import ggml

    blocks = np.zeros((3, 2, 18), np.uint8)  # GGML_TYPE_Q1_0: blocks of 128 weights, a zero fp16 scale, any signs
    blocks[..., 2:] = 0b10101010
    stored = blocks.reshape(3, -1)
    assert not GGUFFile._values(stored, 41).any()
