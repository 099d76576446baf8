"""Gemma 4 MoE (the text model): read, compressed by the passes that fit it (or refused by name), and written in
llama.cpp's own gemma4 architecture, checked against transformers' own model of what moeexport saved."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader
from torch import nn
from transformers import AutoModelForCausalLM

import moeexport
from moeexport import BuildOptions, streaming
from moeexport.adapters import adapter_for
from moeexport.backends import gguf as gguf_backend
from moeexport.checkpoint_files import DEMO_MODEL
from moeexport.adapters.surgery import keep_experts, structure
from moeexport.calibration.observers import observe
from moeexport.compress import compress
from moeexport.errors import MoeExportError
from moeexport.modelio import EXPERTS_IMPLEMENTATION, load, load_streamed
from moeexport.recipe import parse_recipe
from moeexport.validate import TorchRunner, compare
from tests import family_checks as checks
from tests.tiny_models import random_tokens, tiny_model

TRIMMED = [{"block_drop": {"n": 1, "score": "random"}}, {"expert_drop": {"keep": 3, "score": "random"}}]


def _stock(directory: Path):
    return AutoModelForCausalLM.from_pretrained(directory, experts_implementation=EXPERTS_IMPLEMENTATION).eval()


# --- reading, the passes --------------------------------------------------------------------------------------------

def test_a_saved_gemma4_loads_with_its_experts_router_scales_and_per_layer_head_widths(tmp_path):
    model = tiny_model("gemma4_text")
    model.save_pretrained(tmp_path)
    loaded = load(tmp_path)
    tokens = random_tokens(2, 24)
    assert torch.equal(checks.logits(loaded, tokens), checks.logits(model, tokens))
    views = adapter_for(loaded.config).layer_views(loaded)
    assert [view.kind for view in views] == ["moe"] * 4 and {view.num_experts for view in views} == {4}
    assert {view.top_k for view in views} == {2}
    assert [view.attention.head_dim for view in views] == [16, 16, 16, 32]  # the full-attention layer's own


def test_expert_drop_slices_the_router_rows_and_per_expert_scale_with_their_experts():
    model = tiny_model("gemma4_text")
    original = copy.deepcopy(model)
    keep = [3, 1, 0]
    keep_experts(adapter_for(model.config), model, 1, keep)
    router, before = model.model.layers[1].router, original.model.layers[1].router
    index = torch.tensor(keep)
    for now, then in ((router.proj.weight, before.proj.weight), (router.per_expert_scale, before.per_expert_scale),
                      (model.model.layers[1].experts.gate_up_proj, original.model.layers[1].experts.gate_up_proj),
                      (model.model.layers[1].experts.down_proj, original.model.layers[1].experts.down_proj)):
        assert torch.equal(now, then[index])

    def masked(module, args, output):  # the original router with expert 2 removed: the k best of the rest
        probabilities = output[0].clone()
        probabilities[:, 2] = 0
        weights, chosen = probabilities.topk(2, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        return probabilities, weights * module.per_expert_scale[chosen], chosen

    before.register_forward_hook(masked)
    tokens = random_tokens(2, 24)
    torch.testing.assert_close(checks.logits(model, tokens), checks.logits(original, tokens), rtol=0, atol=1e-5)
    assert (checks.logits(model, tokens) - checks.logits(tiny_model("gemma4_text"), tokens)).abs().max() > 1e-3


def test_reap_weighs_each_expert_by_its_scaled_routing_weight_on_the_experts_own_normed_input():
    model = tiny_model("gemma4_text")
    tokens = random_tokens(4, 16)
    statistics = observe(model, tokens, key="k", calibration={}, batch_size=8)
    layer = model.model.layers[2]
    seen = {}
    handle = layer.router.register_forward_hook(lambda module, args, output: seen.update(x=args[0], out=output))
    checks.logits(model, tokens)
    handle.remove()
    probabilities, weights, index = seen["out"]  # per_expert_scale is in the weights the layer mixes with
    x = layer.pre_feedforward_layernorm_2(seen["x"])
    for expert in range(4):
        rows, slot = torch.where(index == expert)
        alone = layer.experts(x[rows], torch.full((len(rows), 1), expert), torch.ones(len(rows), 1))
        expected = (weights[rows, slot].double() * alone.double().norm(dim=-1)).mean()
        assert statistics.layers[2].reap[expert] == pytest.approx(float(expected), rel=1e-5)
    # the routing mass is the router's own softmax scores
    mass = probabilities.double().mean(0)
    assert statistics.layers[2].routing_mass == pytest.approx(mass.tolist(), rel=1e-6)


def test_block_and_uniform_expert_drop_save_a_checkpoint_transformers_loads_to_the_same_model(tmp_path):
    model = tiny_model("gemma4_text")
    recipe = parse_recipe({"passes": [{"block_drop": {"n": 1, "score": "random"}},
                                      {"expert_drop": {"keep": 3, "score": "reap"}}]})
    result = compress(model, recipe, checks.tiny_statistics_provider())
    kept = [old for old, new in enumerate(result.new_block_index) if new is not None]
    full = [new for new, old in enumerate(kept) if old == 3]
    assert [spec.num_experts for spec in structure(adapter_for(model.config), model)] == [3, 3, 3]
    stock = _stock(moeexport.save(model, tmp_path / "out", result.manifest()))
    assert stock.config.num_experts == 3 and stock.config.num_hidden_layers == 3
    assert [layer.self_attn.head_dim for layer in stock.model.layers] == [32 if i in full else 16 for i in range(3)]
    tokens = random_tokens(2, 24)
    assert torch.equal(checks.logits(stock, tokens), checks.logits(model, tokens))


def test_layer_drop_leaves_the_dense_mlp_with_its_norms_and_moexport_reloads_it(tmp_path):
    model = tiny_model("gemma4_text")
    original = copy.deepcopy(model)
    result = compress(model, parse_recipe({"passes": [{"layer_drop": {"n": 1, "score": "random"}}]}), checks.tiny_statistics_provider())
    kinds = [spec.kind for spec in structure(adapter_for(model.config), model)]
    dropped = kinds.index("dropped")
    assert kinds.count("dropped") == 1
    layer, before = model.model.layers[dropped], original.model.layers[dropped]
    assert not hasattr(layer, "experts") and not hasattr(layer, "post_feedforward_layernorm_1")
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # what the layer adds after attention: post-norm(MLP(pre-norm(h))), the experts gone
        expected = before.post_feedforward_layernorm(before.mlp(before.pre_feedforward_layernorm(x)))
        torch.testing.assert_close(layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x))),
                                   expected, rtol=0, atol=0)
    tokens = random_tokens(2, 24)
    saved = load(moeexport.save(model, tmp_path / "out", result.manifest()))
    assert torch.equal(checks.logits(saved, tokens), checks.logits(model, tokens))


def test_merge_is_refused_by_name():
    with pytest.raises(MoeExportError, match="Gemma 4 MoE.*experts cannot be merged.*per_expert_scale.*Expert Drop"):
        compress(tiny_model("gemma4_text"), parse_recipe({"passes": [{"merge": {"keep": 2}}]}), checks.tiny_statistics_provider())


# --- GGUF: llama.cpp's gemma4 -----------------------------------------------------------------------------------------

def _with_demo_vocabulary(**overrides):
    """The tiny Gemma 4 with the demo model's tokenizer beside it (for GGUF files, which carry a vocabulary)."""
    model = tiny_model("gemma4_text", vocab_size=2048, **overrides)
    model.config.name_or_path = str(DEMO_MODEL)
    return model


