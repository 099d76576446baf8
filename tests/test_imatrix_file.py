"""llama.cpp's importance-matrix file, both ways: a build that measures one writes it (imatrix.gguf) for
llama-quantize, and `--imatrix FILE` weighs a build by llama-imatrix's file (GGUF or legacy .dat) instead.

The files llama.cpp would write are built here by hand with gguf-py and struct, following the layout of
llama.cpp's tools/imatrix (writer) and common/imatrix-loader.cpp with tools/quantize (reader): tensors
`<weight>.in_sum2` [experts, width] and `<weight>.counts` [experts, 1], keys imatrix.datasets / chunk_count /
chunk_size; the .dat file's entries are (name, calls, mean squared inputs x calls).

With MOEEXPORT_UPSTREAM_LLAMA naming a directory that holds llama.cpp's own `llama-quantize` (and `llama-imatrix`),
built by tools/build_upstream_llama.py from the llama.cpp sources of the installed llama-cpp-python, the last two
tests run them: llama-quantize given our file, and our build given llama-imatrix's, round as each other.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import moeexport
from moeexport.backends import target_for
from moeexport.backends.gguf import imatrix_file
from moeexport.backends.gguf import writer
from moeexport.calibration.moments import input_moments
from moeexport.calibration.sources import sample_from_model
from moeexport.errors import MoeExportError

LAYERS, EXPERTS = 4, 8  # the demo model's
UPSTREAM = os.environ.get("MOEEXPORT_UPSTREAM_LLAMA")


def _roles(layer: int) -> dict[str, str]:
    """The demo's GGUF tensor names of one block (llama.cpp's names, spelled out) -> the moments' role."""
    block = f"blk.{layer}."
    return {block + "attn_q.weight": "attention_in", block + "attn_k.weight": "attention_in",
            block + "attn_v.weight": "attention_in", block + "attn_output.weight": "attention_out",
            block + "ffn_gate_exps.weight": "experts_in", block + "ffn_up_exps.weight": "experts_in",
            block + "ffn_down_exps.weight": "experts_mid"}


def _as_llama_cpp_sums(moments) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """GGUF tensor name -> (float32 sums [rows, width], counts [rows]), as llama-imatrix holds them."""
    named = {"output.weight": ((-1, "output_in"))} | {
        name: (layer, role) for layer in range(LAYERS) for name, role in _roles(layer).items()}
    sums = {}
    for name, key in named.items():
        rows = moments.sums[key].float().numpy().reshape(-1, moments.sums[key].shape[-1])
        sums[name] = rows, np.asarray(moments.counts[key], np.float32).reshape(-1)
    return sums


def _write_llama_cpp_gguf(path: Path, sums: dict, keys: bool = True) -> Path:
    """An imatrix file in llama-imatrix's GGUF layout (no general.architecture; tensors sorted by name)."""
    out = gguf.GGUFWriter(str(path), arch="")
    if keys:
        out.add_string("general.type", "imatrix")
        out.add_array("imatrix.datasets", ["calibration.txt"])
        out.add_uint32("imatrix.chunk_count", 4)
        out.add_uint32("imatrix.chunk_size", 64)
    for name in sorted(sums):
        rows, counts = sums[name]
        out.add_tensor(f"{name}.in_sum2", rows.astype(np.float32))
        out.add_tensor(f"{name}.counts", counts.reshape(-1, 1).astype(np.float32))
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.write_tensors_to_file()
    out.close()
    return path


