"""Qwen3.5 / 3.6-MoE (`qwen3_5_moe_text`, llama.cpp `qwen35moe`): Gated DeltaNet linear attention in three of
every four layers, gated full attention with partial rotary in the fourth, a sigmoid-gated shared expert, through
the passes and into llama.cpp's own architecture, against transformers' own model of the saved checkpoint.

The tiny model (tests/tiny_models.py) has layers [linear, linear, linear, full], 2 DeltaNet key heads and 4 value
heads (the hub's 16 / 32 ratio), and random zero-centred norm weights here (transformers initialises them to 0)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeexport.adapters import adapter_for
from moeexport.adapters.surgery import drop_blocks, structure
from moeexport.calibration.sources import CalibrationConfig
from moeexport.compress import StatisticsProvider, compress
from moeexport.errors import MoeExportError
from moeexport.modelio import EXPERTS_IMPLEMENTATION, load, load_streamed, save
from moeexport.recipe import parse_recipe
from moeexport import streaming
from tests import family_checks as checks
from tests.tiny_models import random_tokens, tiny_model

FAMILY = "qwen3_5_moe_text"


def _model(**overrides):
    """The tiny model with its norms' weights random too (all zeros would hide a missing 1 + w)."""
    model = tiny_model(FAMILY, **overrides)
    generator = torch.Generator().manual_seed(5)
    for name, parameter in model.named_parameters():
        if "norm" in name:
            parameter.data += 0.3 * torch.randn(parameter.shape, generator=generator)
    return model


def _provider(count: int = 4) -> StatisticsProvider:
    return StatisticsProvider(None, CalibrationConfig(), "tiny", cache_dir=None, tokens=random_tokens(count, 32))


def _compress(model, passes, provider=None):
    compress(model, parse_recipe({"passes": passes}), provider or _provider())
    return model


# --- the adapter ---------------------------------------------------------------------------------------------------

def test_the_views_hand_out_each_layers_own_mixer_and_the_config_its_kinds_and_sizes():
    model = _model()
    adapter = adapter_for(model.config)
    config = adapter.model_config(model.config)
    assert config.layer_mixers == ("linear_attention",) * 3 + ("attention",)
    assert (config.linear.key_heads, config.linear.value_heads, config.linear.key_head_dim) == (2, 4, 8)
    assert config.rotary_dim == 4 and config.norm_weight_offset == 1.0 and config.intermediate_size == 24
    views = adapter.layer_views(model)
    assert [type(view.attention).__name__ for view in views] == ["Qwen3_5MoeGatedDeltaNet"] * 3 + ["Qwen3_5MoeAttention"]
    assert all(view.shared_expert_gate is not None and len(view.shared_experts) == 1 for view in views)


def test_the_layer_by_layer_forward_computes_transformers_logits():
    """What calibration and validation run: each layer called as the model calls it (its own mask and kwargs)."""
    model = _model()
    tokens = random_tokens(3, 24)
    assert torch.equal(torch.from_numpy(streaming.logits(model, tokens)), checks.logits(model, tokens).float())


def test_save_and_load_round_trip_the_model(tmp_path):
    model = _model()
    tokens = random_tokens(2, 16)
    assert torch.equal(checks.logits(model, tokens), checks.logits(checks.reloaded(model, tmp_path / "saved"), tokens))
    assert torch.equal(checks.logits(model, tokens), checks.logits(load(tmp_path / "saved"), tokens))


def test_expert_drop_slices_router_rows_and_both_stacks_and_transformers_reloads_it(tmp_path):
    model = _model()
    before = {view.index: (view.router.weight.clone(), view.experts.gate_up_proj.clone(),
                           view.experts.down_proj.clone()) for view in adapter_for(model.config).layer_views(model)}
    result = compress(model, parse_recipe({"passes": [{"expert_drop": {"keep": 3, "score": "reap", "repair": "none"}}]}), _provider())
    for view in adapter_for(model.config).layer_views(model):
        kept = result.steps[0].plan.keep[view.index]
        router, gate_up, down = before[view.index]
        assert len(kept) == 3 and view.num_experts == 3
        assert torch.equal(view.router.weight, router[kept]) and torch.equal(view.experts.gate_up_proj, gate_up[kept])
        assert torch.equal(view.experts.down_proj, down[kept])
        assert view.shared_expert_gate is not None and len(view.shared_experts) == 1  # never taken
    tokens = random_tokens(2, 16)
    assert torch.equal(checks.logits(model, tokens), checks.logits(checks.reloaded(model, tmp_path / "saved"), tokens))


