"""A GGUF from anyone, checked the way llama.cpp's loader checks it, before anything is allocated or dequantized.

`prescan` walks the header itself, with a bound on every step, before gguf-py's
GGUFReader touches the file (the reader makes a numpy view and a list entry per
array element, so a declared count is memory and time): each declared count
times its smallest element size against the bytes left, metadata arrays
outside the tokenizer of at most OTHER_ARRAY_LIMIT elements, no nested arrays,
and a tensor table whose entries have 1 to 4 positive dimensions, a weight type
moeexport dequantizes, rows of whole blocks, and data laid out as llama.cpp
requires (in table order, each at the aligned end of the one before, the last
inside the file: so no overlap, and no type whose byte size disagrees with the
bytes its data takes).

`check_model` checks the hyper-parameters the model is built from (in range,
of the right kind, borne out by the tensors), the tensor names (a kind the
host's llama.cpp architecture has, in a block that exists) and every expert
stack and router against the expert count; `check_mapping` checks that every
tensor the model reads is present with the shape the model has for it.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import struct
from pathlib import Path

from moeexport.errors import MoeExportError

OTHER_ARRAY_LIMIT = 1 << 16  # elements of a metadata array outside tokenizer.* (llama.cpp's per-layer arrays: <= 512)
TOKENIZER_ARRAY_LIMIT = 1 << 20  # elements of a tokenizer array (vocabularies and merges)
MAX_NAME = 63  # llama.cpp's GGML_MAX_NAME, less its terminating NUL
MAX_DIMS = 4
MAX_EXPERTS = 1024  # llama.cpp's LLAMA_MAX_EXPERTS
MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> their size in bytes (strings: the smallest, an empty one)
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class _Cursor:
    """Bounded little- (or big-) endian reads from a mapped file; running past its end is a damaged file."""

    def __init__(self, data, path: Path, order: str):
        self.data, self.path, self.order, self.at = data, path, order, 0

    def left(self) -> int:
        return len(self.data) - self.at

    def take(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        if size > self.left():
            raise damaged(self.path, f"it ends inside {what}")
        value = struct.unpack_from(self.order + fmt, self.data, self.at)[0]
        self.at += size
        return value

    def string(self, what: str, limit: int | None = None) -> bytes:
        length = self.take("Q", what)
        if length > self.left() or (limit is not None and length > limit):
            raise damaged(self.path, f"{what} declares {length} bytes but {self.left()} follow")
        self.at += length
        return bytes(self.data[self.at - length:self.at])

    def skip(self, size: int, what: str) -> None:
        if size > self.left():
            raise damaged(self.path, f"{what} declares {size} bytes but only {self.left()} follow")
        self.at += size


def damaged(path: Path, why: str) -> MoeExportError:
    return MoeExportError(f"{path} is not a readable GGUF file ({why}): it is damaged or hostile; fetch or write it again")


def prescan(path: Path) -> dict[str, int]:
    """The header walked with every count bounded by the bytes left (see the module docstring): the length of
    each metadata array by key. A file that does not start like a GGUF is left to gguf-py, which names what is
    wrong with it."""
    import gguf

    size = path.stat().st_size
    if size < 24:
        raise damaged(path, f"it is {size} bytes long, shorter than a GGUF header")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            return {}
        order = "<" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF else ">"  # a big-endian file's version
        cursor = _Cursor(data, path, order)
        cursor.at = 8
        tensors, entries = cursor.take("Q", "the tensor count"), cursor.take("Q", "the metadata count")
        if entries * 13 > cursor.left() or tensors * 33 > cursor.left():  # their smallest possible sizes
            raise damaged(path, f"it declares {entries} metadata entries and {tensors} tensors in "
                                f"{cursor.left()} bytes")
        alignment, lengths = DEFAULT_ALIGNMENT, {}
        for _ in range(entries):
            key = cursor.string("a metadata key", 1 << 16).decode("utf-8", "replace")  # named in messages only
            kind = cursor.take("I", f"the type of {key}")
            if key == "general.alignment" and kind == 4 and cursor.left() >= 4:
                alignment = struct.unpack_from(order + "I", data, cursor.at)[0]
            lengths[key] = _skip_value(cursor, key, kind)
        if alignment == 0 or alignment & (alignment - 1):
            raise damaged(path, f"general.alignment {alignment} is not a power of 2")
        table = [_tensor_entry(cursor, gguf) for _ in range(tensors)]
        start = -(-cursor.at // alignment) * alignment
        _check_layout(path, table, start, size, alignment)
    return {key: length for key, length in lengths.items() if length is not None}


def _skip_value(cursor: _Cursor, key: str, kind: int) -> int | None:
    """Past one metadata value; an array's length (None for a scalar)."""
    if kind == STRING:
        _text(cursor, cursor.string(f"the value of {key}"), key)
    elif kind in SCALAR_SIZES:
        cursor.skip(SCALAR_SIZES[kind], f"the value of {key}")
    elif kind == ARRAY:
        item = cursor.take("I", f"the element type of {key}")
        count = cursor.take("Q", f"the length of {key}")
        if item == ARRAY:
            raise damaged(cursor.path, f"metadata {key} is an array of arrays, which llama.cpp does not read")
        if item != STRING and item not in SCALAR_SIZES:
            raise damaged(cursor.path, f"metadata {key} has elements of unknown type {item}")
        smallest = 8 if item == STRING else SCALAR_SIZES[item]
        if count * smallest > cursor.left():
            raise damaged(cursor.path, f"metadata array {key} declares {count} elements but only {cursor.left()} "
                                       "bytes follow")
        limit = TOKENIZER_ARRAY_LIMIT if key.startswith("tokenizer.") else OTHER_ARRAY_LIMIT
        if count > limit:
            raise MoeExportError(f"{cursor.path}: metadata array {key} has {count} elements; moeexport reads arrays "
                                 f"of at most {limit} elements there (no model needs more): the file is hostile or "
                                 "not a model; fetch it from its publisher")
        if item == STRING:
            for _ in range(count):
                element = cursor.string(f"an element of {key}")
                if not key.startswith("tokenizer."):  # tokens may be bytes; the tokenizer converter reads them
                    _text(cursor, element, key)
        else:
            cursor.skip(count * smallest, f"the elements of {key}")
        return count
    else:
        raise damaged(cursor.path, f"metadata {key} has unknown type {kind}")


