"""`moeexport bench`: the weight bytes one decoded token reads, counted by hand; the runs, medians and ratios; the
command's JSON, report and errors. No timing is asserted: speeds vary, structure and accounting do not."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import moeexport
from moeexport.cli import main
from tests.cli_output import without_progress

SMALL = ["--prompt-tokens", "16", "--new-tokens", "4", "--bandwidth-buffer", "128MiB"]  # 4x this machine's 32 MiB L3


# --- the accounting, against shapes and types counted by hand ---------------------------------------------------


def _tiny_gguf(path, tied: bool = False):
    """A one-block llama GGUF with 4 experts, top-2, tensors of four types (llama.cpp cannot run it: no attention
    besides attn_q). Bytes by hand: f32 4 a value, f16 2, q8_0 34 per 32 values."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_expert_count(4)
    writer.add_expert_used_count(2)
    rng = np.random.default_rng(0)

    def q8_0(*shape):
        return gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)

    writer.add_tensor("token_embd.weight", rng.standard_normal((10, 32)).astype(np.float32))  # 1280 B, a row 128
    writer.add_tensor("blk.0.attn_q.weight", rng.standard_normal((32, 32)).astype(np.float16))  # 2048 B
    writer.add_tensor("blk.0.ffn_gate_inp.weight", rng.standard_normal((4, 32)).astype(np.float32))  # 512 B
    writer.add_tensor("blk.0.exp_probs_b.bias", np.zeros(4, np.float32))  # 16 B (a padded layer's bias)
    writer.add_tensor("blk.0.ffn_gate_exps.weight", q8_0(4, 16, 32), raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # 2176 B
    writer.add_tensor("blk.0.ffn_down_exps.weight", q8_0(4, 32, 32), raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # 4352 B
    if not tied:
        writer.add_tensor("output.weight", rng.standard_normal((10, 32)).astype(np.float16))  # 640 B
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_bytes_per_token_counted_by_hand(tmp_path):
    from moeexport.backends.gguf.runner import bytes_per_token

    counted = bytes_per_token(_tiny_gguf(tmp_path / "tiny.gguf"))
    assert counted.routed_experts == (2176 + 4352) * 2 // 4  # top-2 of 4 experts of each stack
    assert counted.head == 640 and counted.lookups == 128  # output.weight whole, one row of token_embd
    assert counted.other == 2048 + 512 + 16  # attention, router, selection bias: whole
    assert counted.total == 3264 + 640 + 128 + 2576 and counted.embedding_rows == 10
    assert counted.experts_read == "top-2 of 4"

    tied = bytes_per_token(_tiny_gguf(tmp_path / "tied.gguf", tied=True))
    assert tied.head == 1280 and tied.lookups == 128  # no output.weight: token_embd is the head too


def _tiny_onnx(path, plain: bool = False, external: bool = False):
    """input_ids -> Gather(embedding) -> MatMul(attention) -> MoE (k=2 of 4; fc1 stored f16 behind a Cast) or, plain,
    TopK + one batched MatMul over a [4, 8, 32] stack -> MatMul(head) -> logits."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"embed": rng.standard_normal((10, 8)).astype(np.float32),  # 320 B, a row 32
               "attention": rng.standard_normal((8, 8)).astype(np.float32),  # 256 B
               "router": rng.standard_normal((8, 4)).astype(np.float32),  # 128 B
               "head": rng.standard_normal((8, 10)).astype(np.float32)}  # 320 B
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["h"]),
             helper.make_node("MatMul", ["h", "attention"], ["x"]),
             helper.make_node("MatMul", ["x", "router"], ["router_logits"])]
    if plain:
        weights |= {"stack": rng.standard_normal((4, 8, 32)).astype(np.float32),  # 4096 B, read whole
                    "k": np.array([2], np.int64)}  # 8 B
        nodes += [helper.make_node("TopK", ["router_logits", "k"], ["top", "index"]),
                  helper.make_node("MatMul", ["x", "stack"], ["experts"]),
                  helper.make_node("ReduceSum", ["experts"], ["y"])]
    else:
        weights |= {"fc1_f16": rng.standard_normal((4, 32, 8)).astype(np.float16),  # 2048 B, read as f32 4096, k/E: 2048
                    "fc2": rng.standard_normal((4, 8, 16)).astype(np.float32)}  # 2048 B, k/E: 1024
        nodes += [helper.make_node("Cast", ["fc1_f16"], ["fc1"], to=TensorProto.FLOAT),
                  helper.make_node("MoE", ["x", "router_logits", "fc1", "", "fc2"], ["y"], domain="com.microsoft", k=2,
                                   activation_type="swiglu", swiglu_fusion=1)]
    nodes += [helper.make_node("MatMul", ["y", "head"], ["projected"]),
              helper.make_node("Identity", ["projected"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 1])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, 10])],
                              [numpy_helper.from_array(array, name) for name, array in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=0)
    return path


@pytest.mark.parametrize("external", [False, True])
def test_onnx_bytes_per_token_counted_by_hand(external, tmp_path):
    from moeexport.backends.onnx.runner import bytes_per_token

    counted = bytes_per_token(_tiny_onnx(tmp_path / "moe.onnx", external=external))
    # the MoE node's expert inputs at k/E, fc1 through the Cast that the runtime folds: read as f32
    assert counted.routed_experts == (4096 + 2048) * 2 // 4
    assert counted.lookups == 32 and counted.embedding_rows == 10  # the gathered embedding: one row
    assert counted.head == 320 and counted.other == 256 + 128
    assert counted.experts_read == "top-2 of 4"

    plain = bytes_per_token(_tiny_onnx(tmp_path / "plain.onnx", plain=True, external=external))
    assert plain.routed_experts == 4096  # a plain graph computes every expert: the stack is read whole
    assert plain.other == 256 + 128 + 8 and plain.experts_read.startswith("all 4")


@pytest.fixture(scope="module")
def demo_artifacts(tmp_path_factory):
    from moeexport.backends import gguf as gguf_backend
    from moeexport.backends import onnx as onnx_backend

    model, directory = moeexport.load("demo"), tmp_path_factory.mktemp("artifacts")
    return (gguf_backend.export(model, directory / "demo.gguf", quant="f32").path,
            onnx_backend.export(model, directory / "demo.onnx", quant="f32").path)


def test_torch_bytes_per_token_by_hand_and_alike_in_every_format(demo_artifacts):
    from moeexport.backends.gguf.runner import bytes_per_token as gguf_bytes
    from moeexport.backends.onnx.runner import bytes_per_token as onnx_bytes
    from moeexport.modelio import load_streamed
    from moeexport.validate import bytes_per_token

    model = moeexport.load("demo")
    c = model.config  # demo: 4 layers, hidden 128, experts of 192, 8 experts, top-2, 2 KV heads of 32, vocab 2048
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    layer = 2 * c.hidden_size**2 + 2 * c.hidden_size * kv + 2 * c.hidden_size + c.num_local_experts * c.hidden_size
    routed = c.num_hidden_layers * c.num_experts_per_tok * 3 * c.hidden_size * c.intermediate_size
    counted = bytes_per_token(model)
    assert counted.routed_experts == 4 * routed
    assert counted.other == 4 * (c.num_hidden_layers * layer + c.hidden_size)  # + the final norm
    assert counted.head == 4 * c.vocab_size * c.hidden_size and counted.lookups == 4 * c.hidden_size
    assert bytes_per_token(load_streamed("demo")) == counted  # shapes alone: the meta-device model counts the same

    gguf_file, onnx_file = demo_artifacts  # f32 both
    assert gguf_bytes(gguf_file) == counted  # f32 everywhere: the same weights, the same bytes
    in_onnx = onnx_bytes(onnx_file)
    assert (in_onnx.routed_experts, in_onnx.head, in_onnx.experts_read) == (
        counted.routed_experts, counted.head, counted.experts_read)


# --- runs, medians, ratios ---------------------------------------------------------------------------------------


def test_runs_interleave_and_medians_spreads_ratios_and_bounds_follow(tmp_path, monkeypatch):
    import moeexport.bench as bench_module

    first, second = _tiny_gguf(tmp_path / "a.gguf"), _tiny_gguf(tmp_path / "b.gguf", tied=True)
    speeds = {first.name: iter([100.0, 300.0, 200.0]), second.name: iter([50.0, 40.0, 60.0]),
              "demo": iter([1.0, 2.0, 3.0])}
    calls = []

    def profile(target, path, prompt, new_tokens, context, threads):
        calls.append(path.name)
        assert target == {"demo": "torch"}.get(path.name, "gguf")
        assert len(prompt) == 16 and new_tokens == 4 and context >= 20 and threads == 1
        assert all(3 <= token < 10 for token in prompt)  # ordinary ids of the smallest vocabulary
        speed = next(speeds[path.name])
        return {"prefill_tokens_per_s": 10 * speed, "decode_tokens_per_s": speed, "time_to_first_token_s": 1 / speed,
                "peak_rss_bytes": int(speed) * 2**20, "runtime_rss_bytes": int(speed) * 2**10}

    monkeypatch.setattr(bench_module, "profile_in_subprocess", profile)
    options = bench_module.BenchOptions(repeats=3, prompt_tokens=16, new_tokens=4, threads=1, bandwidth_buffer=2**27)
    report = bench_module.bench([str(first), "demo"], f"{tmp_path}/./b.gguf", options)  # the baseline is added

    assert calls == ["a.gguf", "demo", "b.gguf"] * 3  # interleaved
    a, demo, b = report.artifacts
    assert (a.label, demo.label, b.label, report.baseline) == ("a.gguf", "demo", "b.gguf", "b.gguf")
    assert b.baseline and not a.baseline and demo.format == "torch" and demo.token_bytes["experts_read"] == "top-2 of 8"
    assert demo.decode_ratio == 2.0 / 50
    assert (a.decode_tokens_per_s.median, a.decode_tokens_per_s.min, a.decode_tokens_per_s.max) == (200, 100, 300)
    assert (b.decode_ratio, b.prefill_ratio) == (1.0, 1.0)
    assert a.decode_ratio == a.prefill_ratio == 200 / 50
    assert a.peak_rss_bytes.median == 200 * 2**20 and len(a.runs) == 3
    assert a.token_bytes["total"] == 6608 and b.token_bytes["total"] == 6608 - 640 + 1280
    bandwidth = report.bandwidth.bytes_per_s
    assert report.bandwidth.buffer_bytes == 2**27 and report.bandwidth.min_bytes_per_s <= bandwidth
    assert a.bound_tokens_per_s == pytest.approx(bandwidth / 6608)
    assert a.bound_fraction == pytest.approx(200 / a.bound_tokens_per_s)
    json.dumps(report.to_dict())  # plain data

    from rich.console import Console

    from moeexport.console import render_bench

    rendered = Console(width=160, record=True)
    render_bench(rendered, report)
    text = rendered.export_text()
    assert "of bound" in text and "a.gguf" in text and "top-2 of 4" in text and "x4.00" in text


# --- the command --------------------------------------------------------------------------------------------------


def test_bench_prints_one_json_document_and_writes_its_report(demo_artifacts, tmp_path, capsys):
    gguf_file, onnx_file = demo_artifacts
    out = tmp_path / "bench"
    argv = ["bench", str(gguf_file), str(onnx_file), "--baseline", str(onnx_file), "--repeats", "1", "--threads", "1",
            "--json", "--out", str(out), *SMALL]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "report.json").read_text())
    assert [a["format"] for a in printed["artifacts"]] == ["gguf", "onnx"]  # the baseline was listed: not twice
    assert printed["baseline"] == "demo.onnx" and printed["bandwidth"]["bytes_per_s"] > 0
    for artifact in printed["artifacts"]:
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes", "runtime_rss_bytes"):
            assert set(artifact[key]) == {"median", "min", "max"} and artifact[key]["median"] > 0
        assert artifact["token_bytes"]["total"] > 0 and len(artifact["runs"]) == 1
        assert artifact["bound_tokens_per_s"] == pytest.approx(printed["bandwidth"]["bytes_per_s"]
                                                               / artifact["token_bytes"]["total"])
        assert artifact["bound_fraction"] == pytest.approx(artifact["decode_tokens_per_s"]["median"]
                                                           / artifact["bound_tokens_per_s"])
    baseline = printed["artifacts"][1]
    assert baseline["baseline"] and baseline["decode_ratio"] == baseline["prefill_ratio"] == 1.0
    page = (out / "report.html").read_text()
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) == 1 and "KV-cache reads are left out" in page


def test_the_profile_process_runs_a_checkpoint_in_torch():
    """backends/profile.py's torch target, in this process (a fresh one would spend seconds importing torch)."""
    import torch

    from moeexport.backends.profile import _profile_torch

    threads = torch.get_num_threads()
    try:
        result = _profile_torch({"path": "demo", "prompt": list(range(3, 19)), "new_tokens": 4, "threads": 1})
    finally:
        torch.set_num_threads(threads)
    assert result["prompt_tokens"] == 16 and result["decode_tokens"] == 4 and result["decode_tokens_per_s"] > 0
    assert result["peak_rss_bytes"] > 0 and "runtime_rss_bytes" in result


def test_bench_help_teaches_the_bound(capsys):
    with pytest.raises(SystemExit) as exit_status:
        main(["bench", "--help"])
    assert exit_status.value.code == 0
    printed = capsys.readouterr().out
    assert "usage: moeexport bench" in printed and "KV-cache reads are left out" in printed


@pytest.mark.parametrize("case", ["missing", "extension", "not a gguf", "llama.cpp refuses", "twice"])
def test_bad_artifacts_are_one_line_and_exit_2(case, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    tiny = str(_tiny_gguf(tmp_path / "tiny.gguf"))  # gguf-py reads it; llama.cpp misses its attention tensors
    artifacts, message = {
        "missing": ([str(tmp_path / "nope.gguf")], "does not exist"),
        "extension": ([str(tmp_path / "notes.txt")], "bench runs .gguf and .onnx files"),
        "not a gguf": ([str(tmp_path / "junk.gguf")], "is not a readable GGUF file"),
        "llama.cpp refuses": ([tiny], "llama.cpp cannot load"),
        "twice": ([tiny, f"{tmp_path}/./tiny.gguf"], "is given twice"),
    }[case]
    assert main(["bench", *artifacts, "--repeats", "1", *SMALL]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and len(without_progress(captured.err).splitlines()) == 1
    assert captured.out == ""
