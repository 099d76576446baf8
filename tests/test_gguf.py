"""GGUF target: files written here load in llama.cpp and compute what the torch model computes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import moeexport
from moeexport.backends import gguf as gguf_backend
from moeexport.calibration.sources import sample_from_model
from moeexport.cli import main
from moeexport.compress import compress
from moeexport.errors import MoeExportError
from moeexport.recipe import parse_recipe
from moeexport.adapters import adapter_for
from moeexport.adapters.surgery import keep_experts, structure
from moeexport.validate import TorchRunner, compare
from tests.conftest import CORPUS, FIXTURE, needs_shared

REPO = Path(__file__).resolve().parents[1]

STRUCTURES = {
    "uncompressed": [],
    "block_drop_2": [{"block_drop": {"n": 2, "score": "random"}}],
    "layer_drop_1": [{"layer_drop": {"n": 1, "score": "random"}}],
    "expert_drop_uniform": [{"expert_drop": {"keep": 5, "scope": "layer", "score": "random"}}],
    "all_three": [
        {"block_drop": {"n": 1, "score": "random"}},
        {"layer_drop": {"n": 1, "score": "random"}},
        {"expert_drop": {"keep": 6, "score": "random"}},
    ],
    "expert_drop_global": [{"expert_drop": {"keep": 5, "scope": "global", "score": "random", "min_keep": 2}}],
    "global_and_layer_drop": [
        {"layer_drop": {"n": 1, "score": "random"}},
        {"expert_drop": {"keep": 4, "scope": "global", "score": "random", "min_keep": 2}},
    ],
}


@pytest.fixture(scope="module")
def demo():
    model, tokenizer = moeexport.load("demo"), moeexport.load_tokenizer("demo")
    windows = sample_from_model(model, tokenizer, 2, 128, seed=11)
    return model, tokenizer, windows


def _compressed(model, passes):
    model = copy.deepcopy(model)
    compress(model, parse_recipe({"passes": passes}), None)
    return model


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_f32_gguf_matches_the_torch_model(name, demo, tmp_path):
    model, _, windows = demo
    model = _compressed(model, STRUCTURES[name])
    artifact = gguf_backend.export(model, tmp_path / "m.gguf", quant="f32")
    fidelity = compare(TorchRunner(model), gguf_backend.Runner(artifact.path, context=128), windows)
    assert fidelity.failures(gguf_backend.TOLERANCES["f32"]) == []
    assert fidelity.max_abs_logit <= 1e-3 and fidelity.top1_agreement == 1.0
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"])
def test_quantized_gguf_stays_within_its_tolerance(quant, demo, tmp_path):
    model, _, windows = demo
    artifact = gguf_backend.export(model, tmp_path / "m.gguf", quant=quant)
    fidelity = compare(TorchRunner(model), gguf_backend.Runner(artifact.path, context=128), windows)
    assert fidelity.failures(gguf_backend.TOLERANCES[quant]) == [], fidelity
    if quant == "f16":  # no router of the demo model sits on a near-tie that f16 rounding flips
        assert fidelity.max_abs_logit <= 5e-2
    f32_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert artifact.path.stat().st_size < f32_bytes


def test_layer_drop_on_a_host_without_dense_layers_stores_zero_experts_in_one_bit(tmp_path):
    import gguf

    from tests.tiny_models import random_tokens

    base = _tiny_with_demo_vocabulary("olmoe", hidden_size=128, intermediate_size=128)  # MoE in every layer
    dropped = _compressed(base, [{"layer_drop": {"n": 1, "score": "random"}}])
    full = gguf_backend.export(base, tmp_path / "full.gguf")
    artifact = gguf_backend.export(dropped, tmp_path / "dropped.gguf")
    assert artifact.architecture == "olmoe" and "zero experts" in artifact.representation
    silent = [spec.kind for spec in structure(adapter_for(dropped.config), dropped)].index("dropped")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(artifact.path).tensors}
    assert types[f"blk.{silent}.ffn_down_exps.weight"] == "Q1_0"
    assert artifact.path.stat().st_size < full.path.stat().st_size
    windows = random_tokens(2, 48, seed=9) * 16
    fidelity = compare(TorchRunner(dropped), gguf_backend.Runner(artifact.path, context=48), windows)
    assert fidelity.max_abs_logit <= 1e-3 and fidelity.top1_agreement == 1.0


def test_non_uniform_expert_counts_move_to_the_padded_host(demo, tmp_path):
    model, _, _ = demo
    model = _compressed(model, STRUCTURES["expert_drop_global"])
    counts = {spec.num_experts for spec in structure(adapter_for(model.config), model)}
    assert len(counts) > 1
    artifact = gguf_backend.export(model, tmp_path / "m.gguf")
    assert artifact.architecture == "step35" and "never-selected pads" in artifact.representation


def test_a_layer_with_fewer_experts_than_top_k_is_refused_with_the_fix(demo, tmp_path):
    model, _, _ = demo
    model = _compressed(model, [{"expert_drop": {"keep": 6, "score": "random"}}])
    keep_experts(adapter_for(model.config), model, 0, [3])  # one layer left with a single expert
    with pytest.raises(MoeExportError, match="add min_keep: 2"):
        gguf_backend.export(model, tmp_path / "m.gguf")


def test_non_uniform_expert_counts_without_a_padded_host_are_refused_before_writing(tmp_path):
    global_drop = [{"expert_drop": {"keep": 3, "scope": "global", "score": "random"}}]
    model = _compressed(_tiny_with_demo_vocabulary("olmoe"), global_drop)  # OLMoE does not renormalize: no host
    assert len({spec.num_experts for spec in structure(adapter_for(model.config), model)}) > 1
    with pytest.raises(MoeExportError, match="scope: layer"):
        gguf_backend.export(model, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_and_unknown_type_are_refused(demo, tmp_path):
    model, _, _ = demo
    (tmp_path / "m.gguf").write_bytes(b"x")
    with pytest.raises(MoeExportError, match="already exists"):
        gguf_backend.export(model, tmp_path / "m.gguf")
    with pytest.raises(MoeExportError, match="unknown GGUF type .iq2_xxs."):
        gguf_backend.export(model, tmp_path / "n.gguf", quant="iq2_xxs")


def test_a_file_llama_cpp_cannot_load_is_a_clear_error(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(MoeExportError, match="llama.cpp cannot load"):
        gguf_backend.Runner(broken)


def test_build_demo_gguf_validates_and_profiles(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - block_drop: {n: 1, score: random}\n  - expert_drop: {keep: 6, score: random}\n")
    out = tmp_path / "build"
    torch_threads = []  # what torch computed with during the build
    from moeexport.backends.gguf import writer

    monkeypatch.setattr(writer, "export", _spying(writer.export, lambda: torch_threads.append(torch.get_num_threads())))
    threads_before = torch.get_num_threads()
    argv = ["build", "demo", "--recipe", str(recipe), "--target", "gguf", "--out", str(out), "--no-eval", "--threads", "1",
            "--save-checkpoint"]
    assert main(argv) == 0
    assert torch_threads == [1] and torch.get_num_threads() == threads_before
    report = json.loads((out / "report.json").read_text())
    assert report["validation"]["failures"] == [] and report["validation"]["tokens"] >= 510
    assert report["profile"]["decode_tokens_per_s"] > 0 and report["profile"]["prefill_tokens_per_s"] > 0
    assert report["profile"]["threads"] == 1 and "on 1 thread," in " ".join(capsys.readouterr().out.split())
    assert 0 < report["profile"]["peak_rss_bytes"] < 2**31
    assert (out / "model-f32.gguf").is_file() and (out / "compressed" / "moeexport.json").is_file()


def _spying(function, spy):
    def spied(*args, **kwargs):
        spy()
        return function(*args, **kwargs)
    return spied


def test_a_build_that_fails_validation_exits_1_and_moves_the_artifact_aside(tmp_path, monkeypatch, capsys):
    from moeexport.validate import Tolerance

    monkeypatch.setitem(gguf_backend.TOLERANCES, "q4_0", Tolerance(max_abs_logit=1e-9))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes: []\n")
    out = tmp_path / "build"
    argv = ["build", "demo", "--recipe", str(recipe), "--target", "gguf", "--quant", "q4_0", "--out", str(out)]
    assert main(argv + ["--no-eval"]) == 1
    assert "validation failed" in capsys.readouterr().err
    assert not (out / "model-q4_0.gguf").exists() and (out / "model-q4_0.gguf.failed").is_file()
    assert json.loads((out / "report.json").read_text())["validation"]["failures"]


@needs_shared
@pytest.mark.parametrize("passes", [[], [{"block_drop": {"n": 2}}], [{"layer_drop": {"n": 2}}]])
def test_fixture_f32_fidelity_over_512_dev_tokens(passes, tmp_path):
    from moeexport.calibration.sources import CalibrationConfig
    from moeexport.compress import StatisticsProvider
    from moeexport.evaluate import eval_windows

    model, tokenizer = moeexport.load(FIXTURE), moeexport.load_tokenizer(FIXTURE)
    provider = StatisticsProvider(tokenizer, CalibrationConfig(str(CORPUS / "calib.txt"), 8, 256), "fixture", None)
    compress(model, parse_recipe({"passes": passes}), provider)
    windows = eval_windows(tokenizer, str(CORPUS / "dev.txt"), 257, 2)  # 2 x 256 predicted tokens
    artifact = gguf_backend.export(model, tmp_path / "m.gguf")
    fidelity = compare(TorchRunner(model), gguf_backend.Runner(artifact.path, context=257), windows)
    assert fidelity.tokens >= 512
    assert fidelity.max_abs_logit <= 1e-3 and fidelity.top1_agreement == 1.0


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "demo-f32.gguf"
    gguf_backend.export(moeexport.load("demo"), path)
    return path


def test_chat_answers_a_prompt_on_the_demo_model(demo_gguf, monkeypatch, capsys):
    runners, real = [], gguf_backend.GGUFRunner
    monkeypatch.setattr(gguf_backend, "GGUFRunner", lambda *args, **kwargs: runners.append(real(*args, **kwargs))
                        or runners[-1])
    assert main(["chat", str(demo_gguf), "--prompt", "Tell me a story.", "--max-tokens", "12", "--threads", "1"]) == 0
    assert capsys.readouterr().out.strip()
    assert [runner.llm.n_threads for runner in runners] == [1]


def test_chat_session_ends_cleanly_on_end_of_input(demo_gguf, monkeypatch, capsys):
    answers = iter(["Hello", ""])

    def fake_input(prompt):
        try:
            return next(answers)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert main(["chat", str(demo_gguf), "--max-tokens", "6", "--system", "Be brief."]) == 0


def test_validate_command_compares_an_artifact_with_its_reference(demo_gguf, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The river rose in the night and the bridge was gone by morning. " * 80)
    argv = ["validate", str(demo_gguf), "--reference", "demo", "--text", str(text), "--length", "64", "--json"]
    assert main(argv) == 0
    fidelity = json.loads(capsys.readouterr().out)
    assert fidelity["tokens"] == 2 * 63 and fidelity["max_abs_logit"] < 1e-3 and fidelity["top1_agreement"] == 1.0


def test_validate_refuses_what_it_cannot_run(tmp_path, capsys):
    engine = tmp_path / "m.plan"
    engine.write_bytes(b"x")
    assert main(["validate", str(engine), "--reference", "demo", "--text", str(engine)]) == 2
    assert "this command runs .gguf and .onnx artifacts" in capsys.readouterr().err
    broken, text = tmp_path / "m.onnx", tmp_path / "t.txt"
    broken.write_bytes(b"x")
    text.write_text("Once upon a time there was a little girl. " * 40)
    assert main(["validate", str(broken), "--reference", "demo", "--text", str(text), "--length", "32"]) == 2
    assert "onnxruntime cannot load" in capsys.readouterr().err


GGUF_FAMILIES = sorted(gguf_backend.ARCHITECTURES)


def _tiny_with_demo_vocabulary(family, **overrides):
    """A tiny random model of `family` that borrows the demo model's tokenizer (2048 pieces)."""
    from moeexport.checkpoint_files import DEMO_MODEL
    from tests.tiny_models import tiny_model

    if family == "qwen2_moe":
        overrides["mlp_only_layers"] = []  # its hosts need MoE in every layer
    model = tiny_model(family, vocab_size=2048, **overrides)
    model.config.name_or_path = str(DEMO_MODEL)
    return model


