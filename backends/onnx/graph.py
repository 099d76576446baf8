"""A small graph builder over onnx.helper: nodes, weights and constants by name.

Every `op` call returns the name(s) of its output(s), so the lowering code
reads like the computation it writes. Weights may be stored in float16 and
are cast back to float32 where they are used: the graph computes in float32
either way, so an f16 artifact differs from f32 only by its rounded weights.

A graph given an ExternalData sink writes each large initializer to the .data
file the moment it is made and keeps only a reference to it, so building a
graph holds no more weights than the one being lowered.
"""

from __future__ import annotations

import math
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from moeexport.errors import MoeExportError

OPSET = 17  # TensorRT 10.x parses opsets up to 20 and ORT runs them all; 17 has everything used here
CONTRIB_DOMAIN = "com.microsoft"
INLINE_BYTES = 1024  # initializers up to this size stay in the graph (onnx.save_model's default size_threshold)
ALIGNMENT = 4096  # external tensors start on a page boundary, so a runtime can memory-map each in place


class ExternalData:
    """The .data file beside a graph: tensors are appended as raw little-endian bytes, each at an aligned offset."""

    def __init__(self, file: BinaryIO, location: str):
        self.file = file
        self.location = location  # the file's name as the graph refers to it, relative to the .onnx
        self.size = 0

    def tensor(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """Append `array` and return the initializer that points at it."""
        return self.stacked(name, [array])

    def stacked(self, name: str, parts) -> onnx.TensorProto:
        """Append a tensor given as consecutive slices of its first axis (an iterable of arrays: a stacked
        tensor [E, ...] an expert at a time, or one whole array), each written as soon as it is made."""
        offset = self.size + -self.size % ALIGNMENT
        self.file.write(bytes(offset - self.size))
        self.size, shape, dtype = offset, None, None
        for part in parts:
            stored = np.ascontiguousarray(part).astype(part.dtype.newbyteorder("<"), copy=False)
            self.file.write(stored.data)
            self.size += stored.nbytes
            shape = [*part.shape] if shape is None else [shape[0] + part.shape[0], *shape[1:]]
            dtype = part.dtype
        tensor = onnx.TensorProto(name=name, dims=shape, data_type=helper.np_dtype_to_tensor_dtype(dtype),
                                  data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.location), ("offset", offset), ("length", self.size - offset)):
            tensor.external_data.add(key=key, value=str(value))  # the keys onnx.external_data_helper reads
        return tensor


