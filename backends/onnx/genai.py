"""genai_config.json and tokenizer files that let onnxruntime-genai run an exported decoder.

onnxruntime-genai (og.Model(directory)) reads the graph's directory: a
genai_config.json naming the graph and its cache, plus tokenizer.json and
tokenizer_config.json. The fields that are not obvious:

- model.type "decoder": genai's generic decoder. Family names it has no
  implementation for (our MoE families' own model_type) are refused as an
  unsupported model_type; the generic decoder only needs the graph's IO, which
  follows genai's naming already (backends/onnx/decoder.py).
- model.context_length and search.max_length: the positions the graph was
  exported with (its RoPE table rows); genai refuses a context_length of 0.
- decoder.num_hidden_layers: the graph's decoder layers, which after a
  Block Drop are fewer than the original model's; one past/present pair each.
- decoder.num_key_value_heads / head_size: the cache shape of the graph
  (decoder.cache_shape); genai allocates the first, empty past tensors with
  it. For multi-head latent attention the cache is one "head" holding the
  kv latent (key, kv_lora_rank wide) and the rotated shared key (value,
  qk_rope_head_dim wide); genai has one head_size for key and value, so the
  value input of such a graph does not match it whenever the two widths differ
  (512 and 64 in the V2 configs), and genai refuses the first step ("invalid
  dimensions for input: past_key_values.0.value"). The config is written all
  the same (head_size = the key width); it runs when the widths are equal.
- search.past_present_share_buffer false: true fails on our graphs ("Attempting
  to broadcast an axis by a dimension other than 1"): genai then hands in a
  max_length past buffer, while our present is past and new concatenated.
- pad_token_id: the model's, else the tokenizer's, else the first eos id (the
  fixture and demo configs have none; single-sequence generation pads nothing).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from moeexport.adapters import adapter_for
from moeexport.adapters.surgery import decoder_layers
from moeexport.backends.onnx.decoder import cache_shape
from moeexport.errors import MoeExportError

CONFIG_NAME = "genai_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what genai's tokenizer reads


def _token_ids(model, tokenizer) -> tuple[int, list[int], int]:
    config = model.config
    bos = config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_token_id
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    pad = next((t for t in (config.pad_token_id, tokenizer.pad_token_id) if t is not None), eos[0])
    return bos, eos, pad


def genai_config(model, tokenizer, onnx_path: Path, context: int) -> dict:
    adapter = adapter_for(model.config)
    config = adapter.model_config(model.config)
    cache = cache_shape(model)
    bos, eos, pad = _token_ids(model, tokenizer)
    return {
        "model": {
            "type": "decoder",
            "bos_token_id": bos,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": pad,
            "context_length": context,
            "vocab_size": config.vocab_size,
            "decoder": {
                "filename": Path(onnx_path).name,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "hidden_size": config.hidden_size,
                "num_attention_heads": config.num_heads,
                "num_key_value_heads": cache.heads,
                "head_size": cache.key_width,
                "num_hidden_layers": len(decoder_layers(adapter, model)),
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "max_length": context,
            "past_present_share_buffer": False,
        },
    }


def write_genai_files(model, tokenizer, onnx_path: Path, context: int) -> list[Path]:
    """Write genai_config.json, tokenizer.json and tokenizer_config.json beside onnx_path, each atomically.

    `context` is the number of positions the graph was exported with. Returns the paths written.
    """
    directory = Path(onnx_path).parent
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".genai.", dir=directory))
    try:
        tokenizer.save_pretrained(staging)
        if not (staging / "tokenizer.json").is_file():
            raise MoeExportError("onnxruntime-genai needs tokenizer.json: load the model's fast tokenizer")
        config = genai_config(model, tokenizer, onnx_path, context)
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        written = []
        for name in (CONFIG_NAME, *TOKENIZER_FILES):
            os.chmod(staging / name, 0o644)
            os.replace(staging / name, directory / name)
            written.append(directory / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written
