"""The target contract and its registry: what the command line and bench offer comes from the registered targets,
target packages import cheaply, the contract's defaults say what a target does not do, and the GGUF target's own
hooks (sizes, bytes per token, the GGUF-input comparison) agree with its files."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
from pydantic import Field

from moeexport.backends import PACKAGES, target_for, target_names
from moeexport.backends.target import Finished, Target, TargetOptions
from moeexport.errors import MoeExportError


class _DummyOptions(TargetOptions):
    dummy_level: int | None = Field(None, json_schema_extra={"metavar": "N"}, description="dummy: how dummy it is")


class _Dummy(Target):
    """A target that does the least the contract asks."""

    name = "dummy"
    extension = "dummy"
    quant_types = ("f32",)
    tolerances = {}
    Options = _DummyOptions

    def check(self, model, quant, options):
        pass

    def export(self, model, directory, quant, options, inputs):
        raise NotImplementedError

    def runner(self, path, context):
        raise NotImplementedError


@pytest.fixture
def dummy_registered(monkeypatch):
    module = types.ModuleType("moeexport_test_dummy_target")
    module.TARGET = _Dummy()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(PACKAGES, "dummy", module.__name__)
    return monkeypatch


def _help(command: str, capsys) -> str:
    from moeexport.arguments import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    return capsys.readouterr().out


def test_a_registered_target_is_offered_by_the_command_line_and_bench(dummy_registered, tmp_path, capsys):
    from moeexport.arguments import build_parser
    from moeexport.bench import _subject, formats_run
    from moeexport.cli import _target_options

    assert target_names()[-1] == "dummy"
    args = build_parser().parse_args(["build", "demo", "--recipe", "r.yaml", "--target", "dummy", "--out", "o",
                                      "--dummy-level", "3"])
    assert args.target == "dummy" and _target_options(args) == {"dummy_level": 3}
    build_help = _help("build", capsys)
    assert "{gguf,onnx,tensorrt,dummy}" in build_help and "--dummy-level N" in build_help
    assert "dummy: how dummy it is" in build_help and "{gguf,onnx,tensorrt,dummy}" in _help("search", capsys)
    assert formats_run()[".dummy"] == "dummy"
    (tmp_path / "m.dummy").write_bytes(b"")
    assert _subject(str(tmp_path / "m.dummy")).format == "dummy"
    (tmp_path / "m.txt").write_text("")
    with pytest.raises(MoeExportError, match=r"bench runs \.gguf and \.onnx and \.dummy files"):
        _subject(str(tmp_path / "m.txt"))
    dummy_registered.undo()  # unregistered: offered nowhere
    assert "dummy" not in target_names() and "dummy" not in _help("build", capsys) and ".dummy" not in formats_run()


def test_the_build_flags_are_the_targets_options_read_back_as_each_target_takes_them():
    from moeexport.arguments import build_parser, target_flags
    from moeexport.cli import _target_options

    fields = {name for target in target_names() for name in target_for(target).Options.model_fields}
    assert {flag.field for flag in target_flags()} == fields
    args = build_parser().parse_args(["build", "demo", "--recipe", "r.yaml", "--target", "gguf", "--out", "o",
                                      "--tensor-type", "_exps=q4_k", "--imatrix", "--moe-ops", "plain"])
    assert _target_options(args) == {"tensor_types": {"_exps": "q4_k"}, "imatrix": True, "moe_ops": "plain"}
    malformed = build_parser().parse_args(["build", "demo", "--recipe", "r.yaml", "--target", "gguf", "--out", "o",
                                           "--tensor-type", "q4_k"])
    with pytest.raises(MoeExportError, match="--tensor-type takes PATTERN=TYPE, got 'q4_k'"):
        _target_options(malformed)


def test_target_packages_import_neither_torch_nor_a_runtime():
    code = ("import sys; from moeexport.backends import target_for, target_names; "
            "[target_for(name).Options for name in target_names()]; "
            "print(sorted({'torch', 'onnx', 'onnxruntime', 'llama_cpp', 'tensorrt', 'gguf'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_the_contracts_defaults_say_what_a_target_does_not_do(tmp_path):
    from moeexport.search import SearchOptions, _check_target

    dummy = _Dummy()
    assert dummy.finish(None, None, None) == Finished() and Finished().failures == ()
    assert dummy.input_comparison(tmp_path / "m.dummy") is None
    assert dummy.stored_files(tmp_path / "m.dummy") == [tmp_path / "m.dummy"]
    with pytest.raises(MoeExportError, match="the dummy target does not count the bytes a decoded token reads"):
        dummy.token_bytes(tmp_path / "m.dummy")
    for hook in (dummy.layout, dummy.sizer):
        with pytest.raises(MoeExportError, match="the dummy target cannot size the files it would write"):
            hook(None)
    only_gguf = r"search sizes and measures --target gguf \(f16, .*\) only, not --target onnx"
    with pytest.raises(MoeExportError, match=only_gguf):
        _check_target("onnx", SearchOptions())


def test_only_a_gguf_input_built_to_gguf_is_compared_with_its_input():
    gguf = target_for("gguf")
    assert gguf.input_comparison("model.gguf") == "measuring quality against the input GGUF, both in llama.cpp"
    assert gguf.input_comparison("demo") is None
    assert all(target_for(name).input_comparison("model.gguf") is None for name in ("onnx", "tensorrt"))


@pytest.mark.parametrize("quant", ["f32", "q4_0"])
def test_the_gguf_sizer_is_exact_on_every_familys_untrimmed_file(quant, tmp_path):
    from moeexport.backends import gguf as gguf_backend
    from tests.test_gguf import GGUF_FAMILIES, _tiny_with_demo_vocabulary

    target = target_for("gguf")
    for family in GGUF_FAMILIES:
        model = _tiny_with_demo_vocabulary(family)
        path = gguf_backend.export(model, tmp_path / f"{family}.gguf", quant=quant).path
        layout = target.layout(model)
        size = target.sizer(path).size(layout, list(range(len(layout.layers))))
        assert size.file_bytes == path.stat().st_size, family
        assert size.token_bytes == target.token_bytes(path).total, family


def test_a_gguf_without_an_output_projection_reads_its_embedding_as_the_head():
    from moeexport.backends.gguf.runner import TensorRead, token_bytes

    embedding = 1000 * 64
    untied = token_bytes([TensorRead(embedding, "row", 1000), TensorRead(embedding, "head")], used=2)
    tied = token_bytes([TensorRead(embedding, "tied", 1000)], used=2)
    assert tied.head == untied.head == embedding and tied.lookups == untied.lookups == 64
    assert tied.embedding_rows == untied.embedding_rows == 1000
