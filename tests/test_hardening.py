"""Hostile input on the input side: pickles, damaged checkpoints, undecodable text, a stale cache.

Every case is a copy of the bundled demo model (or a tiny config) damaged one way; each must
give exit 2 and one line on stderr that names the problem, never a traceback, and never
a pickle load or a parameter left at random initialization.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moeexport
from moeexport.calibration.sources import CalibrationConfig
from moeexport.checkpoint_files import DEMO_MODEL
from moeexport.cli import main
from moeexport.compress import StatisticsProvider
from moeexport.errors import MoeExportError
from moeexport.outputs import replace_atomically
from moeexport.source import open_source
from tests.tiny_models import FAMILIES, random_tokens, tiny_model

SMALL_CALIBRATION = ["--calib-samples", "2", "--calib-length", "32"]
PROSE = "The river rose in the night and by morning the bridge was gone; the village waited for the boats. " * 40
WEIGHTS = "model.safetensors"
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture
def demo_copy(tmp_path):
    return shutil.copytree(DEMO_MODEL, tmp_path / "model")


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(PROSE)
    return path


def tensors_of(model_dir) -> dict[str, torch.Tensor]:
    """In memory, not mapped: the file may be overwritten next."""
    return {name: tensor.clone() for name, tensor in load_file(model_dir / WEIGHTS).items()}


def edit_tensors(model_dir, edit):
    tensors = tensors_of(model_dir)
    edit(tensors)
    save_file(tensors, model_dir / WEIGHTS, metadata={"format": "pt"})


def edit_config(model_dir, **changes):
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | changes))


def one_line_error(capsys, argv) -> str:
    """Exit 2 and the error on one line (progress lines before it aside), never a traceback."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "Traceback" not in captured.err, captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith(f"moeexport {argv[0]}: error: ")]
    assert len(errors) == 1 and captured.err.rstrip().endswith(errors[0]), captured.err
    return errors[0]


# --- pickles are never loaded ---------------------------------------------------------------


