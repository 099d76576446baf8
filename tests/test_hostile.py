"""Hostile input on the recipe and GGUF side: one line on stderr and exit 2 (exit 1 for a verdict).

Recipes: duplicate keys, booleans and strings where numbers belong, YAML that PyYAML
itself trips over, and drops that would empty every layer or the whole model (refused unless
the step says allow_empty_layers: true; a global drop spares each layer's best expert). GGUF files: a damaged header or metadata and
truncation (exit 2, the file named as damaged), data bytes whose flipped bits make
llama.cpp compute NaN (a failed verdict in `validate`, an error while decoding), and chat
templates that are not valid Jinja or fail on the conversation, in `chat`.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from moeexport.adapters import LayerSpec
from moeexport.passes.trim import ExpertDrop, ExpertDropOptions
from moeexport.recipe import load_recipe
from tests.test_hardening import one_line_error
from tests.cli_output import without_progress

PROSE = "The river rose in the night and by morning the bridge was gone; the village waited for the boats. " * 40

# --- recipes -------------------------------------------------------------------------------------

RECIPES = {
    "duplicate option": ("passes:\n  - expert_drop: {keep: 6, scope: layer, keep: 4}\n",
                         "repeats the key 'keep' at line 2, column 42 (first at line 2)"),
    "duplicate step option on its own line": ("passes:\n  - block_drop:\n      n: 1\n      n: 2\n",
                                              "repeats the key 'n' at line 4, column 7 (first at line 3)"),
    "duplicate top-level key": ("passes: []\npasses:\n  - block_drop: {n: 1}\n",
                                "repeats the key 'passes' at line 2, column 1 (first at line 1)"),
    "boolean where a number belongs": ("passes:\n  - expert_drop: {keep: true}\n",
                                       "pass 1 (expert_drop): keep: Input should be a valid integer, got true (a boolean)"),
    "string where a number belongs": ('passes:\n  - expert_drop: {keep: "6"}\n',
                                      "pass 1 (expert_drop): keep: Input should be a valid integer, got '6' (a string)"),
    "float where an integer belongs": ("passes:\n  - block_drop: {n: 1.0}\n",
                                       "pass 1 (block_drop): n: Input should be a valid integer, got 1.0"),
    "string bits": ('passes:\n  - quantize: {method: rtn, bits: "4"}\n',
                    "pass 1 (quantize): bits: Input should be 4 or 8, got '4' (a string)"),
    "number where a boolean belongs": ("passes:\n  - merge: {keep: 4, align: 1}\n",
                                       "pass 1 (merge): align: Input should be a valid boolean, got 1"),
    "boolean in a nested option": ("passes:\n  - merge: {keep: 4, compress: {rank: true, sparsity: 0.5}}\n",
                                   "pass 1 (merge): compress.rank: Input should be a valid integer, got true (a boolean)"),
    "negative seed": ("passes:\n  - block_drop: {n: 1, score: random, seed: -1}\n",
                      "pass 1 (block_drop): seed: Input should be greater than or equal to 0"),
    "keep 0": ("passes:\n  - expert_drop: {keep: 0}\n",
               "expert_drop keep=0 drops every routed expert of every MoE layer; add allow_empty_layers: true"),
    "keep 0, scope global": ("passes:\n  - expert_drop: {keep: 0, scope: global}\n",
                             "expert_drop keep=0 drops every routed expert of every MoE layer"),
    "every MoE sublayer dropped": ("passes:\n  - layer_drop: {n: 4, score: random}\n",
                                   "layer_drop would leave the model without MoE layers (no routed experts in any layer)"),
    "an invalid date": ("passes:\n  - expert_drop: {keep: 2001-13-45}\n",
                        "has a value at line 2, column 25 that YAML cannot read as timestamp ('month must be in 1..12')"),
    "a tag PyYAML cannot construct": ("passes:\n  - expert_drop: {keep: !!timestamp 6}\n",
                                      "has a value at line 2, column 25 that YAML cannot read as timestamp"),
    "an explicit int that is none": ("passes:\n  - expert_drop: {keep: !!int six}\n",
                                     "that YAML cannot read as int (\"invalid literal for int() with base 10: 'six'\")"),
    "a control character": ("passes:\n  - block_drop: {n: 1}\x07\n",
                            "is not valid YAML at line 2: it holds the control character U+0007"),
    "deep nesting": ("passes: " + "[" * 5000 + "]" * 5000 + "\n", "nests more than 50 levels deep at line 1, column 58"),
    "mixed top-level keys": ("passes: []\n1: a\nb: 2\n", "has unknown top-level keys ['1', 'b']"),
}


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_hostile_recipes_are_one_line(case, tmp_path, capsys):
    text, message = RECIPES[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    line = one_line_error(capsys, ["compress", "demo", "--recipe", str(recipe), "--dry-run"])
    assert message in line


def test_allow_empty_layers_lets_the_step_empty_layers():
    layers = [LayerSpec("moe", 8, 2)] * 4
    ExpertDrop().check(ExpertDropOptions(keep=0, allow_empty_layers=True), layers)
    plan = ExpertDrop().plan(None, layers, ExpertDropOptions(keep=0, score="random", allow_empty_layers=True))
    assert all(kept == [] for kept in plan.keep.values())


def test_a_global_drop_spares_each_layers_best_expert_unless_empty_layers_are_allowed():
    layers = [LayerSpec("moe", 8, 2)] * 4
    plan = ExpertDrop().plan(None, layers, ExpertDropOptions(keep=1, scope="global", score="random"))
    assert [len(kept) for kept in plan.keep.values()] == [1, 1, 1, 1]
    plan = ExpertDrop().plan(None, layers, ExpertDropOptions(keep=1, scope="global", score="random",
                                                               allow_empty_layers=True))
    assert sum(map(len, plan.keep.values())) == 4 and any(not kept for kept in plan.keep.values())


def test_the_shipped_recipes_still_load():
    from tests.test_fuzz import RECIPES as SHIPPED

    assert SHIPPED and all(load_recipe(path).steps for path in SHIPPED)


# --- GGUF files ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_gguf(demo_gguf_of):
    pytest.importorskip("llama_cpp")
    return demo_gguf_of("f32")


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(PROSE)
    return path


def _data_start(path) -> int:
    import gguf

    return min(tensor.data_offset for tensor in gguf.GGUFReader(path).tensors)


def _flip(demo_gguf, out, positions, mask: int) -> None:
    data = np.fromfile(demo_gguf, dtype=np.uint8)
    data[positions] ^= mask
    data.tofile(out)


def _with_chat_template(demo_gguf, out, template: str) -> None:
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(demo_gguf)
    writer = gguf.GGUFWriter(out, arch=reader.get_field("general.architecture").contents(), endianess=reader.endianess)
    logging.getLogger("gguf-new-metadata").setLevel(logging.WARNING)
    copy_with_new_metadata(reader, writer, {gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(gguf.GGUFValueType.STRING,
                                                                                                  template)}, [])


def _validate(path, text) -> list[str]:
    return ["validate", str(path), "--reference", "demo", "--text", str(text), "--length", "32", "--windows", "1"]


def _flipped_exponents(demo_gguf, out) -> None:
    """Bit 30 of a float32 (the exponent's top bit) flipped in every 1001st weight: ~1e38, then NaN."""
    start, size = _data_start(demo_gguf), demo_gguf.stat().st_size
    _flip(demo_gguf, out, np.arange(start + 3, size, 4 * 1001), 0x40)


def test_flipped_exponent_bits_fail_validation(demo_gguf, text, tmp_path, capsys):
    from moeexport.cli import main

    damaged = tmp_path / "flipped.gguf"
    _flipped_exponents(demo_gguf, damaged)
    assert main(_validate(damaged, text)) == 1
    err = capsys.readouterr().err
    last = err.rstrip().splitlines()[-1]
    assert "Traceback" not in err and str(damaged) in last and "misses its tolerance" in last, err


def test_decoding_nan_logits_is_a_damaged_file(demo_gguf, tmp_path):
    from moeexport.backends.gguf import GGUFRunner
    from moeexport.errors import MoeExportError

    damaged = tmp_path / "flipped.gguf"
    _flipped_exponents(demo_gguf, damaged)
    runner = GGUFRunner(damaged, context=32)
    with pytest.raises(MoeExportError, match=f"{damaged} is damaged: llama.cpp computes NaN or infinite logits"):
        runner.generate([1, 2, 3], 4, temperature=0.7)


def test_a_batch_llama_cpp_refuses_is_one_line(demo_gguf):
    from moeexport.backends.gguf import GGUFRunner
    from moeexport.errors import MoeExportError

    runner = GGUFRunner(demo_gguf, context=32)
    with pytest.raises(MoeExportError, match=r"cannot run .*: token ids \[5000\] are outside its vocabulary of 2048"):
        runner.logits([1, 5000, 2])


def test_flipped_data_bytes_give_a_verdict_or_one_line(demo_gguf, text, tmp_path, capsys):
    damaged = tmp_path / "flipped.gguf"
    start, size = _data_start(demo_gguf), demo_gguf.stat().st_size
    _flip(demo_gguf, damaged, np.arange(start, size, 97), 0xFF)
    from moeexport.cli import main

    code = main(_validate(damaged, text))
    captured = capsys.readouterr()
    assert code in (1, 2) and "Traceback" not in captured.err and without_progress(captured.err).count("\n") == 0, captured.err


GGUF_DAMAGE = {
    "truncated": (lambda data: data[: len(data) // 2],
                  "the file is damaged or truncated (tensor 'blk.1.ffn_down_exps.weight' data is not within the file "
                  "bounds"),
    "garbage magic": (lambda data: b"XXXX" + data[4:],
                      "the file is damaged or not a GGUF (invalid magic characters: 'XXXX', expected 'GGUF')"),
    "tensor count": (lambda data: data[:8] + b"\xff" * 8 + data[16:],
                     "the file is damaged or not a GGUF (number of tensors is -1"),
    "metadata bytes": (lambda data: data[:24] + bytes(b ^ 0x5A for b in data[24:64]) + data[64:],
                       "the file is damaged or not a GGUF ("),
}


@pytest.mark.parametrize("case", sorted(GGUF_DAMAGE))
def test_a_damaged_gguf_is_named_in_validate(case, demo_gguf, text, tmp_path, capsys):
    damage, message = GGUF_DAMAGE[case]
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(damage(demo_gguf.read_bytes()))
    line = one_line_error(capsys, _validate(damaged, text))
    assert f"llama.cpp cannot load {damaged}: {message}" in line


TEMPLATES = {
    "not valid Jinja": ("{% for m in messages %}{{ m.content }",
                        "its chat template (tokenizer.chat_template) is malformed: unexpected '}' at line 1"),
    "an unknown filter": ("{% for m in messages %}{{ m.content | shout }}{% endfor %}",
                          "its chat template (tokenizer.chat_template) is malformed: No filter named 'shout' at line 1"),
    "fails on the conversation": ("{{ messages[5].content }}",
                                  "its chat template (tokenizer.chat_template) fails on this conversation: "
                                  "list object has no element 5"),
    "raises": ("{{ raise_exception('Conversation roles must alternate user/assistant') }}",
               "llama.cpp cannot answer with {path}: Conversation roles must alternate user/assistant"),
}


@pytest.mark.parametrize("case", sorted(TEMPLATES))
def test_a_broken_chat_template_is_one_line(case, demo_gguf, tmp_path, capsys):
    template, message = TEMPLATES[case]
    broken = tmp_path / "template.gguf"
    _with_chat_template(demo_gguf, broken, template)
    line = one_line_error(capsys, ["chat", str(broken), "--prompt", "Hello", "--max-tokens", "4"])
    assert message.replace("{path}", str(broken)) in line