def _text(cursor: _Cursor, value: bytes, key: str) -> None:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as error:
        raise damaged(cursor.path, f"metadata {key} is not UTF-8 text (byte 0x{value[error.start]:02x})") from None


def _tensor_entry(cursor: _Cursor, gguf) -> tuple[str, tuple[int, ...], int, int]:
    """(name, dimensions innermost first, ggml type, offset) of one entry of the tensor table, checked."""
    path = cursor.path
    name = cursor.string("a tensor name", 1 << 16).decode("utf-8", "replace")
    if len(name) > MAX_NAME:
        raise damaged(path, f"tensor name {name[:80]!r} is longer than llama.cpp's {MAX_NAME} characters")
    dims = cursor.take("I", f"the dimension count of {name}")
    if not 1 <= dims <= MAX_DIMS:
        raise damaged(path, f"tensor {name} has {dims} dimensions; a weight has 1 to {MAX_DIMS}")
    shape = tuple(cursor.take("Q", f"a dimension of {name}") for _ in range(dims))
    if min(shape) < 1 or math.prod(shape) >= 1 << 62:
        raise damaged(path, f"tensor {name} has dimensions {list(shape)}")
    qtype = cursor.take("I", f"the type of {name}")
    offset = cursor.take("Q", f"the offset of {name}")
    readable = _readable_types(gguf)
    if qtype not in readable:
        known = gguf.GGMLQuantizationType(qtype).name if qtype in gguf.GGMLQuantizationType._value2member_map_ \
            else f"unknown type {qtype}"
        raise damaged(path, f"tensor {name} is stored as {known}, which is not a weight type moeexport dequantizes")
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    if shape[0] % block:
        raise damaged(path, f"tensor {name} has rows of {shape[0]} values, not whole blocks of {block} "
                            f"({gguf.GGMLQuantizationType(qtype).name})")
    return name, shape, qtype, offset


