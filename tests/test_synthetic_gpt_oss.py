"""tools/make_synthetic_checkpoint.py's `gpt-oss-20b` preset: the hub's widths and layout, experts in MXFP4."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig

from moeexport.modelio import load, load_streamed
from moeexport.streaming import logits
from tests.tiny_models import random_tokens

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_synthetic_checkpoint", REPO / "tools" / "make_synthetic_checkpoint.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)

# openai/gpt-oss-20b's model.safetensors.index.json: 459 tensors, metadata.total_size
HUB_TENSORS, HUB_TOTAL_SIZE = 459, 13_761_264_768
AT_TEST_WIDTHS = dict(hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      num_local_experts=4, vocab_size=2048)  # widths in whole MXFP4 blocks of 32 inputs


def test_the_whole_preset_has_the_hub_checkpoint_s_tensors_and_bytes():
    config = tool.make_config("gpt-oss-20b")
    specs = dict(tool.tensor_specs(config))
    assert len(specs) == HUB_TENSORS
    assert sum(tool.tensor_bytes(name, shape, torch.bfloat16) for name, shape in specs.items()) == HUB_TOTAL_SIZE
    experts = "model.layers.23.mlp.experts"
    assert specs[f"{experts}.gate_up_proj_blocks"] == (32, 5760, 90, 16)
    assert specs[f"{experts}.down_proj_scales"] == (32, 2880, 90)
    assert specs["model.layers.0.self_attn.sinks"] == (64,) and specs["model.layers.0.mlp.router.bias"] == (32,)
    assert config.layer_types[:4] == ["sliding_attention", "full_attention"] * 2 and config.sliding_window == 128


def test_a_two_layer_checkpoint_at_test_widths_is_read_as_transformers_dequantizes_it(tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    out = tmp_path / "gpt-oss"
    settings = [arg for key, value in AT_TEST_WIDTHS.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    assert tool.main(["gpt-oss-20b", str(out), "--layers", "2", *settings]) == 0
    config = AutoConfig.from_pretrained(out)
    assert (config.model_type, config.num_hidden_layers, config.num_local_experts) == ("gpt_oss", 2, 4)
    assert config.layer_types == ["sliding_attention", "full_attention"] and config.swiglu_limit == 7.0
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["factor"] == 32.0
    assert config.quantization_config["quant_method"] == "mxfp4"

    with safe_open(out / "model.safetensors", "pt") as handle:
        stored = {name: handle.get_tensor(name) for name in handle.keys()}
    packed = {name: t for name, t in stored.items() if name.endswith(("_blocks", "_scales"))}
    assert len(packed) == 8 and all(t.dtype == torch.uint8 for t in packed.values())
    assert all(t.dtype == torch.bfloat16 for name, t in stored.items() if name not in packed)
    model = load(out)
    for index, layer in enumerate(model.model.layers):
        for stack in ("gate_up_proj", "down_proj"):
            prefix = f"model.layers.{index}.mlp.experts.{stack}"
            expected = convert_moe_packed_tensors(stored[prefix + "_blocks"], stored[prefix + "_scales"],
                                                  dtype=torch.float32)
            assert torch.equal(getattr(layer.mlp.experts, stack), expected), prefix
            assert 0.01 < expected.std().item() < 0.04  # weights of the scale the other tensors have
    tokens = random_tokens(2, 16)
    with torch.no_grad():
        eager = model(tokens).logits.numpy()
    assert np.isfinite(eager).all()
    assert np.array_equal(logits(load_streamed(out), tokens), eager)
