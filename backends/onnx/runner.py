"""Run an exported decoder in ONNX Runtime behind moeexport's runner interface.

The KV cache is the graph's own: `present.*` outputs of one step are fed back
as `past_key_values.*` of the next (the loop is backends/decoding.py). The CPU
execution provider is used unless onnxruntime-gpu offers CUDA (or `providers`
says otherwise).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moeexport.backends.decoding import DecoderLoop, TokenBytes, experts_read
from moeexport.errors import MoeExportError
from moeexport.threads import default_threads


class OnnxRunner(DecoderLoop):
    def __init__(self, path: str | Path, context: int = 512, providers: list[str] | None = None,
                 threads: int | None = None):
        from moeexport.backends.onnx.writer import require_moe_kernels

        require_moe_kernels()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.log_severity_level = 3
        available = ort.get_available_providers()
        providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as error:  # onnxruntime raises its own exception types, all with a readable message
            raise MoeExportError(f"onnxruntime cannot load {path}: {str(error).splitlines()[0]}") from None
        graph_context = int(self.session.get_modelmeta().custom_metadata_map.get("moeexport.context", context))
        self.context = self.max_prompt = min(context, graph_context)
        self.providers = self.session.get_providers()
        self.cache_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _forward(self, ids: list[int], past: dict[str, np.ndarray] | None, past_length: int):
        """[len(ids), vocab] logits after `past_length` cached positions, and the cache that follows."""
        if past is None:
            past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32) for i in self.cache_inputs}
        feeds = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, past_length + len(ids)), dtype=np.int64),
            "position_ids": np.arange(past_length, past_length + len(ids), dtype=np.int64)[None],
            **past,
        }
        results = dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        present = {name.replace("present.", "past_key_values."): value
                   for name, value in results.items() if name.startswith("present.")}
        return results["logits"][0], present

    def profile(self, prompt, new_tokens: int = 64) -> dict:
        return super().profile(prompt, new_tokens) | {"providers": self.providers}


MOE_OPS = ("MoE", "QMoE")  # com.microsoft: inputs 0 and 1 are the tokens and router logits, every later one [E, ...]


def bytes_per_token(path: str | Path) -> TokenBytes:
    """The weight bytes ONNX Runtime reads to decode one token of the graph at `path`: its initializers (external
    data included, by their recorded lengths; no weight is read), at their stored types but for widened f16.

    A com.microsoft MoE / QMoE node reads k (its `k` attribute) of the E experts of each expert input:
    k / E of its bytes. A plain MoE graph (TopK routing, no MoE node) computes every expert, so its stacked
    expert weights (the 3-D MatMul operands) are read whole, unless an If decodes one token by Gathering its
    k experts from the stacks (plain-routed): then k / E of them, at their stored type (the gathered copy's
    write and read are not counted). A table only ever gathered along its first axis (the token embedding,
    the RoPE tables) is read one row per token; everything else is read whole.
    Weights stored in f16 are followed through the Cast that widens them, and counted at the widened type:
    ONNX Runtime folds a Cast of an initializer when it loads the graph, so it holds and reads them as float32
    (measured: an f16 graph of one 8x7B-width layer holds 6.6 GB of f32 weights where its file has 3.4 GB).
    """
    import math

    import onnx
    from onnx import helper, numpy_helper

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as error:  # a damaged or foreign file: onnx's message, on one line
        raise MoeExportError(f"{path} is not a readable ONNX graph ({str(error).splitlines()[0]})") from None
    initializers = {tensor.name: tensor for tensor in graph.initializer}

    def stored_bytes(tensor) -> int:
        external = {entry.key: entry.value for entry in tensor.external_data}
        if tensor.data_location == onnx.TensorProto.EXTERNAL and "length" in external:
            return int(external["length"])
        count = math.prod(tensor.dims)
        if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            return (count + 1) // 2
        return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize

    producers = {output: node for node in graph.node for output in node.output}

    def source(name: str) -> str | None:
        """The initializer a node input is, through the Casts that widen stored f16 weights."""
        while name not in initializers and name in producers and producers[name].op_type == "Cast":
            name = producers[name].input[0]
        return name if name in initializers else None

    def attribute(node, name: str, default):
        return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)

    read = {name: stored_bytes(tensor) for name, tensor in initializers.items()}  # bytes read per token
    for node in graph.node:  # folded at load: the runtime reads the widened copy
        if node.op_type == "Cast" and node.input[0] in initializers:
            widened = helper.tensor_dtype_to_np_dtype(attribute(node, "to", onnx.TensorProto.FLOAT)).itemsize
            read[node.input[0]] = math.prod(initializers[node.input[0]].dims) * widened
    kind = dict.fromkeys(initializers, "other")
    moe_nodes = [node for node in graph.node if node.op_type in MOE_OPS and node.domain == "com.microsoft"]
    pairs = set()
    for node in moe_nodes:
        k = attribute(node, "k", 1)
        for name in filter(None, map(source, node.input[2:])):
            count = initializers[name].dims[0]
            read[name], kind[name] = read[name] * min(k, count) // count, "routed_experts"
            pairs.add((min(k, count), count))
    plain = not moe_nodes and any(node.op_type == "TopK" for node in graph.node)
    if plain:
        folder = str(Path(path).parent)  # where a k stored as external data is
        ks = [int(numpy_helper.to_array(initializers[name], folder).ravel()[0]) for node in graph.node
              if node.op_type == "TopK" and (name := source(node.input[1])) is not None]
        for node in (node for node in graph.node if node.op_type == "MatMul"):
            for name in map(source, node.input):
                if name is not None and len(initializers[name].dims) == 3:  # [E, in, out]: every expert at once
                    kind[name] = "routed_experts"
                    pairs.update((k, initializers[name].dims[0]) for k in ks[:1])
        decoding = [inner for node in graph.node if node.op_type == "If"
                    for inner in attribute(node, "then_branch", None).node]
        for name in {source(node.input[0]) for node in decoding if node.op_type == "Gather"} - {None}:
            if len(initializers[name].dims) == 3 and ks:  # [E, in, out]: a token's k experts gathered
                count = initializers[name].dims[0]
                read[name], kind[name] = read[name] * min(ks[0], count) // count, "routed_experts"
                pairs.add((min(ks[0], count), count))
                plain = False
    uses: dict[str, list] = {}
    for node in (node for node in graph.node if node.op_type != "Cast"):  # a widened weight's use is past its Cast
        for position, name in enumerate(node.input):
            if (initializer := source(name)) is not None:
                uses.setdefault(initializer, []).append((node, position))
    rows = 0
    for name, nodes in uses.items():
        if kind[name] == "other" and all(node.op_type == "Gather" and position == 0 and attribute(node, "axis", 0) == 0
                                         for node, position in nodes):
            read[name], kind[name] = read[name] // initializers[name].dims[0], "lookups"
            if any(node.input[1] == "input_ids" for node, _ in nodes):
                rows = initializers[name].dims[0]
    head = _head(graph, producers, source)
    if head is not None and kind[head] == "other":
        kind[head] = "head"
    parts = dict.fromkeys(("routed_experts", "head", "lookups", "other"), 0)
    for name, count in read.items():
        parts[kind[name]] += count
    return TokenBytes(**parts, experts_read=experts_read(pairs, every=plain), embedding_rows=rows)


def _head(graph, producers: dict, source) -> str | None:
    """The initializer of the projection that makes the graph's `logits` (through Identity, Add, Reshape)."""
    name = "logits"
    while name in producers:
        node = producers[name]
        if node.op_type in ("MatMul", "Gemm"):
            return source(node.input[1])
        if node.op_type not in ("Identity", "Add", "Reshape", "Cast"):
            return None
        name = node.input[0]
    return None