def _saved_source(directory: Path) -> Path:
    return checks.saved_with_demo_tokenizer(_with_demo_vocabulary(), directory)


class GgmlGelu(nn.Module):
    """llama.cpp's CPU GELU (ggml's GELU and GEGLU with GGML_GELU_FP16, as built in llama-cpp-python): the tanh
    GELU of the input rounded to fp16, looked up in an fp16 table; the input itself at or above 10, 0 at or
    below -10."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))


def with_ggml_gelu(model):
    emulated = copy.deepcopy(model)
    for module in emulated.modules():
        if hasattr(module, "act_fn"):
            module.act_fn = GgmlGelu()
    return emulated


def _windows() -> torch.Tensor:
    return random_tokens(2, 48, seed=9) * 16  # 48 tokens: far past the sliding window of 8


def _assert_exact(reference, path: Path):
    """llama.cpp's logits against the reference computed with llama.cpp's own fp16-table GELU: exact; against the
    reference as it is, the table's rounding alone (top-1 still agrees)."""
    runner = gguf_backend.Runner(path, context=48)
    fidelity = compare(TorchRunner(with_ggml_gelu(reference)), runner, _windows())
    assert fidelity.max_abs_logit <= 1e-3 and fidelity.top1_agreement == 1.0, fidelity
    plain = compare(TorchRunner(reference), runner, _windows())
    assert plain.max_abs_logit <= 1e-2 and plain.top1_agreement == 1.0, plain
    return fidelity, plain