def test_reap_weighs_each_experts_output_norm_by_the_renormalized_weight_the_block_mixes_with():
    """REAP saliency of a DeltaNet layer's experts, recomputed by hand from the MoE block's inputs: the mean over
    an expert's routed tokens of (softmax -> top-k -> renormalized weight) x ||down(silu(gate x) * up x)||."""
    model, tokens = _model(), random_tokens(4, 32)
    view = adapter_for(model.config).layer_view(model, 1)
    inputs = []
    handle = view.ffn.register_forward_hook(lambda module, args, output: inputs.append(args[0]))
    checks.logits(model, tokens)
    handle.remove()
    x = inputs[0].reshape(-1, model.config.hidden_size)
    probabilities = torch.softmax(x @ view.router.weight.T, dim=-1)
    weights, index = probabilities.topk(model.config.num_experts_per_tok, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    expected = []
    for expert in range(view.num_experts):
        rows, slot = torch.where(index == expert)
        gate, up = (x[rows] @ view.experts.gate_up_proj[expert].T).chunk(2, dim=-1)
        output = (torch.nn.functional.silu(gate) * up) @ view.experts.down_proj[expert].T
        expected.append(float((weights[rows, slot] * output.norm(dim=-1)).mean()) if len(rows) else 0.0)
    statistics = StatisticsProvider(None, CalibrationConfig(), "tiny", cache_dir=None, tokens=tokens).statistics(
        model, [])
    assert max(expected) > 0
    assert statistics.layers[1].reap == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("drop", [[0], [3], [1, 2]])
def test_block_drop_of_any_layer_kind_keeps_each_survivors_mixer_and_transformers_reloads_it(drop, tmp_path):
    model = _model()
    adapter = adapter_for(model.config)
    mixers = adapter.model_config(model.config).layer_mixers
    drop_blocks(adapter, model, drop)
    kept = tuple(kind for i, kind in enumerate(mixers) if i not in drop)
    assert adapter.model_config(model.config).layer_mixers == kept
    reloaded = checks.reloaded(model, tmp_path / "saved")
    assert adapter.model_config(reloaded.config).layer_mixers == kept
    tokens = random_tokens(2, 16)
    assert torch.equal(checks.logits(model, tokens), checks.logits(reloaded, tokens))


def test_layer_drop_removes_the_routed_and_shared_experts_and_their_gate_and_keeps_the_mixer(tmp_path):
    """Decided: the MoE sublayer is the routed experts, the shared expert and its sigmoid gate together (one
    module, mlp); Layer Drop removes all three with its norm, the layer's DeltaNet or attention stays."""
    model = _compress(_model(), [{"layer_drop": {"n": 1, "score": "random"}}])
    specs = structure(adapter_for(model.config), model)
    dropped = [i for i, spec in enumerate(specs) if spec.kind == "dropped"]
    assert len(dropped) == 1
    view = adapter_for(model.config).layer_view(model, dropped[0])
    assert view.shared_experts == () and view.shared_expert_gate is None and view.attention is not None
    tokens = random_tokens(2, 16)
    assert torch.equal(checks.logits(model, tokens), checks.logits(load(save(model, tmp_path / "saved", {})), tokens))


def test_a_streamed_build_is_the_in_memory_one(tmp_path):
    _model().save_pretrained(tmp_path / "source")
    recipe = [{"block_drop": {"n": 1, "score": "random"}}, {"expert_drop": {"keep": 3, "score": "reap"}}]
    results = []
    for loader in (load, load_streamed):
        lm = _compress(loader(tmp_path / "source"), recipe)
        save(lm, tmp_path / loader.__name__, {})
        results.append(load(tmp_path / loader.__name__))
    tokens = random_tokens(2, 20)
    assert torch.equal(*(checks.logits(lm, tokens) for lm in results))


# --- GGUF in llama.cpp's qwen35moe ---------------------------------------------------------------------------------

def _demo_vocabulary(**overrides):
    """The tiny model (random norms) with the demo model's tokenizer (2048 pieces), for a GGUF's vocabulary."""
    from moeexport.checkpoint_files import DEMO_MODEL

    model = _model(vocab_size=2048, **overrides)
    model.config.name_or_path = str(DEMO_MODEL)
    return model


def _gguf_fidelity(reference, path):
    from moeexport.backends import gguf as gguf_backend
    from moeexport.validate import TorchRunner, compare

    windows = random_tokens(2, 48, seed=9) * 16
    return compare(TorchRunner(reference), gguf_backend.Runner(path, context=48), windows)


@pytest.mark.parametrize("passes", [
    [],
    [{"expert_drop": {"keep": 3, "score": "reap"}}],
    [{"block_drop": {"n": 1, "score": "random"}}],  # seeded: which block differs per run of the scorer
], ids=["full", "expert_drop", "block_drop"])
def test_gguf_matches_transformers_own_model_of_the_saved_checkpoint(passes, tmp_path):
    from moeexport.backends import gguf as gguf_backend

    model = _compress(_demo_vocabulary(), passes)
    saved = save(model, tmp_path / "ckpt", {})
    stock = AutoModelForCausalLM.from_pretrained(saved, experts_implementation=EXPERTS_IMPLEMENTATION).eval()
    artifact = gguf_backend.export(load(saved), tmp_path / "m.gguf")
    assert artifact.architecture == "qwen35moe" and artifact.representation == "uniform"
    fidelity = _gguf_fidelity(stock, artifact.path)
    assert fidelity.max_abs_logit <= 1e-3 and fidelity.top1_agreement == 1.0, fidelity


@pytest.mark.parametrize("drop", [[0, 1], [1, 2]])
def test_gguf_block_drop_that_breaks_the_every_fourth_pattern_is_stated_per_layer_and_exact(drop, tmp_path):
    """qwen35moe reads which layers are DeltaNet from attention.recurrent_layers, one flag per layer: a Block
    Drop that moves the full-attention layer off every fourth is written as it is (no byte cost: a flag a layer)."""
    import gguf

    from moeexport.backends import gguf as gguf_backend

    model = _demo_vocabulary()
    drop_blocks(adapter_for(model.config), model, drop)
    saved = save(model, tmp_path / "ckpt", {})
    stock = AutoModelForCausalLM.from_pretrained(saved, experts_implementation=EXPERTS_IMPLEMENTATION).eval()
    artifact = gguf_backend.export(load(saved), tmp_path / "m.gguf")
    field = gguf.GGUFReader(artifact.path).fields["qwen35moe.attention.recurrent_layers"]
    assert field.contents() == [kind == "linear_attention" for kind in stock.config.layer_types]
    fidelity = _gguf_fidelity(stock, artifact.path)
    assert fidelity.max_abs_logit <= 1e-3 and fidelity.top1_agreement == 1.0, fidelity


def test_gguf_layer_drop_is_an_all_zero_moe_sublayer_exact_and_small(tmp_path):
    """qwen35moe needs router, experts and the gated shared expert in every layer: a dropped MoE sublayer is
    written as all-zero ones (Q1_0 / Q4_0 stand-ins, the shared gate's weight ones), which add exactly 0."""
    from moeexport.backends import gguf as gguf_backend

    full = gguf_backend.export(_demo_vocabulary(), tmp_path / "full.gguf")
    model = _compress(_demo_vocabulary(), [{"layer_drop": {"n": 1, "score": "random"}}])
    artifact = gguf_backend.export(model, tmp_path / "dropped.gguf")
    assert artifact.representation.startswith("zero experts for MoE-less layers")
    reference = load(save(model, tmp_path / "ckpt", {}))  # moeexport's model: transformers has no dropped sublayer
    fidelity = _gguf_fidelity(reference, artifact.path)
    assert fidelity.max_abs_logit <= 1e-3 and fidelity.top1_agreement == 1.0, fidelity
    view = adapter_for(model.config).layer_view(_demo_vocabulary(), 0)
    layer_bytes = 4 * sum(t.numel() for t in (view.experts.gate_up_proj, view.experts.down_proj,
                                              *view.shared_experts[0].parameters()))
    assert full.path.stat().st_size - artifact.path.stat().st_size >= 0.7 * layer_bytes


def test_gguf_reading_a_qwen35moe_file_back_is_refused_in_one_line(tmp_path):
    from moeexport.backends import gguf as gguf_backend

    artifact = gguf_backend.export(_demo_vocabulary(), tmp_path / "m.gguf")
    with pytest.raises(MoeExportError, match="Gated DeltaNet layers"):
        load(artifact.path)


def test_gguf_refuses_a_block_drop_that_leaves_no_full_attention_layer(tmp_path):
    """llama.cpp's qwen35moe aborts on a model whose every layer is recurrent (an empty KV cache): refused first."""
    from moeexport.backends import gguf as gguf_backend

    model = _demo_vocabulary()
    drop_blocks(adapter_for(model.config), model, [3])
    with pytest.raises(MoeExportError, match="without a full-attention layer .* drop other blocks"):
        gguf_backend.export(model, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


# --- against llama.cpp's converter ---------------------------------------------------------------------------------

# what ours writes that the converter leaves to llama.cpp's defaults, and what the converter writes that qwen35moe
# does not read when attention.recurrent_layers is present (full_attention_interval); the tiny config also carries
# COMMON's intermediate_size, which the converter writes as feed_forward_length and qwen35moe does not read
OUR_EXTRA_KEYS = {"vocab_size"}
THEIR_UNREAD_KEYS = {"full_attention_interval", "feed_forward_length"}


def test_the_uncompressed_f16_gguf_is_the_converters_tensor_for_tensor_and_key_for_key(tmp_path):
    """llama.cpp's converter on the saved tiny checkpoint (--no-mtp: it has no next-token-prediction layer):
    every tensor has the converter's type and bytes (the v-head reordering, -exp(A_log), 1 + w norms included);
    ours keeps the token embedding F32 (writer.py) and the shared-expert gate as llama.cpp's [hidden] (the
    converter keeps HF's [1, hidden]: the same bytes)."""
    import importlib.util
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from gguf import GGUFReader

    from moeexport.backends import gguf as gguf_backend
    from moeexport.checkpoint_files import DEMO_MODEL

    tool_path = Path(__file__).resolve().parents[1] / "tools" / "compare_with_converter.py"
    spec = importlib.util.spec_from_file_location("compare_with_converter", tool_path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tree = tool.fetch_converter(tmp_path / "converter")
    checkpoint = tmp_path / "ckpt"
    _model(vocab_size=2048).save_pretrained(checkpoint)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(DEMO_MODEL / name, checkpoint / name)
    theirs = tmp_path / "theirs.gguf"
    subprocess.run([sys.executable, "-c", tool.SENTENCEPIECE_CONVERTER, str(checkpoint), "--outtype", "f16",
                    "--no-mtp", "--outfile", str(theirs)], check=True, capture_output=True,
                   env=os.environ | {"PYTHONPATH": os.pathsep.join([str(tree), str(tree / "gguf-py")])})
    ours = gguf_backend.export(load(checkpoint), tmp_path / "ours.gguf", quant="f16").path
    their_file, our_file = GGUFReader(theirs), GGUFReader(ours)
    their_tensors = {t.name: t for t in their_file.tensors}
    our_tensors = {t.name: t for t in our_file.tensors}
    assert set(our_tensors) == set(their_tensors)
    assert any(".ssm_a" in name for name in our_tensors) and any(".attn_gate." in name for name in our_tensors)
    checks.assert_tensors_as_the_converters(our_tensors, their_tensors)
    their_keys, our_keys = checks.architecture_keys(their_file), checks.architecture_keys(our_file)
    assert set(our_keys) - set(their_keys) == OUR_EXTRA_KEYS
    assert {key: our_keys.get(key) for key in set(their_keys) - THEIR_UNREAD_KEYS} == {
        key: value for key, value in their_keys.items() if key not in THEIR_UNREAD_KEYS}


# --- ONNX and TensorRT: refused in one line ------------------------------------------------------------------------

@pytest.mark.parametrize("target_name", ["onnx", "tensorrt"])
def test_onnx_and_tensorrt_refuse_the_deltanet_layers_before_any_work(target_name):
    """ONNX Runtime 1.32 has contrib ops for Gated DeltaNet (CausalConvWithState, LinearAttention), which
    onnxruntime-genai 0.18's builder emits; moeexport's lowering does not write them yet, so both targets (the
    TensorRT bundle is that ONNX) refuse the family at their check, naming what is missing."""
    from moeexport.backends import target_for

    target = target_for(target_name)
    with pytest.raises(MoeExportError, match=r"does not lower linear-attention layers \(Qwen3\.5.*LinearAttention"):
        target.check(_model(), "f32", target.Options())


# --- the hub's multimodal checkpoint -------------------------------------------------------------------------------

def test_the_hubs_multimodal_checkpoint_is_read_as_its_text_model_in_memory_and_streamed(tmp_path):
    """Qwen/Qwen3.5-35B-A3B's layout: config model_type qwen3_5_moe with the text model under text_config, its
    tensors under model.language_model.* (experts fused 3-D, as the model holds them), the next-token-prediction
    block (mtp.*) and the vision tower (model.visual.*) beside them, which transformers' causal LM leaves out."""
    model = _model()
    hub = checks.saved_in_hub_multimodal_layout(
        model, tmp_path, {"model_type": "qwen3_5_moe", "architectures": ["Qwen3_5MoeForConditionalGeneration"],
                          "tie_word_embeddings": False},
        extra_tensors={"mtp.fc.weight": torch.zeros(4, 4), "model.visual.patch_embed.proj.weight": torch.zeros(4, 4)})
    tokens = random_tokens(2, 16)
    for loader in (load, load_streamed):
        read = loader(hub)
        assert read.config.model_type == FAMILY and read.config.name_or_path == str(hub)
        logits = torch.from_numpy(streaming.logits(read, tokens))
        assert torch.equal(logits, checks.logits(model, tokens).float()), loader.__name__


# --- the real-width preset, at small widths ------------------------------------------------------------------------

def test_the_qwen3_6_preset_is_the_hub_layout_and_a_streamed_build_writes_the_in_memory_builds_gguf(tmp_path):
    """tools/make_synthetic_checkpoint.py qwen3.6-35b-a3b (here one period of 4 layers at small widths): the
    multimodal config and model.language_model.* names of the hub, fused experts; moeexport reads it and a
    streamed Expert Drop to half writes the same GGUF as the in-memory one."""
    import importlib.util
    import json
    from pathlib import Path

    from moeexport.backends import gguf as gguf_backend
    from moeexport.source import open_source

    tool_path = Path(__file__).resolve().parents[1] / "tools" / "make_synthetic_checkpoint.py"
    spec = importlib.util.spec_from_file_location("make_synthetic_checkpoint", tool_path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    small = {"hidden_size": 64, "num_experts": 8, "vocab_size": 2048, "head_dim": 32, "linear_key_head_dim": 16,
             "linear_value_head_dim": 16, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
             "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                                 "mrope_section": [2, 1, 1], "mrope_interleaved": True}}
    out = tmp_path / "synthetic"
    tool.write_checkpoint("qwen3.6-35b-a3b", out, layers=4, dtype="float32", overrides=small)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_5_moe" and config["text_config"]["model_type"] == FAMILY
    names = set(open_source(out).headers)
    assert {"model.language_model.layers.0.mlp.experts.gate_up_proj",
            "model.language_model.layers.0.linear_attn.in_proj_qkv.weight",
            "model.language_model.layers.3.self_attn.q_proj.weight", "lm_head.weight"} <= names
    files = []
    for loader in (load, load_streamed):
        lm = _compress(loader(out), [{"expert_drop": {"keep": 4, "score": "reap"}}])
        assert lm.config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
        files.append(gguf_backend.export(lm, tmp_path / f"{loader.__name__}.gguf").path.read_bytes())
    assert files[0] == files[1]


# --- what needs an attention layer's projections: refused by name ---------------------------------------------------

@pytest.mark.parametrize("step", ["layer_drop", "block_drop"])
def test_trim_refit_of_the_absorbing_attention_output_is_refused_before_any_work(step):
    """repair: refit solves for the o_proj that absorbs a dropped block or sublayer; a DeltaNet has none."""
    model = _model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(MoeExportError, match=rf"{step}: repair: refit .* linear_attention layers .* repair: none"):
        _compress(model, [{step: {"n": 1, "score": "random", "repair": "refit"}}])
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_gguf_imatrix_is_refused_at_the_targets_check():
    from moeexport.backends import target_for

    target = target_for("gguf")
    with pytest.raises(MoeExportError, match="--imatrix .* linear_attention layers .* without --imatrix"):
        target.check(_model(), "q4_k_m", target.Options(imatrix=True))
    target.check(_model(), "q4_k_m", target.Options())


def test_gguf_is_exact_over_windows_longer_than_the_deltanets_64_token_chunks(tmp_path):
    """transformers' torch DeltaNet and llama.cpp's both run 64-token chunks: a 200-token window crosses three."""
    from moeexport.backends import gguf as gguf_backend
    from moeexport.validate import TorchRunner, compare

    model = _demo_vocabulary()
    artifact = gguf_backend.export(model, tmp_path / "m.gguf")
    fidelity = compare(TorchRunner(model), gguf_backend.Runner(artifact.path, context=200),
                       random_tokens(2, 200, seed=9) * 16)
    assert fidelity.max_abs_logit <= 1e-3 and fidelity.top1_agreement == 1.0, fidelity
