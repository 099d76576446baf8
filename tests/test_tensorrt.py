"""TensorRT target, everything that runs without a GPU: the parser-support check, the plain-ops ONNX in
ONNX Runtime, the device bundle, the decoding loop the engine runner uses, precision planning, and the
command line when TensorRT is absent. The engine itself is built and run in device_tests/."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import moeexport
from moeexport.backends import onnx as onnx_backend
from moeexport.backends import tensorrt as trt_backend
from moeexport.backends.tensorrt.builder import Profiles, default_precision, plan_precision
from moeexport.calibration.sources import sample_from_model
from moeexport.cli import main
from moeexport.compress import compress
from moeexport.errors import MoeExportError
from moeexport.recipe import parse_recipe
from moeexport.validate import RecordedReference, TorchRunner, compare
from tests.conftest import CORPUS, FIXTURE, needs_shared
from tests.cli_output import without_progress

REPO = Path(__file__).resolve().parents[1]


# --- the support data and the checker on hand-built graphs ---------------------------------


def _model(nodes, inputs, outputs, initializers=(), opset=17, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    imports = [helper.make_opsetid("", opset), *[helper.make_opsetid(d, v) for d, v in extra_opsets]]
    return helper.make_model(graph, opset_imports=imports)


def _topk_graph(k_constant: bool, sorted_: int = 1):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])
    values = helper.make_tensor_value_info("values", TensorProto.FLOAT, [4, None])
    inputs, initializers = [x], []
    if k_constant:
        initializers.append(numpy_helper.from_array(np.array([2], dtype=np.int64), "k"))
    else:
        inputs.append(helper.make_tensor_value_info("k", TensorProto.INT64, [1]))
    node = helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="route", sorted=sorted_)
    return _model([node], inputs, [values], initializers)


def test_the_support_data_names_the_tensorrt_release_and_its_source():
    table = trt_backend.support_table()
    assert "10.3" in table["tensorrt_versions"] and "TensorRT 10.3" in table["describes"]
    assert "onnx-tensorrt" in table["source"]["operators"] and "10.1-GA" in table["source"]["operators"]
    operators = table["operators"]
    assert len(operators) > 150
    assert operators["MatMul"]["supported"] and not operators["Unique"]["supported"]
    assert {"check": "constant_input", "input": 1}.items() <= operators["TopK"]["checks"][1].items()
    assert operators["ScatterND"]["checks"][0]["allowed"] == ["none"]


def test_topk_needs_a_constant_k_and_sorted_output():
    assert trt_backend.check_onnx(_topk_graph(k_constant=True)) == []
    problems = trt_backend.check_onnx(_topk_graph(k_constant=False))
    assert len(problems) == 1 and "TopK node 'route'" in problems[0] and "computed at run time" in problems[0]
    assert any("sorted=0" in p for p in trt_backend.check_onnx(_topk_graph(k_constant=True, sorted_=0)))


def test_a_k_from_a_constant_node_counts_as_constant_and_a_huge_k_is_refused():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 5000])
    out = helper.make_tensor_value_info("values", TensorProto.FLOAT, [4, None])
    for k in (2, 4000):
        constant = helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array([k], dtype=np.int64)))
        topk = helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="t")
        problems = trt_backend.check_onnx(_model([constant, topk], [x], [out]))
        if k == 2:
            assert problems == []
        else:
            assert len(problems) == 1 and "is [4000], TensorRT needs it below 3840" in problems[0]


@pytest.mark.parametrize("reduction, refused", [(None, False), ("none", False), ("add", True), ("mul", True)])
def test_scatter_nd_with_a_reduction_is_refused(reduction, refused):
    data = helper.make_tensor_value_info("data", TensorProto.FLOAT, [4, 8])
    indices = helper.make_tensor_value_info("indices", TensorProto.INT64, [2, 1])
    updates = helper.make_tensor_value_info("updates", TensorProto.FLOAT, [2, 8])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, 8])
    attributes = {"reduction": reduction} if reduction else {}
    node = helper.make_node("ScatterND", ["data", "indices", "updates"], ["out"], name="scatter", **attributes)
    model = _model([node], [data, indices, updates], [out], opset=18)
    problems = trt_backend.check_onnx(model)
    assert bool(problems) == refused
    if refused:
        assert f"reduction='{reduction}'" in problems[0] and "ScatterND node 'scatter'" in problems[0]


def test_contrib_ops_unknown_ops_unsupported_ops_and_opsets_are_refused():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])
    moe = helper.make_node("MoE", ["x", "x", "w1", "w2"], ["y"], name="moe0", domain="com.microsoft", k=2)
    problems = trt_backend.check_onnx(_model([moe], [x], [y], extra_opsets=[("com.microsoft", 1)]))
    assert len(problems) == 1 and "domain 'com.microsoft'" in problems[0] and "plain" in problems[0]

    unique = helper.make_node("Unique", ["x"], ["y"], name="u")
    assert "does not import Unique" in trt_backend.check_onnx(_model([unique], [x], [y]))[0]
    made_up = helper.make_node("Frobnicate", ["x"], ["y"], name="f")
    assert "not in the table" in trt_backend.check_onnx(_model([made_up], [x], [y]))[0]
    relu = helper.make_node("Relu", ["x"], ["y"])
    assert any("opset 21" in p for p in trt_backend.check_onnx(_model([relu], [x], [y], opset=21)))
    nonzero = helper.make_node("NonZero", ["x"], ["y"], name="nz")
    assert "data-dependent" in trt_backend.check_onnx(_model([nonzero], [x], [y]))[0]


def test_element_types_are_checked_through_shape_inference():
    a = helper.make_tensor_value_info("a", TensorProto.INT64, [2, 3])
    b = helper.make_tensor_value_info("b", TensorProto.INT64, [3, 2])
    out = helper.make_tensor_value_info("out", TensorProto.INT64, [2, 2])
    problems = trt_backend.check_onnx(_model([helper.make_node("MatMul", ["a", "b"], ["out"], name="mm")], [a, b], [out]))
    assert len(problems) == 1 and "INT64 input is not supported" in problems[0]
    # the type of an intermediate value comes from inference: Cast to double, then Exp of it
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2])
    nodes = [helper.make_node("Cast", ["x"], ["d"], to=TensorProto.DOUBLE, name="c"), helper.make_node("Exp", ["d"], ["y"], name="e")]
    problems = trt_backend.check_onnx(_model(nodes, [x], [y]))
    assert any("Cast node 'c': casting to DOUBLE" in p for p in problems)
    assert any("Exp node 'e': DOUBLE input" in p for p in problems)


def test_runtime_axes_and_problems_inside_subgraphs_are_found():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    axes = helper.make_tensor_value_info("axes", TensorProto.INT64, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    unsqueeze = helper.make_node("Unsqueeze", ["x", "axes"], ["y"], name="un")
    assert "Unsqueeze's axes" in trt_backend.check_onnx(_model([unsqueeze], [x, axes], [y]))[0]

    condition = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    branch_out = helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])
    then_graph = helper.make_graph([helper.make_node("Unique", ["x"], ["b"], name="inner")], "then", [], [branch_out])
    else_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["b"])], "else", [], [branch_out])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)
    problems = trt_backend.check_onnx(_model([node], [x, condition], [y]))
    assert len(problems) == 1 and "Unique node 'inner'" in problems[0]


# --- the plain-ops decoder ---------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    model, tokenizer = moeexport.load("demo"), moeexport.load_tokenizer("demo")
    return model, sample_from_model(model, tokenizer, 2, 64, seed=5)


@pytest.fixture(scope="module")
def demo_plain(demo, tmp_path_factory):
    model, _ = demo
    return onnx_backend.export(model, tmp_path_factory.mktemp("plain") / "plain.onnx", moe_ops="plain").path


def test_every_op_of_the_plain_decoder_is_in_the_support_data(demo_plain):
    used = trt_backend.support.operators_used(demo_plain)
    assert {"TopK", "MatMul", "Softmax", "ReduceSum"} <= set(used)
    assert not any("::" in op for op in used), "a non-default domain op reached the TensorRT graph"
    operators = trt_backend.support_table()["operators"]
    assert all(operators[op]["supported"] for op in used)
    assert "ScatterND" not in used and "ScatterElements" not in used and "NonZero" not in used
    assert trt_backend.check_onnx(demo_plain) == [] and trt_backend.check_decoder_io(demo_plain) == []


def test_the_contrib_decoder_is_refused_for_tensorrt(demo, tmp_path):
    model, _ = demo
    contrib = onnx_backend.export(model, tmp_path / "contrib.onnx", moe_ops="contrib").path
    problems = trt_backend.check_onnx(contrib)
    assert len(problems) == model.config.num_hidden_layers and all("com.microsoft" in p for p in problems)


def test_decoder_io_problems_are_named():
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])
    positions = helper.make_tensor_value_info("position_ids", TensorProto.INT32, ["batch", "sequence"])
    past = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["batch", "heads", "past", 8])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", "vocab"])
    nodes = [helper.make_node("Identity", ["input_ids"], ["logits"])]
    problems = trt_backend.check_decoder_io(_model(nodes, [ids, mask, positions, past], [logits]))
    joined = " | ".join(problems)
    assert "position_ids must be INT64" in joined and "static heads" in joined
    assert "no matching output present.0.key" in joined and "static vocab" in joined


class OrtLoop(onnx_backend.OnnxRunner):
    """The engine runner's decoding loop over ONNX Runtime on CPU, with small chunks to exercise them."""

    def __init__(self, path, max_prompt, context):
        super().__init__(path, context=context, providers=["CPUExecutionProvider"])
        self.max_prompt, self.calls = max_prompt, []

    def _forward(self, ids, past, past_length):
        assert past is None or all(value.shape[2] == past_length for value in past.values())
        self.calls.append(len(ids))
        return super()._forward(ids, past, past_length)