def _write_llama_cpp_dat(path: Path, sums: dict, calls: int = 1) -> Path:
    """An imatrix file in llama-imatrix's legacy .dat layout: values are float32 means times the calls."""
    data = struct.pack("<i", len(sums))
    for name in sorted(sums):
        rows, counts = sums[name]
        means = (rows / counts[:, None].astype(np.float32)).astype(np.float32) * np.float32(calls)
        data += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", calls, means.size)
        data += means.astype("<f4").tobytes()
    dataset = b"calibration.txt"
    path.write_bytes(data + struct.pack("<ii", 4, len(dataset)) + dataset)
    return path


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """The demo, its measured moments and the q4_k_m file they weigh (writer.export: no pipeline)."""
    model, tokenizer = moeexport.load("demo"), moeexport.load_tokenizer("demo")
    moments = input_moments(model, sample_from_model(model, tokenizer, 4, 64, seed=3))
    written = writer.export(model, tmp_path_factory.mktemp("measured") / "m.gguf", quant="q4_k_m", imatrix=moments)
    assert not [note for note in written.fallbacks if note.startswith("imatrix")]  # every expert saw tokens
    return model, moments, written


def test_ours_is_llama_cpps_layout_and_reads_back_as_measured(measured, tmp_path):
    model, moments, written = measured
    path = tmp_path / "imatrix.gguf"
    imatrix_file.write(path, written.imatrix)
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.type").contents() == "imatrix"
    assert reader.get_field("general.architecture") is None
    assert (reader.get_field("imatrix.chunk_count").contents(), reader.get_field("imatrix.chunk_size").contents()) \
        == (4, 64)
    tensors = {t.name: t for t in reader.tensors}
    stack = tensors["blk.1.ffn_down_exps.weight.in_sum2"]
    assert list(stack.shape) == [192, EXPERTS] and list(tensors["blk.1.ffn_down_exps.weight.counts"].shape) \
        == [1, EXPERTS]  # ggml order: width first
    assert list(tensors["blk.0.attn_q.weight.in_sum2"].shape) == [128, 1]
    assert [t.name for t in reader.tensors] == [name + part for name in sorted(written.imatrix.entries)
                                                for part in (".in_sum2", ".counts")]  # llama-imatrix's order
    back = imatrix_file.read(path)
    expected = _as_llama_cpp_sums(moments)
    assert set(back.entries) == set(expected)
    for name, (rows, counts) in expected.items():
        np.testing.assert_array_equal(back.entries[name].sums, rows.reshape(-1))
        np.testing.assert_array_equal(back.entries[name].counts, counts)


def test_an_expert_without_tokens_is_written_as_llama_imatrix_writes_it(measured, tmp_path):
    model, moments, _ = measured
    starved = type(moments)(chunks=moments.chunks, chunk_size=moments.chunk_size)
    for key in moments.sums:
        starved.sums[key], starved.counts[key] = moments.sums[key].clone(), moments.counts[key]
    for role in ("experts_in", "experts_mid"):
        starved.sums[(2, role)] = starved.sums[(2, role)].clone()
        starved.sums[(2, role)][5] = 0
        starved.counts[(2, role)] = starved.counts[(2, role)].clone()
        starved.counts[(2, role)][5] = 0
    written = writer.export(model, tmp_path / "m.gguf", quant="q4_k_m", imatrix=starved)
    assert "imatrix: blk.2 expert 5 saw no calibration tokens -> its layer's average" in written.fallbacks
    imatrix_file.write(tmp_path / "imatrix.gguf", written.imatrix)
    entry = imatrix_file.read(tmp_path / "imatrix.gguf").entries["blk.2.ffn_up_exps.weight"]
    sums, counts = entry.rows(EXPERTS)
    assert counts[5] == 0 and not sums[5].any() and (np.delete(counts, 5) > 0).all()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "glm4_moe"])
def test_ours_names_the_tensors_our_gguf_of_the_family_holds(family, tmp_path):
    """Shared experts, a leading dense layer: every entry is a weight of the file, an expert stack's rows its
    experts, and the file is taken back as it is."""
    from tests.test_gguf import _tiny_with_demo_vocabulary
    from tests.tiny_models import random_tokens

    model = _tiny_with_demo_vocabulary(family)
    written = writer.export(model, tmp_path / "m.gguf", quant="q4_k_m", imatrix=input_moments(model, random_tokens()))
    tensors = {t.name: t for t in gguf.GGUFReader(written.path).tensors}
    for name, entry in written.imatrix.entries.items():
        experts = tensors[name].shape[2] if len(tensors[name].shape) == 3 else 1
        assert len(entry.counts) == experts, name
    assert any(name.endswith("_exps.weight") for name in written.imatrix.entries)
    imatrix_file.write(tmp_path / "imatrix.gguf", written.imatrix)
    assert writer.check_imatrix_file(model, imatrix_file.read(tmp_path / "imatrix.gguf"), "q4_k_m") == []


