"""gpt-oss: read, compressed by every pass (or refused by name), and written in llama.cpp's own gpt-oss
architecture, checked against transformers' own model of what moeexport saved."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import moeexport
from moeexport.adapters import adapter_for
from moeexport.adapters.surgery import keep_experts, structure
from moeexport.backends import gguf as gguf_backend
from moeexport.calibration.observers import observe
from moeexport.checkpoint_files import DEMO_MODEL
from moeexport.compress import compress
from moeexport.errors import MoeExportError
from moeexport.modelio import EXPERTS_IMPLEMENTATION, load, load_streamed
from moeexport.recipe import parse_recipe
from moeexport.validate import TorchRunner, compare
from tests import family_checks as checks
from tests.tiny_models import random_tokens, tiny_model

TRIMMED = [{"block_drop": {"n": 1, "score": "random"}}, {"expert_drop": {"keep": 3, "score": "random"}}]


def _with_demo_vocabulary(**overrides):
    """The tiny gpt-oss with the demo model's tokenizer beside it (for GGUF files, which carry a vocabulary)."""
    model = tiny_model("gpt_oss", vocab_size=2048, **overrides)
    model.config.name_or_path = str(DEMO_MODEL)
    return model


def _windows() -> torch.Tensor:
    return random_tokens(2, 48, seed=9) * 16  # 48 tokens: far past the sliding window of 8


def _assert_exact(reference, artifact):
    fidelity = compare(TorchRunner(reference), gguf_backend.Runner(artifact.path, context=48), _windows())
    assert fidelity.max_abs_logit <= 1e-3 and fidelity.top1_agreement == 1.0, fidelity
    return fidelity


# --- reading, the passes --------------------------------------------------------------------------------------------

def test_a_saved_gpt_oss_loads_and_its_sliding_window_and_sinks_matter(tmp_path):
    model = tiny_model("gpt_oss")
    model.save_pretrained(tmp_path)
    tokens = random_tokens(2, 24)
    loaded = load(tmp_path)
    assert torch.equal(checks.logits(loaded, tokens), checks.logits(model, tokens))
    for change in ({"sliding_window": 64}, {"sinks": 0.0}):  # both change the tiny model's output
        other = copy.deepcopy(model)
        if "sinks" in change:
            for layer in other.model.layers:
                layer.self_attn.sinks.data.zero_()
        else:
            other.config.sliding_window = change["sliding_window"]
            for layer in other.model.layers:
                if layer.self_attn.sliding_window is not None:
                    layer.self_attn.sliding_window = change["sliding_window"]
        assert (checks.logits(other, tokens) - checks.logits(model, tokens)).abs().max() > 1e-3, change


def test_block_drop_takes_each_layer_s_attention_kind_with_it(tmp_path):
    model = tiny_model("gpt_oss")
    before = list(model.config.layer_types)
    result = compress(model, parse_recipe({"passes": [{"block_drop": {"n": 1, "score": "random"}}]}), checks.tiny_statistics_provider())
    kept = [old for old, new in enumerate(result.new_block_index) if new is not None]
    assert model.config.layer_types == [before[old] for old in kept]
    assert [layer.self_attn.sliding_window is not None for layer in model.model.layers] == [
        kind == "sliding_attention" for kind in model.config.layer_types]
    saved = moeexport.save(model, tmp_path / "out", result.manifest())
    stock = AutoModelForCausalLM.from_pretrained(saved, experts_implementation=EXPERTS_IMPLEMENTATION).eval()
    tokens = random_tokens(2, 24)
    assert torch.equal(checks.logits(stock, tokens), checks.logits(model, tokens))


def test_expert_drop_slices_the_router_bias_and_the_expert_biases_with_their_experts():
    model = tiny_model("gpt_oss")
    original = copy.deepcopy(model)
    adapter = adapter_for(model.config)
    keep_experts(adapter, model, 1, [3, 1])
    view, before = adapter.layer_view(model, 1), adapter.layer_view(original, 1)
    index = torch.tensor([3, 1])
    for now, then in ((view.router.weight, before.router.weight), (view.router.bias, before.router.bias),
                      (view.experts.gate_up_proj, before.experts.gate_up_proj),
                      (view.experts.gate_up_proj_bias, before.experts.gate_up_proj_bias),
                      (view.experts.down_proj, before.experts.down_proj),
                      (view.experts.down_proj_bias, before.experts.down_proj_bias)):
        assert torch.equal(now, then[index])
    # the layer now routes as the original would with experts 0 and 2 masked out
    hidden = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    logits = before.router(hidden)[0]
    masked = logits.clone()
    masked[:, [0, 2]] = float("-inf")
    top, chosen = masked.topk(2, dim=-1)
    expected = torch.zeros_like(hidden)
    for slot in range(2):
        one = before.experts(hidden, chosen[:, slot:slot + 1], torch.ones(16, 1))
        expected += top.softmax(-1)[:, slot:slot + 1] * one
    with torch.no_grad():
        got, _ = view.ffn(hidden[None])
    torch.testing.assert_close(got[0], expected, rtol=0, atol=1e-6)