@pytest.mark.parametrize("passes", [[], TRIMMED], ids=["full", "trimmed"])
def test_gguf_matches_transformers_own_model_of_the_saved_compressed_checkpoint(passes, tmp_path):
    report = checks.build_f32_gguf(_saved_source(tmp_path / "source"), passes, tmp_path / "out")
    assert report.ok and report.artifact["path"].endswith(".gguf"), report.failures
    stock = _stock(tmp_path / "out" / "compressed")
    assert stock.config.num_hidden_layers == 4 - len(passes[:1])
    assert stock.config.num_experts == (3 if passes else 4)
    path = tmp_path / "out" / report.artifact["path"].rpartition("/")[2]
    reader = GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "gemma4"
    assert "blk.0.ffn_down_exps.scale" in {tensor.name for tensor in reader.tensors}
    _assert_exact(stock, path)


def test_a_streamed_build_writes_the_in_memory_build_s_gguf_byte_for_byte(tmp_path):
    import hashlib

    source = _saved_source(tmp_path / "source")
    passes = [{"block_drop": {"n": 1}}, {"layer_drop": {"n": 1}},  # (llama.cpp's gemma4 takes one expert count)
              {"expert_drop": {"keep": 3, "scope": "layer", "score": "reap"}}]
    whole, streamed = (checks.build_f32_gguf(source, passes, tmp_path / f"stream-{stream}", stream) for stream in (False, True))
    assert whole.ok and streamed.ok and streamed.compression.memory["streamed"], (whole.failures, streamed.failures)
    assert whole.compression.passes == streamed.compression.passes
    for name in whole.artifact["files"]:
        digests = {hashlib.sha256((Path(out) / name).read_bytes()).hexdigest() for out in (whole.out, streamed.out)}
        assert len(digests) == 1, name


def test_layer_drop_is_written_as_a_dense_gemma4_layer_without_its_experts_bytes(tmp_path):
    model = _with_demo_vocabulary()
    full = gguf_backend.export(model, tmp_path / "full.gguf")
    compress(model, parse_recipe({"passes": [{"layer_drop": {"n": 1, "score": "random"}}]}), None)
    dropped = next(i for i, spec in enumerate(structure(adapter_for(model.config), model)) if spec.kind == "dropped")
    artifact = gguf_backend.export(model, tmp_path / "m.gguf")
    assert artifact.architecture == "gemma4" and "dense MLP alone" in artifact.representation
    names = {tensor.name for tensor in GGUFReader(artifact.path).tensors}
    assert f"blk.{dropped}.ffn_gate_inp.weight" not in names and f"blk.{dropped}.ffn_gate_up_exps.weight" not in names
    assert f"blk.{dropped}.ffn_gate.weight" in names and f"blk.{dropped}.post_ffw_norm.weight" in names
    view = adapter_for(model.config).layer_view(tiny_model("gemma4_text"), dropped)
    expert_bytes = 4 * (view.experts.gate_up_proj.numel() + view.experts.down_proj.numel())
    saved = full.path.stat().st_size - artifact.path.stat().st_size
    assert saved >= expert_bytes  # the experts' bytes (and the router's) are gone
    _assert_exact(model, artifact.path)


def test_block_drop_that_would_end_in_a_sliding_layer_is_refused_by_name():
    from moeexport.adapters.surgery import drop_blocks

    model = tiny_model("gemma4_text")
    with pytest.raises(MoeExportError, match="Gemma 4 ends in a full-attention layer.*keep the last layer"):
        drop_blocks(adapter_for(model.config), model, [3])


# --- ONNX -------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("moe_ops", ["plain", "plain-routed", "contrib"])
@pytest.mark.parametrize("passes", [[], [{"expert_drop": {"keep": 3, "score": "random"}}],
                                    [{"layer_drop": {"n": 1, "score": "random"}}]],
                         ids=["full", "expert_drop", "layer_drop"])
def test_onnx_matches_torch_with_its_sliding_windows_softcapping_and_the_dense_mlp_beside_the_experts(
        passes, moe_ops, tmp_path):
    """The MoE op's gated activation is a SwiGLU: the GELU-tanh GLU experts are written in standard ops in every
    lowering (contrib included), with the router's norm and scales, the per-expert scale in each expert's down
    rows, per-layer-type RoPE and head widths."""
    from moeexport.backends import onnx as onnx_backend

    model = tiny_model("gemma4_text")
    if passes:
        compress(model, parse_recipe({"passes": passes}), checks.tiny_statistics_provider())
    artifact = onnx_backend.export(model, tmp_path / "m.onnx", moe_ops=moe_ops)
    fidelity = compare(TorchRunner(model), onnx_backend.Runner(artifact.path), random_tokens(2, 48, seed=9))
    assert fidelity.max_abs_logit <= 1e-4 and fidelity.top1_agreement == 1.0, fidelity