class Graph:
    def __init__(self, weight_dtype=np.float32, external: ExternalData | None = None):
        self.weight_dtype = weight_dtype
        self.external = external
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._constants: dict[tuple, str] = {}
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", name: str | None = None, **attributes):
        """Add one node; returns its output name, or a list of names when `outputs` > 1."""
        names = [name] if name and outputs == 1 else [self._name(op_type) for _ in range(outputs)]
        self.nodes.append(
            helper.make_node(op_type, list(inputs), names, name=self._name(f"n_{op_type}"), domain=domain, **attributes)
        )
        return names[0] if outputs == 1 else names

    def raw(self, name: str, array: np.ndarray) -> str:
        """An initializer stored exactly as given (integer codes, scales, tables)."""
        array = np.ascontiguousarray(array)
        if self.external is not None and array.nbytes > INLINE_BYTES:
            self.initializers.append(self.external.tensor(name, array))
        else:
            self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def raw_stack(self, name: str, count: int, part) -> str:
        """An initializer [count, ...] made one slice at a time (`part(i)` -> its i-th [...] slice): in an
        external graph each slice goes to the .data file as it is made, so the whole stack never exists."""
        first = part(0)
        if self.external is None or count * first.nbytes <= INLINE_BYTES:
            return self.raw(name, np.stack([first, *(part(i) for i in range(1, count))]))

        def slices():
            yield first[None]
            for i in range(1, count):
                yield part(i)[None]

        self.initializers.append(self.external.stacked(name, slices()))
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        """A float32 weight as the graph uses it, stored in the artifact's weight dtype."""
        return self.as_float(self.raw(name, np.asarray(array, dtype=self.weight_dtype)))

    def weight_stack(self, name: str, count: int, part) -> str:
        """`weight` of a stack [count, ...] made one slice at a time (see raw_stack)."""
        return self.as_float(self.stored_stack(name, count, part))

    def stored_stack(self, name: str, count: int, part) -> str:
        """A stack [count, ...] in the artifact's weight dtype, made one slice at a time (see raw_stack), for
        `as_float` where it is used."""
        return self.raw_stack(name, count, lambda i: np.asarray(part(i), dtype=self.weight_dtype))

    def as_float(self, stored: str) -> str:
        return stored if self.weight_dtype == np.float32 else self.op("Cast", stored, to=TensorProto.FLOAT)

    def const(self, values, dtype=np.int64) -> str:
        """A small constant, shared by every node that asks for the same values."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self.raw(self._name("const"), array)
        return self._constants[key]

    def if_(self, condition: str, then_branch, else_branch) -> str:
        """One If node on a one-element bool `condition`; each branch is a function that adds its nodes (which
        may use any name of the graph so far) and returns its float output's name."""
        branches = []
        for label, build in (("then", then_branch), ("else", else_branch)):
            outer, self.nodes = self.nodes, []
            try:
                output = build()
                branches.append(helper.make_graph(self.nodes, self._name(label), [],
                                                  [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)]))
            finally:
                self.nodes = outer
        return self.op("If", condition, then_branch=branches[0], else_branch=branches[1])

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, source: str, name: str, elem_type: int, shape: list) -> None:
        self.nodes.append(helper.make_node("Identity", [source], [name], name=self._name("n_out")))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def model(self, graph_name: str, doc: str, uses_contrib: bool) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        if uses_contrib:
            opsets.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="moeexport", doc_string=doc)
        model.ir_version = 8  # readable by every onnxruntime >= 1.14 and TensorRT 10's parser
        return model

    # -- the pieces every layer uses ---------------------------------------------------------

    def linear(self, x: str, name: str, weight, bias=None) -> str:
        """x @ W.T (+ b) for an nn.Linear weight [out, in]."""
        y = self.op("MatMul", x, self.weight(f"{name}.weight", _numpy(weight).T))
        return self.op("Add", y, self.weight(f"{name}.bias", _numpy(bias))) if bias is not None else y

    def rms_norm(self, x: str, name: str, weight, eps: float) -> str:
        """HF RMSNorm: x / sqrt(mean(x^2) + eps) * w, over the last axis (no w: a norm without a weight)."""
        variance = self.op("ReduceMean", self.op("Mul", x, x), axes=[-1], keepdims=1)
        normed = self.op("Div", x, self.op("Sqrt", self.op("Add", variance, self.const(eps, np.float32))))
        return normed if weight is None else self.op("Mul", normed, self.weight(f"{name}.weight", _numpy(weight)))

    def silu(self, x: str) -> str:
        return self.op("Mul", x, self.op("Sigmoid", x))

    def gelu_tanh(self, x: str) -> str:
        """0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))): transformers' gelu_pytorch_tanh."""
        cubic = self.op("Mul", self.op("Mul", self.op("Mul", x, x), x), self.const(0.044715, np.float32))
        inner = self.op("Mul", self.op("Add", x, cubic), self.const(math.sqrt(2 / math.pi), np.float32))
        half = self.op("Mul", x, self.const(0.5, np.float32))
        return self.op("Mul", half, self.op("Add", self.op("Tanh", inner), self.const(1.0, np.float32)))

    def activation(self, x: str, name: str) -> str:
        """transformers' ACT2FN `name` of the activations the exporter lowers (silu, gelu_pytorch_tanh)."""
        if name == "gelu_pytorch_tanh":
            return self.gelu_tanh(x)
        if name != "silu":
            raise MoeExportError(f"the ONNX exporter lowers silu and gelu_pytorch_tanh MLPs, not {name}")
        return self.silu(x)

    def glu_mlp(self, x: str, name: str, mlp, activation: str) -> str:
        """down(act(gate(x)) * up(x)) for a dense MLP module with gate_proj / up_proj / down_proj."""
        gate = self.linear(x, f"{name}.gate_proj", mlp.gate_proj.weight)
        up = self.linear(x, f"{name}.up_proj", mlp.up_proj.weight)
        return self.linear(self.op("Mul", self.activation(gate, activation), up), f"{name}.down_proj",
                           mlp.down_proj.weight)

    def swiglu_mlp(self, x: str, name: str, mlp) -> str:
        """down(silu(gate(x)) * up(x)) for a dense MLP module with gate_proj / up_proj / down_proj."""
        gate = self.linear(x, f"{name}.gate_proj", mlp.gate_proj.weight)
        up = self.linear(x, f"{name}.up_proj", mlp.up_proj.weight)
        return self.linear(self.op("Mul", self.silu(gate), up), f"{name}.down_proj", mlp.down_proj.weight)


def _numpy(tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy() if hasattr(tensor, "detach") else np.asarray(tensor)