def test_reap_weighs_each_expert_by_the_softmax_over_the_top_k_gpt_oss_mixes_with():
    model = tiny_model("gpt_oss")
    tokens = random_tokens(4, 16)
    statistics = observe(model, tokens, key="k", calibration={}, batch_size=8)
    layer = adapter_for(model.config).layer_view(model, 2)
    seen = {}
    handle = layer.router.register_forward_hook(lambda module, args, output: seen.update(x=args[0], out=output))
    checks.logits(model, tokens)
    handle.remove()
    _, weights, index = seen["out"]  # the router's own mixing weights: a softmax over its top-k logits
    x = seen["x"]
    for expert in range(4):
        rows, slot = torch.where(index == expert)
        alone = layer.experts(x[rows], torch.full((len(rows), 1), expert), torch.ones(len(rows), 1))
        expected = (weights[rows, slot].double() * alone.double().norm(dim=-1)).mean()
        assert statistics.layers[2].reap[expert] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("step, message", [
    ({"merge": {"keep": 2}}, "gpt-oss: experts cannot be merged.*router's bias.*use Expert Drop"),
    ({"expert_drop": {"keep": 2, "repair": "refit"}}, "repair: refit cannot apply: the rebuild writes bias-free experts.*gpt-oss.*repair: none"),
])
def test_merge_and_expert_refit_refuse_gpt_oss_experts_by_name(step, message):
    with pytest.raises(MoeExportError, match=message):
        compress(tiny_model("gpt_oss"), parse_recipe({"passes": [step]}), checks.tiny_statistics_provider())


def test_layer_and_block_refit_work_on_gpt_oss_attention():
    model = tiny_model("gpt_oss")
    recipe = parse_recipe({"passes": [{"layer_drop": {"n": 1, "repair": "refit"}},
                                      {"block_drop": {"n": 1, "repair": "refit"}}]})
    result = compress(model, recipe, checks.tiny_statistics_provider())
    errors = [step.plan.repair_error for step in result.steps]
    assert all(after <= before for plan_errors in errors for before, after in plan_errors.values())
    assert torch.isfinite(checks.logits(model, random_tokens(2, 16))).all()


# --- GGUF: llama.cpp's gpt-oss ----------------------------------------------------------------------------------------

def _saved_source(directory: Path) -> Path:
    """The tiny gpt-oss as save_pretrained writes it, with the demo model's tokenizer beside it."""
    return checks.saved_with_demo_tokenizer(_with_demo_vocabulary(), directory)


@pytest.mark.parametrize("passes", [[], TRIMMED], ids=["full", "trimmed"])
def test_gguf_matches_transformers_own_model_of_the_saved_compressed_checkpoint(passes, tmp_path):
    report = checks.build_f32_gguf(_saved_source(tmp_path / "source"), passes, tmp_path / "out")
    assert report.ok and report.artifact["path"].endswith(".gguf")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "compressed",
                                                 experts_implementation=EXPERTS_IMPLEMENTATION).eval()
    assert stock.config.num_hidden_layers == 4 - len(passes[:1])
    assert stock.config.num_local_experts == (3 if passes else 4)
    artifact = gguf_backend.GGUFExport(path=tmp_path / "out" / report.artifact["path"].rpartition("/")[2],
                                       architecture="gpt-oss", quant="f32", representation="")
    _assert_exact(stock, artifact)


