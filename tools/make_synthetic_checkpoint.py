"""Write a checkpoint with a real MoE model's shapes and random weights, without a hub download.

    python tools/make_synthetic_checkpoint.py mixtral-8x7b OUT [--layers N] [--dtype bfloat16]
        [--shard-size 5GB] [--seed 0] [--set key=JSON ...] [--overwrite]

For measuring memory and speed at real widths: Mixtral-8x7B with `--layers 1` is
3.43 GB in bf16 (2.90 GB the layer, 0.52 GB embeddings and LM head), with
`--layers 4` 12.13 GB, whole 93.41 GB. The directory is what the hub holds: config.json
(the preset's values from the model's public config.json, then --set, then
--layers), generation_config.json, `model.safetensors` or
`model-0000i-of-0000n.safetensors` shards of at most --shard-size with
`model.safetensors.index.json`, tensors named and laid out as the hub checkpoints
store them (per-expert w1/w2/w3 or gate_proj/up_proj/down_proj), and a tokenizer.
`gpt-oss-20b` writes its experts as the hub ships them, fused stacks in MXFP4 (uint8 `*_blocks` and
`*_scales`, random codes): 13.76 GB whole, exactly the hub's total_size; 3.27 GB with `--layers 2`.

The tokenizer is the bundled demo model's (moeexport/demo), not the real model's:
text tokenizes to ids below 2048 only, and bos/eos are the demo's ids 1 and 2
(every preset's vocabulary is larger, so the rest of the embedding rows are
never looked up).

Weights: normal * 0.02 for matrices, ones for norms, generated one tensor at a
time (in chunks of rows) by a torch.Generator seeded from --seed and the tensor's
name, so a layer's weights do not depend on --layers or --shard-size and the same
arguments write the same bytes. Shard headers are written first (the data
regions are left sparse) and checked by moeexport.modelio.check_checkpoint against
the model transformers builds from config.json, before any weight is generated;
then the data is streamed into place, so the tool's memory does not grow with the
checkpoint. Everything is written into a staging directory beside OUT and renamed
at the end. Prints progress with ETA, then the total size and the tool's peak RSS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import resource
import shutil
import struct
import sys
from pathlib import Path
from typing import NamedTuple

import torch

DEFAULT_SHARD_SIZE = "5GB"
CHUNK_ELEMENTS = 2**22  # random numbers generated at once (16 MiB in float32), whatever the tensor's size
DEMO_TOKENIZER_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}

PRESETS = {
    "mixtral-8x7b": {
        "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000, "rope_theta": 1e6,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "hidden_act": "silu", "sliding_window": None,
        "router_aux_loss_coef": 0.02, "tie_word_embeddings": False,
    },
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2048,
        "moe_intermediate_size": 768, "intermediate_size": 6144, "num_hidden_layers": 48, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
        "norm_topk_prob": True, "vocab_size": 151936, "rope_theta": 1e6, "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "decoder_sparse_step": 1, "mlp_only_layers": [],
        "attention_bias": False, "use_sliding_window": False, "sliding_window": None, "router_aux_loss_coef": 0.001,
        "tie_word_embeddings": False,
    },
    "olmoe-1b-7b": {
        "model_type": "olmoe", "architectures": ["OlmoeForCausalLM"], "hidden_size": 2048, "intermediate_size": 1024,
        "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 64,
        "num_experts_per_tok": 8, "vocab_size": 50304, "max_position_embeddings": 4096, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5, "norm_topk_prob": False, "clip_qkv": None, "hidden_act": "silu",
        "attention_bias": False, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
    },
}
# zai-org/GLM-4.7-Flash's config.json (its MTP layer, num_nextn_predict_layers 1, is not written)
PRESETS["glm-4.7-flash"] = {
    "model_type": "glm4_moe_lite", "architectures": ["Glm4MoeLiteForCausalLM"], "hidden_size": 2048,
    "intermediate_size": 10240, "moe_intermediate_size": 1536, "num_hidden_layers": 47, "num_attention_heads": 20,
    "num_key_value_heads": 20, "vocab_size": 154880, "max_position_embeddings": 202752, "rope_theta": 1e6,
    "rms_norm_eps": 1e-5, "hidden_act": "silu", "q_lora_rank": 768, "kv_lora_rank": 512, "qk_nope_head_dim": 192,
    "qk_rope_head_dim": 64, "v_head_dim": 256, "n_routed_experts": 64, "n_shared_experts": 1,
    "num_experts_per_tok": 4, "norm_topk_prob": True, "routed_scaling_factor": 1.8, "n_group": 1, "topk_group": 1,
    "attention_bias": False, "tie_word_embeddings": False,
}
# nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16's config.json (52 layers; --layers N keeps the first N of its pattern:
# 6 is one period with an attention block, MEMEM*)
PRESETS["nemotron-3-nano-30b-a3b"] = {
    "model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"], "hidden_size": 2688,
    "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME", "intermediate_size": 1856,
    "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128, "vocab_size": 131072,
    "max_position_embeddings": 262144, "layer_norm_epsilon": 1e-5, "mamba_num_heads": 64, "mamba_head_dim": 64,
    "n_groups": 8, "ssm_state_size": 128, "conv_kernel": 4, "chunk_size": 128, "expand": 2, "use_conv_bias": True,
    "mamba_proj_bias": False, "mamba_hidden_act": "silu", "mlp_hidden_act": "relu2", "mlp_bias": False,
    "n_routed_experts": 128, "n_shared_experts": 1, "num_experts_per_tok": 6, "moe_intermediate_size": 1856,
    "moe_shared_expert_intermediate_size": 3712, "routed_scaling_factor": 2.5, "n_group": 1, "topk_group": 1,
    "norm_topk_prob": True, "use_bias": False, "attention_bias": False, "tie_word_embeddings": False,
}
# google/gemma-4-26B-A4B's text_config, written in the hub's multimodal layout (see LAYOUTS: 3-D stacked experts
# under Gemma4ForConditionalGeneration's model.language_model.*; the vision tower is not written). Layers slide 5:1 (transformers' default pattern, so that
# --layers 6 is one period); the full-attention layers' heads are 512 wide with 2 kv heads that are also the values.
PRESETS["gemma-4-26b-a4b"] = {
    "model_type": "gemma4_text", "architectures": ["Gemma4ForCausalLM"], "hidden_size": 2816,
    "intermediate_size": 2112, "moe_intermediate_size": 704, "num_hidden_layers": 30, "num_attention_heads": 16,
    "num_key_value_heads": 8, "num_global_key_value_heads": 2, "head_dim": 256, "global_head_dim": 512,
    "attention_k_eq_v": True, "enable_moe_block": True, "num_experts": 128, "top_k_experts": 8,
    "vocab_size": 262144, "sliding_window": 1024, "final_logit_softcapping": 30.0, "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh", "hidden_size_per_layer_input": 0,
    "num_kv_shared_layers": 0, "use_double_wide_mlp": False, "attention_bias": False, "tie_word_embeddings": True,
    "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                           "rope_theta": 1000000.0}},
}

# openai/gpt-oss-20b's config.json (its layer_types, sliding then full attention in turn, are the default
# transformers derives, so they follow --layers); the experts are written in MXFP4 as the hub ships them
PRESETS["gpt-oss-20b"] = {
    "model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "hidden_size": 2880, "intermediate_size": 2880,
    "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
    "num_local_experts": 32, "num_experts_per_tok": 4, "experts_per_token": 4, "vocab_size": 201088,
    "max_position_embeddings": 131072, "initial_context_length": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "sliding_window": 128, "swiglu_limit": 7.0, "attention_bias": True, "attention_dropout": 0.0,
    "router_aux_loss_coef": 0.9, "output_router_logits": False, "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                        "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096},
    "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
}
# Qwen/Qwen3.6-35B-A3B's text_config (as Qwen3.5-35B-A3B's): Gated DeltaNet in three of every four layers
# (layer_types follows from full_attention_interval at any --layers), written in the hub's multimodal layout (see
# LAYOUTS); its vision tower and next-token-prediction block, which the causal LM does not load, are not written
PRESETS["qwen3.6-35b-a3b"] = {
    "model_type": "qwen3_5_moe_text", "architectures": ["Qwen3_5MoeForCausalLM"], "hidden_size": 2048,
    "num_hidden_layers": 40, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
    "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    "linear_num_key_heads": 16, "linear_num_value_heads": 32, "full_attention_interval": 4,
    "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "num_experts": 256,
    "num_experts_per_tok": 8, "vocab_size": 248320, "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
    "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                        "mrope_section": [11, 11, 10], "mrope_interleaved": True},
}
PRESETS["tiny-mixtral"] = PRESETS["mixtral-8x7b"] | {  # for tests: Mixtral's structure at small widths
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2, "vocab_size": 2048,
}


class Layout(NamedTuple):
    """Where a family keeps its MoE weights on the hub."""

    moe: str  # the MoE sublayer: router `{moe}.gate`, experts `{moe}.experts.{j}`
    gate_up_down: tuple[str, str, str]  # the expert projections: hidden->ffn (gated), hidden->ffn, ffn->hidden
    expert_width: str  # the config key of one expert's ffn width
    qk_norm: str | None  # None, "head" (over head_dim) or "projection" (over q_proj's / k_proj's whole output)
    latent: bool = False  # multi-head latent attention (q_a/q_b, kv_a/kv_b projections) instead of q/k/v
    shared: str | None = None  # the shared experts' module inside the MoE sublayer (one MLP, n_shared wide)
    router_extra: tuple[str, ...] = ()  # per-expert router tensors besides `gate.weight` (a selection bias)
    # gpt-oss: biased q/k/v/o and per-head sinks; a biased `{moe}.router`; the experts as two fused stacks
    # (gate and up interleaved) in MXFP4 pairs `*_blocks` / `*_scales` (moeexport/mxfp4.py) with float biases
    mxfp4_experts: bool = False
    # the checkpoint holds the tensors as the model does (experts fused 3-D), under the multimodal model's text
    # prefix (model.language_model.*), with a config of that model_type wrapping the text config (Qwen3.5, Gemma 4)
    multimodal: tuple[str, str] | None = None  # (its model_type, its architecture)


LAYOUTS = {
    "mixtral": Layout("block_sparse_moe", ("w1", "w3", "w2"), "intermediate_size", None),
    "qwen3_moe": Layout("mlp", ("gate_proj", "up_proj", "down_proj"), "moe_intermediate_size", "head"),
    "olmoe": Layout("mlp", ("gate_proj", "up_proj", "down_proj"), "intermediate_size", "projection"),
    "glm4_moe_lite": Layout("mlp", ("gate_proj", "up_proj", "down_proj"), "moe_intermediate_size", None, latent=True,
                            shared="shared_experts", router_extra=("e_score_correction_bias",)),
    "gpt_oss": Layout("mlp", ("gate_up_proj", "gate_up_proj", "down_proj"), "intermediate_size", None,
                      mxfp4_experts=True),
    "qwen3_5_moe_text": Layout("mlp", ("gate_proj", "up_proj", "down_proj"), "moe_intermediate_size", "head",
                               shared="shared_expert",
                               multimodal=("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration")),
    "gemma4_text": Layout("experts", ("gate_up_proj", "gate_up_proj", "down_proj"), "moe_intermediate_size", "head",
                          multimodal=("gemma4", "Gemma4ForConditionalGeneration")),
}
MULTIMODAL_TEXT_PREFIX = ("model.", "model.language_model.")
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8"}
MXFP4_SCALES = (119, 122)  # E8M0 exponents drawn from [119, 122): random E2M1 codes then have a std near 0.02


def parse_size(text: str) -> int:
    """'5GB' (powers of 1000, as the hub's shard sizes), '512MiB' (powers of 1024) or a byte count."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?)?B?\s*", text, re.IGNORECASE)
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB, 500MB or 2GiB")
    unit = (match[2] or "").upper()
    scale = (1024 if unit.endswith("I") else 1000) ** ("KMGT".index(unit[0]) + 1 if unit else 0)
    return int(float(match[1]) * scale)


def parse_setting(text: str) -> tuple[str, object]:
    """key=value, the value read as JSON (4096, 1e-6, true, null, [1, 2]) or else as a plain string."""
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected key=value, e.g. --set num_hidden_layers=4")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def make_config(preset: str, layers: int | None = None, overrides: dict | None = None):
    """The transformers config of `preset`, with --set overrides (known keys only) and --layers applied."""
    from transformers import AutoConfig

    from moeexport.errors import MoeExportError

    if preset not in PRESETS:
        raise MoeExportError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = PRESETS[preset] | DEMO_TOKENIZER_IDS
    model_type = values["model_type"]
    defaults = AutoConfig.for_model(model_type)
    known = set(values) | set(defaults.to_dict()) | set(type(defaults).attribute_map)
    for key in overrides or {}:
        if key == "model_type" or key not in known:
            raise MoeExportError(f"--set {key}: {model_type} configs have no such key (or it is the preset's own)"
                                 f"; known keys: {', '.join(sorted(known - {'model_type'}))}")
    values = values | (overrides or {}) | ({"num_hidden_layers": layers} if layers is not None else {})
    if layers is not None and "hybrid_override_pattern" in values:  # the pattern, not the count, sets the layers
        values["hybrid_override_pattern"] = values["hybrid_override_pattern"][:layers]
    return AutoConfig.for_model(**values)


def tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in the hub checkpoints' names and per-expert layout, in model order."""
    from moeexport.adapters import adapter_for

    if config.model_type == "nemotron_h":  # one block per layer: its own names
        return _nemotron_h_specs(config)
    layout = LAYOUTS[config.model_type]  # every preset's family has one; --set cannot change model_type
    if layout.multimodal:
        return _model_specs(config)
    facts = adapter_for(config).model_config(config)
    hidden, head_dim, width = facts.hidden_size, facts.head_dim, getattr(config, layout.expert_width)
    q_width, kv_width = facts.num_heads * head_dim, facts.num_kv_heads * head_dim
    gate, up, down = layout.gate_up_down
    specs = [("model.embed_tokens.weight", (facts.vocab_size, hidden))]
    dense = _dense_layers(config)
    for i in range(config.num_hidden_layers):
        layer, moe = f"model.layers.{i}", f"model.layers.{i}.{layout.moe}"
        specs += [(f"{layer}.input_layernorm.weight", (hidden,))]
        if layout.latent:
            specs += _latent_attention_specs(f"{layer}.self_attn", facts)
        else:
            specs += [(f"{layer}.self_attn.q_proj.weight", (q_width, hidden)),
                      (f"{layer}.self_attn.k_proj.weight", (kv_width, hidden)),
                      (f"{layer}.self_attn.v_proj.weight", (kv_width, hidden)),
                      (f"{layer}.self_attn.o_proj.weight", (hidden, q_width))]
        if layout.mxfp4_experts:
            specs += [(f"{layer}.self_attn.{name}_proj.bias", (width,))
                      for name, width in (("q", q_width), ("k", kv_width), ("v", kv_width), ("o", hidden))]
            specs += [(f"{layer}.self_attn.sinks", (facts.num_heads,))]
        if layout.qk_norm:
            per_head = layout.qk_norm == "head"
            specs += [(f"{layer}.self_attn.q_norm.weight", (head_dim if per_head else q_width,)),
                      (f"{layer}.self_attn.k_norm.weight", (head_dim if per_head else kv_width,))]
        specs += [(f"{layer}.post_attention_layernorm.weight", (hidden,))]
        if i in dense:
            specs += _mlp_specs(moe, hidden, config.intermediate_size)
            continue
        if layout.mxfp4_experts:
            specs += _mxfp4_moe_specs(moe, facts.num_experts, hidden, width)
            continue
        specs += [(f"{moe}.gate.weight", (facts.num_experts, hidden))]
        specs += [(f"{moe}.gate.{name}", (facts.num_experts,)) for name in layout.router_extra]
        for j in range(facts.num_experts):
            specs += [(f"{moe}.experts.{j}.{gate}.weight", (width, hidden)),
                      (f"{moe}.experts.{j}.{up}.weight", (width, hidden)),
                      (f"{moe}.experts.{j}.{down}.weight", (hidden, width))]
        if layout.shared:
            specs += _mlp_specs(f"{moe}.{layout.shared}", hidden, width * facts.shared_expert_count)
    specs += [("model.norm.weight", (hidden,))]
    if not config.tie_word_embeddings:
        specs += [("lm_head.weight", (facts.vocab_size, hidden))]
    return specs


def _nemotron_h_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """Nemotron-H's hub names (backbone.*): each layer one block, its norm and its mixer (Mamba-2, attention or
    the MoE with one shared expert)."""
    from moeexport.adapters import adapter_for

    facts = adapter_for(config).model_config(config)
    hidden, mamba, experts = facts.hidden_size, facts.mamba, facts.num_experts
    conv = mamba.inner + 2 * mamba.groups * mamba.state
    q_width, kv_width = facts.num_heads * facts.head_dim, facts.num_kv_heads * facts.head_dim
    width, shared = config.moe_intermediate_size, config.moe_shared_expert_intermediate_size
    specs = [("backbone.embeddings.weight", (facts.vocab_size, hidden))]
    for i, kind in enumerate(config.layers_block_type):
        block = f"backbone.layers.{i}"
        specs += [(f"{block}.norm.weight", (hidden,))]
        if kind == "linear_attention":
            specs += [(f"{block}.mixer.A_log", (mamba.heads,)), (f"{block}.mixer.D", (mamba.heads,)),
                      (f"{block}.mixer.conv1d.bias", (conv,)), (f"{block}.mixer.conv1d.weight", (conv, 1, mamba.conv_kernel)),
                      (f"{block}.mixer.dt_bias", (mamba.heads,)),
                      (f"{block}.mixer.in_proj.weight", (mamba.inner + conv + mamba.heads, hidden)),
                      (f"{block}.mixer.norm.weight", (mamba.inner,)), (f"{block}.mixer.out_proj.weight", (hidden, mamba.inner))]
        elif kind == "full_attention":
            specs += [(f"{block}.mixer.q_proj.weight", (q_width, hidden)), (f"{block}.mixer.k_proj.weight", (kv_width, hidden)),
                      (f"{block}.mixer.v_proj.weight", (kv_width, hidden)), (f"{block}.mixer.o_proj.weight", (hidden, q_width))]
        else:
            specs += [(f"{block}.mixer.gate.weight", (experts, hidden)),
                      (f"{block}.mixer.gate.e_score_correction_bias", (experts,))]
            for j in range(experts):
                specs += [(f"{block}.mixer.experts.{j}.up_proj.weight", (width, hidden)),
                          (f"{block}.mixer.experts.{j}.down_proj.weight", (hidden, width))]
            specs += [(f"{block}.mixer.shared_experts.up_proj.weight", (shared, hidden)),
                      (f"{block}.mixer.shared_experts.down_proj.weight", (hidden, shared))]
    specs += [("backbone.norm_f.weight", (hidden,)), ("lm_head.weight", (facts.vocab_size, hidden))]
    return specs
def _model_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor the model saves, from its skeleton on the meta device (the tied head aside),
    under the multimodal checkpoint's text prefix where the family's layout is multimodal."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    specs = [(name, tuple(tensor.shape)) for name, tensor in model.state_dict().items() if name not in tied]
    layout = LAYOUTS.get(config.model_type)
    if layout is None or not layout.multimodal:
        return specs
    stem, prefixed = MULTIMODAL_TEXT_PREFIX
    return [(prefixed + name[len(stem):] if name.startswith(stem) else name, shape) for name, shape in specs]


def _save_config(config, directory: Path) -> None:
    """config.json: the config's own, or for a multimodal layout the multimodal config wrapping it as text_config."""
    layout = LAYOUTS.get(config.model_type)
    if layout is None or not layout.multimodal:
        config.save_pretrained(directory)
        return
    model_type, architecture = layout.multimodal
    text = {key: value for key, value in config.to_diff_dict().items() if key != "architectures"}
    wrapper = {"model_type": model_type, "architectures": [architecture], "text_config": text,
               "tie_word_embeddings": config.tie_word_embeddings}
    (directory / "config.json").write_text(json.dumps(wrapper, indent=2) + "\n")


def _dense_layers(config) -> set[int]:
    """The layers with a dense MLP instead of experts (mlp_layer_types; none in the other presets' families)."""
    return {i for i, kind in enumerate(getattr(config, "mlp_layer_types", None) or []) if kind == "dense"}


def _mxfp4_moe_specs(moe: str, experts: int, hidden: int, width: int) -> list[tuple[str, tuple[int, ...]]]:
    """gpt-oss's router and expert stacks as the hub stores them: each stack's rows (its outputs) in blocks of
    mxfp4.BLOCK inputs, 16 bytes of codes and one scale byte per block."""
    from moeexport import mxfp4

    specs = [(f"{moe}.router.weight", (experts, hidden)), (f"{moe}.router.bias", (experts,))]
    for stack, outputs, inputs in (("gate_up_proj", 2 * width, hidden), ("down_proj", hidden, width)):
        groups = inputs // mxfp4.BLOCK
        specs += [(f"{moe}.experts.{stack}{mxfp4.BLOCKS}", (experts, outputs, groups, mxfp4.BLOCK // 2)),
                  (f"{moe}.experts.{stack}{mxfp4.SCALES}", (experts, outputs, groups)),
                  (f"{moe}.experts.{stack}_bias", (experts, outputs))]
    return specs


def stored_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The tensor's dtype in the file: uint8 for MXFP4 codes and scales, else the checkpoint's."""
    from moeexport import mxfp4

    return torch.uint8 if name.endswith((mxfp4.BLOCKS, mxfp4.SCALES)) else dtype


def tensor_bytes(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return _numel(shape) * torch.empty((), dtype=stored_dtype(name, dtype)).element_size()


def _mlp_specs(prefix: str, hidden: int, width: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.gate_proj.weight", (width, hidden)), (f"{prefix}.up_proj.weight", (width, hidden)),
            (f"{prefix}.down_proj.weight", (hidden, width))]


def _latent_attention_specs(prefix: str, facts) -> list[tuple[str, tuple[int, ...]]]:
    """Multi-head latent attention's projections and norms (q through a LoRA of q_lora_rank)."""
    latent, hidden, heads = facts.latent, facts.hidden_size, facts.num_heads
    qk_width = latent.qk_nope_head_dim + latent.qk_rope_head_dim
    return [(f"{prefix}.q_a_proj.weight", (latent.q_lora_rank, hidden)),
            (f"{prefix}.q_a_layernorm.weight", (latent.q_lora_rank,)),
            (f"{prefix}.q_b_proj.weight", (heads * qk_width, latent.q_lora_rank)),
            (f"{prefix}.kv_a_proj_with_mqa.weight", (latent.kv_lora_rank + latent.qk_rope_head_dim, hidden)),
            (f"{prefix}.kv_a_layernorm.weight", (latent.kv_lora_rank,)),
            (f"{prefix}.kv_b_proj.weight",
             (heads * (latent.qk_nope_head_dim + latent.v_head_dim), latent.kv_lora_rank)),
            (f"{prefix}.o_proj.weight", (hidden, heads * latent.v_head_dim))]


def shard_plan(specs, dtype: torch.dtype, shard_size: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors grouped into shards of at most shard_size bytes (a bigger tensor gets its own)."""
    shards, current, used = [], [], 0
    for name, shape in specs:
        size = tensor_bytes(name, shape, dtype)
        if current and used + size > shard_size:
            shards, current, used = shards + [current], [], 0
        current.append((name, shape))
        used += size
    return shards + [current]


def _numel(shape) -> int:
    count = 1
    for dimension in shape:
        count *= dimension
    return count


def safetensors_header(tensors, dtype: torch.dtype) -> bytes:
    """The length-prefixed header of a safetensors file holding `tensors` back to back, in order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        end = offset + tensor_bytes(name, shape, dtype)
        header[name] = {"dtype": SAFETENSORS_DTYPES[stored_dtype(name, dtype)], "shape": list(shape),
                        "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text


def tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


def tensor_chunks(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int):
    """The tensor's values, a few rows at a time: ones for norms and sinks (1-D, not a bias), uniform codes and
    MXFP4_SCALES exponents for MXFP4 pairs, normal * 0.02 for the rest (matrices, biases)."""
    from moeexport import mxfp4

    if len(shape) == 1 and not name.endswith("_bias") and not name.endswith(".bias"):
        yield torch.ones(shape, dtype=dtype)
        return
    generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    columns = shape[-1]
    rows = _numel(shape) // columns
    rows, columns = _numel(shape[:-1]), shape[-1]  # a stack of matrices (fused experts) row after row
    step = max(1, CHUNK_ELEMENTS // columns)
    for start in range(0, rows, step):
        chunk = (min(step, rows - start), columns)
        if name.endswith(mxfp4.BLOCKS):
            yield torch.randint(0, 256, chunk, generator=generator, dtype=torch.uint8)
        elif name.endswith(mxfp4.SCALES):
            yield torch.randint(*MXFP4_SCALES, chunk, generator=generator, dtype=torch.uint8)
        else:
            yield (torch.randn(chunk, generator=generator) * 0.02).to(dtype)


def write_checkpoint(preset: str, out: str | Path, layers: int | None = None, dtype: str = "bfloat16",
                     shard_size: int | str = DEFAULT_SHARD_SIZE, seed: int = 0, overrides: dict | None = None,
                     overwrite: bool = False, progress: bool = False) -> dict:
    """Write the checkpoint into `out`; returns its files and total tensor bytes."""
    from transformers import GenerationConfig

    from moeexport.errors import MoeExportError
    from moeexport.checkpoint_files import DEMO_MODEL, SAFE_INDEX, SAFE_WEIGHTS
    from moeexport.modelio import DTYPES, check_checkpoint
    from moeexport.source import open_source
    from moeexport.outputs import check_output, output_lock, staged

    if dtype not in DTYPES:
        raise MoeExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    shard_bytes = parse_size(shard_size) if isinstance(shard_size, str) else shard_size
    config = make_config(preset, layers, overrides)
    config.dtype = torch_dtype
    specs = tensor_specs(config)
    shards = shard_plan(specs, torch_dtype, shard_bytes)
    names = ([SAFE_WEIGHTS] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    total = sum(tensor_bytes(name, shape, torch_dtype) for name, shape in specs)
    out = check_output(out, None, overwrite)
    free = shutil.disk_usage(next(p for p in [out.resolve(), *out.resolve().parents] if p.exists())).free
    if total > free:
        raise MoeExportError(f"the checkpoint needs {total / 1e9:.2f} GB but {out.parent} has {free / 1e9:.2f} GB "
                             "free; pass fewer --layers or write elsewhere")

    with output_lock(out), staged(out, overwrite) as staging:
        _save_config(config, staging)
        GenerationConfig.from_model_config(config).save_pretrained(staging)
        for tokenizer_file in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
            shutil.copyfile(DEMO_MODEL / tokenizer_file, staging / tokenizer_file)
        starts = []
        for name, tensors in zip(names, shards):  # headers first, data regions sparse until filled
            header = safetensors_header(tensors, torch_dtype)
            with open(staging / name, "wb") as handle:
                handle.write(header)
                handle.truncate(len(header) + sum(tensor_bytes(name, shape, torch_dtype) for name, shape in tensors))
            starts.append(len(header))
        if len(shards) > 1:
            weight_map = {tensor: name for name, tensors in zip(names, shards) for tensor, _ in tensors}
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (staging / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        check_checkpoint(open_source(staging))  # names and shapes as transformers expects
        _fill(staging, names, shards, starts, torch_dtype, seed, total, progress)
    return {"out": out, "files": names, "total_bytes": total, "tensors": len(specs)}


def _fill(directory: Path, names, shards, starts, dtype: torch.dtype, seed: int, total: int, progress: bool) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task("writing", total=total)
        for name, tensors, start in zip(names, shards, starts):
            bar.update(task, description=name)
            with open(directory / name, "r+b") as handle:
                handle.seek(start)
                for tensor, shape in tensors:
                    for chunk in tensor_chunks(tensor, shape, dtype, seed):
                        handle.write(chunk.view(torch.uint8).numpy())
                        bar.advance(task, chunk.numel() * chunk.element_size())


def main(argv: list[str] | None = None) -> int:
    from moeexport.errors import MoeExportError
    from moeexport.modelio import DTYPES
    from moeexport.report import size

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=list(PRESETS))
    parser.add_argument("out", help="the checkpoint directory to write")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the model's own count)")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--shard-size", type=parse_size, default=DEFAULT_SHARD_SIZE,
                        help=f"largest shard, e.g. 5GB or 2GiB (default {DEFAULT_SHARD_SIZE})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", type=parse_setting, action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (JSON), e.g. --set hidden_size=1024; repeatable")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be at least 1")
    import transformers

    transformers.logging.set_verbosity_error()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    try:
        result = write_checkpoint(args.preset, args.out, args.layers, args.dtype, args.shard_size, args.seed,
                                  dict(args.set), args.overwrite, progress=True)
    except MoeExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    total = result["total_bytes"]
    print(f"wrote {result['out']}: {result['tensors']} tensors, {size(total)} ({total / 1e9:.3f} GB) in "
          f"{len(result['files'])} file(s); peak RSS {size(peak)} ({peak / total:.2f}x the weights; "
          f"{size(baseline)} of it before writing, i.e. imports)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