def _readable_types(gguf) -> set[int]:
    """The ggml types GGUFFile dequantizes: plain floats, the writer's Q1_0 zeros, and the types gguf-py knows how
    to dequantize (ggml's own dequantizer reads them all, bit for bit as gguf-py would)."""
    types = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q1_0}
    return {int(t) for t in types | set(gguf.quants._type_traits)}


def _check_layout(path: Path, table: list, start: int, size: int, alignment: int) -> None:
    """Each tensor's data at the aligned end of the one before it, in table order (llama.cpp's rule), within the
    file: no two overlap, and each declared type's byte size is the room its data takes."""
    import gguf

    expected = 0
    for name, shape, qtype, offset in table:
        block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        nbytes = math.prod(shape) // block * block_bytes
        if offset != expected:
            why = "overlaps the tensor before it" if offset < expected else "leaves a gap after the tensor before it"
            raise damaged(path, f"tensor {name}'s data at offset {offset} {why} (expected {expected}): its type or "
                                "shape disagrees with the bytes its data takes, or the table was edited")
        if start + offset + nbytes > size:
            raise damaged(path, f"tensor {name}'s data ends past the end of the file: it is truncated")
        expected = offset + -(-nbytes // alignment) * alignment
    if table and size > start + expected:
        raise damaged(path, f"{size - start - expected} bytes follow the last tensor's data: a tensor's type or shape "
                            "disagrees with the bytes its data takes, or the file was edited")


# --- the model the header describes ---------------------------------------------------------


def _integer(file, key: str, least: int, most: int | None = None, required: bool = True) -> int | None:
    value = file.value(key)
    if value is None and not required:
        return None
    where = f"{file.path}: {file.architecture}.{key}"
    if value is None:
        raise MoeExportError(f"{where} is missing: the file does not describe a model moeexport can build")
    if not isinstance(value, int) or isinstance(value, bool):
        raise MoeExportError(f"{where} is {_shown(value)}; it must be one integer")
    if value < least or (most is not None and value > most):
        bound = f"between {least} and {most}" if most is not None else f"at least {least}"
        raise MoeExportError(f"{where} is {value}; it must be {bound}")
    return value


def _shown(value) -> str:
    return f"an array of {len(value)}" if isinstance(value, list) else repr(value)[:60]


def check_model(file) -> None:
    """The hyper-parameters GGUFFile `file`'s model is built from, in range and borne out by the tensors, its
    per-layer record, and every tensor name one the host's llama.cpp architecture has (the module docstring)."""
    tensors = file.tensors
    if "token_embd.weight" not in tensors:
        raise MoeExportError(f"{file.path} has no token_embd.weight: it is not a complete model")
    vocabulary, hidden = tensors["token_embd.weight"].shape
    width = _integer(file, "embedding_length", 1)
    if width != hidden:
        raise MoeExportError(f"{file.path}: {file.architecture}.embedding_length is {width} but token_embd.weight "
                             f"has rows of {hidden}: the metadata and the tensors disagree")
    heads = _integer(file, "attention.head_count", 1, hidden)
    kv_heads = _integer(file, "attention.head_count_kv", 1, heads, required=False)
    if kv_heads is not None and heads % kv_heads:
        raise MoeExportError(f"{file.path}: {heads} attention heads cannot share {kv_heads} key/value heads evenly "
                             f"({file.architecture}.attention.head_count_kv)")
    if file.value("attention.key_length") is None and hidden % heads:
        raise MoeExportError(f"{file.path}: embedding_length {hidden} is not a whole number of "
                             f"{heads} heads ({file.architecture}.attention.head_count)")
    _integer(file, "attention.key_length", 1, required=False)
    experts = _integer(file, "expert_count", 1, MAX_EXPERTS)
    _integer(file, "expert_used_count", 1, experts)
    epsilon = file.value("attention.layer_norm_rms_epsilon")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not (0 < epsilon < 1):
        raise MoeExportError(f"{file.path}: {file.architecture}.attention.layer_norm_rms_epsilon is "
                             f"{_shown(epsilon)}; it must be a number between 0 and 1 (exclusive)")
    for key, value in file.metadata.items():  # a NaN rope base or scale makes every logit NaN
        if key.startswith(f"{file.architecture}.") and isinstance(value, float) and not math.isfinite(value):
            raise MoeExportError(f"{file.path}: {key} is {value}; it must be a finite number")
    base = file.value("rope.freq_base")
    if base is not None and (isinstance(base, bool) or not isinstance(base, (int, float)) or base <= 0):
        raise MoeExportError(f"{file.path}: {file.architecture}.rope.freq_base is {_shown(base)}; it must be a "
                             "positive number")
    layers = _integer(file, "block_count", 1, MAX_LAYERS)
    _check_vocabulary(file, vocabulary)
    _check_names(file, layers)
    _check_layer_record(file, layers, experts)
    for name, tensor in tensors.items():
        if "_exps." in name or name.endswith("ffn_gate_inp.weight"):
            if tensor.shape[0] != experts:
                what = "router" if name.endswith("ffn_gate_inp.weight") else "expert stack"
                raise MoeExportError(f"{file.path}: {what} {name} holds {tensor.shape[0]} experts but "
                                     f"{file.architecture}.expert_count is {experts}: the metadata and the tensors "
                                     "disagree (llama.cpp refuses it too)")


def _check_vocabulary(file, vocabulary: int) -> None:
    count = file.array_lengths.get("tokenizer.ggml.tokens", 0)
    if not count:
        raise MoeExportError(f"{file.path} has an empty vocabulary (tokenizer.ggml.tokens): it is not a usable model")
    if count != vocabulary:
        raise MoeExportError(f"{file.path}: tokenizer.ggml.tokens lists {count} tokens but token_embd.weight has "
                             f"{vocabulary} rows: the vocabulary and the embeddings disagree")
    for key, value in file.metadata.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < count:
                raise MoeExportError(f"{file.path}: {key} is {_shown(value)}, not a token id of its "
                                     f"{count}-token vocabulary")


def _check_names(file, layers: int) -> None:
    """Every tensor a kind gguf-py lists for the host (llama.cpp builds no other), of a block that exists."""
    import gguf

    from moeexport.backends.gguf.names import TensorNames

    kinds = TensorNames(gguf, file.architecture).allowed
    if kinds is None:
        return  # a host newer than this gguf-py: nothing to check the names against
    templates = [gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[kind]] for kind in kinds]
    patterns = [re.compile(re.escape(template).replace(r"\{bid\}", r"(\d+)") + r"\.(weight|bias)")
                for template in templates]
    for name in file.tensors:
        match = next((found for pattern in patterns if (found := pattern.fullmatch(name))), None)
        if match is None:
            raise MoeExportError(f"{file.path} holds tensor {name}, which llama.cpp's {file.architecture} has no "
                                 "place for (llama.cpp refuses it): the file was edited or is another model")
        if match.re.groups == 2 and int(match.group(1)) >= layers:
            raise MoeExportError(f"{file.path} holds tensor {name} of block {match.group(1)}, but the model has "
                                 f"{layers} blocks ({file.architecture}.block_count)")