@pytest.mark.parametrize("layout", ["gguf", "dat"])
def test_llama_cpps_file_gives_the_gguf_measuring_gives(layout, measured, tmp_path):
    model, moments, written = measured
    sums = _as_llama_cpp_sums(moments)
    make = _write_llama_cpp_gguf if layout == "gguf" else _write_llama_cpp_dat
    path = make(tmp_path / f"theirs.{layout}", sums)
    target = target_for("gguf")
    options = target.options({"imatrix": str(path)})
    target.check(model, "q4_k_m", options)
    theirs = target.export(model, tmp_path, "q4_k_m", options, inputs=_no_inputs())
    assert theirs.imatrix == {"source": str(path)}
    assert theirs.path.read_bytes() == written.path.read_bytes()
    assert not (tmp_path / imatrix_file.FILE_NAME).exists()  # only a measured one is written beside


def _no_inputs():
    from moeexport.backends.target import ExportInputs

    return ExportInputs()


def test_a_file_without_the_output_head_is_taken_and_says_so(measured, tmp_path):
    model, moments, _ = measured
    sums = _as_llama_cpp_sums(moments)
    del sums["output.weight"]  # llama-imatrix collects it only with --process-output
    path = _write_llama_cpp_gguf(tmp_path / "theirs.gguf", sums)
    notes = writer.check_imatrix_file(model, imatrix_file.read(path), "q4_k_m")
    assert notes == [f"imatrix: output.weight is not in {path} (llama-imatrix collects it only with "
                     "--process-output): rounded without importance"]


def _damaged(sums: dict, damage: str) -> dict:
    sums = dict(sums)
    if damage == "foreign tensor":
        sums["blk.9.attn_q.weight"] = sums["blk.0.attn_q.weight"]
    elif damage == "wrong width":
        rows, counts = sums["blk.1.ffn_down_exps.weight"]
        sums["blk.1.ffn_down_exps.weight"] = rows[:, :96], counts
    elif damage == "fewer experts":
        rows, counts = sums["blk.3.ffn_gate_exps.weight"]
        sums["blk.3.ffn_gate_exps.weight"] = rows[:6], counts[:6]
    elif damage == "not covered":
        del sums["blk.2.attn_k.weight"]
    return sums


@pytest.mark.parametrize("damage, message", [
    ("foreign tensor", "names blk.9.attn_q.weight, which this model's GGUF does not have"),
    ("wrong width", "blk.1.ffn_down_exps.weight has 768 values in 8 row(s), where this model's tensor takes 8 x 192"),
    ("fewer experts", "blk.3.ffn_gate_exps.weight has 768 values in 6 row(s), where this model's tensor takes 8 x 128"),
    ("not covered", "does not cover blk.2.attn_k.weight: make it with llama-imatrix on this build's model"),
])
def test_a_file_for_another_model_is_refused_at_the_targets_check(damage, message, measured, tmp_path):
    model, moments, _ = measured
    path = _write_llama_cpp_gguf(tmp_path / "theirs.gguf", _damaged(_as_llama_cpp_sums(moments), damage))
    target = target_for("gguf")
    with pytest.raises(MoeExportError) as refused:
        target.check(model, "q4_k_m", target.options({"imatrix": str(path)}))
    assert message in str(refused.value) and "\n" not in str(refused.value)


