"""A build computes and writes only what was asked, and says how fast it read the model (issue 28, items 1 and 4).

compressed/ only with --save-checkpoint, and the artifact byte for byte the same either way; no calibration
text read for a recipe whose passes do not calibrate; every stage's bytes read of the model's files and read
speed against the disk's, counted where the readers read.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import moeexport
from moeexport import reads
from moeexport.calibration import sources
from moeexport.console import read_line
from tests.family_checks import HELD_OUT, saved_with_demo_tokenizer
from tests.tiny_models import tiny_model

EXPERT_DROP = [{"expert_drop": {"keep": 3, "score": "reap"}}]  # statistics on the calibration text; counts change


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return saved_with_demo_tokenizer(tiny_model("mixtral", vocab_size=2048), tmp_path_factory.mktemp("tiny"))


def _build(model: Path, passes: list, out: Path, calibration: str | Path = HELD_OUT, **options):
    settings = dict(out=str(out), quant="f32", profile=False, validation_windows=(2, 32), measure_quality=False,
                    calibration=moeexport.CalibrationOptions(source=str(calibration), samples=4, length=32),
                    eval_text=str(HELD_OUT)) | options
    return moeexport.build(model, {"passes": passes}, "gguf", moeexport.BuildOptions(**settings))


def _digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "streamed"])
def test_the_checkpoint_is_written_only_when_asked_and_the_artifact_is_the_same_either_way(checkpoint, tmp_path,
                                                                                          stream):
    lean = _build(checkpoint, EXPERT_DROP, tmp_path / "lean", stream=stream)
    saved = _build(checkpoint, EXPERT_DROP, tmp_path / "saved", stream=stream, save_checkpoint=True)
    assert lean.ok and saved.ok
    assert not (tmp_path / "lean" / "compressed").exists() and "save" not in lean.timings
    assert sorted(path.name for path in (tmp_path / "lean").iterdir()) == ["model-f32.gguf", "report.html",
                                                                           "report.json"]
    # the drop's expert counts reach the GGUF's header without a save writing them into the config first
    assert _digest(lean.artifact["path"]) == _digest(saved.artifact["path"])
    assert moeexport.load(tmp_path / "saved" / "compressed").config.num_local_experts == 3


def test_the_expert_counts_a_save_wrote_into_the_config_still_reach_the_artifact_without_one(checkpoint, tmp_path):
    """One expert kept of the top-2: the config's top-k becomes 1, which the TensorRT bundle records."""
    builds = {}
    for save in (False, True):
        out = tmp_path / f"save-{save}"
        settings = dict(out=str(out), quant="f32", profile=False, validation_windows=(2, 32), measure_quality=False,
                        eval_text=str(HELD_OUT), save_checkpoint=save)
        report = moeexport.build(checkpoint, {"passes": [{"expert_drop": {"keep": 1, "score": "random"}}]},
                                 "tensorrt", moeexport.BuildOptions(**settings))
        assert report.ok, report.failures
        builds[save] = json.loads((out / "bundle" / "bundle.json").read_text())
        builds[save]["onnx_sha256"] = _digest(out / "bundle" / "model.onnx")
    assert builds[False]["model"]["num_experts_per_tok"] == 1
    assert {key: value for key, value in builds[False].items() if key != "created"} == {
        key: value for key, value in builds[True].items() if key != "created"}


@pytest.mark.parametrize("passes", [[], [{"block_drop": {"n": 1, "score": "random", "repair": "none"}}]],
                         ids=["empty", "surgery"])
def test_a_recipe_that_does_not_calibrate_never_reads_the_calibration_text(checkpoint, tmp_path, monkeypatch, passes):
    read, drawn = [], []
    original = sources.read_documents

    def reading(source, *rest):  # the calibration text's way in: the check, and drawing the set
        read.append(Path(source).name)
        return original(source, *rest)

    monkeypatch.setattr(sources, "read_documents", reading)
    monkeypatch.setattr("moeexport.compress.calibration_tokens", lambda *args: drawn.append(args))
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(HELD_OUT.read_text())
    report = _build(checkpoint, passes, tmp_path / "out", calibration)
    assert report.ok and "calibration.txt" not in read and drawn == []  # (the validation reads its held-out text)

    monkeypatch.setattr("moeexport.compress.calibration_tokens", sources.calibration_tokens)
    calibrated = _build(checkpoint, EXPERT_DROP, tmp_path / "calibrated", calibration)
    assert calibrated.ok and read.count("calibration.txt") == 2  # checked first, then drawn from: the spy sees reads


