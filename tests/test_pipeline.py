"""The pipeline as a library call (moeexport.build and friends), --json, the target contract, and safe outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import moeexport
from moeexport import BuildOptions, CalibrationOptions
from moeexport.backends import target_for
from moeexport.cli import main
from moeexport.errors import MoeExportError
from moeexport.checkpoint_files import DEMO_MODEL
from moeexport.pipeline import compress, evaluate
from tests.cli_output import without_progress

SMALL = CalibrationOptions(samples=4, length=64)
# held-out text from a file: sampling validation windows from the model would cost seconds per build
HELD_OUT = Path(__file__).with_name("held_out_text.txt")
SMALL_FLAGS = ["--calib-samples", "4", "--calib-length", "64", "--eval-text", str(HELD_OUT)]
RECIPE = {"passes": [{"block_drop": {"n": 1}}, {"expert_drop": {"keep": 6, "scope": "global", "score": "reap",
                                                                 "min_keep": 2}}]}


@pytest.fixture(scope="module")
def onnx_build(tmp_path_factory):
    events = []
    out = tmp_path_factory.mktemp("build") / "demo-onnx"
    report = moeexport.build("demo", RECIPE, "onnx", BuildOptions(out=str(out), calibration=SMALL, eval_text=str(HELD_OUT),
                                                                  save_checkpoint=True), events.append)
    return report, events, out


def test_build_is_a_library_call_that_returns_its_report_and_prints_nothing(onnx_build, capsys):
    report, events, out = onnx_build
    assert capsys.readouterr().out == ""
    assert report.ok and report.validation["failures"] == [] and report.validation["max_abs_logit"] <= 1e-4
    assert report.validation["tokens"] >= 510 and report.profile["decode_tokens_per_s"] > 0
    assert [layer["num_experts"] for layer in report.compression.layers_after] != [8, 8, 8]  # global: uneven counts
    assert report.artifact["files"]["model-f32.onnx"] == (out / "model-f32.onnx").stat().st_size
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report.to_dict()))
    kinds = {event.kind for event in events}
    assert {"stage", "task", "advance", "done", "step"} <= kinds
    assert any(event.kind == "stage" and "validating" in event.message for event in events)


def test_a_build_writes_what_other_tools_load_as_they_are(onnx_build):
    _, _, out = onnx_build
    assert {"genai_config.json", "tokenizer.json", "tokenizer_config.json", "report.html", "report.json"} <= {
        path.name for path in out.iterdir()}
    assert moeexport.load(out / "compressed").config.num_hidden_layers == 3
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3
    assert not [path.name for path in out.parent.iterdir() if ".partial-" in path.name]


@pytest.mark.parametrize("target, extra", [("gguf", ["--quant", "q8_0"]), ("onnx", ["--quant", "int4"]),
                                           ("tensorrt", [])])
def test_json_is_exactly_one_document_for_every_target(target, extra, tmp_path, capsys):
    out = tmp_path / target
    code = main(["build", "demo", "--recipe", str(_recipe_file(tmp_path)), "--target", target, "--out", str(out),
                 "--no-eval", "--json", *extra, *SMALL_FLAGS])
    report = json.loads(capsys.readouterr().out)  # nothing else on stdout
    assert code == 0 and report["ok"] and report["target"] == target
    assert report["validation"]["tokens"] >= 510 and report["validation"]["failures"] == []
    assert report["artifact"]["file_bytes"] > 0 and report["compression"]["parameters"]["after"] > 0
    if target == "tensorrt":
        assert report["profile"] is None and report["engine"]["built"] is False  # profiled on the device
        assert {"bundle/bundle.json", "bundle/model.onnx", "bundle/reference.npz"} <= set(report["artifact"]["files"])
    else:
        assert report["profile"]["decode_tokens_per_s"] > 0


def _recipe_file(directory):
    path = directory / "recipe.yaml"
    path.write_text("passes:\n  - block_drop: {n: 1}\n")
    return path


def test_compress_eval_and_validate_return_reports(tmp_path, onnx_build):
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time there was a little house by the river, and a fox lived under it. " * 40)
    report = compress("demo", RECIPE, moeexport.CompressOptions(dry_run=True, calibration=SMALL))
    assert report.out is None and report.parameters["after"] < report.parameters["before"]
    assert report.passes[0]["name"] == "block_drop" and report.passes[0]["summary"]
    result = evaluate("demo", str(text), reference="demo", length=64, max_sequences=2)
    assert result.kl == pytest.approx(0, abs=1e-9) and result.top1_agreement == 1
    _, _, out = onnx_build
    validation = moeexport.pipeline.validate(out / "model-f32.onnx", out / "compressed", str(text), length=64)
    assert validation.fidelity.max_abs_logit <= 1e-4 and validation.artifact == out / "model-f32.onnx"


def test_target_options_are_strict_and_owned_by_their_target():
    with pytest.raises(MoeExportError, match="--imatrix is not an option of the onnx target"):
        target_for("onnx").options({"imatrix": True})
    with pytest.raises(MoeExportError, match="--block-size: .*power of two"):
        target_for("onnx").options({"block_size": 24})
    with pytest.raises(MoeExportError, match="--moe-ops"):
        target_for("onnx").options({"moe_ops": "fast"})
    assert target_for("gguf").options({"tensor_types": {"_exps": "q4_k"}}).tensor_types == {"_exps": "q4_k"}
    for name in ("gguf", "onnx", "tensorrt"):
        target = target_for(name)
        # (a GGUF input's own types, "keep", are judged by the tolerance of the input's type)
        assert set(target.quant_types) <= set(target.tolerances) | {"keep"} and target.extension


def test_a_build_that_misses_its_tolerance_lands_aside_with_its_numbers(tmp_path, monkeypatch, capsys):
    from moeexport.backends.onnx import ONNXTarget
    from moeexport.validate import Tolerance

    monkeypatch.setattr(ONNXTarget, "tolerances", {"f32": Tolerance(max_abs_logit=0.0)})
    out = tmp_path / "failed"
    code = main(["build", "demo", "--recipe", str(_recipe_file(tmp_path)), "--target", "onnx", "--out", str(out),
                 "--no-eval", *SMALL_FLAGS])
    assert code == 1 and "validation failed (max |delta logit|" in capsys.readouterr().err
    assert (out / "model-f32.onnx.failed").is_file() and not (out / "model-f32.onnx").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] is False and report["failures"] and report["profile"] is None


def test_an_interrupted_rebuild_keeps_the_previous_build_and_leaves_no_staging(tmp_path, monkeypatch):
    from moeexport.backends.onnx import ONNXTarget

    out = tmp_path / "build"
    options = BuildOptions(out=str(out), calibration=SMALL, measure_quality=False, overwrite=True,
                           eval_text=str(HELD_OUT))
    moeexport.build("demo", {"passes": []}, "onnx", options)
    before = sorted(path.name for path in out.iterdir())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ONNXTarget, "runner", interrupted)
    with pytest.raises(KeyboardInterrupt):
        moeexport.build("demo", {"passes": []}, "onnx", options)
    assert sorted(path.name for path in out.iterdir()) == before
    assert [path.name for path in tmp_path.iterdir()] == ["build"]


@pytest.fixture
def model_copy(tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, copy)
    return copy


@pytest.mark.parametrize("command", ["build", "compress"])
@pytest.mark.parametrize("where", ["the model itself", "inside the model", "a folder holding the model"])
def test_the_source_is_never_an_output(command, where, model_copy, tmp_path, capsys):
    out = {"the model itself": model_copy, "inside the model": model_copy / "out", "a folder holding the model": tmp_path}[where]
    before = _digests(model_copy)
    argv = [command, str(model_copy), "--recipe", str(_recipe_file(tmp_path)), "--out", str(out), "--overwrite",
            *SMALL_FLAGS] + (["--target", "gguf"] if command == "build" else [])
    assert main(argv) == 2
    error = without_progress(capsys.readouterr().err)
    assert len(error.splitlines()) == 1 and "model" in error and "elsewhere" in error
    assert _digests(model_copy) == before  # byte for byte


def _digests(directory) -> dict:
    import hashlib

    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.iterdir())}


def test_an_output_that_is_a_file_or_unwritable_is_one_line(tmp_path, capsys):
    existing = tmp_path / "file"
    existing.write_text("keep me")
    for out, message in ((existing, "is an existing file"), (existing / "below", "is a file")):
        assert main(["compress", "demo", "--recipe", str(_recipe_file(tmp_path)), "--out", str(out), "--overwrite",
                     *SMALL_FLAGS]) == 2
        error = without_progress(capsys.readouterr().err)
        assert len(error.splitlines()) == 1 and message in error
    assert existing.read_text() == "keep me"


def test_a_result_is_published_whole_and_never_over_one_that_appeared_meanwhile(tmp_path):
    from moeexport.outputs import publish, staged

    out = tmp_path / "result"
    abandoned = tmp_path / ".result.partial-999999999-x"  # a killed run's staging: no such process
    abandoned.mkdir()
    with staged(out, overwrite=False) as staging:
        (staging / "file").write_text("first")
        assert not out.exists()
    assert (out / "file").read_text() == "first" and not abandoned.exists()
    second = tmp_path / "second"
    second.mkdir()
    with pytest.raises(MoeExportError, match="appeared while this run was writing"):
        publish(second, out, overwrite=False)
    with staged(out, overwrite=True) as staging:
        (staging / "file").write_text("replaced")
    assert (out / "file").read_text() == "replaced"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["result", "second"]


def test_the_statistics_cache_keeps_its_newest_entries_within_its_limit(tmp_path):
    import os

    from moeexport.compress import prune_cache

    for age, name in enumerate(["newest", "middle", "oldest"]):
        entry = tmp_path / f"{name}.json"
        entry.write_bytes(b"x" * 1000)
        os.utime(entry, ns=(10**18 - age * 10**9, 10**18 - age * 10**9))
    assert [path.stem for path in prune_cache(tmp_path, 2500)] == ["oldest"]
    assert sorted(path.stem for path in tmp_path.iterdir()) == ["middle", "newest"]
    assert prune_cache(tmp_path, 10) == [tmp_path / "middle.json"]  # the newest stays even over the limit


def test_a_second_run_into_the_same_output_stops_at_once(tmp_path, capsys):
    from moeexport.outputs import output_lock

    out = tmp_path / "busy"
    with output_lock(out):
        assert main(["build", "demo", "--recipe", str(_recipe_file(tmp_path)), "--target", "onnx", "--out", str(out),
                     *SMALL_FLAGS]) == 2
        error = without_progress(capsys.readouterr().err)
        assert len(error.splitlines()) == 1 and "another moeexport run is writing" in error
    assert not out.exists() and not (tmp_path / ".busy.lock").exists()


def test_validate_gives_a_verdict_and_exits_1_against_the_wrong_reference(onnx_build, tmp_path, capsys):
    _, _, out = onnx_build
    text = tmp_path / "text.txt"
    text.write_text("The fox ran along the river bank until the evening came and the stars rose. " * 40)
    common = ["validate", str(out / "model-f32.onnx"), "--text", str(text), "--length", "64"]
    assert main([*common, "--reference", str(out / "compressed")]) == 0
    assert "verdict: within its tolerance (max_abs_logit 0.0001, top1_agreement 1)" in capsys.readouterr().out
    assert main([*common, "--reference", "demo"]) == 1  # the uncompressed model: not what the graph computes
    captured = capsys.readouterr()
    assert "MISSES" in captured.out and "misses its tolerance" in captured.err
    assert main([*common, "--reference", "demo", "--min-top1", "0.0"]) == 0  # explicit limits replace the default
    assert (out / "model-f32.onnx").is_file()  # validate never moves a file


def _complete_build(out) -> bool:
    report = json.loads((out / "report.json").read_text())
    files = report["artifact"]["files"]
    return report["ok"] and all((out / name).stat().st_size == size for name, size in files.items())


def test_sigkill_at_any_point_leaves_the_previous_build_or_a_new_complete_one(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "build"
    options = BuildOptions(out=str(out), calibration=SMALL, measure_quality=False, overwrite=True,
                           eval_text=str(HELD_OUT))
    moeexport.build("demo", {"passes": []}, "onnx", options)
    command = [sys.executable, "-m", "moeexport.cli", "build", "demo", "--recipe", str(_recipe_file(tmp_path)),
               "--target", "onnx", "--out", str(out), "--overwrite", "--no-eval", *SMALL_FLAGS]
    for delay in (2.0, 5.0, 8.0):  # while importing / compressing, exporting, validating or profiling
        run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)
        time.sleep(delay)
        run.send_signal(signal.SIGKILL)
        run.wait()
        assert _complete_build(out), f"killed after {delay}s"
    moeexport.build("demo", {"passes": []}, "onnx", options)  # the next run clears what killed runs left
    assert _complete_build(out)
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".build.")) == []  # staging, lock


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import errno

    from moeexport.backends.onnx import ONNXTarget

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out"))

    monkeypatch.setattr(ONNXTarget, "export", full)
    assert main(["build", "demo", "--recipe", str(_recipe_file(tmp_path)), "--target", "onnx", "--out",
                 str(tmp_path / "out"), "--no-eval", *SMALL_FLAGS]) == 2
    error = without_progress(capsys.readouterr().err)
    assert error.splitlines() == [f"moeexport build: error: No space left on device ({tmp_path / 'out'})"]
    # block_drop scores by KL on the fly, so no statistics were cached either: only the recipe is left
    assert sorted(path.name for path in tmp_path.iterdir()) == ["recipe.yaml"]


def test_a_full_disk_while_saving_the_checkpoint_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import transformers
    from safetensors import SafetensorError

    def full(*args, **kwargs):  # what safetensors raises on ENOSPC: not an OSError
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
    monkeypatch.setattr("moeexport.modelio.save_model", full)
    out = tmp_path / "out"
    assert main(["build", "demo", "--recipe", str(_recipe_file(tmp_path)), "--target", "onnx", "--out", str(out),
                 "--no-eval", "--save-checkpoint", *SMALL_FLAGS]) == 2
    error = without_progress(capsys.readouterr().err).splitlines()
    assert len(error) == 1 and "No space left on device" in error[0] and "free disk space" in error[0]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["recipe.yaml"]


@pytest.mark.parametrize("flag", ["--max-tokens", "--ctx-size"])
def test_chat_refuses_counts_below_one(flag, tmp_path, capsys):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")  # the counts are checked before the file is loaded
    assert main(["chat", str(model), flag, "-5", "--prompt", "hi"]) == 2
    assert without_progress(capsys.readouterr().err) == f"moeexport chat: error: {flag} must be at least 1"


def test_a_missing_tokenizer_is_one_line(model_copy, tmp_path, capsys):
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        (model_copy / name).unlink()
    assert main(["compress", str(model_copy), "--recipe", str(_recipe_file(tmp_path)), "--dry-run", *SMALL_FLAGS]) == 2
    error = without_progress(capsys.readouterr().err)
    assert len(error.splitlines()) == 1 and "tokenizer" in error, error


def test_a_profile_reports_its_own_peak_memory_not_its_parent_s(onnx_build):
    import numpy as np

    from moeexport.backends.profile import profile_in_subprocess

    _, _, out = onnx_build
    parent = np.ones(96 * 2**20)  # 768 MiB held here while the profile runs in a child process
    speed = profile_in_subprocess("onnx", out / "model-f32.onnx", list(range(1, 33)), 8)
    assert parent.sum() > 0 and speed["peak_rss_bytes"] < 600 * 2**20
