"""Will TensorRT's ONNX parser take this graph? Checked here, before anything is copied to a device.

Building an engine needs a CUDA GPU, so an unsupported op would otherwise be
found only on the Jetson, after the bundle was made and shipped. The rules come
from a data file (onnx_support_trt10.json) that names the TensorRT release it
describes and where it was read from: per op, whether the parser imports it,
the element types it takes, and the restrictions that can be verified
mechanically (an input that must be a build-time constant, an attribute value,
a zero point). `check_onnx` applies them to every node, subgraphs included;
`check_decoder_io` checks that the graph's inputs and outputs have the shapes
the prefill and decode optimization profiles are built for.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

SUPPORT_FILE = Path(__file__).with_name("onnx_support_trt10.json")


@lru_cache(maxsize=1)
def support_table() -> dict:
    if not SUPPORT_FILE.is_file():
        from moeexport.errors import MoeExportError

        raise MoeExportError(
            f"{SUPPORT_FILE.name} is missing from this installation of moeexport; reinstall it from a complete source "
            "(its package data must include backends/tensorrt/*.json)"
        )
    return json.loads(SUPPORT_FILE.read_text())


def _load(path_or_model):
    import onnx

    if isinstance(path_or_model, onnx.ModelProto):
        return path_or_model
    # the structure is all that is checked: external weights stay on disk
    return onnx.load(str(path_or_model), load_external_data=False)


def _type_name(elem_type: int) -> str:
    import onnx

    return onnx.TensorProto.DataType.Name(elem_type)


class _Scope:
    """What is known about the tensors visible in one graph: constants and element types."""

    def __init__(self, graph, parent: "_Scope | None", types: dict[str, int]):
        self.constants: dict[str, object] = dict(parent.constants) if parent else {}
        self.types = dict(parent.types) if parent else {}
        self.types.update(types)
        for tensor in graph.initializer:
            self.constants[tensor.name] = tensor
            self.types[tensor.name] = tensor.data_type
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attribute in node.attribute:
                    if attribute.name == "value":
                        self.constants[node.output[0]] = attribute.t
                        self.types[node.output[0]] = attribute.t.data_type

    def value(self, name: str):
        """The constant's values as numpy, or None when the data lives outside the model (not loaded)."""
        from onnx import numpy_helper

        tensor = self.constants.get(name)
        if tensor is None or tensor.data_location == 1:  # EXTERNAL
            return None
        return numpy_helper.to_array(tensor)


