"""GGUFs from strangers: every command that reads one holds the way llama.cpp's loader holds.

Each case is the demo model's GGUF (written here) edited one way: a hyper-parameter
out of range or of the wrong kind, an expert stack that disagrees with the expert
count, a tensor whose type, offset or name llama.cpp would refuse, a metadata array
declared longer than the file. Each gives exit 2 and one line naming the problem,
before any weight is dequantized, within seconds.
"""

from __future__ import annotations

import json
import struct
import time

import numpy as np
import pytest

from moeexport.errors import MoeExportError
from tests.test_hardening import one_line_error

gguf = pytest.importorskip("gguf")

PROSE = "The river rose in the night and by morning the bridge was gone; the village waited for the boats. " * 40
DELETE = object()


@pytest.fixture(scope="module")
def demo_gguf(demo_gguf_of):
    return demo_gguf_of("q8_0")


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(PROSE)
    return path


def rewritten(source, out, metadata=None, tensors=None):
    """`source` written again through gguf-py with metadata keys replaced (a (type, value) pair, or DELETE to
    drop the key) and tensors replaced (name -> (numpy-order shape, ggml type, raw bytes), or DELETE)."""
    metadata, tensors = metadata or {}, tensors or {}
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(out, arch=reader.get_field("general.architecture").contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if metadata.get(key) is DELETE:
            del metadata[key]
            continue
        kind, value = metadata.pop(key, None) or (field.types[0], field.contents())
        sub_type = field.types[1] if kind == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(key, value, kind, sub_type=sub_type)
    for key, (kind, value) in metadata.items():
        writer.add_key_value(key, value, kind)
    for tensor in reader.tensors:
        shape, qtype, data = (tuple(int(n) for n in reversed(tensor.shape)), tensor.tensor_type,
                              np.array(tensor.data).view(np.uint8).reshape(-1))
        replacement = tensors.pop(tensor.name, None)
        if replacement is DELETE:
            continue
        if replacement is not None:
            shape, qtype, data = replacement
        _add_raw(writer, tensor.name, shape, qtype, data)
    for name, (shape, qtype, data) in tensors.items():
        _add_raw(writer, name, shape, qtype, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _add_raw(writer, name: str, shape: tuple[int, ...], qtype, data: np.ndarray) -> None:
    """Stored bytes added as they are (gguf-py takes their shape in bytes: the last axis in bytes per row)."""
    block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    byte_shape = (*shape[:-1], shape[-1] // block * block_bytes)
    writer.add_tensor(name, data.reshape(byte_shape), raw_shape=byte_shape, raw_dtype=qtype)


def patched_entry(source, out, name: str, qtype: int | None = None, offset_from: str | None = None,
                  dims: int | None = None):
    """`source` with tensor `name`'s table entry edited in place: its ggml type, its data offset (that of tensor
    `offset_from`) or its dimension count."""
    data = bytearray(source.read_bytes())
    encoded = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(encoded) + len(encoded)
    count = struct.unpack_from("<I", data, at)[0]
    type_at = at + 4 + 8 * count
    if qtype is not None:
        struct.pack_into("<I", data, type_at, qtype)
    if offset_from is not None:
        other = struct.pack("<Q", len(offset_from)) + offset_from.encode()
        other_at = data.index(other) + len(other)
        other_offset_at = other_at + 4 + 8 * struct.unpack_from("<I", data, other_at)[0] + 4
        data[type_at + 4:type_at + 12] = data[other_offset_at:other_offset_at + 8]
    if dims is not None:
        struct.pack_into("<I", data, at, dims)
    out.write_bytes(bytes(data))
    return out


U32, I32, F32, STR, ARR = (gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32, gguf.GGUFValueType.FLOAT32,
                           gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY)
Q8_0 = gguf.GGMLQuantizationType.Q8_0


def _stack(source, name, experts):
    """Expert stack or router `name` cut or grown (its first slices repeated) to `experts` slices."""
    reader = gguf.GGUFReader(source)
    tensor = next(t for t in reader.tensors if t.name == name)
    shape = tuple(int(n) for n in reversed(tensor.shape))
    rows = np.array(tensor.data).view(np.uint8).reshape(shape[0], -1)
    grown = np.concatenate([rows] * (-(-experts // shape[0])))[:experts]
    return (experts, *shape[1:]), tensor.tensor_type, grown.reshape(-1)


def _no_layer_record(metadata=None):
    return {"moeexport.layers": DELETE} | (metadata or {})


CASES = {
    # item 4: expert stacks against the expert count
    "stacks of 8 described as 6": (lambda s, o: rewritten(s, o, _no_layer_record({"llama.expert_count": (U32, 6)})),
                                   "blk.0.ffn_gate_inp.weight holds 8 experts but llama.expert_count is 6"),
    "stacks of 8 described as 16": (lambda s, o: rewritten(s, o, _no_layer_record({"llama.expert_count": (U32, 16)})),
                                    "holds 8 experts but llama.expert_count is 16"),
    "a router with too many rows": (lambda s, o: rewritten(s, o, tensors={
        "blk.2.ffn_gate_inp.weight": _stack(s, "blk.2.ffn_gate_inp.weight", 9)}),
        "router blk.2.ffn_gate_inp.weight holds 9 experts but llama.expert_count is 8"),
    "a stack of 4 among 8": (lambda s, o: rewritten(s, o, tensors={
        "blk.1.ffn_down_exps.weight": _stack(s, "blk.1.ffn_down_exps.weight", 4)}),
        "expert stack blk.1.ffn_down_exps.weight holds 4 experts but llama.expert_count is 8"),
    # item 6: what ended in a traceback
    "bos_token_id outside the vocabulary": (lambda s, o: rewritten(s, o, {"tokenizer.ggml.bos_token_id": (U32, 5000)}),
                                            "tokenizer.ggml.bos_token_id is 5000, not a token id of its 2048-token"),
    "an empty vocabulary": (lambda s, o: _with_array(rewritten(s, o.with_name("no-tokens.gguf"), {
        "tokenizer.ggml.tokens": DELETE, "tokenizer.ggml.scores": DELETE, "tokenizer.ggml.token_type": DELETE}),
        o, "tokenizer.ggml.tokens", 8, 0, b""), "has an empty vocabulary (tokenizer.ggml.tokens)"),
    "embedding_length 0": (lambda s, o: rewritten(s, o, {"llama.embedding_length": (U32, 0)}),
                           "llama.embedding_length is 0; it must be at least 1"),
    "embedding_length wrong": (lambda s, o: rewritten(s, o, {"llama.embedding_length": (U32, 64)}),
                               "llama.embedding_length is 64 but token_embd.weight has rows of 128"),
    "head_count 0": (lambda s, o: rewritten(s, o, {"llama.attention.head_count": (U32, 0)}),
                     "llama.attention.head_count is 0; it must be between 1 and 128"),
    "head_count 3": (lambda s, o: rewritten(s, o, {"llama.attention.head_count": (U32, 3)}),
                     "3 attention heads cannot share 2 key/value heads evenly"),
    "head_count missing": (lambda s, o: rewritten(s, o, {"llama.attention.head_count": DELETE}),
                           "llama.attention.head_count is missing"),
    "expert_used_count an array": (lambda s, o: rewritten(s, o, {"llama.expert_used_count": (ARR, [2, 2])}),
                                   "llama.expert_used_count is an array of 2; it must be one integer"),
    "expert_used_count 99": (lambda s, o: rewritten(s, o, {"llama.expert_used_count": (U32, 99)}),
                             "llama.expert_used_count is 99; it must be between 1 and 8"),
    "a malformed layer record": (lambda s, o: rewritten(s, o, {"moeexport.layers": (STR, '[{"kind": "moe"')}),
                                 "moeexport.layers is not a JSON list of layer records"),
    "a 100k-deep layer record": (lambda s, o: rewritten(s, o, {"moeexport.layers": (STR, "[" * 100_000)}),
                                 "moeexport.layers is not a JSON list of layer records"),
    "a layer record of another model": (lambda s, o: rewritten(s, o, {"moeexport.layers": (STR, json.dumps(
        [{"kind": "moe", "num_experts": 64, "top_k": 2}] * 4))}), "layer 0 is LayerSpec(kind='moe', num_experts=64"),
    "no token_embd": (lambda s, o: rewritten(s, o, tensors={"token_embd.weight": DELETE}),
                      "has no token_embd.weight: it is not a complete model"),
    "a missing expert stack": (lambda s, o: rewritten(s, o, tensors={"blk.1.ffn_up_exps.weight": DELETE}),
                               "has no tensor blk.1.ffn_up_exps.weight (the model's model.layers.1.mlp.experts"),
    "n_dims 0": (lambda s, o: patched_entry(s, o, "blk.0.attn_norm.weight", dims=0),
                 "tensor blk.0.attn_norm.weight has 0 dimensions; a weight has 1 to 4"),
    "an I32 tensor": (lambda s, o: patched_entry(s, o, "blk.0.attn_norm.weight", qtype=int(gguf.GGMLQuantizationType.I32)),
                      "tensor blk.0.attn_norm.weight is stored as I32, which is not a weight type moeexport"),
    # item 7: what was accepted
    "a tensor declared Q8_0 over F32 bytes": (lambda s, o: patched_entry(s, o, "blk.0.ffn_gate_inp.weight",
                                                                         qtype=int(Q8_0)),
                                   "tensor blk.0.ffn_gate_exps.weight's data at offset"),
    "expert_used_count 0": (lambda s, o: rewritten(s, o, {"llama.expert_used_count": (U32, 0)}),
                            "llama.expert_used_count is 0; it must be between 1 and 8"),
    "a negative epsilon": (lambda s, o: rewritten(s, o, {"llama.attention.layer_norm_rms_epsilon": (F32, -1e-5)}),
                           "llama.attention.layer_norm_rms_epsilon is -9.99"),
    "a NaN rope base": (lambda s, o: rewritten(s, o, {"llama.rope.freq_base": (F32, float("nan"))}),
                        "llama.rope.freq_base is nan; it must be a finite number"),
    "a zero rope base": (lambda s, o: rewritten(s, o, {"llama.rope.freq_base": (F32, 0.0)}),
                         "llama.rope.freq_base is 0.0; it must be a positive number"),
    "overlapping tensors": (lambda s, o: patched_entry(s, o, "blk.0.attn_k.weight", offset_from="blk.0.attn_q.weight"),
                            "tensor blk.0.attn_k.weight's data at offset"),
    "an unknown extra tensor": (lambda s, o: rewritten(s, o, tensors={"blk.0.mystery.weight": (
        (4,), gguf.GGMLQuantizationType.F32, np.zeros(16, np.uint8))}),
        "holds tensor blk.0.mystery.weight, which llama.cpp's llama has no place for"),
    "a tensor of a block that does not exist": (lambda s, o: rewritten(s, o, tensors={"blk.9.attn_norm.weight": (
        (128,), gguf.GGMLQuantizationType.F32, np.zeros(512, np.uint8))}),
        "holds tensor blk.9.attn_norm.weight of block 9, but the model has 4 blocks"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_gguf_llama_cpp_would_refuse_is_one_line(case, demo_gguf, text, tmp_path, capsys, monkeypatch):
    from moeexport.backends.gguf.reader import GGUFFile

    make, message = CASES[case]
    crafted = make(demo_gguf, tmp_path / "crafted.gguf")

    def no_dequantizing(*args, **kwargs):
        raise AssertionError("a weight was dequantized before the file was checked")

    monkeypatch.setattr(GGUFFile, "_values", staticmethod(no_dequantizing))
    started = time.perf_counter()
    line = one_line_error(capsys, ["eval", str(crafted), "--text", str(text)])
    assert message in line and str(crafted) in line
    assert time.perf_counter() - started < 30


def test_the_unedited_file_passes_every_check(demo_gguf, tmp_path):
    """No false alarm: the file written again unchanged (gguf-py's layout) reads as the model it holds."""
    from moeexport.source import open_source

    again = rewritten(demo_gguf, tmp_path / "again.gguf")
    assert open_source(again).config.num_local_experts == open_source(demo_gguf).config.num_local_experts == 8


# --- metadata arrays: checked before gguf-py expands them -------------------------------------


def _with_array(source, out, key: str, item_type: int, count: int, payload: bytes):
    """`source` with one more metadata entry, an array `key` declared `count` long over `payload`, inserted
    before the others, and a byte array after it that keeps the data aligned."""
    data = source.read_bytes()
    entry = struct.pack("<Q", len(key)) + key.encode() + struct.pack("<IIQ", 9, item_type, count) + payload
    filler = "moeexport.test_filler"
    room = -(len(entry) + 24 + len(filler)) % 32 or 32
    entry += struct.pack("<Q", len(filler)) + filler.encode() + struct.pack("<IIQ", 9, 0, room) + bytes(room)
    kv_count = struct.unpack_from("<Q", data, 16)[0]
    out.write_bytes(data[:16] + struct.pack("<Q", kv_count + 2) + entry + data[24:])
    return out


def _peak_rss_grows_by(run) -> int:
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


def test_an_array_declared_longer_than_the_file_is_refused_at_once(demo_gguf, tmp_path):
    from moeexport.backends.gguf.reader import GGUFFile

    key = "general.tags"
    crafted = _with_array(demo_gguf, tmp_path / "bomb.gguf", key, 8, 10**9, b"\0" * 10)
    # the array swallows the rest of the file: what follows is read as its elements, which cannot be 1e9
    started = time.perf_counter()
    with pytest.raises(MoeExportError, match=f"metadata array {key} declares 1000000000 elements but only"):
        GGUFFile(crafted)
    assert time.perf_counter() - started < 5


def test_a_valid_two_million_element_array_is_refused_without_expanding_it(demo_gguf, tmp_path):
    from moeexport.backends.gguf.reader import GGUFFile

    count = 2_000_000
    key = "general.tags"
    crafted = _with_array(demo_gguf, tmp_path / "long.gguf", key, 0, count, bytes(count))
    started = time.perf_counter()
    grown = []

    def read():
        with pytest.raises(MoeExportError, match=f"metadata array {key} has 2000000 elements; moeexport reads "
                                                 "arrays of at most 65536"):
            GGUFFile(crafted)

    grown.append(_peak_rss_grows_by(read))
    assert time.perf_counter() - started < 5 and grown[0] < 200 * 2**20


def test_a_tokenizer_array_at_the_limit_is_read_in_seconds(demo_gguf, tmp_path):
    """The bound is a bound, not a refusal of every long array: a tokenizer array under it is read."""
    from moeexport.backends.gguf.checks import prescan

    count = 500_000
    key = "tokenizer.ggml.extra"
    crafted = _with_array(demo_gguf, tmp_path / "merges.gguf", key, 0, count, bytes(count))
    started = time.perf_counter()
    assert prescan(crafted)[key] == count
    assert time.perf_counter() - started < 5


# --- what is dequantized: the head and the embeddings checked finite like the experts ----------


def _nan_scales(source, out, name: str):
    """`source` with the scale of the first Q8_0 block of every row of tensor `name` set to NaN."""
    tensor = next(t for t in gguf.GGUFReader(source).tensors if t.name == name)
    data = np.fromfile(source, np.uint8)
    rows = int(tensor.shape[-1])
    row_bytes = int(tensor.n_bytes) // rows
    scales = tensor.data_offset + row_bytes * np.arange(rows)
    data[scales], data[scales + 1] = 0x00, 0x7E  # float16 NaN, little-endian
    data.tofile(out)
    return out


@pytest.mark.parametrize("tensor, parameter", [("output.weight", "lm_head.weight"),
                                               ("token_embd.weight", "model.embed_tokens.weight")])
def test_a_head_or_embeddings_that_dequantize_to_nan_are_refused(tensor, parameter, demo_gguf, text, tmp_path,
                                                                 capsys):
    crafted = _nan_scales(demo_gguf, tmp_path / "nan.gguf", tensor)
    line = one_line_error(capsys, ["eval", str(crafted), "--text", str(text), "--length", "32"])
    assert f"{parameter} has non-finite values (NaN or Inf)" in line and "--allow-nonfinite" in line


def test_bench_takes_an_artifact_set_aside_as_failed(demo_gguf, tmp_path):
    """README: a build that misses its tolerance renames its file *.failed, and bench measures it from there."""
    from moeexport.bench import _subject

    failed = tmp_path / "model-q8_0.gguf.failed"
    failed.symlink_to(demo_gguf)
    assert _subject(str(failed)).format == _subject(str(demo_gguf)).format
    with pytest.raises(MoeExportError, match=r"notes.txt.failed is a .txt file: bench runs .*\*.failed"):
        (tmp_path / "notes.txt.failed").write_text("x")
        _subject(str(tmp_path / "notes.txt.failed"))
