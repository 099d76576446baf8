"""tools/make_synthetic_checkpoint.py: hub-layout checkpoints with real widths and random weights, at tiny widths here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import moeexport
from moeexport.adapters import adapter_for
from moeexport.errors import MoeExportError

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_synthetic_checkpoint", REPO / "tools" / "make_synthetic_checkpoint.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)

TOKENS = torch.tensor([[1, 5, 300, 2047, 17, 2]])
TINY = {  # --set overrides that shrink a real preset to test widths
    "qwen3-30b-a3b": dict(hidden_size=64, moe_intermediate_size=32, intermediate_size=96, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2, vocab_size=2048),
    "olmoe-1b-7b": dict(hidden_size=64, intermediate_size=32, num_attention_heads=4, num_key_value_heads=4,
                        num_experts=4, num_experts_per_tok=2, vocab_size=2048),
}


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            found |= {name: handle.get_tensor(name) for name in handle.keys()}
    return found


def logits(lm) -> torch.Tensor:
    with torch.no_grad():
        return lm(TOKENS).logits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "tiny"
    assert tool.main(["tiny-mixtral", str(out), "--layers", "2"]) == 0
    return out, moeexport.load(out)


def test_tiny_mixtral_loads_with_the_configured_shapes(tiny, capsys):
    out, lm = tiny
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer.model",
        "tokenizer_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["dtype"]) == (
        "mixtral", 2, 64, "bfloat16")
    out_logits = logits(lm)
    assert out_logits.shape == (1, TOKENS.shape[1], 2048) and torch.isfinite(out_logits).all()
    view = adapter_for(lm.config).layer_view(lm, 1)
    assert view.num_experts == 4 and view.top_k == 2 and tuple(view.experts.gate_up_proj.shape) == (4, 192, 64)

    stored = tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    w1, w3 = (stored[f"model.layers.1.block_sparse_moe.experts.3.{w}.weight"].float() for w in ("w1", "w3"))
    assert torch.equal(view.experts.gate_up_proj[3], torch.cat([w1, w3]))  # transformers read the hub layout
    assert torch.equal(stored["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    assert abs(stored["model.embed_tokens.weight"].float().std().item() - 0.02) < 0.001
    assert len(moeexport.load_tokenizer(out)("a few words").input_ids) > 1


def test_small_shards_write_an_index_and_load_to_the_same_model(tiny, tmp_path):
    single, lm = tiny
    out = tmp_path / "sharded"
    result = tool.write_checkpoint("tiny-mixtral", out, layers=2, shard_size="300KB")
    assert len(result["files"]) >= 3 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for name in result["files"]:
        assert (out / name).stat().st_size <= 300_000 + 8192  # tensor bytes within the limit, plus the header
        with safe_open(out / name, "pt") as handle:
            assert {t for t, shard in index["weight_map"].items() if shard == name} == set(handle.keys())
    stored = tensors(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    assert stored.keys() == tensors(single).keys()
    assert all(torch.equal(stored[name], t) for name, t in tensors(single).items())
    assert torch.equal(logits(moeexport.load(out)), logits(lm))


def test_the_same_seed_writes_the_same_bytes_and_layers_do_not_depend_on_the_layer_count(tiny, tmp_path):
    single, _ = tiny
    again, reseeded, one_layer = tmp_path / "again", tmp_path / "seed1", tmp_path / "one"
    tool.write_checkpoint("tiny-mixtral", again, layers=2)
    tool.write_checkpoint("tiny-mixtral", reseeded, layers=2, seed=1)
    tool.write_checkpoint("tiny-mixtral", one_layer, layers=1)
    for path in single.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name
    assert (reseeded / "model.safetensors").read_bytes() != (single / "model.safetensors").read_bytes()
    two, one = tensors(single), tensors(one_layer)
    assert one.keys() < two.keys() and all(torch.equal(t, two[name]) for name, t in one.items())


@pytest.mark.parametrize("preset", sorted(TINY))
def test_qwen3_moe_and_olmoe_structures_load(preset, tmp_path):
    out = tmp_path / preset
    settings = [arg for key, value in TINY[preset].items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    assert tool.main([preset, str(out), "--layers", "2", "--shard-size", "150KB", *settings]) == 0
    lm = moeexport.load(out)
    assert lm.config.model_type == tool.PRESETS[preset]["model_type"] and lm.config.num_hidden_layers == 2
    assert torch.isfinite(logits(lm)).all()
    attention = adapter_for(lm.config).layer_view(lm, 0).attention
    q_norm = 32 if preset == "qwen3-30b-a3b" else 64  # Qwen3: over head_dim; OLMoE: over q_proj's whole output
    assert tuple(attention.q_norm.weight.shape) == (q_norm,)


def test_a_config_the_layout_does_not_match_is_refused_before_any_weight_is_written(tmp_path, capsys):
    out = tmp_path / "biased"
    with pytest.raises(MoeExportError, match=r"lacks tensor model\.layers\.0\.self_attn\.[qkvo]_proj\.bias"):
        tool.write_checkpoint("qwen3-30b-a3b", out, layers=1, overrides=TINY["qwen3-30b-a3b"] | {"attention_bias": True})
    assert not out.exists() and not list(tmp_path.iterdir())
    assert tool.main(["tiny-mixtral", str(out), "--set", "hiden_size=32"]) == 2
    assert "--set hiden_size" in capsys.readouterr().err and not out.exists()
