"""Nemotron-H MoE (Nemotron-3-Nano, transformers nemotron_h): one block per layer (Mamba-2, NoPE attention or the
MoE), ReLU² experts without a gate, DeepSeek-V3's sigmoid router with a selection bias, a shared expert. The passes
on it, checked against transformers' own model of what moeexport saved."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import moeexport
from moeexport.adapters import adapter_for
from moeexport.adapters.routing import route
from moeexport.adapters.surgery import drop_blocks, keep_experts, structure
from moeexport.calibration.sources import CalibrationConfig
from moeexport.compress import StatisticsProvider, compress
from moeexport.errors import MoeExportError
from moeexport.modelio import load
from moeexport.recipe import parse_recipe
from moeexport.streaming import logits as layer_by_layer_logits
from tests.test_family_glm_ernie import convert  # noqa: F401 (the converter fixture)
from tests.tiny_models import random_tokens, tiny_model

FAMILY = "nemotron_h"


def _compress(model, passes, seed=1):
    provider = StatisticsProvider(None, CalibrationConfig(), "tiny", cache_dir=None,
                                  tokens=random_tokens(4, 32, seed=seed))
    compress(model, parse_recipe({"passes": passes}), provider)
    return model


def _logits(model, windows: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # transformers builds no cache for a first layer without attention or Mamba
        return model(input_ids=windows, use_cache=False).logits


def test_the_declaration_reads_every_layers_mixer_the_router_and_the_ungated_experts():
    model = tiny_model(FAMILY)
    config = adapter_for(model.config).model_config(model.config)
    assert config.layer_mixers == ("mamba", "none", "attention", "none")
    assert (config.routing.scores, config.routing.selection_bias, config.routing.scale) == ("sigmoid", True, 2.5)
    assert not config.experts.gated and config.experts.activation == "relu2"
    assert config.rms_norm_eps == model.config.layer_norm_epsilon and config.shared_expert_count == 1
    assert [spec.kind for spec in structure(adapter_for(model.config), model)] == ["dense", "moe", "dense", "moe"]


def test_the_layer_by_layer_forward_is_transformers_own():
    model = tiny_model(FAMILY)
    windows = random_tokens(2, 40, seed=3)  # longer than chunk_size: the Mamba scan crosses chunks
    assert torch.equal(torch.from_numpy(layer_by_layer_logits(model, windows)), _logits(model, windows))


def test_route_is_the_routers_own_choice_before_and_after_expert_drop():
    model = tiny_model(FAMILY)
    adapter = adapter_for(model.config)
    rule = adapter.model_config(model.config).routing
    for drop in (False, True):
        if drop:
            for view in adapter.layer_views(model):
                if view.kind == "moe":
                    keep_experts(adapter, model, view.index, [3, 0, 2])
        for view in (v for v in adapter.layer_views(model) if v.kind == "moe"):
            x = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(view.index))
            logits, weights, index = view.router(x)
            own_weights, own_index = route(rule, logits, view.top_k, selection_bias=view.selection_bias)
            order, own_order = index.argsort(dim=-1), own_index.argsort(dim=-1)
            assert torch.equal(index.gather(-1, order), own_index.gather(-1, own_order))
            torch.testing.assert_close(weights.gather(-1, order), own_weights.gather(-1, own_order))


@pytest.mark.parametrize("passes, kinds", [
    ([{"expert_drop": {"keep": 3, "score": "reap"}}], ["linear_attention", "moe", "full_attention", "moe"]),
    ([{"block_drop": {"n": 2, "score": "random"}}], ["full_attention", "moe"]),  # the Mamba and a MoE block gone
], ids=["expert_drop", "block_drop"])
def test_uniform_passes_save_a_checkpoint_transformers_loads_and_runs_the_same(passes, kinds, tmp_path):
    model = _compress(tiny_model(FAMILY), passes)
    assert model.config.layers_block_type == kinds
    saved = moeexport.save(model, tmp_path / "ckpt", {})
    stock = AutoModelForCausalLM.from_pretrained(saved).eval()
    windows = random_tokens(2, 40, seed=5)
    torch.testing.assert_close(_logits(stock, windows), _logits(model, windows), rtol=0, atol=1e-6)
    if "expert_drop" in passes[0]:
        experts = [view.experts.up_proj.shape[0] for view in adapter_for(stock.config).layer_views(stock)
                   if view.kind == "moe"]
        assert experts == [3, 3] and "gate_up_proj" not in dict(stock.named_parameters())


def test_block_drop_renumbers_the_survivors_state_slots_and_the_config_follows(tmp_path):
    model = tiny_model(FAMILY)
    drop_blocks(adapter_for(model.config), model, [1])  # a MoE block: the Mamba block 0 stays, attention moves up
    assert model.config.layers_block_type == ["linear_attention", "full_attention", "moe"]
    assert model.model.layers[1].mixer.layer_idx == 1
    saved = moeexport.save(model, tmp_path / "ckpt", {})
    stock = AutoModelForCausalLM.from_pretrained(saved).eval()
    windows = random_tokens(2, 40, seed=5)
    torch.testing.assert_close(_logits(stock, windows), _logits(model, windows), rtol=0, atol=1e-6)


def test_layer_drop_removes_the_moe_block_whole_and_keeps_its_norm(tmp_path):
    """A Nemotron-H MoE layer is one block (norm, routed and shared experts): Layer Drop leaves the residual."""
    model = _compress(tiny_model(FAMILY), [{"layer_drop": {"n": 1, "score": "random"}}])
    specs = structure(adapter_for(model.config), model)
    dropped = [index for index, spec in enumerate(specs) if spec.kind == "dropped"]
    assert len(dropped) == 1 and model.config.layers_block_type[dropped[0]] == "moe"
    windows = random_tokens(2, 40, seed=5)
    hidden = torch.randn(2, 7, model.config.hidden_size)
    assert torch.equal(model.model.layers[dropped[0]](hidden), hidden)
    reloaded = load(moeexport.save(model, tmp_path / "ckpt", {}))
    assert torch.equal(_logits(reloaded, windows), _logits(model, windows))


def test_merging_refuses_the_selection_bias_in_one_line():
    with pytest.raises(MoeExportError, match="cannot be merged .*e_score_correction_bias"):
        _compress(tiny_model(FAMILY), [{"merge": {"keep": 2}}])


def test_experts_in_a_latent_space_are_refused_in_one_line():
    with pytest.raises(MoeExportError, match="moe_latent_size=16 .* not supported"):
        config = tiny_model(FAMILY, moe_latent_size=16).config
        adapter_for(config).model_config(config)


# --- GGUF in llama.cpp's nemotron_h_moe ---------------------------------------------------------------------------

def _gguf_model(passes=(), **overrides):
    from tests.test_gguf import _tiny_with_demo_vocabulary

    return _compress(_tiny_with_demo_vocabulary(FAMILY, **overrides), list(passes))


def _fidelity(reference, path):
    from moeexport.backends import gguf as gguf_backend
    from moeexport.validate import TorchRunner, compare

    return compare(TorchRunner(reference), gguf_backend.Runner(path, context=48), random_tokens(2, 48, seed=9) * 16)


@pytest.mark.parametrize("passes, dropped_blocks", [([], []), ([{"expert_drop": {"keep": 3, "score": "reap"}}], []),
                                                    ([], [1])], ids=["full", "expert_drop", "block_drop"])
def test_gguf_matches_transformers_own_model_of_the_saved_checkpoint(passes, dropped_blocks, tmp_path):
    from moeexport.backends import gguf as gguf_backend

    model = _gguf_model(passes)
    drop_blocks(adapter_for(model.config), model, dropped_blocks)  # a MoE block: Mamba-2 and attention stay
    saved = moeexport.save(model, tmp_path / "ckpt", {})
    stock = AutoModelForCausalLM.from_pretrained(saved).eval()  # transformers' own model of what was saved
    artifact = gguf_backend.export(load(saved), tmp_path / "m.gguf")
    assert artifact.architecture == "nemotron_h_moe" and artifact.representation == "uniform"
    fidelity = _fidelity(stock, artifact.path)
    assert fidelity.max_abs_logit <= 1e-3 and fidelity.top1_agreement == 1.0, fidelity


@pytest.mark.parametrize("dropped, kind", [([0], "mamba"), ([2], "attention")])
def test_gguf_refuses_a_model_without_a_mamba_or_an_attention_block_in_one_line(dropped, kind, tmp_path):
    """llama.cpp's nemotron_h_moe aborts allocating an empty recurrent or KV memory (GGML_ASSERT(buffer))."""
    from moeexport.backends import gguf as gguf_backend

    model = _gguf_model()
    drop_blocks(adapter_for(model.config), model, dropped)
    with pytest.raises(MoeExportError, match=f"without any {kind} block"):
        gguf_backend.export(model, tmp_path / "m.gguf")