def test_every_stage_reports_the_bytes_it_read_and_its_speed_against_the_disk(checkpoint, tmp_path):
    weights = (checkpoint / "model.safetensors").stat().st_size
    whole = _build(checkpoint, EXPERT_DROP, tmp_path / "whole")
    assert whole.read_bytes["load"] == weights  # the in-memory loader reads the file whole, once
    assert whole.read_bytes["disk"] == 0 and whole.read_bytes["export"] == 0  # the probe reads past the counter
    assert whole.read_bytes["total"] >= weights + sum(value for stage, value in whole.read_bytes.items()
                                                      if stage not in ("load", "total"))
    disk = whole.disk_read
    assert disk["file"] == str(checkpoint / "model.safetensors") and disk["bytes"] == weights
    assert disk["bytes_per_s"] == pytest.approx(disk["bytes"] / disk["seconds"])

    streamed = _build(checkpoint, EXPERT_DROP, tmp_path / "streamed", stream=True)
    assert streamed.read_bytes["load"] < weights / 4  # a streamed load reads no layer: each is read when walked
    assert streamed.read_bytes["export"] > 0 and streamed.read_bytes["reference"] > 0  # layers read as walked

    data = streamed.to_dict()
    rows = {row["stage"]: row for row in data["read_profile"]}
    assert list(rows)[:-2] == [stage for stage in data["timings"] if stage != "total"]
    assert list(rows)[-2:] == ["between stages", "total"]
    export = rows["export"]
    assert export["read_bytes"] == streamed.read_bytes["export"]
    assert export["read_bytes_per_s"] == pytest.approx(export["read_bytes"] / data["timings"]["export"])
    assert export["share_of_disk"] == pytest.approx(export["read_bytes_per_s"] / disk_speed(data))
    assert sum(row["read_bytes"] for stage, row in rows.items() if stage != "total") == rows["total"]["read_bytes"]

    page = (tmp_path / "streamed" / "report.html").read_text()
    assert "Reading the model" in page and "% of the disk&#x27;s" in page and "between stages" in page
    line = read_line(streamed)
    assert line.startswith("read ") and "export " in line and "GB/s" in line and "\n" not in line


def disk_speed(data: dict) -> float:
    return data["disk_read"]["bytes_per_s"]


def test_the_disk_probe_reads_a_bounded_prefix_with_its_pages_dropped_or_says_they_stayed(tmp_path, monkeypatch):
    monkeypatch.setattr(reads, "PROBE_BYTES", 2**20)
    path = tmp_path / "weights.bin"
    with path.open("wb") as handle:
        handle.write(os.urandom(3 * 2**20))
        handle.flush()
        os.fsync(handle.fileno())  # dirty pages cannot be dropped before they are written
    dropped = reads.disk_read_speed(path)
    assert dropped["bytes"] == 2**20 and dropped["cache"] == "dropped" and dropped["resident_share"] == 0
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapping:
        assert sum(mapping[offset] for offset in range(0, 2**20, mmap.PAGESIZE)) >= 0  # touched: mapped pages stay
        cached = reads.disk_read_speed(path)
    assert cached["cache"] == "cached" and cached["resident_share"] == 1.0 and cached["bytes"] == 2**20


def test_the_gguf_reader_counts_the_stored_bytes_it_reads(tmp_path):
    gguf = pytest.importorskip("gguf")
    from moeexport.backends.gguf.reader import GGUFFile

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.ffn_down_exps.weight", np.arange(4 * 32 * 64, dtype=np.float32).reshape(4, 32, 64))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    file = GGUFFile(path)
    before = reads.total()
    expert = file.dequantized("blk.0.ffn_down_exps.weight", 2, 1)
    assert reads.total() - before == 32 * 64 * 4  # one expert's stored values, not the stack
    assert expert[0, 1, 3] == 2 * 32 * 64 + 64 + 3


def test_a_gguf_input_saves_its_dequantized_checkpoint_only_when_asked(checkpoint, tmp_path):
    from moeexport.backends import gguf as gguf_backend

    source = gguf_backend.export(moeexport.load(checkpoint), tmp_path / "tiny-q8_0.gguf", quant="q8_0").path
    builds = {save: _build(source, [], tmp_path / f"save-{save}", quant="keep", save_checkpoint=save)
              for save in (False, True)}
    assert all(report.ok for report in builds.values())
    assert not (tmp_path / "save-False" / "compressed").exists()
    assert _digest(builds[False].artifact["path"]) == _digest(builds[True].artifact["path"])
    saved, given = moeexport.load(tmp_path / "save-True" / "compressed"), moeexport.load(source)
    assert saved.state_dict().keys() == given.state_dict().keys()
    assert all(torch.equal(saved.state_dict()[name], tensor) for name, tensor in given.state_dict().items())
    assert builds[True].read_bytes["total"] > 0 and builds[True].read_bytes["export"] > 0  # GGUF reads counted
