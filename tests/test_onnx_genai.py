"""onnxruntime-genai runs our ONNX decoders, with the genai_config.json and tokenizer files written beside them."""

from __future__ import annotations

import json

import pytest

from moeexport.adapters import adapter_for
from moeexport.adapters.surgery import drop_blocks, structure
from moeexport.backends import onnx as onnx_backend
from moeexport.backends.onnx.genai import write_genai_files
from moeexport.modelio import load, load_tokenizer
from moeexport.validate import TorchRunner
from tests.conftest import CORPUS, FIXTURE, needs_shared
from tests.tiny_models import random_tokens, tiny_model

og = pytest.importorskip("onnxruntime_genai", reason="needs onnxruntime-genai (in the dev extra)")

CONTEXT = 256
NEW_TOKENS = 32
PROMPT = "Once upon a time, in a quiet village by the sea,"


def _export(model, tokenizer, directory):
    path = onnx_backend.export(model, directory / "model.onnx", quant="f32", context=CONTEXT).path
    return path, write_genai_files(model, tokenizer, path, CONTEXT)


def _genai_greedy(directory, prompt: list[int], count: int) -> list[int]:
    genai_model = og.Model(str(directory))
    params = og.GeneratorParams(genai_model)
    length = len(prompt) + count  # min_length too: torch's reference never stops at eos
    params.set_search_options(do_sample=False, max_length=length, min_length=length)
    generator = og.Generator(genai_model, params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def _assert_generates_like_torch(model, tokenizer, directory):
    _export(model, tokenizer, directory)
    prompt = tokenizer(PROMPT)["input_ids"]
    genai_ids = list(og.Tokenizer(og.Model(str(directory))).encode(PROMPT))
    assert [model.config.bos_token_id, *genai_ids] == prompt  # genai's encode adds no BOS
    assert _genai_greedy(directory, prompt, NEW_TOKENS) == TorchRunner(model).generate(prompt, NEW_TOKENS)


def test_the_demo_model_generates_torchs_greedy_tokens(tmp_path):
    _assert_generates_like_torch(load("demo"), load_tokenizer("demo"), tmp_path)


@needs_shared
@pytest.mark.parametrize("compressed", [False, True], ids=["uncompressed", "global_expert_drop"])
def test_the_fixture_generates_torchs_greedy_tokens(compressed, tmp_path):
    from moeexport.calibration.sources import CalibrationConfig
    from moeexport.compress import StatisticsProvider, compress
    from moeexport.recipe import parse_recipe

    model, tokenizer = load(FIXTURE), load_tokenizer(FIXTURE)
    if compressed:
        calibration = CalibrationConfig(source=str(CORPUS / "calib.txt"), num_sequences=8, sequence_length=128)
        provider = StatisticsProvider(tokenizer, calibration, "fixture", cache_dir=None)
        recipe = {"passes": [{"expert_drop": {"keep": 6, "scope": "global", "score": "reap", "min_keep": 2}}]}
        compress(model, parse_recipe(recipe), provider)
        counts = [spec.num_experts for spec in structure(adapter_for(model.config), model)]
        assert len(set(counts)) > 1 and sum(counts) == 6 * len(counts), counts  # non-uniform layers
    _assert_generates_like_torch(model, tokenizer, tmp_path)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "block_drop"])
def test_tiny_families_generate_torchs_greedy_tokens(family, tmp_path):
    # DeepSeek-V2's latent cache runs only when its key and value widths agree (genai has one head_size)
    model = tiny_model("mixtral" if family == "block_drop" else family,
                       **({"kv_lora_rank": 8} if family == "deepseek_v2" else {}))
    if family == "block_drop":
        drop_blocks(adapter_for(model.config), model, [1, 2])
    _, written = _export(model, load_tokenizer("demo"), tmp_path)
    config = json.loads(written[0].read_text())["model"]["decoder"]
    assert config["num_hidden_layers"] == (2 if family == "block_drop" else 4)
    prompt = random_tokens(1, 8)[0].tolist()
    assert _genai_greedy(tmp_path, prompt, NEW_TOKENS) == TorchRunner(model).generate(prompt, NEW_TOKENS)


def test_the_config_says_what_the_model_says(tmp_path):
    model, tokenizer = load("demo"), load_tokenizer("demo")
    path, written = _export(model, tokenizer, tmp_path / "out")
    names = ("genai_config.json", "tokenizer.json", "tokenizer_config.json")
    assert written == [tmp_path / "out" / name for name in names]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([path.name, *(p.name for p in written)])
    config = json.loads(written[0].read_text())
    decoder, search = config["model"]["decoder"], config["search"]
    assert config["model"]["type"] == "decoder"
    assert config["model"]["vocab_size"] == model.config.vocab_size
    assert config["model"]["context_length"] == search["max_length"] == CONTEXT
    c = model.config
    assert (config["model"]["bos_token_id"], config["model"]["eos_token_id"]) == (c.bos_token_id, c.eos_token_id)
    assert decoder["filename"] == path.name == "model.onnx"
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"], decoder["head_size"]) == (
        c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads)
    assert (decoder["hidden_size"], decoder["num_hidden_layers"]) == (c.hidden_size, c.num_hidden_layers)
    assert search["past_present_share_buffer"] is False
    latent = json.loads(write_genai_files(tiny_model("deepseek_v2"), tokenizer, tmp_path / "ds.onnx", CONTEXT)[0]
                        .read_text())["model"]["decoder"]
    assert (latent["num_key_value_heads"], latent["head_size"]) == (1, 16)  # one latent "head", kv_lora_rank wide
