"""GGUF input for the families whose files need more than the plain reader: gpt-oss (biases, sinks, sliding
windows, YaRN, interleaved gate/up, MXFP4 experts carried byte for byte) and sigmoid-gated deepseek2 files
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
from moeexport.errors import MoeExportError
from moeexport.recipe import parse_recipe
from moeexport.validate import TorchRunner, compare
from tests.test_gguf_input import HELD_OUT, _tiny
from tests.tiny_models import random_tokens, tiny_model

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


def _trim_gguf(source, passes, out):
    """GGUF -> GGUF: `passes` on the model file `source` holds, every tensor kept carried (--quant keep)."""
    calibration = moeexport.CalibrationOptions(source=str(HELD_OUT), samples=4, length=32)
    options = moeexport.BuildOptions(out=str(out), calibration=calibration, eval_text=str(HELD_OUT))
    report = moeexport.build(source, {"passes": passes}, "gguf", options)
    assert report.quant == "keep" and report.ok, report.validation
    return report.artifact["path"]


def _assert_llama_cpp_runs_the_trim_as_torch(source, passes, output):
    """llama.cpp's logits on `output` are torch's of the same trim of the model read from `source`."""
    reference = _compressed(moeexport.load(source), passes)
    windows = random_tokens(2, 48, seed=9) * 16  # 48 tokens: past gpt-oss's tiny sliding window of 8
    fidelity = compare(TorchRunner(reference), gguf_backend.Runner(output, context=48), windows)
    assert fidelity.max_abs_logit <= 1e-3 and fidelity.top1_agreement == 1.0, fidelity
    return fidelity


def _copied(source, path, metadata: dict | None = None, dequantize: bool = False):
    """A copy of GGUF `source` at `path` (as another writer would write it) with the string fields `metadata` set,
    or with every quantized tensor dequantized to F32 by gguf-py."""
    import gguf

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(str(path), reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value_type = field.types[0]
        writer.add_key_value(name, (metadata or {}).get(name, field.contents()), value_type,
                             sub_type=field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        data, kind = np.array(tensor.data), tensor.tensor_type
        if dequantize and kind not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data, kind = gguf.quants.dequantize(data, kind), gguf.GGMLQuantizationType.F32
        writer.add_tensor(tensor.name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- gpt-oss ------------------------------------------------------------------------------------------------------

# (files moeexport writes for gpt-oss read back exactly: tests/test_gguf_input.py, its full and trimmed cases)


def _mxfp4_checkpoint(directory):
    """The tiny gpt-oss with its experts as hub MXFP4 pairs (random codes), the demo's tokenizer beside it."""
    from moeexport.checkpoint_files import DEMO_MODEL
    from tests.test_family_gpt_oss import _mxfp4_checkpoint

    source = _mxfp4_checkpoint(directory, vocab_size=2048)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        (source / name).write_bytes((DEMO_MODEL / name).read_bytes())
    return source


def _moeexport_s_mxfp4_gguf(checkpoint, path):
    """moeexport's gpt-oss GGUF of `checkpoint`: its experts' MXFP4 codes carried, every other tensor F32."""
    from moeexport.modelio import load_streamed

    return gguf_backend.export(load_streamed(checkpoint), path, quant="q8_0",
                               tensor_types={r"^(?!.*_exps\.weight)": "f32"}).path