def _even_over_expert_groups(step: dict, model) -> dict:
    """An expert_drop step that keeps two experts of each group where the router chooses within expert groups."""
    groups = adapter_for(model.config).model_config(model.config).routing.groups
    if "expert_drop" not in step or groups == 1:
        return step
    return {"expert_drop": step["expert_drop"] | {"keep": 2 * groups}}


@pytest.mark.parametrize("passes", [[], [{"block_drop": {"n": 1, "score": "random"}},
                                         {"layer_drop": {"n": 1, "score": "random"}},
                                         {"expert_drop": {"keep": 3, "score": "random"}}]], ids=["full", "trimmed"])
@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_every_gguf_family_exports_loads_and_matches(family, passes, tmp_path):
    from tests.tiny_models import random_tokens

    # Nemotron-H with two of each block: a random Block Drop leaves a Mamba and an attention block, which llama.cpp
    # needs (it aborts on an empty recurrent state or KV cache)
    overrides = {"layers_block_type": ["linear_attention", "moe", "full_attention"] * 2} if family == "nemotron_h" else {}
    model = _tiny_with_demo_vocabulary(family, **overrides)
    model = _compressed(model, [_even_over_expert_groups(step, model) for step in passes])
    artifact = gguf_backend.export(model, tmp_path / "m.gguf")
    if not passes:
        assert artifact.representation == "uniform"  # dense layers are no padding
    windows = random_tokens(2, 48, seed=9) * 16  # spread over the 2048-token vocabulary
    reference = model
    if gguf_backend.ARCHITECTURES[family].fp16_activation:  # llama.cpp's CPU GELU: an fp16 table, emulated
        from tests.test_family_gemma4 import with_ggml_gelu

        reference = with_ggml_gelu(model)
    fidelity = compare(TorchRunner(reference), gguf_backend.Runner(artifact.path, context=48), windows)
    assert fidelity.max_abs_logit <= 1e-3 and fidelity.top1_agreement == 1.0, (family, fidelity)