def test_the_runner_loop_chunks_prefill_and_decodes_through_the_cache(demo, demo_plain):
    model, windows = demo
    loop = OrtLoop(demo_plain, max_prompt=24, context=128)
    window = windows[0].tolist()
    fidelity = compare(TorchRunner(model), loop, windows)
    assert fidelity.max_abs_logit <= 1e-4 and fidelity.top1_agreement == 1.0
    assert loop.calls[:3] == [24, 24, 16]  # 64 tokens in chunks of at most 24
    loop.calls.clear()
    assert loop.generate(window[:30], 10) == TorchRunner(model).generate(window[:30], 10)
    assert loop.calls == [24, 6] + [1] * 9
    sampled = [loop.generate(window[:30], 8, temperature=1.0, seed=s) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    speed = loop.profile(window[:40], new_tokens=8)
    assert speed["prompt_tokens"] == 40 and speed["decode_tokens"] == 8
    assert speed["prefill_tokens_per_s"] > 0 and speed["decode_tokens_per_s"] > 0 and speed["time_to_first_token_s"] > 0
    with pytest.raises(MoeExportError, match="context of 128"):
        loop.generate(window[:60], 100)


# --- the fixture, four structures: the TensorRT ONNX matches torch in ONNX Runtime ---------

FIXTURE_STRUCTURES = {
    "uncompressed": [],
    "block_drop_2": [{"block_drop": {"n": 2}}],
    "layer_drop_2": [{"layer_drop": {"n": 2}}],
    "global_expert_drop": [{"expert_drop": {"keep": 5, "scope": "global", "score": "frequency", "min_keep": 2}}],
}


@needs_shared
@pytest.mark.parametrize("name", list(FIXTURE_STRUCTURES))
def test_fixture_tensorrt_onnx_matches_torch_in_onnx_runtime(name, tmp_path):
    from moeexport.adapters import adapter_for
    from moeexport.adapters.surgery import structure
    from moeexport.calibration.sources import CalibrationConfig
    from moeexport.compress import StatisticsProvider
    from moeexport.evaluate import eval_windows

    model, tokenizer = moeexport.load(FIXTURE), moeexport.load_tokenizer(FIXTURE)
    provider = StatisticsProvider(tokenizer, CalibrationConfig(str(CORPUS / "calib.txt"), 8, 256), "fixture", None)
    compress(model, parse_recipe({"passes": FIXTURE_STRUCTURES[name]}), provider)
    if name == "global_expert_drop":
        counts = {spec.num_experts for spec in structure(adapter_for(model.config), model) if spec.kind == "moe"}
        assert len(counts) > 1, "global Expert Drop should leave different expert counts per layer"
    windows = eval_windows(tokenizer, str(CORPUS / "dev.txt"), 257, 2)  # 2 x 256 predicted tokens
    bundle = trt_backend.write_bundle(model, tmp_path / "bundle", windows, "dev.txt")
    assert bundle.manifest["tensorrt_support"]["problems"] == []
    assert trt_backend.check_onnx(bundle.path / "model.onnx") == []
    assert trt_backend.check_decoder_io(bundle.path / "model.onnx") == []
    fidelity = bundle.fidelity
    print(f"{name}: ORT vs torch max |dlogit| {fidelity.max_abs_logit:.2e}, top-1 {fidelity.top1_agreement:.2%}")
    assert fidelity.tokens >= 512 and bundle.failures == []
    assert fidelity.max_abs_logit <= 1e-4 and fidelity.top1_agreement == 1.0


# --- the bundle ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_bundle(demo, tmp_path_factory):
    model, windows = demo
    return trt_backend.write_bundle(model, tmp_path_factory.mktemp("b") / "bundle", windows, "sampled")


def test_the_bundle_is_complete_and_reads_back_without_pickles(demo, demo_bundle):
    model, windows = demo
    path = demo_bundle.path
    assert {p.name for p in path.iterdir()} == {"bundle.json", "model.onnx", "reference.npz", "README.txt"}
    bundle = trt_backend.Bundle(path)
    manifest = bundle.manifest
    assert manifest["onnx"]["moe_ops"] == "plain" and manifest["onnx"]["qdq"] == []
    assert manifest["onnx"]["io"]["layers"] == model.config.num_hidden_layers
    assert manifest["validation_here"]["failures"] == [] and manifest["validation_here"]["max_abs_logit"] <= 1e-4
    assert set(manifest["engine_tolerances"]) == {"fp32", "fp16", "bf16", "int8", "fp8"}
    assert "TensorRT 10.3" in manifest["tensorrt_support"]["checked_against"]
    stored_windows, logits = bundle.reference()
    assert stored_windows.tolist() == windows.tolist()
    assert logits.shape == (2, 64, model.config.vocab_size) and logits.dtype == np.float32
    expected = TorchRunner(model).logits(windows[1].tolist())
    assert np.array_equal(RecordedReference(stored_windows, logits).logits(windows[1].tolist()), expected)
    with np.load(path / "reference.npz", allow_pickle=False) as data:
        assert sorted(data.files) == ["logits", "windows"]
    assert "moeexport trt-build" in (path / "README.txt").read_text()
    assert trt_backend.Bundle(path.parent).path == path  # the build's --out directory works too


def test_a_damaged_or_foreign_bundle_is_refused_with_the_fix(demo_bundle, tmp_path):
    import shutil

    copy_ = tmp_path / "copy"
    shutil.copytree(demo_bundle.path, copy_)
    (copy_ / "reference.npz").write_bytes(b"truncated")
    with pytest.raises(MoeExportError, match="reference.npz in .* differs .* copy it again"):
        trt_backend.Bundle(copy_)
    (copy_ / "model.onnx").unlink()
    with pytest.raises(MoeExportError, match="model.onnx is missing .* copy the whole directory again"):
        trt_backend.Bundle(copy_)
    with pytest.raises(MoeExportError, match="has no bundle.json"):
        trt_backend.Bundle(tmp_path)
    with pytest.raises(MoeExportError, match="already exists"):
        trt_backend.write_bundle(None, demo_bundle.path, np.zeros((1, 4), dtype=np.int64))


def test_an_onnx_that_misses_its_tolerance_is_kept_aside_and_not_buildable(demo, tmp_path, monkeypatch):
    from moeexport.validate import Tolerance

    model, windows = demo
    monkeypatch.setitem(onnx_backend.TOLERANCES, "f32", Tolerance(max_abs_logit=0.0))
    result = trt_backend.write_bundle(model, tmp_path / "bundle", windows[:1], "sampled")
    assert result.failures and (result.path / "model.onnx.failed").is_file() and not (result.path / "model.onnx").exists()
    with pytest.raises(MoeExportError, match="failed validation where it was built"):
        trt_backend.Bundle(result.path)


# --- engine build planning (no TensorRT needed to decide) -----------------------------------


def test_profiles_cover_prefill_and_decode():
    io = {"cache": {"past_key_values.0.key": [2, 32], "past_key_values.0.value": [2, 32]}}
    prefill, decode = Profiles(max_prompt=512, context=2048).shapes(io)
    assert prefill["input_ids"] == ((1, 1), (1, 128), (1, 512))
    assert prefill["attention_mask"] == ((1, 1), (1, 128), (1, 2048))
    assert prefill["past_key_values.0.key"] == ((1, 2, 0, 32), (1, 2, 0, 32), (1, 2, 2047, 32))
    assert decode["input_ids"] == ((1, 1), (1, 1), (1, 1)) and decode["position_ids"] == decode["input_ids"]
    assert decode["past_key_values.0.value"] == ((1, 2, 0, 32), (1, 2, 1023, 32), (1, 2, 2047, 32))
    assert decode["attention_mask"] == ((1, 1), (1, 1024), (1, 2048))
    with pytest.raises(MoeExportError, match="between 1 and the context"):
        Profiles(max_prompt=4096, context=2048)


def test_precision_on_tensorrt_10_uses_builder_flags():
    orin = (8, 7)
    assert plan_precision("fp32", 10, {}, orin, True).clear == ["TF32"]
    assert plan_precision("fp16", 10, {}, orin, True).flags == ["FP16"]
    assert plan_precision("bf16", 10, {}, orin, True).flags == ["BF16"]
    assert plan_precision("int8", 10, {"qdq": ["INT8"]}, orin, True).flags == ["INT8", "FP16"]
    assert default_precision(10, True) == "fp16" and default_precision(10, False) == "fp32"
    with pytest.raises(MoeExportError, match="explicitly quantized ONNX .*QuantizeLinear/DequantizeLinear.* ModelOpt"):
        plan_precision("int8", 10, {"qdq": []}, orin, True)
    with pytest.raises(MoeExportError, match="fp8 needs compute capability 8.9"):
        plan_precision("fp8", 10, {"qdq": ["FLOAT8E4M3FN"]}, orin, True)
    with pytest.raises(MoeExportError, match="bf16 needs compute capability 8.0"):
        plan_precision("bf16", 10, {}, (7, 2), True)
    with pytest.raises(MoeExportError, match="no fast FP16"):
        plan_precision("fp16", 10, {}, (6, 1), False)


def test_precision_on_tensorrt_11_is_strongly_typed():
    hopper = (9, 0)
    fp32 = plan_precision("fp32", 11, {}, hopper, None)
    assert fp32.strongly_typed and fp32.flags == [] and fp32.autocast is None
    fp16 = plan_precision("fp16", 11, {}, hopper, None)
    assert fp16.strongly_typed and fp16.flags == [] and fp16.autocast == "fp16"
    assert plan_precision("fp8", 11, {"qdq": ["FLOAT8E4M3FN"]}, hopper, None).flags == []
    assert default_precision(11, None) == "fp32"


# --- without TensorRT ---------------------------------------------------------------------

no_tensorrt = pytest.mark.skipif(trt_backend.status().available, reason="TensorRT is usable here")


@no_tensorrt
def test_the_engine_runner_and_builder_say_what_is_missing(tmp_path):
    with pytest.raises(MoeExportError, match="TensorRT|CUDA"):
        trt_backend.TensorRTRunner(tmp_path / "model.plan")
    status = trt_backend.status()
    assert not status.available and ("pip install" in status.reason or "torch" in status.reason)


@no_tensorrt
def test_build_demo_tensorrt_writes_the_bundle_and_explains_the_next_step(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - block_drop: {n: 1, score: random}\n  - expert_drop: {keep: 6, score: random}\n")
    out = tmp_path / "build"
    argv = ["build", "demo", "--recipe", str(recipe), "--target", "tensorrt", "--out", str(out), "--no-eval",
            "--calib-samples", "4", "--calib-length", "64"]
    assert main(argv) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "engine not built" in printed and "moeexport trt-build bundle" in printed and "README.txt" in printed
    assert "top-1 100.00%" in printed
    bundle = trt_backend.Bundle(out / "bundle")
    assert bundle.manifest["compression"]["passes"][0]["name"] == "block_drop"
    assert bundle.manifest["model"]["num_hidden_layers"] == 3
    report = json.loads((out / "report.json").read_text())
    assert report["engine"]["built"] is False and "TensorRT" in report["engine"]["reason"]
    assert report["validation"]["failures"] == [] and report["validation"]["tokens"] >= 510
    assert not (out / "compressed").exists()  # the bundle carries what the device needs; no --save-checkpoint

    assert main(["trt-build", str(out / "bundle"), "--precision", "fp16"]) == 2
    error = without_progress(capsys.readouterr().err)
    assert len(error.splitlines()) == 1 and error.startswith("moeexport trt-build: error: TensorRT")
    assert "pip install" in error or "apt install" in error


def test_trt_build_refuses_what_is_not_a_bundle(tmp_path, capsys):
    assert main(["trt-build", str(tmp_path / "missing")]) == 2
    assert without_progress(capsys.readouterr().err).count("\n") == 0
    assert main(["trt-build", str(tmp_path)]) == 2
    assert "has no bundle.json" in capsys.readouterr().err


def test_trt_build_has_help(capsys):
    with pytest.raises(SystemExit) as exit_status:
        main(["trt-build", "--help"])
    assert exit_status.value.code == 0 and "--precision" in capsys.readouterr().out


def test_device_tests_skip_here_with_their_reasons():
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "device_tests", "-rs", "-q", "-p", "no:cacheprovider"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    if trt_backend.status().available:
        pytest.skip("TensorRT is usable here: device_tests run for real")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "passed" not in done.stdout.splitlines()[-1] and "skipped" in done.stdout.splitlines()[-1]
    assert "SKIPPED" in done.stdout and ("no CUDA GPU" in done.stdout or "TensorRT" in done.stdout)


# --- the builder's calls, against a recording stand-in for the tensorrt module -------------
# (the real API is exercised in device_tests/; this pins what moeexport asks of it per version)


class _Recorder:
    def __init__(self, version: str, parse_ok: bool = True, build_ok: bool = True):
        self.__version__, self.parse_ok, self.build_ok = version, parse_ok, build_ok
        self.calls: list[tuple] = []
        major = int(version.split(".")[0])
        flags = ["TF32"] + (["FP16", "BF16", "INT8", "FP8"] if major < 11 else [])
        self.BuilderFlag = type("BuilderFlag", (), {name: name for name in flags})
        self.NetworkDefinitionCreationFlag = type("Flags", (), {"STRONGLY_TYPED": 5} if major < 11 else {})
        self.MemoryPoolType = type("Pool", (), {"WORKSPACE": "WORKSPACE"})
        recorder = self

        class Logger:
            WARNING = VERBOSE = ERROR = 0

            def __init__(self, level):
                pass

        class Error:
            def desc(self):
                return "Attribute reduction is not supported."

            def node(self):
                return 7

            def node_name(self):
                return "scatter_3"

            def node_operator(self):
                return "ScatterND"

        class Parser:
            num_errors = 0 if parse_ok else 1

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                recorder.calls.append(("parse", Path(path).name))
                return recorder.parse_ok

            def get_error(self, index):
                return Error()

        class Cache:
            def serialize(self):
                return b"timing"

        class Profile:
            def set_shape(self, name, low, opt, high):
                recorder.calls.append(("shape", name, low, opt, high))

        class Config:
            def set_memory_pool_limit(self, pool, size):
                recorder.calls.append(("workspace", size))

            def set_flag(self, flag):
                recorder.calls.append(("set", flag))

            def clear_flag(self, flag):
                recorder.calls.append(("clear", flag))

            def add_optimization_profile(self, profile):
                recorder.calls.append(("profile",))

            def create_timing_cache(self, data):
                recorder.calls.append(("cache_in", bytes(data)))
                return Cache()

            def set_timing_cache(self, cache, ignore_mismatch):
                pass

            def get_timing_cache(self):
                return Cache()

        class Builder:
            platform_has_fast_fp16 = True

            def __init__(self, logger):
                pass

            def create_network(self, flags):
                recorder.calls.append(("network", flags))
                return object()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"plan-bytes" if recorder.build_ok else None

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, Parser


@pytest.fixture
def fake_tensorrt(monkeypatch):
    from moeexport.backends.tensorrt import builder

    def install(version, **options):
        recorder = _Recorder(version, **options)
        monkeypatch.setitem(sys.modules, "tensorrt", recorder)
        monkeypatch.setattr(builder, "gpu_capability", lambda: (8, 7))
        return recorder

    return install


IO = {"cache": {"past_key_values.0.key": [2, 32], "past_key_values.0.value": [2, 32]}}


def test_a_tensorrt_10_build_sets_flags_profiles_and_the_timing_cache(fake_tensorrt, tmp_path):
    from moeexport.backends.tensorrt.builder import build_engine

    recorder = fake_tensorrt("10.3.0")
    (tmp_path / "model.onnx").write_bytes(b"")
    cache = tmp_path / "timing.cache"
    result = build_engine(tmp_path / "model.onnx", tmp_path, IO, Profiles(512, 2048), workspace_bytes=2**30, timing_cache=cache)
    assert result.precision == "fp16" and result.engine_path == tmp_path / "model-fp16.plan"
    assert result.engine_path.read_bytes() == b"plan-bytes" and cache.read_bytes() == b"timing"
    assert not list(tmp_path.glob("*.partial")) and result.timing_cache_reused is False
    assert ("network", 0) in recorder.calls and ("set", "FP16") in recorder.calls and ("workspace", 2**30) in recorder.calls
    assert recorder.calls.count(("profile",)) == 2
    shapes = [call for call in recorder.calls if call[0] == "shape"]
    assert len(shapes) == 2 * 5 and ("shape", "input_ids", (1, 1), (1, 1), (1, 1)) in shapes

    recorder.calls.clear()
    again = build_engine(tmp_path / "model.onnx", tmp_path, IO, Profiles(512, 2048), precision="fp32", timing_cache=cache)
    assert again.timing_cache_reused and ("cache_in", b"timing") in recorder.calls
    assert ("clear", "TF32") in recorder.calls and not any(call[0] == "set" for call in recorder.calls)


def test_a_tensorrt_11_build_is_strongly_typed_and_fp16_needs_modelopt(fake_tensorrt, tmp_path):
    from moeexport.backends.tensorrt.builder import build_engine

    recorder = fake_tensorrt("11.1.0")
    (tmp_path / "model.onnx").write_bytes(b"")
    result = build_engine(tmp_path / "model.onnx", tmp_path, IO, Profiles(64, 256))
    assert result.precision == "fp32" and ("network", 0) in recorder.calls
    assert not any(call[0] in ("set", "clear") for call in recorder.calls)
    if importlib.util.find_spec("modelopt") is None:
        with pytest.raises(MoeExportError, match="TensorRT 11 takes fp16 only from the ONNX's own types: pip install nvidia-modelopt"):
            build_engine(tmp_path / "model.onnx", tmp_path, IO, Profiles(64, 256), precision="fp16")


def test_parser_and_builder_failures_are_one_line_with_the_node(fake_tensorrt, tmp_path):
    from moeexport.backends.tensorrt.builder import build_engine

    fake_tensorrt("10.3.0", parse_ok=False)
    with pytest.raises(MoeExportError, match=r"cannot parse model.onnx: node scatter_3 ScatterND: Attribute reduction"):
        build_engine(tmp_path / "model.onnx", tmp_path, IO, Profiles(64, 256))
    fake_tensorrt("10.3.0", build_ok=False)
    with pytest.raises(MoeExportError, match="could not build an engine .* fp16"):
        build_engine(tmp_path / "model.onnx", tmp_path, IO, Profiles(64, 256))
    assert not list(tmp_path.glob("*.plan*"))