def _check_layer_record(file, layers: int, experts: int) -> None:
    """moeexport.layers (written by moeexport) a JSON list of one layer record per block, each within the expert
    count; else leading_dense_block_count a count of blocks."""
    from moeexport.adapters import LayerSpec
    from moeexport.backends.gguf.names import LAYERS_KEY

    if LAYERS_KEY not in file.metadata:
        _integer(file, "leading_dense_block_count", 0, layers, required=False)
        return
    record, where = file.metadata[LAYERS_KEY], f"{file.path}: {LAYERS_KEY}"
    try:
        specs = [LayerSpec(**spec) for spec in json.loads(record)] if isinstance(record, str) else None
    except (ValueError, TypeError, RecursionError):
        specs = None
    if specs is None:
        raise MoeExportError(f"{where} is not a JSON list of layer records: the file was edited; write it again")
    if len(specs) != layers:
        raise MoeExportError(f"{where} lists {len(specs)} layers for block_count {layers}: the file was edited; "
                             "write it again")
    for index, spec in enumerate(specs):
        counts = (spec.num_experts, spec.top_k)
        if spec.kind not in ("moe", "dense", "dropped") or not all(isinstance(n, int) and not isinstance(n, bool)
                                                                  for n in counts) \
                or (spec.kind == "moe" and not 1 <= spec.top_k <= spec.num_experts <= experts):
            raise MoeExportError(f"{where}: layer {index} is {spec}, which no model has (at most {experts} experts, "
                                 "top-k between 1 and its experts): the file was edited; write it again")