def _as_pickled_shards(model_dir):
    tensors = tensors_of(model_dir)
    torch.save(tensors, model_dir / "pytorch_model-00001-of-00001.bin")
    names = tensors.keys()
    index = {"metadata": {}, "weight_map": {name: "pytorch_model-00001-of-00001.bin" for name in names}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    (model_dir / WEIGHTS).unlink()


def _only_pytorch_model_bin(model_dir):
    torch.save(tensors_of(model_dir), model_dir / "pytorch_model.bin")
    (model_dir / WEIGHTS).unlink()


def _pickle_renamed_safetensors(model_dir):
    torch.save(tensors_of(model_dir), model_dir / WEIGHTS)


PICKLES = {
    "index pointing at .bin shards": (_as_pickled_shards,
                                      "names shard pytorch_model-00001-of-00001.bin, which is not a .safetensors file"),
    "only pytorch_model.bin": (_only_pytorch_model_bin,
                               "pytorch_model.bin is a pickled checkpoint, which moeexport never loads"),
    "pickle renamed .safetensors": (_pickle_renamed_safetensors,
                                    "model.safetensors is a pickle (a torch.save file) named .safetensors"),
}


@pytest.mark.parametrize("case", sorted(PICKLES))
def test_pickles_are_refused_without_being_loaded(case, demo_copy, text, capsys, monkeypatch):
    damage, message = PICKLES[case]
    damage(demo_copy)

    def no_pickles(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_pickles)
    line = one_line_error(capsys, ["eval", str(demo_copy), "--text", str(text)])
    assert message in line and "convert it to safetensors" in line


# --- damaged checkpoints ------------------------------------------------------------------------


def _truncate(model_dir):
    data = (model_dir / WEIGHTS).read_bytes()
    (model_dir / WEIGHTS).write_bytes(data[: len(data) // 2])


def _garbage_header(model_dir):
    data = (model_dir / WEIGHTS).read_bytes()
    (model_dir / WEIGHTS).write_bytes(b"\xff" * 16 + data[16:])


def drop(*names):
    return lambda model_dir: edit_tensors(model_dir, lambda tensors: [tensors.pop(name) for name in names])


def put(name, tensor):
    return lambda model_dir: edit_tensors(model_dir, lambda tensors: tensors.update({name: tensor}))


def poison(name, value):
    return lambda model_dir: edit_tensors(model_dir, lambda tensors: tensors[name].view(-1).__setitem__(3, value))


def config(**changes):
    return lambda model_dir: edit_config(model_dir, **changes)


def write(name, data: bytes):
    return lambda model_dir: (model_dir / name).write_bytes(data)


Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
EXPERT_7 = [f"model.layers.2.block_sparse_moe.experts.7.w{i}.weight" for i in (1, 2, 3)]
DAMAGED = {
    "truncated safetensors": (_truncate, "model.safetensors is not a readable safetensors file (incomplete metadata"),
    "empty safetensors": (write(WEIGHTS, b""), "model.safetensors is empty (0 bytes)"),
    "garbage header": (_garbage_header, "model.safetensors is not a readable safetensors file (header too large)"),
    "missing q_proj": (drop("model.layers.1.self_attn.q_proj.weight"),
                       "lacks tensor model.layers.1.self_attn.q_proj.weight: transformers would fill it with random"),
    "missing lm_head": (drop("lm_head.weight"), "lacks tensor lm_head.weight"),
    "one expert missing": (drop(*EXPERT_7), f"lacks tensor {EXPERT_7[0]} (and 2 more)"),
    "unexpected tensor": (put("model.layers.0.self_attn.extra.weight", torch.zeros(3)),
                          "holds tensor model.layers.0.self_attn.extra.weight, which the model in config.json has"),
    "wrong shape": (put(Q_PROJ, torch.zeros(64, 128)),
                    f"tensor {Q_PROJ} has shape [64, 128] but config.json implies [128, 128]"),
    "int32 weights": (put(Q_PROJ, torch.ones(128, 128, dtype=torch.int32)),
                      f"tensor {Q_PROJ} is I32, but weights must be floating point"),
    "NaN weight": (poison(Q_PROJ, float("nan")), f"weight {Q_PROJ} has 1 non-finite values (NaN or Inf)"),
    "Inf in one expert": (poison("model.layers.1.block_sparse_moe.experts.3.w2.weight", float("inf")),
                          "weight model.layers.1.mlp.experts.down_proj has 1 non-finite values (NaN or Inf) in expert"),
    "config.json is a list": (write("config.json", b"[1, 2]"), "config.json holds a JSON list, not an object"),
    "config.json does not parse": (write("config.json", b'{"model_type": "mixtral",'), "config.json is not valid JSON"),
    "config.json is binary": (write("config.json", b"\x89PNG\r\n\x1a\n\xff\xfe"), "config.json is not valid JSON"),
    "top-k 0": (config(num_experts_per_tok=0), "num_experts_per_tok is 0; it must be an integer of at least 1"),
    "top-k above the expert count": (config(num_experts_per_tok=9),
                                     "num_experts_per_tok is 9 but the model has 8 experts (num_local_experts)"),
    "top-k a string": (config(num_experts_per_tok="2"), "is not a valid mixtral config"),
    "no experts": (config(num_local_experts=0), "num_local_experts is 0; it must be an integer of at least 1"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_checkpoints_are_refused_by_name(case, demo_copy, text, capsys):
    damage, message = DAMAGED[case]
    damage(demo_copy)
    line = one_line_error(capsys, ["eval", str(demo_copy), "--text", str(text)])
    assert message in line


CONFIG_BOMBS = {
    "1e9 experts": ({"num_local_experts": 10**9},
                    "num_local_experts is 1000000000 but the weights hold at most 8 experts per layer"),
    "1e5 layers": ({"num_hidden_layers": 10**5}, "num_hidden_layers is 100000 but the weights hold 4 layers"),
    "a width of 2**40": ({"hidden_size": 2**40}, "hidden_size 1099511627776 do not match the embeddings' shape"),
    "a vocabulary of 1e12": ({"vocab_size": 10**12}, "vocab_size 1000000000000 and hidden_size 128 do not match"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_BOMBS))
def test_a_config_the_weights_do_not_bear_out_is_refused_before_any_model_is_built(case, demo_copy, text, capsys,
                                                                                  monkeypatch):
    import time

    from transformers import AutoModelForCausalLM

    changes, message = CONFIG_BOMBS[case]
    edit_config(demo_copy, **changes)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built from the config")

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", no_model)
    started = time.perf_counter()
    for argv in (["eval", str(demo_copy), "--text", str(text)],
                 ["compress", str(demo_copy), "--recipe", str(RECIPES / "trim.yaml"), "--dry-run", "--max-memory", "1GB"]):
        assert message in one_line_error(capsys, argv)
    assert time.perf_counter() - started < 30


def test_a_damaged_shard_behind_an_index_is_named(demo_copy):
    tensors = tensors_of(demo_copy)
    names = sorted(tensors)
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    weight_map = {}
    shards = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second}
    for shard, names_in_shard in shards.items():
        save_file({n: tensors[n] for n in names_in_shard}, demo_copy / shard, metadata={"format": "pt"})
        weight_map |= {n: shard for n in names_in_shard}
    index = demo_copy / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    (demo_copy / WEIGHTS).unlink()
    with pytest.raises(MoeExportError, match="not a valid safetensors index .KeyError: 'metadata'"):
        moeexport.load(demo_copy)
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert moeexport.load(demo_copy).config.num_hidden_layers == 4  # a sound sharded checkpoint loads

    shard = demo_copy / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(MoeExportError, match="model-00002-of-00002.safetensors is not a readable safetensors file"):
        moeexport.load(demo_copy)


def test_tied_embeddings_may_leave_lm_head_out(demo_copy):
    edit_tensors(demo_copy, lambda t: t.pop("lm_head.weight"))
    edit_config(demo_copy, tie_word_embeddings=True)
    model = moeexport.load(demo_copy)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no-stream"])
def test_a_stored_head_under_a_tied_config_is_kept_as_transformers_keeps_it(stream, demo_copy, tmp_path):
    """config.json says tie_word_embeddings but the file holds its own, different lm_head: transformers keeps the
    file's head; so does moeexport, streamed or not, and the checkpoint it writes gives transformers' logits."""
    from transformers import AutoModelForCausalLM

    from moeexport.pipeline import CompressOptions, compress
    from moeexport.streaming import logits

    edit_config(demo_copy, tie_word_embeddings=True)
    tokens = torch.arange(3, 35)[None]
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(demo_copy).eval()(input_ids=tokens).logits.numpy()
    read = (logits(moeexport.modelio.load_streamed(demo_copy), tokens) if stream
            else moeexport.load(demo_copy)(input_ids=tokens).logits.numpy())
    assert abs(read - expected).max() < 1e-4
    calibration = moeexport.CalibrationOptions(source=str(Path(__file__).with_name("held_out_text.txt")),
                                               samples=2, length=32)
    out = tmp_path / "out"
    compress(str(demo_copy), {"passes": []},
             CompressOptions(out=str(out), stream=stream, measure_quality=False, calibration=calibration))
    with torch.no_grad():
        written = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=tokens).logits.numpy()
    assert abs(written - expected).max() < 1e-4


def test_a_tie_that_replaces_a_stored_weight_is_refused_as_a_bug(demo_copy, monkeypatch):
    """A streamed model's head, read whole for an exporter, cannot silently share a tying bug: a tie that overwrote
    the stored head is caught. (The streamed logits read the stored head's rows themselves.)"""
    from moeexport.streaming import LayerStream, outer

    edit_config(demo_copy, tie_word_embeddings=True)
    monkeypatch.setattr(LayerStream, "_untie_stored_copies", lambda self: None)
    model = moeexport.modelio.load_streamed(demo_copy)
    with pytest.raises(MoeExportError, match="lm_head.weight is not the checkpoint's lm_head.weight after tying"):
        with outer(model, "output"):
            pass


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoints_transformers_writes_pass_the_checks(family, tmp_path):
    """No false alarms: each family's save_pretrained layout (converted on load) is accepted."""
    model = tiny_model(family)
    model.save_pretrained(tmp_path)
    loaded = moeexport.load(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_a_manifest_checkpoint_is_checked_against_its_structure(tmp_path):
    from moeexport.adapters import adapter_for
    from moeexport.adapters.surgery import keep_experts

    model = tiny_model("mixtral")
    keep_experts(adapter_for(model.config), model, 1, [0, 2])  # non-uniform: the manifest form
    out = moeexport.save(model, tmp_path / "out", {"passes": []})
    assert moeexport.load(out).model.layers[1].mlp.experts.gate_up_proj.shape[0] == 2
    edit = {name: tensor.clone() for name, tensor in load_file(out / "moeexport.safetensors").items()}
    edit["model.layers.1.mlp.experts.down_proj"] = edit["model.layers.1.mlp.experts.down_proj"][:1].clone()
    save_file(edit, out / "moeexport.safetensors", metadata={"format": "pt"})
    with pytest.raises(MoeExportError, match=r"down_proj has shape \[1, 32, 48\] but config.json implies \[2, 32"):
        moeexport.load(out)


# --- undecodable recipes and texts --------------------------------------------------------------

BINARY = bytes(range(256)) * 4


def test_binary_recipe_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(BINARY)
    line = one_line_error(capsys, ["compress", "demo", "--recipe", str(recipe), "--dry-run"])
    assert f"recipe {recipe} is not UTF-8 text (byte 0x80 at offset 128)" in line


def test_alias_bomb_recipe_is_refused_at_once(tmp_path, capsys):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, 9):  # 9 * 4**8 = 589,824 strings once expanded
        name, below = chr(97 + level), chr(96 + level)
        lines.append(f"{name}: &{name} [*{below}, *{below}, *{below}, *{below}]")
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text("\n".join(lines) + "\npasses: [*i]\n")
    line = one_line_error(capsys, ["compress", "demo", "--recipe", str(recipe), "--dry-run"])
    assert "uses an alias (*name) at line 2" in line and "lol" not in line


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_binary_calibration_text_is_one_line(suffix, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("passes:\n  - expert_drop: {keep: 6}\n")
    calib = tmp_path / f"calib{suffix}"
    calib.write_bytes(BINARY)
    line = one_line_error(capsys, ["compress", "demo", "--recipe", str(recipe), "--dry-run", "--calib", str(calib)])
    assert f"text source {calib} is not UTF-8 text" in line


def test_text_with_nul_bytes_is_binary(tmp_path, capsys):
    calib = tmp_path / "zeros.txt"
    calib.write_bytes(b"\0" * 4096)
    line = one_line_error(capsys, ["eval", "demo", "--text", str(calib)])
    assert "holds NUL bytes at offset 0: it is a binary file" in line


# --- text read a piece at a time -----------------------------------------------------------------


class _RecordingTokenizer:
    """The demo tokenizer, recording the length of every text it is given."""

    def __init__(self):
        self.tokenizer, self.given = moeexport.load_tokenizer("demo"), []
        self.eos_token_id = self.tokenizer.eos_token_id

    def __call__(self, text, **kwargs):
        self.given.append(len(text))
        return self.tokenizer(text, **kwargs)


def _one_line(path, words: int, seed: int = 0):
    import random

    vocabulary = PROSE.split()
    path.write_text(" ".join(random.Random(seed).choices(vocabulary, k=words)))
    return path


def test_a_short_document_is_tokenized_whole_as_before(tmp_path):
    from moeexport.calibration.sources import token_stream

    tokenizer = _RecordingTokenizer()
    stream = token_stream(tokenizer, [PROSE, PROSE[:500]])
    whole = tokenizer.tokenizer(PROSE, add_special_tokens=False)["input_ids"]
    assert stream.tolist()[:len(whole) + 1] == whole + [tokenizer.eos_token_id]
    assert tokenizer.given == [len(PROSE), 500]


def test_a_one_line_text_is_tokenized_in_pieces_cut_at_spaces(tmp_path, monkeypatch):
    from moeexport.calibration import sources

    monkeypatch.setattr(sources, "PIECE_CHARS", 4096)
    text = _one_line(tmp_path / "one-line.txt", 40_000)
    tokenizer = _RecordingTokenizer()
    windows = sources.calibration_tokens(None, tokenizer, CalibrationConfig(str(text), 8, 64, 0))
    assert windows.shape == (8, 64) and max(tokenizer.given) <= 4096 and len(tokenizer.given) > 20
    whole = tokenizer.tokenizer(text.read_text(), add_special_tokens=False)["input_ids"]
    pieces = sources.token_stream(tokenizer, [text.read_text()]).tolist()[:-1]
    # cut at spaces, the pieces tokenize as the whole does, but for a token at a few cuts
    assert abs(len(pieces) - len(whole)) <= len(tokenizer.given) and pieces[:500] == whole[:500]


def test_held_out_windows_read_only_the_text_they_need(tmp_path):
    """8 MB in one line: the first windows come from its first piece, within seconds and little memory."""
    import subprocess
    import sys

    text = _one_line(tmp_path / "one-line.txt", 1_600_000)
    assert text.stat().st_size > 8 * 10**6
    measure = ("import sys, time; from pathlib import Path; from moeexport.evaluate import eval_windows; "
               "from moeexport.modelio import load_tokenizer; tokenizer = load_tokenizer('demo'); "
               "before = next(int(l.split()[1]) for l in Path('/proc/self/status').read_text().splitlines() "
               "if l.startswith('VmHWM:')); started = time.perf_counter(); "
               "windows = eval_windows(tokenizer, sys.argv[1], 256, 8); seconds = time.perf_counter() - started; "
               "after = next(int(l.split()[1]) for l in Path('/proc/self/status').read_text().splitlines() "
               "if l.startswith('VmHWM:')); print(list(windows.shape), (after - before) * 1024, seconds)")
    shape, grown, seconds = subprocess.run([sys.executable, "-c", measure, str(text)], capture_output=True,
                                           text=True, check=True).stdout.strip().rsplit(" ", 2)
    # the whole text tokenized at once: ~800 MB and ~20 s (the imports before it are not counted)
    assert shape == "[8, 256]" and int(grown) < 200 * 2**20 and float(seconds) < 10


# --- paths and sizes the command line is given -------------------------------------------------


def test_an_out_through_a_symlink_loop_is_one_line(tmp_path, capsys):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("passes: []\n")
    for out in (tmp_path / "a", tmp_path / "a" / "inside"):
        line = one_line_error(capsys, ["compress", "demo", "--recipe", str(recipe), "--out", str(out)])
        assert f"--out {out} cannot be resolved" in line and "symlink loop" in line


def test_a_fifo_recipe_is_named_as_no_regular_file(tmp_path, capsys):
    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    line = one_line_error(capsys, ["compress", "demo", "--recipe", str(fifo), "--dry-run"])
    assert f"recipe file {fifo} is not a regular file (a directory, FIFO or device)" in line


@pytest.mark.parametrize("size", ["0.5", "0.9B", "0"])
def test_a_max_memory_under_a_byte_is_refused_not_the_default(size, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("passes: []\n")
    line = one_line_error(capsys, ["compress", "demo", "--recipe", str(recipe), "--dry-run", "--max-memory", size])
    assert f"--max-memory {size!r} is" in line


@pytest.mark.parametrize("published", [True, False], ids=["after the second rename", "between the renames"])
def test_a_run_killed_while_publishing_leaves_nothing_the_next_run_does_not_clear(published, tmp_path):
    """publish() moves the old output aside, renames the new one in, then deletes the old: a kill after the first
    rename leaves `.NAME.old-*`; the next write into that output clears it, putting an unreplaced result back."""
    from moeexport.outputs import staged

    out = tmp_path / "out"
    aside = tmp_path / ".out.old-killed"
    (aside / "out").mkdir(parents=True)
    (aside / "out" / "result.txt").write_text("previous")
    if published:
        out.mkdir()
        (out / "result.txt").write_text("published")
    else:
        with staged(tmp_path / "elsewhere", overwrite=False):
            pass  # another output's write does not touch this one's leftovers
        assert aside.exists()
    with staged(out, overwrite=True) as staging:
        assert (out / "result.txt").read_text() == ("published" if published else "previous")
        (staging / "result.txt").write_text("new")
    assert (out / "result.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out"] + ([] if published else ["elsewhere"]))


SEARCH_BEFORE_WORK = {
    "--layer-drop 99": (["--max-size", "30%", "--layer-drop", "0,99"],
                        "--layer-drop 99: demo has 4 decoder layers, so at most 4 can be dropped"),
    "--block-drop 4": (["--max-size", "30%", "--block-drop", "1,4"],
                       "--block-drop 4: demo has 4 decoder layers, so at most 3 can be dropped"),
    "--max-size 101%": (["--max-size", "101%"], "--max-size '101%' is more than the untrimmed F16 GGUF itself"),
    "--max-bytes 1B": (["--max-bytes", "1B"], "--max-bytes 1 bytes is less than any file of demo can be: its token "
                       "embeddings alone take 131,072 bytes at 4 bits per weight"),
    "--min-decode-speedup 1000x": (["--min-decode-speedup", "1000x"],
                                   "--min-decode-speedup 1000x is more than any trimming of demo reaches: every token "
                                   "reads its LM head, so at most 94x"),
}


@pytest.mark.parametrize("case", sorted(SEARCH_BEFORE_WORK))
def test_a_search_that_cannot_succeed_is_refused_before_any_work(case, capsys, monkeypatch):
    import time

    from moeexport import search

    def no_work(*args, **kwargs):
        raise AssertionError("the search started")

    monkeypatch.setattr(search, "_search", no_work)
    flags, message = SEARCH_BEFORE_WORK[case]
    started = time.perf_counter()
    assert message in one_line_error(capsys, ["search", "demo", "--target", "gguf", *flags])
    assert time.perf_counter() - started < 30


def test_a_bench_prompt_longer_than_the_context_is_one_line_before_any_run(capsys, monkeypatch):
    from moeexport import bench

    def no_run(*args, **kwargs):
        raise AssertionError("an artifact was run")

    monkeypatch.setattr(bench, "profile_in_subprocess", no_run)
    line = one_line_error(capsys, ["bench", "demo", "--prompt-tokens", "100000", "--repeats", "1"])
    assert "make 100032 positions, more than the 2048 that demo was trained for" in line


def test_a_long_prompt_reaches_the_profiling_process_on_stdin(monkeypatch):
    """A prompt as a command-line argument exceeds the system's limit ("Argument list too long")."""
    import json
    import subprocess

    from moeexport.backends import profile

    calls = []

    def run(argv, **kwargs):
        calls.append((argv, kwargs))
        return subprocess.CompletedProcess(argv, 0, stdout=json.dumps({"ok": True}), stderr="")

    monkeypatch.setattr(profile.subprocess, "run", run)
    assert profile.profile_in_subprocess("gguf", "m.gguf", list(range(300_000)), 4, 300_100)["ok"] is True
    (argv, kwargs), = calls
    assert sum(len(part) for part in argv) < 200 and json.loads(kwargs["input"])["prompt"][-1] == 299_999


def test_the_profiling_process_reads_its_request_from_stdin():
    import json
    import subprocess
    import sys

    request = json.dumps({"target": "nonesuch", "path": "x", "prompt": [1], "new_tokens": 1, "context": 8})
    done = subprocess.run([sys.executable, "-m", "moeexport.backends.profile", "-"], input=request,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "nonesuch" in done.stderr and "Traceback" not in done.stderr, done.stderr


# --- two runs at once ------------------------------------------------------------------------------

RUN = "import sys; from moeexport.cli import main; sys.exit(main(sys.argv[1:]))"


def _compress_at_once(tmp_path, outs, env=None):
    """Two `compress` runs of the demo model started together (the recipe observes calibration text):
    (exit code, stderr) of each."""
    import subprocess
    import sys

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("passes:\n  - expert_drop: {keep: 6, score: frequency}\n")
    text = Path(__file__).with_name("held_out_text.txt")
    runs = [subprocess.Popen([sys.executable, "-c", RUN, "compress", "demo", "--recipe", str(recipe), "--out",
                              str(out), "--calib", str(text), *SMALL_CALIBRATION, "--eval-text", str(text)],
                             stderr=subprocess.PIPE, text=True, env=os.environ | (env or {}))
            for out in outs]
    return [(run.wait(timeout=300), run.stderr.read()) for run in runs]


def test_two_compressions_into_one_out_at_once_leave_one_whole_output(tmp_path):
    out = tmp_path / "out"
    results = sorted(_compress_at_once(tmp_path, [out, out]))
    (ok, _), (refused, message) = results
    assert (ok, refused) == (0, 2), results
    lines = [line for line in message.splitlines() if line.startswith("moeexport compress: error: ")]
    assert "Traceback" not in message and len(lines) == 1, message
    assert f"another moeexport run is writing {out}" in lines[0] or f"output {out} already exists" in lines[0]
    assert moeexport.load(out).config.num_local_experts == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yaml"]  # no lock, staging or old copy


def test_two_runs_sharing_a_cache_at_once_both_finish_and_agree(tmp_path):
    cache = tmp_path / "cache"
    results = _compress_at_once(tmp_path, [tmp_path / "one", tmp_path / "two"], {"MOEEXPORT_CACHE": str(cache)})
    assert [code for code, _ in results] == [0, 0], results
    one, two = (load_file(tmp_path / name / "model.safetensors") for name in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.equal(one[name], two[name]) for name in one)
    written = [path for path in cache.rglob("*") if path.is_file()]
    assert written and not [path for path in written if ".partial" in path.name], written


# --- the statistics cache cannot go stale -------------------------------------------------------

PLAN = "passes:\n  - expert_drop: {keep: 5, scope: layer, score: frequency}\n"


def _dry_run(capsys, model, recipe, text, *extra) -> str:
    assert main(["compress", str(model), "--recipe", str(recipe), "--dry-run", "--calib", str(text),
                 *SMALL_CALIBRATION, *extra]) == 0
    out = capsys.readouterr().out
    return out[out.index("expert_drop"):]


def test_swapped_layers_get_their_own_statistics_and_plan(demo_copy, text, tmp_path, capsys):
    def swap(name):
        for a, b in (("model.layers.1.", "model.layers.2."), ("model.layers.2.", "model.layers.1.")):
            if name.startswith(a):
                return b + name[len(a):]
        return name

    tensors = tensors_of(demo_copy)
    swapped = {swap(name): tensor for name, tensor in tensors.items()}
    assert swapped.keys() == tensors.keys()
    save_file(swapped, demo_copy / WEIGHTS, metadata={"format": "pt"})
    header = int.from_bytes((DEMO_MODEL / WEIGHTS).read_bytes()[:8], "little") + 8
    assert (demo_copy / WEIGHTS).read_bytes()[:header] == (DEMO_MODEL / WEIGHTS).read_bytes()[:header]  # same header
    assert open_source(demo_copy).fingerprint != open_source(DEMO_MODEL).fingerprint

    recipe = tmp_path / "plan.yaml"
    recipe.write_text(PLAN)
    original = _dry_run(capsys, "demo", recipe, text)  # fills the cache
    cached = _dry_run(capsys, demo_copy, recipe, text)
    fresh = _dry_run(capsys, demo_copy, recipe, text, "--no-cache")
    assert cached == fresh and cached != original


def test_editing_the_calibration_text_changes_the_key_and_its_path_does_not(tmp_path):
    def key(path):
        return StatisticsProvider(None, CalibrationConfig(str(path), 2, 32), "src", cache_dir=tmp_path).key([])

    first = tmp_path / "calib.txt"
    first.write_text(PROSE)
    before = key(first)
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text(PROSE)
    assert key(elsewhere) == before  # content, not path
    stat = first.stat()
    first.write_text(PROSE.replace("river", "rivet", 1))
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime
    assert key(first) != before
    assert StatisticsProvider(None, CalibrationConfig(), "other", cache_dir=tmp_path).key([]) != \
        StatisticsProvider(None, CalibrationConfig(), "src", cache_dir=tmp_path).key([])


def test_given_tokens_are_part_of_the_key(tmp_path):
    def key(seed):
        tokens = random_tokens(2, 8, seed)
        return StatisticsProvider(None, CalibrationConfig(), "src", cache_dir=tmp_path, tokens=tokens).key([])

    assert key(0) == key(0) != key(1)


class Notes:
    def __init__(self):
        self.notes = []

    def note(self, message):
        self.notes.append(message)

    def add_task(self, description, total=None):
        return 0

    def advance(self, task, advance=1):
        pass

    def remove_task(self, task):
        pass


@pytest.mark.parametrize("garbage", [b"{not json", b"\xff\xfe\x00", b"[]", b'{"version": 1}', b""])
def test_a_corrupt_cache_file_is_reported_and_recomputed(garbage, tmp_path):
    model = tiny_model("mixtral")

    def provider(progress=None):
        return StatisticsProvider(None, CalibrationConfig(), "src", cache_dir=tmp_path, progress=progress,
                                  tokens=random_tokens(2, 8))

    expected = provider().statistics(model, history=[])
    (entry,) = tmp_path.glob("*.json")
    entry.write_bytes(garbage)

    notes = Notes()
    again = provider(notes)
    assert again.statistics(model, history=[]) == expected and again.observations == 1
    assert len(notes.notes) == 1 and str(entry) in notes.notes[0] and "\n" not in notes.notes[0]
    with pytest.warns(UserWarning, match="statistics cache file .* is unreadable"):
        entry.write_bytes(garbage)
        provider().statistics(model, history=[])
    reused = provider()
    assert reused.statistics(model, history=[]) == expected and reused.observations == 0  # rewritten whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [entry.name]  # no temporary files left


def test_concurrent_cache_writes_never_collide(tmp_path):
    target = tmp_path / "entry.json"
    errors = []

    def write(number):
        try:
            for _ in range(20):
                entry = json.dumps({"writer": number, "pad": "x" * 9999})
                replace_atomically(target, lambda path: path.write_text(entry))
        except Exception as error:  # pragma: no cover - the failure this test looks for
            errors.append(error)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert json.loads(target.read_text())["writer"] in range(8)
    assert [p.name for p in tmp_path.iterdir()] == ["entry.json"]


def test_the_remembered_weight_digest_follows_every_write(demo_copy, monkeypatch):
    """With the digest memo on (here for every size), an in-place edit that keeps size and mtime is still seen."""
    import moeexport.cache
    import moeexport.fingerprint

    monkeypatch.setattr(moeexport.fingerprint, "DIGEST_MEMO_BYTES", 0)

    def fingerprint(directory):  # remembered under the cache root
        return open_source(directory, cache_root=moeexport.cache.ROOT).fingerprint

    before = fingerprint(demo_copy)
    assert fingerprint(demo_copy) == before
    weights = demo_copy / WEIGHTS
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of the last weight
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    assert fingerprint(demo_copy) != before


def test_allow_nonfinite_loads_what_is_refused_by_default(demo_copy, text, capsys):
    poison(Q_PROJ, float("nan"))(demo_copy)
    assert "--allow-nonfinite" in one_line_error(capsys, ["eval", str(demo_copy), "--text", str(text)])
    assert main(["eval", str(demo_copy), "--text", str(text), "--length", "32", "--max-sequences", "1",
                 "--allow-nonfinite", "--json"]) == 0
