"""GGUF input for the families whose files need more than the plain reader: sigmoid-gated deepseek2 files
(DeepSeek-V3, GLM-4.7-Flash) read back as their own family, and GGUF -> GGUF trims of them that llama.cpp runs
exactly as torch runs the same trim of the model read from the input."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

import moeexport
from moeexport.adapters import adapter_for
from moeexport.adapters.surgery import structure
from moeexport.backends import gguf as gguf_backend
from moeexport.backends.gguf.reader import GGUFFile, carried_codes
from moeexport.compress import compress
from moeexport.recipe import parse_recipe
from moeexport.validate import TorchRunner, compare
from tests.test_gguf_input import HELD_OUT, _tiny
from tests.tiny_models import random_tokens

SIGMOID_FAMILIES = ("deepseek_v3", "glm4_moe_lite")
KEEP = {"deepseek_v3": 4, "glm4_moe_lite": 3}  # half the experts; for DeepSeek-V3 two of each group's four


def _trims(family: str) -> dict[str, list]:
    return {
        "full": [],
        "expert_drop": [{"expert_drop": {"keep": KEEP[family], "scope": "layer", "score": "random"}}],
        "block_and_layer_drop": [{"block_drop": {"n": 1, "score": "random"}},
                                 {"layer_drop": {"n": 1, "score": "random"}}],
    }


def _logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


def _compressed(model, passes):
    model = copy.deepcopy(model)
    compress(model, parse_recipe({"passes": passes}), None)
    return model


# --- sigmoid-gated deepseek2 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("trim", ["full", "expert_drop", "block_and_layer_drop"])
@pytest.mark.parametrize("family", SIGMOID_FAMILIES)
def test_a_sigmoid_gated_deepseek2_gguf_reads_back_as_its_own_family(family, trim, tmp_path):
    model = _compressed(_tiny(family), _trims(family)[trim])
    written = gguf_backend.export(model, tmp_path / "m.gguf")
    assert GGUFFile(written.path).value("expert_gating_func") == 2  # sigmoid, in the host DeepSeek-V2 shares
    loaded = moeexport.load(written.path)
    # the demo's vocabulary has no BPE pre-tokenizer to tell GLM's files from DeepSeek's: read as DeepSeek-V3,
    # whose transformers model computes as GLM-4.7-Flash's (the logits below)
    assert loaded.config.model_type == "deepseek_v3"
    adapter = adapter_for(loaded.config)
    routing = adapter.model_config(loaded.config).routing
    given = adapter_for(model.config).model_config(model.config).routing
    assert replace(routing, scale=0.0) == replace(given, scale=0.0)  # sigmoid, bias, groups, norm
    assert routing.scale == pytest.approx(given.scale, rel=1e-6)  # stored as a float32
    assert structure(adapter, loaded) == structure(adapter_for(model.config), model)
    tokens = random_tokens(2, 32, seed=3) * 16
    difference = (_logits(loaded, tokens) - _logits(model, tokens)).abs().max().item()
    assert difference <= 1e-4, (family, trim, difference)


def _with_metadata(source, path, changes: dict):
    """A copy of GGUF `source` at `path` with the string fields `changes` set (as another writer would)."""
    import gguf

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(str(path), reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value_type = field.types[0]
        writer.add_key_value(name, changes.get(name, field.contents()), value_type,
                             sub_type=field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("pre,family", [("glm4", "glm4_moe_lite"), ("deepseek-v3", "deepseek_v3")])
def test_the_bpe_pre_tokenizer_tells_glm_4_7_flash_files_from_deepseek_v3_ones(pre, family, tmp_path):
    written = gguf_backend.export(_tiny("glm4_moe_lite"), tmp_path / "m.gguf")
    renamed = _with_metadata(written.path, tmp_path / "pre.gguf", {"tokenizer.ggml.pre": pre})
    assert moeexport.load(renamed).config.model_type == family


def test_a_softmax_gated_deepseek2_gguf_still_reads_as_deepseek_v2(tmp_path):
    written = gguf_backend.export(_tiny("deepseek_v2"), tmp_path / "m.gguf")
    assert moeexport.load(written.path).config.model_type == "deepseek_v2"


@pytest.mark.parametrize("family", SIGMOID_FAMILIES)
def test_a_sigmoid_deepseek2_gguf_to_gguf_trim_runs_in_llama_cpp_as_torch_runs_it(family, tmp_path):
    source = gguf_backend.export(_tiny(family), tmp_path / "in.gguf").path  # f32
    passes = [{"layer_drop": {"n": 1, "score": "random"}},
              {"expert_drop": {"keep": KEEP[family], "scope": "layer", "score": "random"}}]
    calibration = moeexport.CalibrationOptions(source=str(HELD_OUT), samples=4, length=32)
    options = moeexport.BuildOptions(out=str(tmp_path / "out"), calibration=calibration, eval_text=str(HELD_OUT))
    report = moeexport.build(source, {"passes": passes}, "gguf", options)
    assert report.quant == "keep" and report.ok, report.validation
    output = report.artifact["path"]
    assert GGUFFile(output).architecture == "deepseek2" and GGUFFile(output).value("expert_gating_func") == 2
    # the reference: the same trim, in torch, of the model the input file holds
    reference = _compressed(moeexport.load(source), passes)
    windows = random_tokens(2, 48, seed=9) * 16
    fidelity = compare(TorchRunner(reference), gguf_backend.Runner(output, context=48), windows)
    assert fidelity.max_abs_logit <= 1e-3 and fidelity.top1_agreement == 1.0, fidelity
    codes = carried_codes(source, output)
    stacks = [name for name in codes if "_exps" in name or name.endswith("ffn_gate_inp.weight")]
    assert stacks and all(codes[name] in ("carried", "zeros") for name in stacks), codes  # each expert's bytes
    assert GGUFFile(output).tensors[stacks[0]].shape[0] == KEEP[family]