def check_mapping(file, sources: dict, parameters: dict) -> None:
    """Every parameter of the model (name -> shape) that is read from the file has its tensors there, of the
    shape the model has for it (experts: per expert); only the head may be left out (tied to the embeddings)."""
    for name, shape in parameters.items():
        source = sources.get(name)
        if source is None:
            if name.endswith("lm_head.weight") or name.endswith(".rotary_emb.inv_freq"):
                continue
            raise MoeExportError(f"{file.path} has no tensor for the model's {name}: the file is incomplete or was "
                                 "edited; fetch or write it again")
        if source.latent_heads:
            continue  # k_b and v_b, joined per head: their sizes are checked by the join
        absent = [tensor for tensor in source.tensors if tensor not in file.tensors]
        if absent:
            raise MoeExportError(f"{file.path} has no tensor {absent[0]} (the model's {name}): the file is incomplete "
                                 "or was edited; fetch or write it again")
        stored = [file.tensors[tensor].shape for tensor in source.tensors]
        if source.experts is not None and len(shape) == 3:  # a stack: per expert, gate and up joined
            shape = (shape[0], shape[2], shape[1]) if source.transposed else shape  # held as x @ W takes it
            rows = sum(one[1] for one in stored)
            if any(one[2:] != tuple(shape[2:]) for one in stored) or rows != shape[1]:
                raise _wrong_shape(file, source.tensors[0], stored[0], shape)
        elif source.experts is not None:  # a router's rows or a bias: one entry per expert (a bias [E] may be [1, E])
            joined = (*stored[0][:-1], sum(one[-1] for one in stored))  # gate's and up's expert biases side by side
            if _squeezed(joined)[1:] != _squeezed(shape)[1:]:
                raise _wrong_shape(file, source.tensors[0], stored[0], shape)
        elif _squeezed(stored[0]) != _squeezed(shape):  # [32] holds a [1, 32] parameter: the reader reshapes
            raise _wrong_shape(file, source.tensors[0], stored[0], shape)


def _squeezed(shape) -> tuple[int, ...]:
    return tuple(n for n in shape if n != 1)


def _wrong_shape(file, name: str, stored: tuple, shape) -> MoeExportError:
    return MoeExportError(f"{file.path}: tensor {name} has shape {list(stored)} but the model its metadata describes "
                          f"needs {list(shape)}: the metadata and the tensors disagree")