def _unreadable(tmp_path: Path, kind: str) -> tuple[Path, str]:
    path = tmp_path / f"{kind.replace(' ', '_')}.gguf"
    one = {"blk.0.attn_q.weight": (np.ones((1, 128), np.float32), np.ones(1, np.float32))}
    if kind == "no such file":
        return path, "no such file"
    if kind == "a model, not an imatrix":
        _write_llama_cpp_gguf(path, one, keys=False)
        return path, "needs imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size"
    if kind == "sums without counts":
        out = gguf.GGUFWriter(str(path), arch="")
        out.add_array("imatrix.datasets", ["x"])
        out.add_uint32("imatrix.chunk_count", 1)
        out.add_uint32("imatrix.chunk_size", 1)
        out.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones((1, 128), np.float32))
        out.write_header_to_file(), out.write_kv_data_to_file(), out.write_tensors_to_file(), out.close()
        return path, "blk.0.attn_q.weight has .in_sum2 but not .counts"
    if kind == "hostile header":  # a GGUF header that declares 2**56 tensors
        path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**56 - 1, 5) + bytes(8))
        return path, "is not a readable GGUF file (it declares 5 metadata entries and 72057594037927935 tensors"
    path.write_bytes(struct.pack("<ii", 1, 40) + b"blk.0")  # a .dat cut short
    return path, "neither a GGUF nor a complete legacy .dat importance matrix"


@pytest.mark.parametrize("kind", ["no such file", "a model, not an imatrix", "sums without counts", "hostile header",
                                  "truncated dat"])
def test_an_unreadable_file_is_refused_when_the_options_are_read(kind, tmp_path):
    path, message = _unreadable(tmp_path, kind)
    with pytest.raises(MoeExportError) as refused:
        target_for("gguf").options({"imatrix": str(path)})
    assert message in str(refused.value) and str(path) in str(refused.value) and "\n" not in str(refused.value)


def test_the_flag_alone_measures_and_with_a_file_reads_it():
    from moeexport.arguments import build_parser
    from moeexport.cli import _target_options

    def parsed(*extra):
        return _target_options(build_parser().parse_args(["build", "demo", "--recipe", "r.yaml", "--target", "gguf",
                                                          "--out", "o", *extra]))

    assert parsed("--imatrix")["imatrix"] is True
    assert parsed("--imatrix", "their.gguf", "--quant", "q4_k_m")["imatrix"] == "their.gguf"
    assert "imatrix" not in parsed()


