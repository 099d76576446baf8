"""A model is opened once, into a Source value; a streamed model's stream is a handle, not an attribute."""

from __future__ import annotations

import gc
import weakref

import pytest

import moeexport
from moeexport import CompressOptions
from moeexport.adapters import adapter_for
from moeexport.adapters.surgery import keep_experts
from moeexport.backends import gguf as gguf_backend
from moeexport.checkpoint_files import DEMO_MODEL, MANIFEST_WEIGHTS, SAFE_WEIGHTS, read_headers
from moeexport.modelio import load_streamed, save
from moeexport.pipeline import compress
from moeexport.source import open_source
from moeexport.streaming import stream_of
from tests.tiny_models import tiny_model

RANDOM_DROP = {"passes": [{"expert_drop": {"keep": 6, "scope": "layer", "score": "random"}}]}


def test_the_demo_source_is_its_safetensors_directory_with_config_and_headers():
    source = open_source("demo")
    assert (source.given, source.kind, source.path) == ("demo", "demo", DEMO_MODEL)
    assert source.weight_files == (DEMO_MODEL / SAFE_WEIGHTS,) and source.manifest is None and source.layers is None
    assert source.config.model_type == "mixtral" and source.headers == read_headers([DEMO_MODEL / SAFE_WEIGHTS])
    assert not source.is_gguf and len(source.fingerprint) == 16


def test_a_checkpoint_directory_is_a_safetensors_source_in_the_layout_it_was_saved_in(tmp_path):
    tiny_model("mixtral").save_pretrained(tmp_path)
    source = open_source(tmp_path)
    assert (source.kind, source.path, source.weight_files) == ("safetensors", tmp_path, (tmp_path / SAFE_WEIGHTS,))
    assert any(".experts.0.w1." in name for name in source.headers)  # the hub's per-expert layout, as stored


def test_a_compressed_checkpoint_is_a_manifest_source_with_its_per_layer_structure(tmp_path):
    model = tiny_model("mixtral")
    keep_experts(adapter_for(model.config), model, 1, [3, 0])  # experts per layer differ: the manifest form
    out = save(model, tmp_path / "compressed", manifest={})
    source = open_source(out)
    assert source.kind == "manifest" and source.weight_files == (out / MANIFEST_WEIGHTS,)
    assert [layer.num_experts for layer in source.layers] == [4, 2, 4, 4] and source.manifest["stock_loadable"] is False


def test_a_gguf_source_is_the_file_with_headers_under_the_model_parameter_names(tmp_path):
    path = gguf_backend.export(moeexport.load("demo"), tmp_path / "demo-q8_0.gguf", quant="q8_0").path
    source = open_source(path)
    assert (source.kind, source.path, source.weight_files, source.manifest) == ("gguf", path, (path,), None)
    assert source.is_gguf and len(source.layers) == source.config.num_hidden_layers
    assert set(source.headers) == set(load_streamed(source).state_dict())  # float32 values under the model's names
    assert {dtype for _, dtype, _ in source.headers.values()} == {"F32"}


def test_the_fingerprint_remembers_large_files_digests_only_under_the_cache_root_it_is_given(tmp_path, monkeypatch):
    import moeexport.fingerprint

    monkeypatch.setattr(moeexport.fingerprint, "DIGEST_MEMO_BYTES", 0)
    remembered = open_source("demo", cache_root=tmp_path / "cache").fingerprint
    assert list((tmp_path / "cache" / "digests").glob("*.json"))  # every file hashed is remembered (here: any size)
    assert open_source("demo").fingerprint == remembered and [p.name for p in tmp_path.iterdir()] == ["cache"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_command_opens_its_model_once_and_reads_its_headers_once(stream, monkeypatch):
    import moeexport.modelio
    import moeexport.pipeline
    import moeexport.source

    calls = {"open": 0, "resolve": 0, "headers": 0, "checked against config": 0}

    def spy(name, module, attribute, *more_modules):
        def counted(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        function = getattr(module, attribute)
        for where in (module, *more_modules):
            monkeypatch.setattr(where, attribute, counted)

    spy("open", moeexport.source, "open_source", moeexport.pipeline)
    spy("resolve", moeexport.source, "resolve_model_dir", moeexport.modelio)
    spy("headers", moeexport.source, "read_headers")
    spy("checked against config", moeexport.modelio, "check_checkpoint")
    report = compress("demo", RANDOM_DROP, CompressOptions(dry_run=True, measure_quality=False, stream=stream))
    assert report.memory["streamed"] is stream
    assert calls == {"open": 1, "resolve": 1, "headers": 1, "checked against config": 1}


def test_a_streamed_model_is_found_by_its_handle_and_goes_with_it():
    model = load_streamed("demo")
    stream = stream_of(model)
    assert stream is not None and stream.model is model
    assert not any(value is stream for value in vars(model).values())  # no attribute of the model holds it
    assert stream_of(moeexport.load("demo")) is None  # a model in memory has none
    gone = weakref.ref(model)
    del model, stream
    gc.collect()
    assert gone() is None  # the handle does not keep the model alive (nor the model its stream)