def test_a_streamed_build_writes_the_in_memory_build_s_files_byte_for_byte(tmp_path):
    source = _saved_source(tmp_path / "source")
    passes = [{"block_drop": {"n": 1}}, {"layer_drop": {"n": 1}},
              {"expert_drop": {"keep": 3, "scope": "global", "score": "reap", "min_keep": 2}}]
    whole, streamed = (checks.build_f32_gguf(source, passes, tmp_path / f"stream-{stream}", stream) for stream in (False, True))
    assert whole.ok and streamed.ok and streamed.compression.memory["streamed"]
    assert whole.compression.passes == streamed.compression.passes
    assert whole.artifact["files"].keys() == streamed.artifact["files"].keys()
    for name in whole.artifact["files"]:  # the GGUF
        digests = {hashlib.sha256((Path(out) / name).read_bytes()).hexdigest() for out in (whole.out, streamed.out)}
        assert len(digests) == 1, name
    # the compressed checkpoints (a streamed save is sharded): the same tensors
    saved = [load(Path(report.out) / "compressed").state_dict() for report in (whole, streamed)]
    assert saved[0].keys() == saved[1].keys() and all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])


@pytest.mark.parametrize("passes", [[{"expert_drop": {"keep": 3, "scope": "layer", "score": "random"}}],
                                    [{"layer_drop": {"n": 1, "score": "random"}},
                                     {"expert_drop": {"keep": 2, "scope": "layer", "score": "random"}}]],
                         ids=["stock", "manifest"])
def test_a_streamed_save_holds_the_expert_biases_and_loads_to_the_in_memory_model(passes, tmp_path):
    tiny_model("gpt_oss").save_pretrained(tmp_path / "source")
    saved = []
    for loader in (load, load_streamed):
        lm = loader(tmp_path / "source")
        compress(lm, parse_recipe({"passes": passes}), checks.tiny_statistics_provider())
        saved.append(load(moeexport.save(lm, tmp_path / loader.__name__, {})))
    tokens = random_tokens(2, 24)
    assert torch.equal(checks.logits(saved[0], tokens), checks.logits(saved[1], tokens))
    assert (tmp_path / "load_streamed" / "model.safetensors.index.json").is_file() == (len(passes) == 1)


def test_layer_drop_is_written_as_all_zero_experts_exactly(tmp_path):
    model = _with_demo_vocabulary()
    compress(model, parse_recipe({"passes": [{"layer_drop": {"n": 1, "score": "random"}}]}), None)
    dropped = next(i for i, spec in enumerate(structure(adapter_for(model.config), model)) if spec.kind == "dropped")
    artifact = gguf_backend.export(model, tmp_path / "m.gguf")
    assert artifact.architecture == "gpt-oss" and f"zero experts for MoE-less layers [{dropped}]" in artifact.representation
    _assert_exact(model, artifact)
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(artifact.path).tensors}
    assert all(not np.any(tensors[f"blk.{dropped}.{kind}.weight"].data) for kind in ("ffn_gate_exps", "ffn_up_exps",
                                                                                    "ffn_down_exps"))


def test_non_uniform_expert_counts_are_padded_in_gpt_oss_itself_exactly(tmp_path):
    model = _with_demo_vocabulary()
    adapter = adapter_for(model.config)
    for layer, keep in enumerate([[0, 1, 2], [3], [0, 1], [0, 1, 2, 3]]):  # one layer below the top-2
        keep_experts(adapter, model, layer, keep)
    artifact = gguf_backend.export(model, tmp_path / "m.gguf")
    assert artifact.architecture == "gpt-oss" and "never-selected pads" in artifact.representation
    _assert_exact(model, artifact)


def test_a_model_left_with_no_sliding_layer_still_loads_and_matches(tmp_path):
    model = _with_demo_vocabulary()
    from moeexport.adapters.surgery import drop_blocks

    drop_blocks(adapter_for(model.config), model, [0, 2])  # the two sliding-window layers
    assert model.config.layer_types == ["full_attention", "full_attention"]
    _assert_exact(model, gguf_backend.export(model, tmp_path / "m.gguf"))


def test_yarn_without_truncation_is_exported_and_the_difference_is_reported(tmp_path):
    rope = dict(tiny_model("gpt_oss").config.rope_parameters, truncate=False)
    model = _with_demo_vocabulary(rope_parameters=rope)
    artifact = gguf_backend.export(model, tmp_path / "m.gguf")
    assert any("truncate: false" in line for line in artifact.fallbacks)
    fidelity = compare(TorchRunner(model), gguf_backend.Runner(artifact.path, context=48), _windows())
    assert 1e-4 < fidelity.max_abs_logit < 0.1  # llama.cpp rounds the correction range: close, not exact


def test_a_router_rule_gpt_oss_s_host_does_not_compute_is_refused(tmp_path):
    model = _with_demo_vocabulary(swiglu_limit=5.0)  # llama.cpp's graph fixes the limit at 7
    with pytest.raises(MoeExportError, match="gpt-oss computes a clamped SwiGLU \\(alpha 1.702, limit 7.0\\)"):
        gguf_backend.export(model, tmp_path / "m.gguf")