def test_a_router_rule_the_host_cannot_compute_is_refused(tmp_path):
    model = _tiny_with_demo_vocabulary("qwen3_moe")
    model.config.norm_topk_prob = False  # llama.cpp's qwen3moe always renormalizes
    with pytest.raises(MoeExportError, match="always renormalizes"):
        gguf_backend.export(model, tmp_path / "m.gguf")


def test_k_quants_report_the_tensors_llama_cpp_kept_wider(demo, tmp_path):
    model, _, windows = demo  # hidden 128: rows too short for 256-wide K blocks
    model = _compressed(model, STRUCTURES["all_three"])  # with a MoE-less layer, whose zeros are requantized
    artifact = gguf_backend.export(model, tmp_path / "m.gguf", quant="q4_k_m")
    fidelity = compare(TorchRunner(model), gguf_backend.Runner(artifact.path, context=128), windows)
    # 128-wide rows quantize poorly (the fixture's 256-wide ones reach KL 2e-3); this checks the file computes
    assert fidelity.max_abs_logit < float("inf") and fidelity.kl < 0.1
    assert artifact.fallbacks and all("llama.cpp's q4_k_m rules" in line for line in artifact.fallbacks)
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize("family, host", [("mixtral", "step35"), ("qwen3_moe", "hy_v3")])
def test_layer_drop_moves_to_a_host_with_real_savings(family, host, tmp_path):
    from tests.tiny_models import random_tokens

    base = _tiny_with_demo_vocabulary(family)
    dropped = _compressed(base, [{"layer_drop": {"n": 2, "score": "random"}}])
    full = gguf_backend.export(base, tmp_path / "full.gguf")
    artifact = gguf_backend.export(dropped, tmp_path / "dropped.gguf")
    assert artifact.architecture == host and "dense FFN" in artifact.representation
    dropped_bytes = sum(p.numel() for p in base.parameters()) * 4 - sum(p.numel() for p in dropped.parameters()) * 4
    saved = full.path.stat().st_size - artifact.path.stat().st_size
    assert saved >= 0.8 * dropped_bytes
    windows = random_tokens(2, 48, seed=9) * 16
    fidelity = compare(TorchRunner(dropped), gguf_backend.Runner(artifact.path, context=48), windows)
    assert fidelity.max_abs_logit <= 1e-3 and fidelity.top1_agreement == 1.0


