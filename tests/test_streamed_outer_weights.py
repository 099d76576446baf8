"""A streamed model's embeddings, head and logits are never whole in memory, and what it computes and writes
is what it did when they were: rows read by runs, the head in row blocks, logits spilled a few windows at a time,
the saver's embeddings and head in blocks of rows (safetensors' own bytes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from moeexport import modelio, streaming
from moeexport.modelio import load, load_streamed, save
from moeexport.streaming import stream_of
from moeexport.validate import RecordedReference, TorchRunner
from tests.tiny_models import random_tokens, tiny_model


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    directory = tmp_path_factory.mktemp("source")
    tiny_model("mixtral", vocab_size=300).save_pretrained(directory)
    return directory


def test_rows_are_read_by_runs_as_the_whole_tensor_holds_them(source):
    model = load_streamed(source)  # the model owns its stream
    stream = stream_of(model)
    name = "model.embed_tokens.weight"
    whole = stream.checkpoint.tensor(name)
    for indices in ([3, 4, 5, 9, 10, 299], [0], list(range(300)), [7, 2, 3]):
        assert torch.equal(stream.checkpoint.rows(name, torch.tensor(indices)), whole[indices])
    rows = stream.weight_rows("output")
    assert rows.shape == (300, model.config.hidden_size)
    assert torch.equal(rows[250:400], stream.checkpoint.tensor("lm_head.weight")[250:])


def test_logits_a_few_windows_and_head_rows_at_a_time_are_the_in_memory_model_s(source, monkeypatch):
    tokens = random_tokens(5, 24)
    expected = load(source)(input_ids=tokens, use_cache=False).logits.detach().numpy()
    assert np.array_equal(streaming.logits(load_streamed(source), tokens), expected)  # one head block
    monkeypatch.setattr(streaming, "LOGIT_POSITIONS", 48)  # two windows per group: three groups
    original = streaming.LayerStream.head_blocks
    monkeypatch.setattr(streaming.LayerStream, "head_blocks", lambda self, rows=4096: original(self, rows=64))
    blocks = list(streaming.window_logits(load_streamed(source), tokens))
    assert [(start, len(block)) for start, block in blocks] == [(0, 2), (2, 2), (4, 1)]
    assert np.allclose(np.concatenate([block for _, block in blocks]), expected, rtol=0, atol=1e-5)


def test_a_streamed_reference_is_recorded_to_a_file_with_the_same_logits(source, monkeypatch):
    windows = random_tokens(3, 24)
    expected = streaming.logits(load_streamed(source), windows)  # all three windows through the head at once
    monkeypatch.setattr(streaming, "LOGIT_POSITIONS", 24)  # a window at a time
    recorded = RecordedReference.record(TorchRunner(load_streamed(source)), windows)
    assert isinstance(recorded.recorded, np.memmap) and recorded.spilled() is recorded
    assert all(np.array_equal(recorded.logits(window), expected[i]) for i, window in enumerate(windows.tolist()))
    whole = RecordedReference.record(TorchRunner(load(source)), windows)
    spilled = whole.spilled()
    assert all(np.array_equal(spilled.logits(window), whole.logits(window)) for window in windows.tolist())


def test_the_saver_writes_safetensors_own_bytes_a_block_of_rows_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(modelio._InBlocks, "ROWS", 7)
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(30, 16, generator=generator)
    rows = streaming.WeightRows(embeddings.shape, lambda first, stop: embeddings[first:stop])
    tensors = {"b.norm": torch.randn(16, generator=generator), "a.codes": torch.arange(5, dtype=torch.uint8),
               "model.embed_tokens.weight": modelio._InBlocks.rows(rows, torch.bfloat16)}
    modelio._save_file_in_blocks(tensors, tmp_path / "blocks.safetensors")
    save_file(tensors | {"model.embed_tokens.weight": embeddings.bfloat16()}, tmp_path / "whole.safetensors",
              metadata={"format": "pt"})
    assert (tmp_path / "blocks.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()


def test_a_streamed_save_writes_the_embeddings_and_head_as_an_in_memory_save(source, tmp_path, monkeypatch):
    monkeypatch.setattr(modelio._InBlocks, "ROWS", 64)
    save(load_streamed(source), tmp_path / "streamed", {})
    save(load(source), tmp_path / "whole", {})
    streamed, whole = (load(tmp_path / kind) for kind in ("streamed", "whole"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(streamed.get_parameter(name), whole.get_parameter(name))


def test_the_memory_plan_counts_a_block_of_head_rows_and_two_windows_of_logits_not_the_whole_vocabulary():
    import importlib.util
    from pathlib import Path

    from moeexport.memory import LOGIT_POSITIONS, Workload, plan

    path = Path(__file__).resolve().parents[1] / "tools" / "make_synthetic_checkpoint.py"
    spec = importlib.util.spec_from_file_location("make_synthetic_checkpoint", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    workload = Workload(logit_positions=16 * 128 * 2 + 2 * 256)
    peaks = {}
    for vocab in (2048, 201088):  # gpt-oss-20b's widths, two layers, and its vocabulary or a small one
        config = tool.make_config("gpt-oss-20b", 2, {"vocab_size": vocab})
        headers = {name: (list(shape), "U8" if name.endswith(("_blocks", "_scales")) else "BF16", "model.safetensors")
                   for name, shape in tool.tensor_specs(config)}
        peaks[vocab] = plan(headers, config.hidden_size, vocab, 64 * 2**30, workload, stream=True,
                            dtype="float32").streamed_bytes
    assert peaks[201088] - peaks[2048] == 2 * LOGIT_POSITIONS * (201088 - 2048) * 4