# --- ONNX: QMoE int4 ----------------------------------------------------------------------------------------------------

def test_qmoe_int4_carries_the_quantize_pass_s_grid_of_gpt_oss_experts_exactly(tmp_path):
    """The quantize pass rounds gpt-oss's transposed stacks along their inputs, QMoE's blocks run along its
    weights' inputs: the codes and scales carry over, so the int4 graph computes the quantized model."""
    from moeexport.backends import onnx as onnx_backend
    from moeexport.quantization import weight_grid

    model = tiny_model("gpt_oss", intermediate_size=32)  # QMoE blocks of 16 divide both widths
    compress(model, parse_recipe({"passes": [{"quantize": {"method": "rtn", "bits": 4, "group_size": 16}}]}), None)
    tokens = random_tokens(2, 24)
    artifact = onnx_backend.export(model, tmp_path / "m.onnx", quant="int4", block_size=16,
                                   weight_grid=weight_grid(model))
    fidelity = compare(TorchRunner(model), onnx_backend.Runner(artifact.path), tokens)
    assert fidelity.max_abs_logit <= 1e-4 and fidelity.top1_agreement == 1.0, fidelity
    requantized = onnx_backend.export(tiny_model("gpt_oss", intermediate_size=32), tmp_path / "r.onnx",
                                      quant="int4", block_size=16)  # the unquantized model, rounded by the export
    assert compare(TorchRunner(tiny_model("gpt_oss", intermediate_size=32)), onnx_backend.Runner(requantized.path),
                   tokens).kl < 0.05


@pytest.mark.parametrize("moe_ops", ["plain", "plain-routed"])
def test_the_plain_gpt_oss_graph_is_one_tensorrt_s_parser_takes(moe_ops, tmp_path):
    """Sinks, sliding-window masks, the clamped SwiGLU and top-k softmax in ops TensorRT 10 imports (matching
    torch: tests/test_onnx.py's every-family test)."""
    from moeexport.backends import onnx as onnx_backend
    from moeexport.backends.tensorrt.support import check_onnx

    artifact = onnx_backend.export(tiny_model("gpt_oss"), tmp_path / "m.onnx", moe_ops=moe_ops)
    assert check_onnx(artifact.path) == []


# --- MXFP4 experts, as the hub stores them --------------------------------------------------------------------------