def _expert_bytes(model) -> int:
    """float32 bytes of one routed expert (its up and down projections)."""
    view = next(v for v in adapter_for(model.config).layer_views(model) if v.kind == "moe")
    return 4 * (view.experts.up_proj[0].numel() + view.experts.down_proj[0].numel())


@pytest.mark.parametrize("experts, kept", [(4, [[2, 0, 3], [1, 3]]), (4, [[0, 1, 2, 3], [2, 0]]),
                                           (8, [[6, 1], [0, 2, 4, 5, 7]])],
                         ids=["3_and_2", "4_and_2", "2_and_5_of_8"])  # (DeepSeek-V3's router needs two per layer)
def test_non_uniform_expert_counts_are_exact_and_save_their_bytes_in_nemotron_h_moe(experts, kept, tmp_path):
    """Each layer's experts are split into equal slots that fill one expert count (llama.cpp's only one), chosen
    together through per-layer top-k; per-layer slot widths (expert_feed_forward_length) keep the bytes saved.
    (2 and 5 of 8 experts 24 wide: 10 slots, the 5 experts in two of 12, the 2 in five of 5, one neuron zero.)"""
    from moeexport.backends import gguf as gguf_backend
    from moeexport.backends.gguf.reader import GGUFFile

    full = gguf_backend.export(_gguf_model(n_routed_experts=experts), tmp_path / "full.gguf")
    model = _gguf_model(n_routed_experts=experts)
    adapter = adapter_for(model.config)
    for layer, keep in zip([1, 3], kept):
        keep_experts(adapter, model, layer, keep)
    saved = moeexport.save(model, tmp_path / "ckpt", {})
    artifact = gguf_backend.export(load(saved), tmp_path / "m.gguf")
    fidelity = _fidelity(load(saved), artifact.path)  # moeexport's model of the saved checkpoint (per-layer counts)
    assert fidelity.max_abs_logit <= 1e-3 and fidelity.top1_agreement == 1.0, fidelity
    used = GGUFFile(artifact.path).value("expert_used_count")
    assert isinstance(used, list) and len(set(k for k in used if k)) == 2  # a per-layer top-k array, only here
    assert "split into equal slots" in artifact.representation
    dropped = sum(experts - len(keep) for keep in kept) * _expert_bytes(model)
    saved_bytes = full.path.stat().st_size - artifact.path.stat().st_size
    assert saved_bytes >= 0.8 * dropped, (saved_bytes, dropped)


