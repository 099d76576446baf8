"""The command line on the bundled demo model: the happy path, --help, and bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch

import moeexport
from moeexport.cli import main
from moeexport.console import PROGRESS_LINE
from tests.cli_output import without_progress

SMALL_CALIBRATION = ["--calib-samples", "4", "--calib-length", "64"]
TRIM = "passes:\n  - block_drop: {n: 1}\n  - layer_drop: {n: 1}\n  - expert_drop: {keep: 6, scope: global, score: frequency}\n"
PROSE = (
    "The old house stood at the end of the lane, and every evening the children ran past it without looking. "
    "Nobody could say who had lived there last, though the baker swore he had seen a light in the upper window "
    "on the night of the great storm. In the morning the road was flooded and the river had risen to the bridge. "
)


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "trim.yaml"
    path.write_text(TRIM)
    return path


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "held_out.txt"
    path.write_text(PROSE * 30)
    return path


@pytest.mark.parametrize("command", [[], ["analyze"], ["compress"], ["eval"], ["build"], ["validate"], ["chat"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_status:
        main(command + ["--help"])
    assert exit_status.value.code == 0
    assert "usage: moeexport" in capsys.readouterr().out


def test_compress_then_eval_the_demo_model(tmp_path, recipe, text_file, capsys):
    out = tmp_path / "demo-trimmed"
    assert main(["compress", "demo", "--recipe", str(recipe), "--out", str(out), *SMALL_CALIBRATION]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "block_drop" in printed and "parameters" in printed and "top-1 agreement" in printed
    # stderr is no terminal here: progress comes as timestamped lines, each stage started and ended, layers counted
    log = captured.err.splitlines()
    assert all(PROGRESS_LINE.match(line) or line.startswith("note: ") for line in log), log
    started = {line[11:] for line in log if line.startswith("[") and ": done in " not in line and "/" not in line}
    ended = {line[11:].partition(": done in ")[0] for line in log if ": done in " in line}
    assert started and started <= ended, (started - ended)
    assert any(re.search(r"layers: \d+/\d+", line) for line in log), log
    manifest = json.loads((out / "moeexport.json").read_text())
    assert [p["name"] for p in manifest["passes"]] == ["block_drop", "layer_drop", "expert_drop"]
    assert manifest["parameters"]["after"] < manifest["parameters"]["before"]
    assert (out / "tokenizer.model").is_file()

    model = moeexport.load(out)
    assert model.config.num_hidden_layers == 3
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 9]])).logits).all()

    assert main(["eval", str(out), "--text", str(text_file), "--reference", "demo", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] > 0 and result["kl"] > 0 and 0 < result["top1_agreement"] < 1


def test_a_compressed_checkpoint_is_a_valid_model_for_the_next_recipe(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    block = tmp_path / "block.yaml"
    block.write_text("passes:\n  - block_drop: {n: 1}\n")
    empty = tmp_path / "empty.yaml"
    empty.write_text("passes: []\n")
    assert main(["compress", "demo", "--recipe", str(block), "--out", str(first), *SMALL_CALIBRATION]) == 0
    assert main(["compress", str(first), "--recipe", str(empty), "--out", str(second), "--no-eval"]) == 0
    tokens = torch.tensor([[1, 20, 30, 40]])
    assert torch.equal(moeexport.load(first)(input_ids=tokens).logits, moeexport.load(second)(input_ids=tokens).logits)


def test_analyze_writes_statistics_plots_and_report(tmp_path, capsys):
    out = tmp_path / "analysis"
    assert main(["analyze", "demo", "--out", str(out), *SMALL_CALIBRATION]) == 0
    assert "Block Drop candidates, cheapest first" in capsys.readouterr().out
    for name in ("statistics.json", "expert_usage.png", "layer_similarity.png", "block_windows.png", "report.html"):
        assert (out / name).stat().st_size > 0
    statistics = json.loads((out / "statistics.json").read_text())
    assert all(sum(layer["expert_tokens"]) == 4 * 64 * 2 for layer in statistics["layers"])


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, recipe, capsys):
    out = tmp_path / "never"
    assert main(["compress", "demo", "--recipe", str(recipe), "--out", str(out), "--dry-run", *SMALL_CALIBRATION]) == 0
    printed = capsys.readouterr().out
    assert "drop blocks" in printed and "MiB" in printed and "nothing written" in printed
    written = {p.name for p in tmp_path.iterdir()} - {recipe.name, "statistics-cache"}  # the cache is no output
    assert not out.exists() and written == set()


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


BAD_INPUTS = {
    "missing model directory": (["compress", "{tmp}/nope"], TRIM, "does not exist"),
    "dense model": (["compress", "{tmp}/dense"], TRIM, "dense (non-MoE)"),
    "unknown model_type": (["compress", "{tmp}/alien"], TRIM, "unknown model_type 'alien-lm'"),
    "too many blocks": (["compress", "demo"], "passes:\n  - block_drop: {n: 4}\n", "has 4 blocks"),
    "too many layers": (["compress", "demo"], "passes:\n  - layer_drop: {n: 5}\n", "MoE layers left"),
    "too many experts": (["compress", "demo"], "passes:\n  - expert_drop: {keep: 9}\n", "has 8 experts"),
    "malformed yaml": (["compress", "demo"], "passes: [block_drop: {n: 1}\n", "not valid YAML"),
    "unknown pass": (["compress", "demo"], "passes:\n  - merge_all: {}\n", "unknown pass 'merge_all'"),
    "unknown option": (["compress", "demo"], "passes:\n  - layer_drop: {n: 1, how: fast}\n", "how: unknown option"),
    "option of another target": (["build", "demo", "--target", "onnx", "--imatrix"], TRIM,
                                 "--imatrix is not an option of the onnx target (its options: --moe-ops, --block-size)"),
    "block size that is no power of two": (["build", "demo", "--target", "onnx", "--quant", "int4", "--block-size", "24"],
                                           TRIM, "--block-size: must be a power of two >= 16, got 24"),
    "block size zero": (["build", "demo", "--target", "onnx", "--quant", "int4", "--block-size", "0"],
                        TRIM, "--block-size: must be a power of two >= 16, got 0"),
    "block size the experts cannot take": (["build", "demo", "--target", "onnx", "--quant", "int4", "--block-size", "256"],
                                           TRIM, "--block-size 256 cannot quantize layer 0's experts"),
    "quant the target cannot write": (["build", "demo", "--target", "gguf", "--quant", "iq2_xxs"], TRIM, "not a gguf type"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys):
    command, recipe_text, message = BAD_INPUTS[case]
    _write(tmp_path / "dense" / "config.json", json.dumps({"model_type": "llama", "vocab_size": 32}))
    _write(tmp_path / "alien" / "config.json", json.dumps({"model_type": "alien-lm"}))
    recipe = _write(tmp_path / "recipe.yaml", recipe_text)
    out = tmp_path / "out"
    argv = [part.format(tmp=tmp_path) for part in command]
    code = main(argv + ["--recipe", str(recipe), "--out", str(out), *SMALL_CALIBRATION])
    stderr = without_progress(capsys.readouterr().err)
    assert code == 2
    assert message in stderr and len(stderr.splitlines()) == 1
    assert not out.exists()


def test_existing_output_needs_overwrite(tmp_path, recipe, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["compress", "demo", "--recipe", str(recipe), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


EARLY_REFUSALS = {  # refused before torch is imported: a second, not the minutes a build would take first
    "weight type the target lacks": (["--target", "gguf", "--quant", "iq2_xxs"], [], "not a gguf type"),
    "option of another target": (["--target", "onnx", "--imatrix"], [], "not an option of the onnx target"),
    "missing runtime": (["--target", "gguf"], ["llama_cpp"],
                        "needs llama-cpp-python, which this Python lacks: pip install 'moeexport[gguf]' (in a clone"),
    "missing model": (["--target", "gguf", "--model-path-missing"], [], "does not exist"),
}


@pytest.mark.parametrize("case", sorted(EARLY_REFUSALS))
def test_build_refuses_bad_arguments_before_importing_torch(case, tmp_path, recipe):
    import subprocess
    import sys

    flags, missing, message = EARLY_REFUSALS[case]
    model = str(tmp_path / "nope") if "--model-path-missing" in flags else "demo"
    flags = [flag for flag in flags if flag != "--model-path-missing"]
    argv = ["build", model, "--recipe", str(recipe), "--out", str(tmp_path / "out"), *flags]
    script = (f"import sys\nfor name in {missing!r}: sys.modules[name] = None  # as if not installed\n"
              f"from moeexport.cli import main\ncode = main({argv!r})\nprint(code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], (done.stdout, done.stderr)
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