def _mxfp4_checkpoint(directory: Path, vocab_size: int = 128) -> Path:
    """The tiny gpt-oss with its expert stacks as hub MXFP4 pairs (random codes and scales), as transformers'
    integrations/mxfp4.py lays them out: `*_blocks` [E, N, K / 32, 16], `*_scales` [E, N, K / 32]."""
    import json

    from safetensors.torch import load_file, save_file

    tiny_model("gpt_oss", intermediate_size=32, vocab_size=vocab_size).save_pretrained(directory)  # whole blocks
    weights = load_file(directory / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for name in [name for name in weights if name.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, inputs, outputs = weights.pop(name).shape
        weights[name + "_blocks"] = torch.randint(0, 256, (experts, outputs, inputs // 32, 16), dtype=torch.uint8,
                                                  generator=generator)
        weights[name + "_scales"] = torch.randint(121, 126, (experts, outputs, inputs // 32), dtype=torch.uint8,
                                                  generator=generator)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_mxfp4_experts_are_read_dequantized_as_transformers_dequantizes_them_streamed_too(tmp_path):
    from safetensors.torch import load_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from moeexport.streaming import logits

    source = _mxfp4_checkpoint(tmp_path / "mxfp4")
    model = load(source)
    stored = load_file(source / "model.safetensors")
    for index, layer in enumerate(model.model.layers):
        for stack in ("gate_up_proj", "down_proj"):
            prefix = f"model.layers.{index}.mlp.experts.{stack}"
            expected = convert_moe_packed_tensors(stored[prefix + "_blocks"], stored[prefix + "_scales"],
                                                  dtype=torch.float32)
            assert torch.equal(getattr(layer.mlp.experts, stack), expected), prefix
    assert getattr(model.config, "quantization_config", None) is None  # what is saved is not MXFP4
    tokens = random_tokens(2, 24)
    assert np.array_equal(logits(load_streamed(source), tokens), checks.logits(model, tokens).numpy())


@pytest.mark.parametrize("loader", [load, load_streamed])
def test_an_mxfp4_checkpoint_compressed_saves_one_stock_transformers_loads(loader, tmp_path):
    source = _mxfp4_checkpoint(tmp_path / "mxfp4")
    model = loader(source)
    compress(model, parse_recipe({"passes": [{"expert_drop": {"keep": 3, "scope": "layer", "score": "random"}}]}),
             checks.tiny_statistics_provider())
    saved = moeexport.save(model, tmp_path / "out", {})
    stock = AutoModelForCausalLM.from_pretrained(saved, experts_implementation=EXPERTS_IMPLEMENTATION).eval()
    reference = load(source)
    compress(reference, parse_recipe({"passes": [{"expert_drop": {"keep": 3, "scope": "layer",
                                                                  "score": "random"}}]}), checks.tiny_statistics_provider())
    tokens = random_tokens(2, 24)
    assert stock.config.num_local_experts == 3
    assert torch.equal(checks.logits(stock, tokens), checks.logits(reference, tokens))


def test_a_streamed_build_of_an_mxfp4_checkpoint_writes_a_gguf_that_matches(tmp_path):
    source = _mxfp4_checkpoint(tmp_path / "mxfp4", vocab_size=2048)  # the demo tokenizer's
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        (source / name).write_bytes((DEMO_MODEL / name).read_bytes())
    report = checks.build_f32_gguf(source, TRIMMED[1:], tmp_path / "out", stream=True)
    assert report.ok and report.compression.memory["streamed"], report.failures
    assert report.validation["max_abs_logit"] <= 1e-3 and report.validation["top1_agreement"] == 1.0


def test_the_memory_plan_sizes_an_mxfp4_checkpoint_as_the_model_it_dequantizes_to(tmp_path):
    from moeexport.checkpoint_files import read_headers
    from moeexport.memory import checkpoint_sizes

    packed = _mxfp4_checkpoint(tmp_path / "mxfp4")
    load(packed).save_pretrained(tmp_path / "floats")
    sizes = [checkpoint_sizes(read_headers([directory / "model.safetensors"]))
             for directory in (packed, tmp_path / "floats")]
    assert sizes[0] == sizes[1] and sizes[0][0][0].expert > 0  # an expert read at a time, not a resident layer


def _ggml_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The hub's MXFP4 rows (blocks [N, G, 16]: inputs 2j, 2j + 1 in byte j's low, high nibble; scales [N, G])
    as ggml's block_mxfp4 bytes [N, G * 17]: the scale, then inputs j and j + 16 in byte j's low and high nibble."""
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    return np.concatenate([scales[..., None], qs], axis=-1).reshape(blocks.shape[0], -1).astype(np.uint8)


def expected_mxfp4_stacks(stored: dict, layer: int, kept: list[int]) -> dict[str, list]:
    """GGML MXFP4 bytes of layer `layer`'s kept experts, per GGUF stack, from the checkpoint's `stored` hub tensors
    (gate and up are the interleaved stack's even and odd rows)."""
    gate_up, down = (f"model.layers.{layer}.mlp.experts.{stack}" for stack in ("gate_up_proj", "down_proj"))
    return {
        "ffn_gate_exps": [_ggml_mxfp4(stored[gate_up + "_blocks"][e, 0::2], stored[gate_up + "_scales"][e, 0::2])
                          for e in kept],
        "ffn_up_exps": [_ggml_mxfp4(stored[gate_up + "_blocks"][e, 1::2], stored[gate_up + "_scales"][e, 1::2])
                        for e in kept],
        "ffn_down_exps": [_ggml_mxfp4(stored[down + "_blocks"][e], stored[down + "_scales"][e]) for e in kept],
    }


def test_mxfp4_experts_go_into_the_gguf_as_the_same_mxfp4_bytes(tmp_path):
    from gguf import GGMLQuantizationType, GGUFReader
    from safetensors.numpy import load_file

    source = _mxfp4_checkpoint(tmp_path / "mxfp4", vocab_size=2048)
    model = load_streamed(source)
    model.config.name_or_path = str(DEMO_MODEL)  # a vocabulary for the file
    keep = {0: [3, 1, 0], 1: [0, 1, 2], 2: [2, 3, 0], 3: [1, 2, 3]}
    adapter = adapter_for(model.config)
    for layer, kept in keep.items():
        keep_experts(adapter, model, layer, kept)
    artifact = gguf_backend.export(model, tmp_path / "m.gguf", quant="q8_0")
    tensors = {tensor.name: tensor for tensor in GGUFReader(artifact.path).tensors}
    stored = load_file(source / "model.safetensors")
    for layer, kept in keep.items():
        expected = expected_mxfp4_stacks(stored, layer, kept)
        for kind, experts in expected.items():
            tensor = tensors[f"blk.{layer}.{kind}.weight"]
            assert tensor.tensor_type == GGMLQuantizationType.MXFP4
            assert np.array_equal(np.asarray(tensor.data).reshape(len(kept), -1), np.stack(experts).reshape(len(kept), -1))
    assert tensors["blk.0.attn_q.weight"].tensor_type == GGMLQuantizationType.Q8_0  # the rest as asked
    reference = load(source)
    for layer, kept in keep.items():
        keep_experts(adapter_for(reference.config), reference, layer, kept)
    from gguf import quants

    for layer in keep:  # gguf-py's reading of those bytes is the model's own weights, exactly
        experts = adapter_for(reference.config).layer_view(reference, layer).experts
        rows = experts.gate_up_proj.transpose(1, 2)
        for kind, weights in (("ffn_gate_exps", rows[:, 0::2]), ("ffn_up_exps", rows[:, 1::2]),
                              ("ffn_down_exps", experts.down_proj.transpose(1, 2))):
            tensor = tensors[f"blk.{layer}.{kind}.weight"]
            assert np.array_equal(quants.dequantize(np.asarray(tensor.data), tensor.tensor_type), weights.numpy())
    fidelity = compare(TorchRunner(reference), gguf_backend.Runner(artifact.path, context=24),
                       random_tokens(2, 24) * 16)
    assert fidelity.kl < 1e-2, fidelity  # llama.cpp runs it (int8 activations and q8_0 attention: not exact)


# --- the same file as llama.cpp's converter -------------------------------------------------------------------------

CONVERTER_WITH_SENTENCEPIECE = """
import runpy, sys
tree = sys.argv.pop(1)
sys.path[:0] = [tree, tree + "/gguf-py"]
from conversion import gpt_oss
gpt_oss.GptOssModel.set_vocab = lambda self: self._set_vocab_sentencepiece()  # the demo tokenizer is SentencePiece
sys.argv[0] = tree + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_our_f16_gguf_is_llama_cpp_s_converter_s_file_tensor_for_tensor(tmp_path):
    """Same tensors (names, types, shapes, bytes) and keys as llama.cpp's convert_hf_to_gguf.py writes for the
    checkpoint, but for the differences listed here (its vocabulary read as SentencePiece, the demo's)."""
    import importlib.util
    import os
    import subprocess
    import sys

    from gguf import GGUFReader

    spec = importlib.util.spec_from_file_location("compare_with_converter",
                                                  Path(__file__).parents[1] / "tools" / "compare_with_converter.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tree = tool.fetch_converter(tmp_path)
    source = _saved_source(tmp_path / "tiny")
    model = load(source)
    ours = gguf_backend.export(model, tmp_path / "ours.gguf", quant="f16").path
    theirs = tmp_path / "theirs.gguf"
    script = tmp_path / "convert.py"
    script.write_text(CONVERTER_WITH_SENTENCEPIECE)
    subprocess.run([sys.executable, str(script), str(tree), str(source), "--outtype", "f16", "--outfile", str(theirs)],
                   env=os.environ | {"PYTHONPATH": str(tree / "gguf-py")}, check=True, capture_output=True)
    files = [GGUFReader(path) for path in (ours, theirs)]
    keys = [{k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")} for r in files]
    tensors = [{t.name: t for t in r.tensors} for r in files]
    assert set(keys[0]) - set(keys[1]) == {"gpt-oss.rope.dimension_count", "gpt-oss.vocab_size", "moeexport.layers",
                                           "moeexport.representation"}
    assert set(keys[1]) - set(keys[0]) == {"general.size_label", "general.type"}
    assert [k for k in set(keys[0]) & set(keys[1]) if keys[0][k] != keys[1][k]] == ["general.name"]  # tiny / Tiny
    assert tensors[0].keys() == tensors[1].keys()
    differing = [name for name in tensors[0] if tensors[0][name].tensor_type != tensors[1][name].tensor_type
                 or not np.array_equal(np.asarray(tensors[0][name].data), np.asarray(tensors[1][name].data))]
    assert differing == ["token_embd.weight"]  # ours stays F32 in F16 files (writer.py: a row lookup, no compute)