def test_a_global_expert_drop_through_the_pipeline_is_exact_in_nemotron_h_moe(tmp_path):
    from moeexport.backends import gguf as gguf_backend

    model = _gguf_model([{"expert_drop": {"keep": 3, "scope": "global", "score": "reap", "min_keep": 2}}],
                        n_routed_experts=8)
    counts = [spec.num_experts for spec in structure(adapter_for(model.config), model) if spec.kind == "moe"]
    assert sum(counts) == 6
    artifact = gguf_backend.export(model, tmp_path / "m.gguf")
    fidelity = _fidelity(model, artifact.path)
    assert fidelity.max_abs_logit <= 1e-3 and fidelity.top1_agreement == 1.0, (counts, fidelity)


def test_layer_drop_leaves_the_block_out_of_the_file_exactly(tmp_path):
    """A dropped MoE block is an identity: the file has one block fewer, every byte of it saved."""
    from moeexport.backends import gguf as gguf_backend
    from moeexport.backends.gguf.reader import GGUFFile

    full = gguf_backend.export(_gguf_model(), tmp_path / "full.gguf")
    model = _gguf_model([{"layer_drop": {"n": 1, "score": "kl"}}])
    artifact = gguf_backend.export(load(moeexport.save(model, tmp_path / "ckpt", {})), tmp_path / "m.gguf")
    assert GGUFFile(artifact.path).value("block_count") == 3 and "left out (identities)" in artifact.representation
    fidelity = _fidelity(model, artifact.path)
    assert fidelity.max_abs_logit <= 1e-3 and fidelity.top1_agreement == 1.0, fidelity
    block = 4 * sum(p.numel() for p in _gguf_model().model.layers[1].parameters())
    assert full.path.stat().st_size - artifact.path.stat().st_size >= block


