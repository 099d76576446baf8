"""Fuzzing the two readers a user's files reach first: the recipe parser and the checkpoint reader.

Seeded generators (no extra dependency), a fixed number of inputs each, a few seconds each:
every input either parses (loads) or is refused with one MoeExportError line, never another
exception. Each test prints how many inputs it tried, in how long, and how they ended
(`pytest -s`), and records the same as junit properties.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from moeexport.errors import MoeExportError
from moeexport.checkpoint_files import DEMO_MODEL
from moeexport.modelio import load
from moeexport.passes import PASSES
from moeexport.recipe import Recipe, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
RECIPE_INPUTS = 1500
WEIGHT_INPUTS = 160
CONFIG_INPUTS = 200


def _tally(outcomes: Counter, started: float, what: str, record_property) -> None:
    seconds = time.perf_counter() - started
    total = sum(outcomes.values())
    print(f"\n{what}: {total} inputs in {seconds:.1f} s: " + ", ".join(f"{n} {k}" for k, n in outcomes.most_common()))
    record_property("inputs", total)
    record_property("seconds", round(seconds, 2))
    record_property("outcomes", dict(outcomes))


def _one_line_or_success(attempt, describe):
    """'accepted' or 'refused'; anything but a one-line MoeExportError fails the test with the input."""
    try:
        attempt()
    except MoeExportError as error:
        assert str(error) and "\n" not in str(error), f"{describe()}: not one line: {error!r}"
        return "refused"
    except Exception as error:  # the finding: name the input that got past the readers' checks
        pytest.fail(f"{describe()}: {type(error).__name__}: {error}")
    return "accepted"


# --- recipes ---------------------------------------------------------------------------------

OPTION_NAMES = sorted({name for p in PASSES.values() for name in p.Options.model_fields} | {"compress", "rank"})
WORDS = [*PASSES, *OPTION_NAMES, "passes", "layer", "global", "gptq", "rtn", "wanda", "2:4", "random", "frequency", "x"]
YAML_NOISE = ["&a ", "*a", "!!python/object/apply:os.system ['true']", "<<: ", "? ", "{", "}", "[", "]", ", ", ": ",
              "- ", "\t", "%YAML 1.1\n", "---\n", "...\n", "!!binary aGk=", "!!timestamp 2001-12-14", "|\n  ", "'", '"',
              "#", "\ufeff", "\x85", "\u2028", "~", "null", "yes", "0x1f", "1e3", "1.0e+3", ".inf", ".nan", "0o17", "1_000"]


def _scalar(rng: random.Random):
    return rng.choice([
        rng.randint(-3, 12), rng.choice([0, 1, 2**31, 2**63, 10**30, -(2**63)]), rng.random(), rng.choice([0.0, 1.0, 1.5]),
        float("inf"), float("nan"), True, False, None, rng.choice(WORDS),
        "".join(rng.choices("ab:2-_ \n\\", k=rng.randint(0, 6))),
    ])


def _structure(rng: random.Random, depth: int = 0):
    """A random YAML-able value, biased toward recipe-shaped mappings."""
    kind = rng.random()
    if depth > 3 or kind < 0.35:
        return _scalar(rng)
    if kind < 0.6:
        return [_structure(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    keys = rng.sample(WORDS, rng.randint(0, 3))
    return {key: _structure(rng, depth + 1) for key in keys}


def _near_recipe(rng: random.Random) -> dict:
    """passes: [ {a real pass: {its real options, random values}} ] — deep into the option models."""
    steps = []
    for _ in range(rng.randint(0, 3)):
        name = rng.choice(list(PASSES))
        fields = list(PASSES[name].Options.model_fields)
        steps.append({name: {field: _scalar(rng) if rng.random() < 0.8 else _structure(rng, 2)
                             for field in rng.sample(fields, rng.randint(0, len(fields)))}})
    return {"passes": steps}


def _mutate_text(rng: random.Random, text: str) -> str:
    for _ in range(rng.randint(1, 4)):
        position = rng.randint(0, len(text))
        move = rng.random()
        if move < 0.3:
            text = text[:position] + rng.choice(YAML_NOISE) + text[position:]
        elif move < 0.5:
            text = text[:position] + text[position + rng.randint(1, 8):]
        elif move < 0.65:
            lines = text.splitlines(keepends=True) or [""]
            line = rng.randrange(len(lines))
            lines.insert(rng.randrange(len(lines) + 1), lines[line])  # a repeated line: duplicate keys, repeated steps
            text = "".join(lines)
        elif move < 0.8:
            text = text[:position] + rng.choice(WORDS) + text[position:]
        elif move < 0.9:
            text = text[:position]
        else:
            text = text[:position] + chr(rng.choice([0, 7, 0x1F, 0x7F, 0xA0, 0xFFFD, 0x1F600])) + text[position:]
    return text


def _recipe_input(rng: random.Random, seeds: list[str]) -> bytes:
    kind = rng.random()
    if kind < 0.35:
        return _mutate_text(rng, rng.choice(seeds)).encode("utf-8", "surrogatepass")
    if kind < 0.6:
        return yaml.safe_dump(_near_recipe(rng), default_flow_style=rng.random() < 0.5, allow_unicode=True).encode()
    if kind < 0.75:
        text = yaml.safe_dump(_near_recipe(rng), default_flow_style=rng.random() < 0.5)
        return _mutate_text(rng, text).encode("utf-8", "surrogatepass")
    if kind < 0.9:
        return yaml.safe_dump(_structure(rng), allow_unicode=True).encode()
    if kind < 0.98:  # random bytes, sometimes behind a valid start
        noise = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
        return (b"passes:\n  - " if rng.random() < 0.5 else b"") + noise
    depth = rng.randint(40, 1200)  # deep nesting: the composer is recursive
    return (rng.choice(["[", "{a: ", "- "]) * depth).encode()


def test_recipe_parser_fuzz(tmp_path, record_property):
    rng = random.Random(20240614)
    seeds = [path.read_text() for path in RECIPES] + ["passes: []\n", "passes:\n  - block_drop: {n: 1}\n"]
    path = tmp_path / "recipe.yaml"
    outcomes, started = Counter(), time.perf_counter()
    for number in range(RECIPE_INPUTS):
        data = _recipe_input(rng, seeds)
        path.write_bytes(data)

        def parse():
            recipe = load_recipe(path)
            assert isinstance(recipe, Recipe)
            path.write_text(recipe.to_yaml())  # what was accepted reads back the same
            assert load_recipe(path) == recipe, recipe.to_yaml()

        outcomes[_one_line_or_success(parse, lambda: f"recipe input {number} {data[:300]!r}")] += 1
    _tally(outcomes, started, "recipe parser fuzz", record_property)
    assert outcomes["accepted"] > 50 and outcomes["refused"] > 500  # the generator reaches both sides


# --- checkpoints -----------------------------------------------------------------------------

WEIGHTS = "model.safetensors"
DTYPE_NAMES = ["F32", "F16", "BF16", "F64", "I32", "U32", "I64", "I16", "U8", "I8", "BOOL", "F8_E4M3", "X", ""]


def _split(data: bytes) -> tuple[dict, bytes]:
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text)) + text + body


def _mutate_header(rng: random.Random, header: dict) -> dict:
    """One change to the parsed header: its entries stay where safetensors expects them, or nearly."""
    header = json.loads(json.dumps(header))
    names = [name for name in header if name != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    move = rng.randrange(9)
    if move == 0:
        entry["dtype"] = rng.choice(DTYPE_NAMES)
    elif move == 1 and len(entry["shape"]) > 1:
        entry["shape"] = entry["shape"][::-1]  # same size, wrong shape
    elif move == 2:
        entry["shape"] = rng.choice([[], [0], [-1], [1] * 9, [entry["shape"][0] * 2], entry["shape"] + [1], ["a"], None])
    elif move == 3:
        start, end = entry["data_offsets"]
        delta = rng.choice([-4, -1, 1, 4, 10**12, -(10**6)])
        entry["data_offsets"] = rng.choice([[start + delta, end + delta], [start, end + delta], [end, start], [start]])
    elif move == 4:
        header[name[:-1] + rng.choice("xyz.")] = header.pop(name)  # renamed: one missing, one unexpected
    elif move == 5:
        del header[name]
    elif move == 6:
        header[rng.choice(names)] = dict(entry)  # two entries share bytes
    elif move == 7:
        header["__metadata__"] = rng.choice([{"format": 1}, [], "pt", {"format": "pt", "x": None}, {}])
    else:
        entry[rng.choice(["extra", "dtype", "shape"])] = rng.choice([None, 1, "F32", [2], {}])
    return header


def _mutate_weights(rng: random.Random, original: bytes) -> tuple[str, bytes]:
    header, body = _split(original)
    length = struct.unpack("<Q", original[:8])[0]
    move = rng.randrange(20)
    if move < 6:
        return "header entry", _join(_mutate_header(rng, header), body)
    if move < 8:  # the length prefix
        prefix = rng.choice([0, 1, length - 1, length + 1, len(original), 2**63, rng.randrange(2**64)])
        return "length prefix", struct.pack("<Q", prefix) + original[8:]
    if move < 11:  # raw header bytes: flipped, inserted or deleted
        data = bytearray(original)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(8, 8 + length)
            choice = rng.random()
            if choice < 0.5:
                data[at] ^= 1 << rng.randrange(8)
            elif choice < 0.75:
                data.insert(at, rng.randrange(256))
            else:
                del data[at]
        return "header bytes", bytes(data)
    if move < 13:
        cut = rng.choice([0, rng.randrange(1, 8), rng.randrange(8, 8 + length), rng.randrange(8 + length, len(original))])
        return "truncated", original[:cut]
    if move < 16:  # splices: repeated, appended, prepended, a digit changed
        kind = rng.randrange(4)
        if kind == 0:
            return "spliced", original[: 8 + length] + original[: 8 + length] + body
        if kind == 1:
            return "spliced", original + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        if kind == 2:
            return "spliced", bytes(rng.randint(1, 9)) + original
        text = original[8 : 8 + length]
        digits = [i for i, byte in enumerate(text) if chr(byte).isdigit()]
        at = 8 + rng.choice(digits)
        return "spliced", original[:at] + str(rng.randrange(10)).encode() + original[at + 1 :]
    if move < 18:
        return "other file", rng.choice([b"", b"\x80\x02}q\x00.", b"PK\x03\x04" + bytes(60), b"{}", bytes(8) + b"{}"])
    # data bytes (1 in 10, each a full load): the model loads, or non-finite weights are refused by name
    data = bytearray(original)
    start = 8 + length
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(start, len(data) - 4) & ~3
        data[at : at + 4] = rng.choice([struct.pack("<f", float("nan")), struct.pack("<f", float("inf")),
                                        bytes(rng.randrange(256) for _ in range(4))])
    return "data bytes", bytes(data)


def _config_value(rng: random.Random):
    return rng.choice([None, True, False, -1, 0, 1, 2, 3, 7, 9, 64, 2.5, -0.0, float("nan"), "x", "", [], [1], {},
                       {"rope_type": "default"}, {"rope_type": "nope"}, "silu", "int8", "mixtral", "llama"])


def _mutate_config(rng: random.Random, text: str) -> tuple[str, bytes]:
    config = json.loads(text)
    move = rng.randrange(6)
    if move < 3:
        key = rng.choice(sorted(config) + ["num_experts", "moe_intermediate_size", "quantization_config", "auto_map"])
        config[key] = _config_value(rng)
        return "value", json.dumps(config).encode()
    if move == 3:
        del config[rng.choice(sorted(config))]
        return "key removed", json.dumps(config).encode()
    if move == 4:
        return "not an object", json.dumps(rng.choice([[config], "config", 3, None, []])).encode()
    data = bytearray(text.encode())
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(data))
        data[at] = rng.choice([0, 0xFF, 0xC3, ord("{"), ord('"'), ord(","), ord("9")])
    return "bytes", bytes(data[: rng.randint(1, len(data))] if rng.random() < 0.3 else data)


@pytest.fixture
def model_dir(tmp_path):
    directory = tmp_path / "model"
    directory.mkdir()
    shutil.copy(DEMO_MODEL / "config.json", directory)
    shutil.copy(DEMO_MODEL / WEIGHTS, directory)
    return directory


def test_checkpoint_reader_fuzz_weights(model_dir, record_property):
    rng = random.Random(1406)
    original = (DEMO_MODEL / WEIGHTS).read_bytes()
    kinds, outcomes, started = Counter(), Counter(), time.perf_counter()
    for number in range(WEIGHT_INPUTS):
        kind, data = _mutate_weights(rng, original)
        (model_dir / WEIGHTS).write_bytes(data)
        kinds[kind] += 1
        outcome = _one_line_or_success(lambda: load(model_dir), lambda: f"weights input {number} ({kind})")
        outcomes[f"{kind} {outcome}"] += 1
    _tally(outcomes, started, "checkpoint reader fuzz, model.safetensors", record_property)
    assert len(kinds) == 7


def test_checkpoint_reader_fuzz_config(model_dir, record_property):
    rng = random.Random(1407)
    original = (DEMO_MODEL / "config.json").read_text()
    outcomes, started = Counter(), time.perf_counter()
    for number in range(CONFIG_INPUTS):
        kind, data = _mutate_config(rng, original)
        (model_dir / "config.json").write_bytes(data)
        outcome = _one_line_or_success(lambda: load(model_dir), lambda: f"config input {number} ({kind}) {data[:400]!r}")
        outcomes[f"{kind} {outcome}"] += 1
    _tally(outcomes, started, "checkpoint reader fuzz, config.json", record_property)


# --- GGUF files ------------------------------------------------------------------------------

GGUF_INPUTS = 160  # header moves only; a longer run with weight bytes damaged: tools/fuzz_gguf.py
GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _gguf_fields(data: bytes) -> list[tuple[str, int, int]]:
    """(what, position, size) of every number in a well-formed GGUF header: the counts, each metadata value
    (an array's element type and length; a string's length), each tensor's dimension count, dimensions, type
    and offset. The fuzzer edits these in place."""
    fields = [("tensor count", 8, 8), ("metadata count", 16, 8)]
    at = 24

    def string(what):
        nonlocal at
        fields.append((what, at, 8))
        length = struct.unpack_from("<Q", data, at)[0]
        at += 8 + length

    for _ in range(struct.unpack_from("<Q", data, 16)[0]):
        length = struct.unpack_from("<Q", data, at)[0]
        at += 8 + length
        kind = struct.unpack_from("<I", data, at)[0]
        fields.append(("metadata type", at, 4))
        at += 4
        if kind == 8:
            string("metadata string length")
        elif kind == 9:
            item, count = struct.unpack_from("<IQ", data, at)
            fields += [("array element type", at, 4), ("array length", at + 4, 8)]
            at += 12
            if item == 8:
                for _ in range(count):
                    string("array string length")
            else:
                at += count * GGUF_SCALAR_SIZES[item]
        else:
            fields.append(("metadata value", at, GGUF_SCALAR_SIZES[kind]))
            at += GGUF_SCALAR_SIZES[kind]
    for _ in range(struct.unpack_from("<Q", data, 8)[0]):
        string("tensor name length")
        dims = struct.unpack_from("<I", data, at)[0]
        fields.append(("tensor dimension count", at, 4))
        fields += [("tensor dimension", at + 4 + 8 * i, 8) for i in range(dims)]
        at += 4 + 8 * dims
        fields += [("tensor type", at, 4), ("tensor offset", at + 4, 8)]
        at += 12
    fields.append(("end of header", at, 0))
    return fields


def _mutate_gguf(rng: random.Random, original: bytes, fields: list, data_start: int,
                 data_moves: bool) -> tuple[str, bytes]:
    header_end = fields[-1][1]
    move = rng.randrange(20 if data_moves else 17)
    data = bytearray(original)
    if move < 8:  # a number of the header set to an edge value, or nudged
        what, at, size = rng.choice(fields[:-1])
        old = int.from_bytes(data[at:at + size], "little")
        value = rng.choice([0, 1, 2, 3, old + 1, old - 1, old * 2, old * 1000, 2 ** (8 * size - 1),
                            2 ** (8 * size) - 1, rng.randrange(2 ** (8 * size))]) % 2 ** (8 * size)
        data[at:at + size] = value.to_bytes(size, "little")
        return f"field: {what}", bytes(data)
    if move < 12:  # header bytes flipped
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(4, header_end)] ^= 1 << rng.randrange(8)
        return "header bytes", bytes(data)
    if move < 15:
        cut = rng.choice([rng.randrange(0, 24), rng.randrange(24, header_end), rng.randrange(header_end, len(data))])
        return "truncated", original[:cut]
    if move < 17:  # a float metadata value (epsilon, rope base) made non-finite, negative or zero
        floats = [at for what, at, size in fields if what == "metadata value" and size == 4]
        at = rng.choice(floats)
        data[at:at + 4] = struct.pack("<f", rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e30]))
        return "float value", bytes(data)
    # data bytes (a full read of every weight): the model reads, or non-finite weights are refused by name
    for _ in range(rng.randint(1, 6)):
        at = rng.randrange(data_start, len(data) - 2)
        data[at:at + 2] = rng.choice([b"\x00\x7e", b"\x00\x7c", bytes(rng.randrange(256) for _ in range(2))])
    return "data bytes", bytes(data)


@pytest.fixture(scope="module")
def fuzzed_gguf(demo_gguf_of):
    pytest.importorskip("gguf")
    return demo_gguf_of("q8_0")


def _read_gguf(path: Path, every_weight: bool) -> None:
    """What every command that reads a GGUF as a model does: open it; for data moves, read every weight."""
    import torch

    from moeexport.modelio import load_streamed
    from moeexport.source import open_source
    from moeexport.streaming import logits

    source = open_source(path)
    if every_weight:
        logits(load_streamed(source), torch.arange(3, 19)[None])


def _gguf_fuzz(original_path: Path, tmp_path: Path, inputs: int, seed: int, data_moves: bool) -> Counter:
    """`inputs` mutations of the GGUF at `original_path`, each read as a model; `data_moves`: also damage weight
    bytes, each such input read whole through the streamed model (seconds each: outside CI)."""
    import gguf

    original = original_path.read_bytes()
    fields = _gguf_fields(original)
    data_start = min(tensor.data_offset for tensor in gguf.GGUFReader(original_path).tensors)
    rng = random.Random(seed)
    path = tmp_path / "fuzzed.gguf"
    outcomes = Counter()
    for number in range(inputs):
        kind, data = _mutate_gguf(rng, original, fields, data_start, data_moves)
        path.write_bytes(data)
        outcome = _one_line_or_success(lambda: _read_gguf(path, kind == "data bytes"),
                                       lambda: f"GGUF input {number} ({kind}, seed {seed})")
        outcomes[f"{kind.partition(':')[0]} {outcome}"] += 1
    return outcomes


def test_gguf_reader_fuzz(fuzzed_gguf, tmp_path, record_property):
    started = time.perf_counter()
    outcomes = _gguf_fuzz(fuzzed_gguf, tmp_path, GGUF_INPUTS, 2906, data_moves=False)
    _tally(outcomes, started, "GGUF reader fuzz", record_property)
    assert sum(n for k, n in outcomes.items() if k.endswith("refused")) > GGUF_INPUTS // 2