def _inferred_types(model) -> dict[str, int]:
    """Element type of every value shape inference can reach (graph inputs, outputs, intermediates)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is a help for the type check, never a reason to fail it
        inferred = model
    graph = inferred.graph
    types = {}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    return types


def _attribute(node, name: str, default):
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            value = helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _where(node) -> str:
    return f"{node.op_type} node {node.name!r}" if node.name else f"{node.op_type} node (output {node.output[0]!r})"


def _check_node(node, scope: _Scope, table: dict) -> list[str]:
    operators = table["operators"]
    described = table["describes"].split(",")[0]
    if node.domain not in table["domains"]["supported"]:
        return [
            f"{_where(node)} is in domain {node.domain!r}: TensorRT's parser has no importer for it and no plugin "
            "of that name ships with TensorRT; export with moe_ops='plain' (default-domain ops only)"
        ]
    entry = operators.get(node.op_type)
    if entry is None:
        return [f"{_where(node)}: {node.op_type} is not in the table of the {described}"]
    if not entry["supported"]:
        return [f"{_where(node)}: the {described} does not import {node.op_type}"]
    problems = []
    for check in entry.get("checks", []):
        problem = _apply(check, node, scope)
        if problem:
            problems.append(f"{_where(node)}: {problem}")
    problems += _check_types(node, entry, scope)
    return problems


def _input(node, index: int) -> str | None:
    return node.input[index] if len(node.input) > index and node.input[index] else None


def _apply(check: dict, node, scope: _Scope) -> str | None:
    kind = check["check"]
    if kind == "constant_input":
        name = _input(node, check["input"])
        if name is not None and name not in scope.constants:
            return f"input {check['input']} ({name!r}) is computed at run time; {check['why']}"
    elif kind == "constant_below":
        name = _input(node, check["input"])
        value = scope.value(name) if name else None
        if value is not None and np.any(np.asarray(value) >= check["limit"]):
            return f"input {check['input']} is {np.asarray(value).tolist()}, TensorRT needs it below {check['limit']}"
    elif kind == "attribute_in":
        value = _attribute(node, check["attribute"], check["default"])
        if value not in check["allowed"]:
            return f"{check['attribute']}={value!r} is not supported (allowed: {', '.join(map(repr, check['allowed']))})"
    elif kind == "attribute_absent":
        present = [a.name for a in node.attribute if a.name in check["attributes"]]
        if present:
            return f"attribute {present[0]} is not supported"
    elif kind == "zero_input":
        name = _input(node, check["input"])
        if name is not None:
            value = scope.value(name)
            if value is None:
                return f"input {check['input']} ({name!r}) must be a constant zero"
            if np.any(np.asarray(value, dtype=np.float64) != 0):
                return f"input {check['input']} ({name!r}) must be zero (symmetric quantization)"
    elif kind == "refuse":
        return check["why"]
    else:
        raise ValueError(f"unknown check {kind!r} in {SUPPORT_FILE.name}")
    return None


def _check_types(node, entry: dict, scope: _Scope) -> list[str]:
    allowed = set(entry.get("types") or [])
    if not allowed:
        return []
    typed = entry.get("typed", {"input": 0})
    if "output" in typed:
        name = node.output[typed["output"]] if len(node.output) > typed["output"] else None
    else:
        name = _input(node, typed["input"])
    problems = []
    elem_type = scope.types.get(name) if name else None
    if elem_type:  # 0 = unknown: inference did not reach it
        type_name = _type_name(elem_type)
        if type_name not in allowed:
            problems.append(f"{_where(node)}: {type_name} input is not supported (TensorRT takes {', '.join(sorted(allowed))})")
    if typed.get("attribute_to"):
        target = _type_name(_attribute(node, "to", 0))
        if target not in allowed:
            problems.append(f"{_where(node)}: casting to {target} is not supported")
    return problems


def _graphs_of(node):
    from onnx import helper

    for attribute in node.attribute:
        value = helper.get_attribute_value(attribute)
        if hasattr(value, "node"):  # a GraphProto (If/Loop/Scan bodies)
            yield value
        elif isinstance(value, list):
            yield from (item for item in value if hasattr(item, "node"))


def _walk(graph, scope: _Scope, table: dict, seen: set) -> list[str]:
    problems = []
    for node in graph.node:
        for problem in _check_node(node, scope, table):
            if problem not in seen:
                seen.add(problem)
                problems.append(problem)
        for body in _graphs_of(node):
            problems += _walk(body, _Scope(body, scope, {}), table, seen)
    return problems


def check_onnx(path_or_model) -> list[str]:
    """Everything in the model that TensorRT's ONNX parser (the release the data file describes) would refuse.

    An empty list means every node's op, domain, input types and checkable
    restrictions are supported. The opset and the element types of the
    graph's inputs and initializers are checked too.
    """
    model = _load(path_or_model)
    table = support_table()
    problems = []
    low, high = table["opset"]["min"], table["opset"]["max"]
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and not low <= opset.version <= high:
            problems.append(f"opset {opset.version}: the {table['describes'].split(',')[0]} parses opsets {low} to {high}")
    supported_types = set(table["data_types"]["supported"])
    for tensor in model.graph.initializer:
        if _type_name(tensor.data_type) not in supported_types:
            problems.append(f"initializer {tensor.name!r} is {_type_name(tensor.data_type)}, which TensorRT does not support")
    for value in [*model.graph.input, *model.graph.output]:
        type_name = _type_name(value.type.tensor_type.elem_type)
        if type_name not in supported_types:
            problems.append(f"graph input/output {value.name!r} is {type_name}, which TensorRT does not support")
    scope = _Scope(model.graph, None, _inferred_types(model))
    return problems + _walk(model.graph, scope, table, set())


def operators_used(path_or_model) -> dict[str, int]:
    """{'domain::op' or 'op': count} over every node, subgraphs included (for reports and tests)."""
    counts: dict[str, int] = {}

    def visit(graph):
        for node in graph.node:
            key = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
            counts[key] = counts.get(key, 0) + 1
            for body in _graphs_of(node):
                visit(body)

    visit(_load(path_or_model).graph)
    return counts


# --- the decoder's inputs and outputs -----------------------------------------------------

TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids")


def _dims(value) -> list:
    """Each dimension as an int (static) or a str (symbolic; '' when unnamed)."""
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def decoder_io(path_or_model) -> dict:
    """The graph's interface as the TensorRT profiles see it.

    Returns {'layers': n, 'cache': {input name: [static dims between batch and past]...}, 'dtypes': {...}}:
    for each past_key_values.{i}.{key,value} the static head and width dims
    [heads, width] that every profile shape repeats.
    """
    model = _load(path_or_model)
    inputs = {value.name: value for value in model.graph.input}
    cache = {}
    for name, value in inputs.items():
        if name.startswith("past_key_values."):
            dims = _dims(value)
            cache[name] = [dims[1], dims[3]] if len(dims) == 4 else dims
    return {
        "inputs": {name: _dims(value) for name, value in inputs.items()},
        "outputs": {value.name: _dims(value) for value in model.graph.output},
        "dtypes": {value.name: _type_name(value.type.tensor_type.elem_type) for value in [*model.graph.input, *model.graph.output]},
        "cache": cache,
        "layers": len({name.split(".")[1] for name in cache}),
    }


def check_decoder_io(path_or_model) -> list[str]:
    """Problems that would keep the prefill/decode optimization profiles from covering the graph.

    The profiles fix batch to 1 and vary only the sequence, total and past
    lengths, so: the three token inputs are int64 [batch, sequence]; every
    past_key_values.{i}.key/value is [batch, heads, past, width] with static
    heads and width and a matching present.{i}.key/value output; logits is
    [batch, sequence, vocab] with a static vocab.
    """
    io = decoder_io(path_or_model)
    problems = []
    for name in TOKEN_INPUTS:
        dims = io["inputs"].get(name)
        if dims is None:
            problems.append(f"input {name} is missing")
        elif len(dims) != 2 or io["dtypes"][name] != "INT64":
            problems.append(f"input {name} must be INT64 [batch, sequence], found {io['dtypes'][name]} {dims}")
    for name in io["inputs"]:
        if name not in TOKEN_INPUTS and not name.startswith("past_key_values."):
            problems.append(f"input {name} is not one the TensorRT profiles know how to shape")
    if not io["cache"]:
        problems.append("no past_key_values.{i}.key/value inputs: the engine would have no KV cache for decoding")
    for name, static in io["cache"].items():
        dims = io["inputs"][name]
        if len(dims) != 4 or not all(isinstance(d, int) and d > 0 for d in static):
            problems.append(f"{name} must be [batch, heads, past, width] with static heads and width, found {dims}")
        present = name.replace("past_key_values.", "present.", 1)
        if present not in io["outputs"]:
            problems.append(f"{name} has no matching output {present}")
    logits = io["outputs"].get("logits")
    if logits is None or len(logits) != 3 or not isinstance(logits[2], int) or logits[2] <= 0:
        problems.append(f"output logits must be [batch, sequence, vocab] with a static vocab, found {logits}")
    return problems