def test_qwen3_non_uniform_experts_move_to_hy_v3_exactly(tmp_path):
    from tests.tiny_models import random_tokens

    model = _compressed(
        _tiny_with_demo_vocabulary("qwen3_moe"),
        [{"expert_drop": {"keep": 3, "scope": "global", "score": "random", "min_keep": 2}}],
    )
    assert len({spec.num_experts for spec in structure(adapter_for(model.config), model)}) > 1
    artifact = gguf_backend.export(model, tmp_path / "m.gguf")
    assert artifact.architecture == "hy_v3" and "never-selected pads" in artifact.representation
    windows = random_tokens(2, 48, seed=9) * 16
    fidelity = compare(TorchRunner(model), gguf_backend.Runner(artifact.path, context=48), windows)
    assert fidelity.max_abs_logit <= 1e-3 and fidelity.top1_agreement == 1.0


@needs_shared
def test_fixture_gguf_matches_llama_cpp_s_own_converter(tmp_path):
    """Differential test: the file llama.cpp's convert_hf_to_gguf.py writes and ours compute the same logits."""
    import importlib.util
    import os
    import subprocess
    import sys

    from moeexport.evaluate import eval_windows

    spec = importlib.util.spec_from_file_location("compare_with_converter", REPO / "tools" / "compare_with_converter.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    llama_cpp_tree = tool.fetch_converter(tmp_path)
    theirs = tmp_path / "converter.gguf"
    subprocess.run(
        [sys.executable, str(llama_cpp_tree / "convert_hf_to_gguf.py"), str(FIXTURE), "--outtype", "f32",
         "--outfile", str(theirs)],
        env=os.environ | {"PYTHONPATH": str(llama_cpp_tree / "gguf-py")}, check=True, capture_output=True,
    )
    ours = gguf_backend.export(moeexport.load(FIXTURE), tmp_path / "ours.gguf").path
    windows = eval_windows(moeexport.load_tokenizer(FIXTURE), str(CORPUS / "dev.txt"), 257, 2)
    their_runner, our_runner = gguf_backend.Runner(theirs, context=257), gguf_backend.Runner(ours, context=257)
    for window in windows.tolist():
        assert abs(their_runner.logits(window) - our_runner.logits(window)).max() <= 1e-4
    # and moeexport reads the converter's file back as the model it came from
    with torch.no_grad():
        read_back, original = moeexport.load(theirs)(windows).logits, moeexport.load(FIXTURE)(windows).logits
    assert (read_back - original).abs().max().item() <= 1e-4


def test_per_tensor_type_overrides(demo, tmp_path):
    from gguf import GGUFReader

    model, _, windows = demo
    artifact = gguf_backend.export(model, tmp_path / "m.gguf", quant="q8_0", tensor_types={"_exps": "q4_0"})
    types = {t.name: t.tensor_type.name for t in GGUFReader(artifact.path).tensors}
    assert types["blk.0.ffn_down_exps.weight"] == "Q4_0" and types["blk.0.attn_q.weight"] == "Q8_0"
    fidelity = compare(TorchRunner(model), gguf_backend.Runner(artifact.path, context=128), windows)
    assert fidelity.failures(gguf_backend.TOLERANCES["q4_0"]) == []


@pytest.mark.parametrize("tensor_types, message", [({"(": "q4_0"}, "not a regular expression"),
                                                   ({"_exps": "q3_z"}, "unknown ggml type 'q3_z'")])
def test_bad_tensor_type_overrides_are_refused(tensor_types, message, demo, tmp_path):
    with pytest.raises(MoeExportError, match=message):
        gguf_backend.export(demo[0], tmp_path / "m.gguf", quant="q8_0", tensor_types=tensor_types)
    assert list(tmp_path.iterdir()) == []


def test_importance_matrix_reaches_llama_cpp_and_starved_experts_fall_back(demo, tmp_path):
    from moeexport.calibration.moments import input_moments

    model, tokenizer, windows = demo
    calibration = sample_from_model(model, tokenizer, 4, 64, seed=3)
    moments = input_moments(model, calibration)
    moments.sums[(1, "experts_in")][5] = 0  # expert 5 of layer 1 "saw" no tokens
    moments.counts[(1, "experts_in")][5] = 0
    artifact = gguf_backend.export(model, tmp_path / "m.gguf", quant="q4_k_m", imatrix=moments)
    assert "imatrix: blk.1 expert 5 saw no calibration tokens -> its layer's average" in artifact.fallbacks
    plain = gguf_backend.export(model, tmp_path / "plain.gguf", quant="q4_k_m")
    assert artifact.path.read_bytes() != plain.path.read_bytes()  # the quantizer used it
    fidelity = compare(TorchRunner(model), gguf_backend.Runner(artifact.path, context=128), windows)
    assert fidelity.failures(gguf_backend.TOLERANCES["q4_k_m"]) == []


def test_input_moments_count_every_routed_token():
    from moeexport.calibration.moments import input_moments
    from tests.tiny_models import random_tokens, tiny_model

    model = tiny_model("qwen2_moe")
    tokens = random_tokens(4, 16)
    moments = input_moments(model, tokens)
    for layer in (0, 2, 3):  # layer 1 is dense
        assert int(moments.counts[(layer, "experts_in")].sum()) == tokens.numel() * 2
        assert moments.mean((layer, "experts_mid")).shape == (4, 24)
        assert torch.isfinite(moments.mean((layer, "experts_in"))).all()
    assert moments.counts[(1, "attention_in")] == tokens.numel()


def test_greedy_generation_in_llama_cpp_follows_the_torch_model(demo_gguf):
    torch_runner = TorchRunner(moeexport.load("demo"))
    gguf_runner = gguf_backend.Runner(demo_gguf, context=128)
    prompt = [1, 450, 1200, 33, 98]
    assert gguf_runner.generate(prompt, 24) == torch_runner.generate(prompt, 24)
    sampled = gguf_runner.generate(prompt, 24, temperature=1.0, seed=1)
    assert len(sampled) == 24 and sampled == gguf_runner.generate(prompt, 24, temperature=1.0, seed=1)


def test_deepseek_v2_lite_after_block_drop_is_refused_with_the_reason(tmp_path):
    from moeexport.checkpoint_files import DEMO_MODEL
    from tests.tiny_models import tiny_model

    model = tiny_model("deepseek_v2", vocab_size=2048, q_lora_rank=None)  # V2-Lite style: no q LoRA
    model.config.name_or_path = str(DEMO_MODEL)
    with pytest.raises(MoeExportError, match="only by its 26 or 27 layers"):
        gguf_backend.export(model, tmp_path / "m.gguf")


def test_tensor_names_come_from_gguf_py_s_tables():
    import gguf

    from moeexport.backends.gguf.names import TensorNames

    names = TensorNames(gguf, "qwen2moe")
    assert names("TOKEN_EMBD") == "token_embd.weight"
    assert names.block(3)("FFN_GATE_EXP") == "blk.3.ffn_gate_exps.weight"
    assert names("ATTN_Q", 0, ".bias") == "blk.0.attn_q.bias"
    assert names("FFN_GATE_INP_SHEXP", 1) == "blk.1.ffn_gate_inp_shexp.weight"
    with pytest.raises(MoeExportError, match="qwen3moe has no FFN_GATE_INP_SHEXP tensor"):
        TensorNames(gguf, "qwen3moe")("FFN_GATE_INP_SHEXP", 1)  # llama.cpp would refuse the file


def _on_grid(model, bits: int, group_size: int):
    """The model with its routed experts rounded onto a symmetric grid, as the quantize pass leaves them."""
    from moeexport.quantization import dequantize, quantize_rtn

    model = copy.deepcopy(model)
    adapter = adapter_for(model.config)
    for layer in model.model.layers:
        experts = getattr(getattr(layer, adapter.moe), adapter.experts)
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(experts, name)
            weight.data = dequantize(*quantize_rtn(weight.data, bits, group_size), group_size)
    model.config.moeexport_weight_grid = {"bits": bits, "group_size": group_size, "method": "rtn", "targets": "experts"}
    return model


@pytest.mark.parametrize("bits, quant", [(4, "q4_0"), (8, "q8_0")])
def test_quantized_experts_are_written_with_their_exact_codes(bits, quant, demo, tmp_path):
    import gguf

    from moeexport.quantization import weight_grid

    model = _on_grid(demo[0], bits, 64)
    artifact = gguf_backend.export(model, tmp_path / "m.gguf", quant=quant, weight_grid=weight_grid(model))
    assert not any("re-quantizes" in note for note in artifact.fallbacks)
    tensors = {t.name: t for t in gguf.GGUFReader(artifact.path).tensors}
    experts = model.model.layers[2].mlp.experts
    written = gguf.quants.dequantize(tensors["blk.2.ffn_down_exps.weight"].data, tensors["blk.2.ffn_down_exps.weight"].tensor_type)
    assert torch.equal(torch.from_numpy(written.reshape(experts.down_proj.shape)), experts.down_proj.data)
    gate = gguf.quants.dequantize(tensors["blk.2.ffn_gate_exps.weight"].data, tensors["blk.2.ffn_gate_exps.weight"].tensor_type)
    assert torch.equal(torch.from_numpy(gate.reshape(experts.gate_up_proj.shape[0], -1, gate.shape[-1])),
                       experts.gate_up_proj.data.chunk(2, dim=1)[0])


def test_a_type_that_cannot_hold_the_grid_says_it_re_quantizes(demo, tmp_path):
    from moeexport.quantization import weight_grid

    model = _on_grid(demo[0], 4, 64)
    artifact = gguf_backend.export(model, tmp_path / "m.gguf", quant="q8_0", weight_grid=weight_grid(model))
    assert any("int4 g64 by the quantize pass; this q8_0 file re-quantizes them (a plain --quant q4_0" in note
               for note in artifact.fallbacks)


@pytest.mark.parametrize("quant, tensor_types", [("q4_k_m", None), ("q6_k", None), ("q8_0", {"_exps": "q4_k"})])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v2"])
def test_llama_cpp_mixes_are_written_tensor_for_tensor_as_llama_model_quantize_writes_them(
        family, quant, tensor_types, tmp_path):
    """The K-quant path chooses types on a proxy and quantizes slices with ggml (backends/gguf/ggml.py): the same
    types and bytes as llama.cpp's quantizer run on a whole F32 file."""
    import gguf

    from moeexport.backends.gguf.writer import LLAMA_FTYPES, _ggml_types, _llama_cpp_quantize
    from tests.tiny_models import tiny_model

    model = tiny_model(family)
    model.config.name_or_path = str(moeexport.checkpoint_files.DEMO_MODEL)  # a tokenizer for the file's vocabulary
    ours, whole = tmp_path / "ours.gguf", tmp_path / "f32.gguf"
    gguf_backend.export(model, ours, quant, tensor_types=tensor_types)
    gguf_backend.export(model, whole, "f32")
    _llama_cpp_quantize(whole, tmp_path / "llama.gguf", LLAMA_FTYPES[quant], _ggml_types(gguf, tensor_types or {}))
    expected = {t.name: t for t in gguf.GGUFReader(tmp_path / "llama.gguf").tensors}
    written = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    assert written.keys() == expected.keys()
    for name, tensor in expected.items():
        assert (written[name].tensor_type, list(written[name].shape)) == (tensor.tensor_type, list(tensor.shape)), name
        assert written[name].data.tobytes() == tensor.data.tobytes(), name
    assert len({t.tensor_type for t in expected.values()}) >= 2  # a mix, not one type