def _converter_s_mxfp4_gguf(checkpoint, path):
    """llama.cpp's convert_hf_to_gguf.py's file of `checkpoint` (F32; the experts repacked as MXFP4)."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_family_gpt_oss import CONVERTER_WITH_SENTENCEPIECE

    spec = importlib.util.spec_from_file_location("compare_with_converter",
                                                  Path(__file__).parents[1] / "tools" / "compare_with_converter.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tree = tool.fetch_converter(path.parent / "converter")
    script = path.parent / "convert.py"
    script.write_text(CONVERTER_WITH_SENTENCEPIECE)
    subprocess.run([sys.executable, str(script), str(tree), str(checkpoint), "--outtype", "f32", "--outfile",
                    str(path)], env=os.environ | {"PYTHONPATH": str(tree / "gguf-py")}, check=True, capture_output=True)
    return path


@pytest.mark.parametrize("writer", [_moeexport_s_mxfp4_gguf, _converter_s_mxfp4_gguf], ids=["ours", "converter"])
def test_an_mxfp4_gpt_oss_gguf_trimmed_to_gguf_carries_the_kept_experts_mxfp4_bytes(writer, tmp_path):
    import gguf
    from gguf import GGMLQuantizationType, GGUFReader

    checkpoint = _mxfp4_checkpoint(tmp_path / "mxfp4")
    source = writer(checkpoint, tmp_path / "in.gguf")
    # read back, it is the model transformers makes of the hub checkpoint (its MXFP4 dequantized)
    tokens = random_tokens(2, 32, seed=3) * 16
    read_back = (_logits(moeexport.load(source), tokens) - _logits(moeexport.load(checkpoint), tokens)).abs().max()
    assert read_back <= 1e-4, read_back
    passes = [{"block_drop": {"n": 1, "score": "random", "repair": "none"}},  # a refit is rewritten, not carried
              {"expert_drop": {"keep": 3, "scope": "layer", "score": "random", "repair": "none"}}]
    output = _trim_gguf(source, passes, tmp_path / "out")
    given = {tensor.name: tensor for tensor in GGUFReader(source).tensors}
    made = {tensor.name: tensor for tensor in GGUFReader(output).tensors}
    assert len(given) > len(made)  # a block fewer
    mxfp4 = [name for name in made if name.endswith("_exps.weight")]
    assert len(mxfp4) == 9 and all(given[name].tensor_type == GGMLQuantizationType.MXFP4 for name in mxfp4)
    for name in mxfp4:
        assert made[name].tensor_type == GGMLQuantizationType.MXFP4, name
        output_experts = np.asarray(made[name].data).reshape(3, -1)
        # the block it came from: Block Drop renumbers, so find it among the input's stacks of that kind
        kind = name.split(".", 2)[-1]
        matches = []
        for other in (n for n in given if n.endswith(kind)):
            input_experts = np.asarray(given[other].data).reshape(4, -1)
            slots = [next((e for e in range(4) if np.array_equal(input_experts[e], row)), None)
                     for row in output_experts]
            if None not in slots:
                matches.append(slots)
        assert len(matches) == 1 and len(set(matches[0])) == 3, (name, matches)  # 3 distinct experts' bytes
    # the torch model of the same trim (read from the input) holds exactly what those bytes decode to
    reference = _compressed(moeexport.load(source), passes)
    for view in adapter_for(reference.config).layer_views(reference):
        rows = view.experts.gate_up_proj.transpose(1, 2)
        for kind, weights in (("ffn_gate_exps", rows[:, 0::2]), ("ffn_up_exps", rows[:, 1::2]),
                              ("ffn_down_exps", view.experts.down_proj.transpose(1, 2))):
            tensor = made[f"blk.{view.index}.{kind}.weight"]
            decoded = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
            assert np.array_equal(decoded, weights.numpy()), (view.index, kind)
    # llama.cpp runs the file's structure exactly (its MXFP4 decoded to F32 beside it: on MXFP4 its CPU kernels
    # round the activations to 8 bits), and the MXFP4 file itself closely
    _assert_llama_cpp_runs_the_trim_as_torch(source, passes, _copied(output, tmp_path / "f32.gguf", dequantize=True))
    fidelity = compare(TorchRunner(reference), gguf_backend.Runner(output, context=48), random_tokens(2, 48) * 16)
    assert fidelity.kl < 1e-2, fidelity


def test_an_in_memory_mxfp4_gpt_oss_carries_its_unchanged_experts_mxfp4_codes(tmp_path):
    from gguf import GGMLQuantizationType, GGUFReader
    from safetensors.numpy import load_file

    from moeexport.adapters.surgery import keep_experts
    from tests.test_family_gpt_oss import expected_mxfp4_stacks

    checkpoint = _mxfp4_checkpoint(tmp_path / "mxfp4")
    model = moeexport.load(checkpoint)  # in memory: the experts dequantized
    keep = {0: [3, 1, 0], 1: [0, 1, 2], 2: [2, 3, 0], 3: [1, 2, 3]}
    for layer, kept in keep.items():
        keep_experts(adapter_for(model.config), model, layer, kept)
    with torch.no_grad():  # as a pass that rewrites an expert would: its layer's experts are no longer the codes
        model.model.layers[2].mlp.experts.down_proj[1, 0, 0] += 1.0
    tensors = {tensor.name: tensor for tensor in GGUFReader(
        gguf_backend.export(model, tmp_path / "m.gguf", quant="q8_0").path).tensors}
    stored = load_file(checkpoint / "model.safetensors")
    for layer, kept in keep.items():
        expected = expected_mxfp4_stacks(stored, layer, kept)
        for kind, experts in expected.items():
            tensor = tensors[f"blk.{layer}.{kind}.weight"]
            if layer == 2:
                assert tensor.tensor_type == GGMLQuantizationType.Q8_0, kind  # written from the weights
                continue
            assert tensor.tensor_type == GGMLQuantizationType.MXFP4, (layer, kind)
            assert np.array_equal(np.asarray(tensor.data).reshape(3, -1), np.stack(experts).reshape(3, -1))


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


@pytest.mark.parametrize("pre,family", [("glm4", "glm4_moe_lite"), ("deepseek-v3", "deepseek_v3")])
def test_the_bpe_pre_tokenizer_tells_glm_4_7_flash_files_from_deepseek_v3_ones(pre, family, tmp_path):
    written = gguf_backend.export(_tiny("glm4_moe_lite"), tmp_path / "m.gguf")
    renamed = _copied(written.path, tmp_path / "pre.gguf", {"tokenizer.ggml.pre": pre})
    assert moeexport.load(renamed).config.model_type == family


def test_a_softmax_gated_deepseek2_gguf_still_reads_as_deepseek_v2(tmp_path):
    written = gguf_backend.export(_tiny("deepseek_v2"), tmp_path / "m.gguf")
    assert moeexport.load(written.path).config.model_type == "deepseek_v2"


@pytest.mark.parametrize("family", SIGMOID_FAMILIES)
def test_a_sigmoid_deepseek2_gguf_to_gguf_trim_runs_in_llama_cpp_as_torch_runs_it(family, tmp_path):
    source = gguf_backend.export(_tiny(family), tmp_path / "in.gguf").path  # f32
    # unrepaired: the torch reference trims on its own, and a refit on other calibration tokens would differ
    passes = [{"layer_drop": {"n": 1, "score": "random", "repair": "none"}},
              {"expert_drop": {"keep": KEEP[family], "scope": "layer", "score": "random", "repair": "none"}}]
    output = _trim_gguf(source, passes, tmp_path / "out")
    assert GGUFFile(output).architecture == "deepseek2" and GGUFFile(output).value("expert_gating_func") == 2
    _assert_llama_cpp_runs_the_trim_as_torch(source, passes, output)
    codes = carried_codes(source, output)
    stacks = [name for name in codes if "_exps" in name or name.endswith("ffn_gate_inp.weight")]
    assert stacks and all(codes[name] in ("carried", "zeros") for name in stacks), codes  # each expert's bytes
    assert GGUFFile(output).tensors[stacks[0]].shape[0] == KEEP[family]


# --- YaRN in deepseek2 -----------------------------------------------------------------------------------------------

def _with_rope(family: str, rope_parameters: dict | None = None):
    """The tiny `family` model (the demo's vocabulary) with `rope_parameters`; the same weights whatever they are."""
    from moeexport.checkpoint_files import DEMO_MODEL

    model = tiny_model(family, vocab_size=2048, **({"rope_parameters": rope_parameters} if rope_parameters else {}))
    model.config.name_or_path = str(DEMO_MODEL)
    return model


def _yarn(mscale: float, mscale_all_dim: float) -> dict:
    """DeepSeek-V3's hub YaRN (mscale = mscale_all_dim = 1; DeepSeek-V2-Lite's 0.707), over a tiny original context
    that the test windows outrun."""
    return {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": mscale, "mscale_all_dim": mscale_all_dim}


@pytest.mark.parametrize("family,mscale", [("deepseek_v3", 1.0), ("glm4_moe_lite", 0.707)])
def test_deepseek2_with_yarn_runs_in_llama_cpp_as_in_torch_and_reads_back(family, mscale, tmp_path):
    model = _with_rope(family, _yarn(mscale, mscale))
    written = gguf_backend.export(model, tmp_path / "m.gguf")
    file = GGUFFile(written.path)
    assert file.value("rope.scaling.type") == "yarn"
    assert file.value("rope.scaling.yarn_log_multiplier") == pytest.approx(0.1 * mscale)  # the converter's key
    windows = random_tokens(2, 48, seed=9) * 16
    fidelity = compare(TorchRunner(model), gguf_backend.Runner(written.path, context=48), windows)
    assert fidelity.max_abs_logit <= 1e-3 and fidelity.top1_agreement == 1.0, fidelity
    unscaled = _with_rope(family)
    unscaled.load_state_dict(model.state_dict())  # (tiny_model's seed makes them equal already)
    assert (_logits(unscaled, windows) - _logits(model, windows)).abs().max() > 1e-2  # YaRN matters here
    loaded = moeexport.load(written.path)
    assert loaded.config.rope_parameters["rope_type"] == "yarn"
    assert loaded.config.rope_parameters["mscale_all_dim"] == pytest.approx(mscale, rel=1e-6)
    assert (_logits(loaded, windows) - _logits(model, windows)).abs().max() <= 1e-4


def test_deepseek2_refuses_a_yarn_that_llama_cpp_would_scale_otherwise(tmp_path):
    model = _with_rope("deepseek_v3", _yarn(1.0, 0.707))  # HF: attention_factor 1.0 / 0.707-mscale
    with pytest.raises(MoeExportError, match="takes YaRN's mscale equal to mscale_all_dim"):
        gguf_backend.export(model, tmp_path / "m.gguf")