def test_the_cli_refuses_a_missing_file_in_one_line_before_torch(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("passes: []\n")
    argv = ["build", "demo", "--recipe", str(recipe), "--target", "gguf", "--out", str(tmp_path / "out"),
            "--imatrix", str(tmp_path / "missing.gguf")]
    script = ("import sys\nfrom moeexport.cli import main\ncode = main(" + repr(argv) + ")\n"
              "print(code, [name for name in ('torch', 'transformers') if name in sys.modules])")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.split(" ", 1)[0] == "2" and done.stdout.split(" ", 1)[1].strip() == "[]", done
    assert done.stderr.strip().splitlines() == [f"moeexport build: error: --imatrix {tmp_path / 'missing.gguf'}: no such file (give "
                                                "llama-imatrix's output, or --imatrix alone to measure one)"]


def test_a_measuring_build_writes_the_file_and_a_streamed_build_given_it_writes_the_same_gguf(tmp_path):
    from moeexport.pipeline import BuildOptions, CalibrationOptions, build

    def built(out: str, imatrix, stream: bool):
        return build("demo", {"passes": []}, "gguf", BuildOptions(
            out=str(tmp_path / out), quant="q4_k_m", target_options={"imatrix": imatrix}, stream=stream,
            calibration=CalibrationOptions(samples=4, length=64), validation_windows=(1, 64), profile=False))

    measuring = built("measured", True, stream=False)
    written = tmp_path / "measured" / imatrix_file.FILE_NAME
    assert measuring.artifact["imatrix"] == {"source": "measured", "file": str(written)}
    report = json.loads((tmp_path / "measured" / "report.json").read_text())
    assert report["artifact"]["imatrix"]["file"] == str(written)
    assert imatrix_file.FILE_NAME not in report["artifact"]["files"]  # beside the artifact, not part of it
    assert f"written to {written}" in (tmp_path / "measured" / "report.html").read_text()
    given = built("given", str(written), stream=True)  # a file needs no measuring, so a streamed build takes it
    assert given.compression.memory["streamed"]
    assert given.artifact["imatrix"] == {"source": str(written)} and "imatrix" not in given.timings
    assert Path(given.artifact["path"]).read_bytes() == Path(measuring.artifact["path"]).read_bytes()


@pytest.mark.skipif(not UPSTREAM, reason="MOEEXPORT_UPSTREAM_LLAMA is unset: no llama.cpp llama-quantize binary to "
                    "run (tools/build_upstream_llama.py builds one and prints the variable)")
def test_llama_quantize_takes_ours_and_rounds_as_our_build(measured, tmp_path):
    """llama.cpp's own quantizer, given our f32 file and our imatrix.gguf, writes the tensors our q4_k_m build
    wrote with the same moments."""
    model, moments, written = measured
    imatrix_file.write(tmp_path / "imatrix.gguf", written.imatrix)
    f32 = writer.export(model, tmp_path / "m-f32.gguf", quant="f32").path
    done = subprocess.run([str(Path(UPSTREAM) / "llama-quantize"), "--imatrix", str(tmp_path / "imatrix.gguf"),
                           str(f32), str(tmp_path / "theirs.gguf"), "Q4_K_M"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    log = done.stdout + done.stderr
    assert f"loaded {len(written.imatrix.entries)} importance matrix entries" in log
    assert "is different from tensor size" not in log
    theirs = {t.name: t for t in gguf.GGUFReader(tmp_path / "theirs.gguf").tensors}
    ours = {t.name: t for t in gguf.GGUFReader(written.path).tensors}
    assert set(theirs) == set(ours)
    for name, tensor in ours.items():
        assert tensor.tensor_type == theirs[name].tensor_type, name
        assert np.array_equal(np.asarray(tensor.data), np.asarray(theirs[name].data)), name


@pytest.mark.skipif(not (UPSTREAM and (Path(UPSTREAM) / "llama-imatrix").is_file()),
                    reason="MOEEXPORT_UPSTREAM_LLAMA holds no llama-imatrix (tools/build_upstream_llama.py "
                    "--imatrix builds it)")
def test_llama_imatrixs_own_file_builds_as_llama_quantize_uses_it(measured, tmp_path):
    """llama-imatrix's file of our f32 GGUF, given to our build (--imatrix FILE) and to llama-quantize: the same
    tensors (its file lacks the output head, as llama-imatrix leaves it out by default: both round it unweighted)."""
    from moeexport.backends.target import ExportInputs
    from moeexport.checkpoint_files import DEMO_MODEL

    model, _, _ = measured
    f32 = writer.export(model, tmp_path / "m-f32.gguf", quant="f32").path
    theirs = tmp_path / "theirs.gguf"
    made = subprocess.run([str(Path(UPSTREAM) / "llama-imatrix"), "-m", str(f32), "-f",
                           str(Path(DEMO_MODEL) / "calibration.txt"), "-o", str(theirs), "-c", "64", "--chunks", "16",
                           "--no-ppl", "-t", "2"], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0 and theirs.is_file(), made.stderr[-2000:]
    target = target_for("gguf")
    options = target.options({"imatrix": str(theirs)})
    target.check(model, "q4_k_m", options)
    ours = target.export(model, tmp_path, "q4_k_m", options, ExportInputs())
    assert f"imatrix: output.weight is not in {theirs}" in " ".join(ours.fallbacks)
    assert not [note for note in ours.fallbacks if "saw no calibration tokens" in note]  # (their 1s, our average)
    done = subprocess.run([str(Path(UPSTREAM) / "llama-quantize"), "--imatrix", str(theirs), str(f32),
                           str(tmp_path / "upstream.gguf"), "Q4_K_M"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    upstream = {t.name: t for t in gguf.GGUFReader(tmp_path / "upstream.gguf").tensors}
    for tensor in gguf.GGUFReader(ours.path).tensors:
        assert np.array_equal(np.asarray(tensor.data), np.asarray(upstream[tensor.name].data)), tensor.name