# keys the converter writes that ours leaves to llama.cpp (NoPE: no rotation; the context the converter writes for
# every Mamba hybrid is an arbitrary 2**20, ours the config's), and ours that it leaves out (same values)
CONVERTER_ONLY_KEYS = {"rope.dimension_count", "rope.scaling.finetuned", "context_length"}
OUR_EXTRA_KEYS = {"attention.layer_norm_rms_epsilon", "vocab_size", "context_length"}


def test_the_uncompressed_f16_gguf_is_the_converters_tensor_for_tensor_and_key_for_key(convert, tmp_path):
    import shutil

    import numpy as np
    from gguf import GGUFReader

    from moeexport.backends import gguf as gguf_backend
    from moeexport.checkpoint_files import DEMO_MODEL

    checkpoint = tmp_path / "ckpt"
    tiny_model(FAMILY, vocab_size=2048).save_pretrained(checkpoint)  # the hub's layout: backbone.*, one per expert
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(DEMO_MODEL / name, checkpoint / name)
    theirs = convert(checkpoint, "f16", [], tmp_path / "theirs.gguf")
    ours = gguf_backend.export(load(checkpoint), tmp_path / "ours.gguf", quant="f16").path
    their_file, our_file = GGUFReader(theirs), GGUFReader(ours)
    their_tensors = {t.name: t for t in their_file.tensors}
    our_tensors = {t.name: t for t in our_file.tensors}
    assert set(our_tensors) == set(their_tensors)
    for name, their in their_tensors.items():
        our = our_tensors[name]
        if name == "token_embd.weight":  # ours keeps the embedding F32 in an F16 file (writer.py): the same rounded
            assert our.tensor_type.name == "F32" and their.tensor_type.name == "F16"
            assert np.array_equal(np.asarray(our.data).astype(np.float16), np.asarray(their.data))
            continue
        assert our.tensor_type == their.tensor_type, name  # (the Mamba-2 conv, A, D and norm F32 in both)
        assert np.array_equal(np.asarray(our.data), np.asarray(their.data)), name
        assert list(our.shape) == list(their.shape), name

    def keys(reader):
        prefix = f"{reader.fields['general.architecture'].contents()}."
        return {name.removeprefix(prefix): field.contents() for name, field in reader.fields.items()
                if name.startswith(prefix)}

    their_keys, our_keys = keys(their_file), keys(our_file)
    assert set(our_keys) - set(their_keys) <= OUR_EXTRA_KEYS
    assert {key: our_keys.get(key) for key in set(their_keys) - CONVERTER_ONLY_KEYS} == {
        key: value for key, value in their_keys.items() if key not in CONVERTER_ONLY_KEYS}