def test_int4_onnx_experts_are_refused_by_name(tmp_path):
    from moeexport.backends import onnx as onnx_backend

    with pytest.raises(MoeExportError, match="QMoE op, whose gated activation is a SwiGLU.*GELU-tanh"):
        onnx_backend.export(tiny_model("gemma4_text"), tmp_path / "m.onnx", quant="int4")


# --- real widths: the synthetic checkpoint preset ------------------------------------------------------------------------

def test_the_gemma4_preset_at_small_widths_writes_a_checkpoint_of_the_model_s_own_tensors(tmp_path):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("synthetic", Path(__file__).parents[1] / "tools" /
                                                  "make_synthetic_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    small = {"hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "num_experts": 4,
             "top_k_experts": 2, "vocab_size": 2048, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 16, "global_head_dim": 32, "num_global_key_value_heads": 1}
    settings = [arg for key, value in small.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    out = tmp_path / "gemma4"
    assert tool.main(["gemma-4-26b-a4b", str(out), "--layers", "6", "--shard-size", "400KB", *settings]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma4" and config["text_config"]["model_type"] == "gemma4_text"
    assert "model.language_model.layers.0.experts.gate_up_proj" in json.loads(
        (out / "model.safetensors.index.json").read_text())["weight_map"]
    model = load(out)
    tokens = random_tokens(1, 16)
    assert torch.equal(checks.logits(model, tokens), torch.from_numpy(streaming.logits(load_streamed(out), tokens)))
    assert model.config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]  # one period of 5:1
    assert [layer.self_attn.head_dim for layer in model.model.layers] == [16] * 5 + [32]
    assert model.model.layers[5].self_attn.v_proj is None  # the full layer's keys are its values
    assert torch.isfinite(checks.logits(model, tokens)).all()


def test_the_hubs_multimodal_checkpoint_is_read_as_its_text_model_in_memory_and_streamed(tmp_path):
    """google/gemma-4-26B-A4B's layout: config model_type gemma4 with the text model under text_config, its tensors
    under model.language_model.* (the head tied to the embeddings), the vision tower beside them. transformers'
    own Gemma4ForCausalLM cannot read these names (its conversion table has no prefix for them); moeexport does."""
    from safetensors.torch import load_file, save_file

    model = tiny_model("gemma4_text")
    hub = checks.saved_in_hub_multimodal_layout(
        model, tmp_path, {"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"]},
        skip=("lm_head.weight",), extra_tensors={"model.vision_tower.patch_embedder.input_proj.weight": torch.zeros(4, 4),
                                                 "model.embed_vision.embedding_projection.weight": torch.zeros(4, 4)})
    tokens = random_tokens(2, 16)
    for loader in (load, load_streamed):
        read = loader(hub)
        assert read.config.model_type == "gemma4_text" and read.config.name_or_path == str(hub)
        assert torch.equal(torch.from_numpy(streaming.logits(read, tokens)), checks.logits(model, tokens)), loader.__name__
    tensors = load_file(hub / "model.safetensors")
    del tensors["model.language_model.layers.1.experts.down_proj"]
    save_file(tensors, hub / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MoeExportError, match=r"lacks tensor model\.language_model\.layers\.1\.experts\.down_proj"):
        load(hub)


def test_the_tensorrt_bundle_of_a_model_whose_layers_differ_in_key_value_heads_is_written(tmp_path):
    """Gemma 4's config is heterogeneous (its full-attention layers have their own key-value heads), and
    transformers refuses a plain read of such a key: the bundle's manifest states the config's global value."""
    import json

    options = BuildOptions(out=str(tmp_path / "out"), quant="f16", profile=False, validation_windows=(2, 48),
                           eval_text=str(checks.HELD_OUT), measure_quality=False)
    source = _saved_source(tmp_path / "model")
    report = moeexport.build(source, {"passes": []}, "tensorrt", options)
    manifest = json.loads((tmp_path / "out" / "bundle" / "bundle.json").read_text())
    assert report.ok and manifest["model"]["model_type"] == "gemma4_text"
    assert manifest["model"]["num_key_value_heads"] == json.loads((source / "config.json").read_text())[
        "num_key_value_heads"]