@pytest.mark.parametrize("target", ["onnx", "tensorrt"])
def test_onnx_and_tensorrt_refuse_the_mamba_blocks_in_one_line_before_any_work(target):
    """The targets' check, which the pipeline runs before it compresses anything."""
    import importlib

    backend = importlib.import_module(f"moeexport.backends.{target}")
    with pytest.raises(MoeExportError, match=r"does not lower Mamba-2 or feed-forward-only layers \(Nemotron-H"):
        backend.TARGET.check(tiny_model(FAMILY), "f32", backend.TARGET.Options())


@pytest.mark.parametrize("trim", [[{"layer_drop": {"n": 1, "score": "kl"}}],
                                  [{"expert_drop": {"keep": 3, "scope": "global", "score": "reap", "min_keep": 2}}]],
                         ids=["layer_drop", "global_expert_drop"])
def test_a_streamed_build_of_the_hub_layout_writes_the_in_memory_builds_gguf(trim, tmp_path):
    import shutil

    from moeexport.backends import gguf as gguf_backend
    from moeexport.checkpoint_files import DEMO_MODEL
    from moeexport.modelio import load_streamed
    from tests.test_gguf import _tiny_with_demo_vocabulary

    source = tmp_path / "source"
    _tiny_with_demo_vocabulary(FAMILY, n_routed_experts=8).save_pretrained(source)  # backbone.*, one per expert
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(DEMO_MODEL / name, source / name)
    files = []
    for loader in (load, load_streamed):
        model = _compress(loader(source), trim)
        files.append(gguf_backend.export(model, tmp_path / f"{loader.__name__}.gguf").path.read_bytes())
    assert files[0] == files[1]


def test_the_synthetic_preset_writes_the_hub_layout_transformers_loads(tmp_path):
    """tools/make_synthetic_checkpoint.py nemotron-3-nano-30b-a3b at small widths (--set): one period of the
    pattern (--layers 6: Mamba-2, MoE and the attention block), hub names, loaded and run by transformers."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "make_synthetic_checkpoint", Path(__file__).resolve().parents[1] / "tools" / "make_synthetic_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    small = dict(hidden_size=64, vocab_size=2048, num_attention_heads=4, head_dim=16, mamba_num_heads=8,
                 mamba_head_dim=8, n_groups=2, ssm_state_size=8, n_routed_experts=8, moe_intermediate_size=32,
                 moe_shared_expert_intermediate_size=48)
    settings = [arg for key, value in small.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    out = tmp_path / "nano"
    assert tool.main(["nemotron-3-nano-30b-a3b", str(out), "--layers", "6", *settings]) == 0
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    assert stock.config.layers_block_type == ["linear_attention", "moe", "linear_attention", "moe",
                                              "linear_attention", "full_attention"]
    assert torch.isfinite(_logits(stock, random_tokens(1, 20))).all()
    assert tuple(stock.model.layers[1].mixer.experts.up_proj.shape) == (8, 32, 64)


def test_expert_slots_fill_one_count_with_equal_splits_and_pad_only_where_no_divisor_fits():
    from moeexport.backends.gguf.writer import expert_slots

    total, slots = expert_slots([4, 3], width=24, top_k=2)  # 12 slots: 4 x 3 of width 8 and 3 x 4 of width 6
    assert total == 12 and [(s.split, s.width, s.top_k, s.pads(total)) for s in slots] == [(3, 8, 6, 0), (4, 6, 8, 0)]
    total, slots = expert_slots([5, 5], width=24, top_k=2)  # uniform: as it is
    assert total == 5 and all((s.split, s.pads(total)) == (1, 0) for s in slots)
    total, slots = expert_slots([128, 64, 100], width=1856, top_k=6)  # Nemotron-3-Nano's widths
    stored = sum(total * 2 * s.width for s in slots)
    assert stored <= 1.05 * 1856 * 2 * (128 + 64 + 100)  # within 5% of the kept experts' own weights
