"""Read a MoE GGUF back: its config, tokenizer and weights, one tensor (or one expert) at a time.

The inverse of writer.py, for the hosts it writes (architectures.py) and for
files of the same hosts that llama.cpp's own converter writes:
- The family comes from `general.architecture`, through architectures.py's
  table read backwards. A padded host (step35, hy_v3) is read only from
  files moeexport wrote, whose `moeexport.layers` says which experts are real
  and which layers lost their MoE sublayer: a stock file of such a host is
  another model family.
- The config comes from the host's metadata keys, under canonical names that the
  family's adapter spells as its transformers config (`MoEAdapter.config_values`).
- The tokenizer comes from the `tokenizer.ggml.*` metadata through transformers'
  GGUF tokenizer converter.
- Weights are read with plain file reads (no memory map: a mapping keeps every
  page it touched in this process's resident memory) and dequantized by ggml's own
  `to_float` (bit for bit what gguf-py computes, about ten times as fast),
  K-quants included. Experts are the outer axis of the `*_exps` stacks, so one
  expert's bytes are one contiguous range of the file.

`GGUFCheckpoint` serves those weights under the model's parameter names to a
moeexport.streaming.LayerStream, undoing the writer's layout changes (the q/k
row permutation of NORM RoPE hosts, latent attention's k_b / v_b split, the
padding experts, the gate / up split of interleaved, transposed expert stacks);
the writer carries tensors of the file by the stream's record (MXFP4 experts too).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeexport.backends.gguf import ggml
from moeexport.backends.gguf.architectures import ARCHITECTURES, host_named
from moeexport.backends.gguf.checks import check_mapping, check_model, prescan
from moeexport.backends.gguf.names import LAYERS_KEY
from moeexport.errors import MoeExportError
from moeexport.memory import release_freed_memory
from moeexport import reads

DEQUANTIZE_ROWS = 512  # rows dequantized at once


def per_expert(name: str) -> bool:
    """Whether GGUF tensor `name` has one slice per routed expert (a stack of experts, or the router's rows)."""
    return "_exps." in name or name.endswith("ffn_gate_inp.weight")


def host_families() -> dict[str, str]:
    """general.architecture -> the HF model_type it hosts (padded hosts included); where several families share a
    host, the first in the table, the one whose files read_config reads."""
    hosts = {}
    for model_type, architecture in ARCHITECTURES.items():
        hosts.setdefault(architecture.name, model_type)
        if architecture.padded_host is not None:
            hosts.setdefault(architecture.padded_host.name, model_type)
    return hosts


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's data lies in the file, and in what form."""

    name: str
    shape: tuple[int, ...]  # numpy order, outermost axis first, in elements
    qtype: int  # ggml type id
    offset: int  # absolute offset of its data in the file
    nbytes: int

    def outer_bytes(self) -> int:
        """Bytes of one slice along the outermost axis (an expert of a stack, a row of a matrix)."""
        return self.nbytes // self.shape[0]


class GGUFFile:
    """A GGUF file's metadata and tensor table; tensor data is read on request."""

    def __init__(self, path: str | Path):
        gguf = _gguf()
        self.path = Path(path)
        if not self.path.is_file():
            raise MoeExportError(f"{self.path} is not a file")
        self.array_lengths = prescan(self.path)  # bounded: before gguf-py makes a view per array element
        try:
            reader = gguf.GGUFReader(self.path)
        except Exception as error:  # gguf-py raises ValueError/struct errors on a damaged file
            raise MoeExportError(f"{self.path} is not a readable GGUF file ({error}); fetch or write it again") from None
        self.metadata = {}
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or (len(field.data) > 64 and name.startswith("tokenizer.")):
                continue  # the header's own fields and the vocabulary (read by the tokenizer converter)
            self.metadata[name] = field.contents()
        self.tensors = {
            t.name: StoredTensor(t.name, tuple(int(n) for n in reversed(t.shape)), int(t.tensor_type),
                                 int(t.data_offset), int(t.n_bytes))
            for t in reader.tensors
        }
        del reader  # drops its memory map
        self.architecture = self.metadata.get("general.architecture")

    def value(self, key: str, default=None):
        """`key` under the host's prefix ("expert_count" is "<arch>.expert_count")."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def raw(self, name: str, start: int = 0, count: int | None = None) -> np.ndarray:
        """The stored bytes of slices [start, start + count) along the tensor's outermost axis, uint8
        [count, bytes per slice]."""
        tensor = self.tensors[name]
        count = tensor.shape[0] - start if count is None else count
        size = tensor.outer_bytes()
        return self._bytes(name, tensor.offset + start * size, count * size).reshape(count, size)

    def _bytes(self, name: str, offset: int, size: int) -> np.ndarray:
        with open(self.path, "rb") as handle:
            handle.seek(offset)
            data = np.fromfile(handle, np.uint8, size)
        reads.count(data.size)
        if data.size != size:
            raise MoeExportError(f"{self.path} ends inside tensor {name}: the file is truncated; fetch it again")
        return data

    @staticmethod
    def _values(raw: np.ndarray, qtype: int, out: np.ndarray | None = None) -> np.ndarray:
        """float32 rows from stored rows (uint8 [rows, bytes per row]), written into `out` when given."""
        gguf = _gguf()
        qtype = gguf.GGMLQuantizationType(qtype)
        if qtype == gguf.GGMLQuantizationType.F32:
            values = raw.view(np.float32)
        elif qtype == gguf.GGMLQuantizationType.F16:
            values = raw.view(np.float16)
        else:  # ggml's own dequantizer: llama.cpp's values for every type it stores
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            shape = (len(raw), raw.shape[1] // size * block)
            return ggml.dequantize_rows(qtype, raw, np.empty(shape, np.float32) if out is None else out)
        if out is None:
            return values.astype(np.float32)
        out[...] = values
        return out

    def matrix_rows(self, name: str, index: int, first: int, count: int) -> np.ndarray:
        """float32 rows [first, first + count) of matrix `index` of a stacked tensor [E, rows, columns]."""
        tensor = self.tensors[name]
        row_bytes = tensor.outer_bytes() // tensor.shape[1]
        offset = tensor.offset + index * tensor.outer_bytes() + first * row_bytes
        raw = self._bytes(name, offset, count * row_bytes).reshape(count, row_bytes)
        return self._dequantize_rows(raw, tensor.qtype, np.empty((count, tensor.shape[-1]), np.float32))

    def dequantized(self, name: str, start: int = 0, count: int | None = None,
                    out: np.ndarray | None = None) -> np.ndarray:
        """float32 values of slices [start, start + count) along the outermost axis (all of them by default),
        written into `out` when given."""
        tensor = self.tensors[name]
        count = tensor.shape[0] - start if count is None else count
        if len(tensor.shape) == 1:
            return self._values(self.raw(name, start, count).reshape(1, -1), tensor.qtype).reshape(count)
        values = np.empty((count, *tensor.shape[1:]), np.float32) if out is None else out
        rows = values.reshape(-1, tensor.shape[-1])
        raw = self.raw(name, start, count).reshape(rows.shape[0], -1)  # stored rows are small (4-8 bits)
        self._dequantize_rows(raw, tensor.qtype, rows)
        return values

    def _dequantize_rows(self, raw: np.ndarray, qtype: int, rows: np.ndarray) -> np.ndarray:
        """Stored rows `raw` dequantized into float32 `rows`, a block at a time (the reads' temporaries handed
        back to the system afterwards)."""
        for first in range(0, rows.shape[0], DEQUANTIZE_ROWS):
            self._values(raw[first:first + DEQUANTIZE_ROWS], qtype, out=rows[first:first + DEQUANTIZE_ROWS])
        release_freed_memory()
        return rows


def _gguf():
    try:
        import gguf
    except ImportError:
        raise MoeExportError("reading a GGUF needs gguf-py: pip install 'moeexport[gguf]'") from None
    return gguf


# --- the model the file describes ------------------------------------------------------


def read_config(file: "GGUFFile | str | Path"):
    """The transformers config of the model a MoE GGUF holds (with name_or_path the file itself)."""
    from transformers import AutoConfig

    from moeexport.adapters import supported_families
    from moeexport.adapters.declaration import ExpertLayout, FFNWidths, LatentAttention, ModelConfig, Routing

    file = file if isinstance(file, GGUFFile) else GGUFFile(file)
    model_type = _model_type(file)
    if file.value("expert_count") in (None, 0):
        raise MoeExportError(f"{file.path} holds a dense {file.architecture} model, not a mixture of experts")
    check_model(file)
    architecture = ARCHITECTURES[model_type]
    if (file.value("expert_gating_func") == _gguf().ExpertGatingFuncType.SIGMOID and not architecture.routing_keys
            and not architecture.sigmoid_gated):
        # a host that routes by softmax whatever the file says
        raise MoeExportError(f"{file.path} routes by sigmoid scores (with a selection bias or expert groups), "
                             "which moeexport does not read from a GGUF yet: start from the HF checkpoint")
    layers = trunk_layers(file)
    tensors = file.tensors
    expert_width = _expert_width(file)
    shared_width = file.value("expert_shared_feed_forward_length", 0) or 0
    latent = None
    heads = file.value("attention.head_count")
    head_dim = file.value("attention.key_length") or file.value("embedding_length") // heads
    kv_heads = file.value("attention.head_count_kv", heads)
    if architecture.latent_attention:
        rope_dim = file.value("rope.dimension_count")
        latent = LatentAttention(
            q_lora_rank=file.value("attention.q_lora_rank"), kv_lora_rank=file.value("attention.kv_lora_rank"),
            qk_nope_head_dim=file.value("attention.key_length_mla") - rope_dim, qk_rope_head_dim=rope_dim,
            v_head_dim=file.value("attention.value_length_mla"))
        head_dim, kv_heads = rope_dim, heads  # HF's MLA configs: head_dim is the rotated width; one kv head per head
    rotary_dim = file.value("rope.dimension_count") if architecture.rope_dims_partial else None
    specs = layer_specs(file)
    dense = [index for index, spec in enumerate(specs) if spec.kind == "dense"]
    canonical = ModelConfig(
        model_type=model_type,
        name_or_path=str(file.path),
        vocab_size=tensors["token_embd.weight"].shape[0],
        hidden_size=file.value("embedding_length"),
        intermediate_size=file.value("feed_forward_length"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        context_length=file.value("context_length"),
        rms_norm_eps=float(file.value("attention.layer_norm_rms_epsilon")),
        rope_theta=float(file.value("rope.freq_base", 10000.0)),
        hidden_act="silu",
        num_experts=max(spec.num_experts for spec in specs),
        top_k=file.value("expert_used_count"),
        routing=Routing(renormalize=architecture.renormalizes
                        if not (architecture.latent_attention or architecture.routing_keys)
                        else bool(file.value("expert_weights_norm", False)),
                        scale=float(file.value("expert_weights_scale", 1.0)),
                        groups=file.value("expert_group_count", 1) or 1,
                        top_groups=file.value("expert_group_used_count", 1) or 1),
        shared_expert_count=file.value("expert_shared_count", 1 if shared_width else 0),
        clip_qkv=file.value("attention.clamp_kqv"),
        latent=latent,
        rotary_dim=rotary_dim if rotary_dim and rotary_dim != head_dim else None,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        # the host's fixed clamped SwiGLU (gpt-oss)
        experts=ExpertLayout(alpha=architecture.clamped_swiglu[0], limit=architecture.clamped_swiglu[1])
        if architecture.clamped_swiglu else ExpertLayout(),
        **_sliding_window(file, architecture, layers),
        rope_scaling=_yarn(file, architecture) if architecture.yarn else {},
    )
    widths = FFNWidths(expert_width, shared_width, tuple(dense))
    values = supported_families()[model_type].config_values(canonical, layers, widths, tied="output.weight" not in tensors)
    special = {key: file.metadata.get(f"tokenizer.ggml.{name}")
               for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                                 ("pad_token_id", "padding_token_id"))}
    config = AutoConfig.for_model(**values, **{k: v for k, v in special.items() if v is not None})
    config.name_or_path = str(file.path)
    return config


def _sliding_window(file: GGUFFile, architecture, layers: int) -> dict:
    """ModelConfig's sliding_layers and sliding_window as the host reads them: the window, and the file's
    per-layer pattern or else the host's own (each `sliding_period`-th layer attends fully)."""
    window = file.value("attention.sliding_window")
    if not architecture.sliding_period or not window:
        return {}
    pattern = file.value("attention.sliding_window_pattern")
    if pattern is None:
        pattern = [index % architecture.sliding_period < architecture.sliding_period - 1 for index in range(layers)]
    if len(pattern) != layers:
        raise MoeExportError(f"{file.path}: {file.architecture}.attention.sliding_window_pattern lists "
                             f"{len(pattern)} layers for block_count {layers}: the file was edited; write it again")
    return {"sliding_layers": tuple(bool(slides) for slides in pattern), "sliding_window": int(window)}


def _yarn(file: GGUFFile, architecture) -> dict:
    """The file's YaRN RoPE scaling as transformers' rope_parameters (without rope_theta); {} without it.
    llama.cpp rounds YaRN's correction range to whole dimensions, which transformers does with truncate: true."""
    if file.value("rope.scaling.type") != "yarn":
        return {}
    keys = {"factor": "rope.scaling.factor", "original_max_position_embeddings": "rope.scaling.original_context_length",
            "beta_fast": "rope.scaling.yarn_beta_fast", "beta_slow": "rope.scaling.yarn_beta_slow",
            "attention_factor": "rope.scaling.yarn_attn_factor"}
    values = {name: file.value(key) for name, key in keys.items() if file.value(key) is not None}
    if "factor" not in values or "original_max_position_embeddings" not in values:
        raise MoeExportError(f"{file.path} scales RoPE by YaRN without {file.architecture}.rope.scaling.factor and "
                             ".original_context_length: the file is incomplete; write it again")
    if architecture.yarn_mscale and file.value("rope.scaling.yarn_log_multiplier"):  # 0.1 x mscale_all_dim
        values["mscale"] = values["mscale_all_dim"] = float(np.float32(file.value("rope.scaling.yarn_log_multiplier")
                                                                       / np.float32(0.1)))
    return {"rope_type": "yarn", **values, "truncate": True}


def _model_type(file: GGUFFile) -> str:
    hosts = host_families()
    model_type = hosts.get(file.architecture)
    if model_type is None:
        raise MoeExportError(f"{file.path}: moeexport reads GGUFs of the hosts it writes "
                             f"({', '.join(sorted(hosts))}), not {file.architecture!r}")
    architecture = ARCHITECTURES[model_type]
    if architecture.unread:
        raise MoeExportError(f"{file.path}: moeexport does not read {file.architecture} GGUFs yet (their "
                             f"{architecture.unread}); build from the Hugging Face checkpoint instead")
    if file.architecture != architecture.name and LAYERS_KEY not in file.metadata:
        raise MoeExportError(f"{file.path} is a stock {file.architecture} model, which moeexport does not read; "
                             f"it reads {file.architecture} files only as the padded host of its own exports")
    return _family_by_gating(file, model_type)


def _family_by_gating(file: GGUFFile, model_type: str) -> str:
    """Of the families sharing the file's host, the one its expert_gating_func names (architectures.py's
    sigmoid_gated); among several, the one whose tokenizer.ggml.pre the writer gives it (those the table puts on
    one host compute alike: only the config's model_type differs), else the first."""
    sharing = [name for name, host in ARCHITECTURES.items() if host.name == file.architecture]
    if len(sharing) == 1:
        return model_type
    sigmoid = file.value("expert_gating_func") == _gguf().ExpertGatingFuncType.SIGMOID
    gated = [name for name in sharing if ARCHITECTURES[name].sigmoid_gated == sigmoid] or [model_type]
    pre = file.metadata.get("tokenizer.ggml.pre")
    return next((name for name in gated if ARCHITECTURES[name].bpe_pre == pre), gated[0])


def _expert_width(file: GGUFFile) -> int:
    """The routed experts' ffn width, from the first expert stack (every expert has it)."""
    stack = next((t for name, t in file.tensors.items() if name.endswith("ffn_down_exps.weight")), None)
    if stack is None:
        raise MoeExportError(f"{file.path} has no expert tensors (ffn_down_exps): it is not a MoE GGUF")
    return stack.shape[-1]


def trunk_layers(file: GGUFFile) -> int:
    """The decoder layers: block_count less any next-token-prediction blocks stored after them (llama.cpp's
    converter writes GLM-4.5's; transformers' model has none, and moeexport reads none)."""
    return file.value("block_count") - (file.value("nextn_predict_layers", 0) or 0)


def layer_specs(file: GGUFFile) -> list:
    """Each layer's LayerSpec: as moeexport recorded it, else every layer MoE after the leading dense ones."""
    from moeexport.adapters import LayerSpec

    layers = trunk_layers(file)
    if LAYERS_KEY in file.metadata:
        specs = [LayerSpec(**spec) for spec in json.loads(file.metadata[LAYERS_KEY])]
        if len(specs) != layers:
            raise MoeExportError(f"{file.path}: {LAYERS_KEY} lists {len(specs)} layers for block_count {layers}: "
                                 "the file was edited; write it again")
        return specs
    experts, top_k = file.value("expert_count"), file.value("expert_used_count")
    leading = file.value("leading_dense_block_count", 0) or 0
    shared = bool(file.value("expert_shared_feed_forward_length", 0))
    return [LayerSpec("dense") if index < leading else LayerSpec("moe", experts, top_k, shared)
            for index in range(layers)]


def load_tokenizer(path: str | Path):
    """The tokenizer the file's `tokenizer.ggml.*` metadata describes (transformers' GGUF converter)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    try:
        architecture, vocabulary, settings = get_gguf_tokenizer(str(path))
        backend, _ = convert_gguf_tokenizer(architecture, vocabulary)
    except (KeyError, ValueError) as error:
        raise MoeExportError(f"cannot build a tokenizer from {path}'s metadata: {error}") from None
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{k: v for k, v in settings.items() if v is not None})


# --- weights under the model's parameter names ----------------------------------------


@dataclass(frozen=True)
class Source:
    """Where one model parameter comes from in the file: a tensor, or several joined, undone as stored."""

    tensors: tuple[str, ...]  # GGUF names; gate_up_proj joins ffn_gate_exps and ffn_up_exps along the rows
    permute_heads: int = 0  # llama's q/k rows: undo the writer's interleaving for this many heads
    latent_heads: int = 0  # latent attention's kv_b_proj: join k_b (transposed back) and v_b per head
    experts: int | None = None  # real experts of a padded stack or router (None: all of it); pads follow
    shape: tuple[int, ...] = ()  # the parameter's shape
    interleaved: bool = False  # joined tensors alternate (gpt-oss's gate_up: a gate row, then an up row)
    transposed: bool = False  # the parameter holds each expert's matrix transposed (applied as x @ W: gpt-oss)


class GGUFCheckpoint:
    """A GGUF file's tensors under the model's parameter names, dequantized to float32 (a LayerStream's reads).

    Built on the meta-device skeleton of the model `read_config` describes; the
    mapping walks that skeleton's views, so it holds every family's names.
    """

    def __init__(self, model, file: GGUFFile):
        from moeexport.adapters import adapter_for
        from moeexport.adapters.surgery import get_path
        from moeexport.backends.gguf.names import DENSE_FFN, ROUTED_FFN, SHARED_FFN, TensorNames

        self.file = file
        self.sources: dict[str, Source] = {}
        names = TensorNames(_gguf(), file.architecture)
        adapter = adapter_for(model.config)
        # a transposed expert layout (gpt-oss) is read an expert matrix at a time, in the model's layout: reads in
        # row blocks compute untransposed experts without biases
        self.reads_in_blocks = not adapter.expert_layout(model.config).transposed
        config = adapter.model_config(model.config)
        module_names = {id(module): name for name, module in model.named_modules()}
        host = host_named(config.model_type, file.architecture)
        permute = host.permute_qk

        def add(module, kind, *, block=None, parameter="weight", suffix=".weight", **how):
            name = f"{module_names[id(module)]}.{parameter}"
            gguf_name = names(kind, block, suffix)
            if gguf_name in file.tensors:
                self.sources[name] = Source((gguf_name,), shape=tuple(getattr(module, parameter).shape), **how)

        around = adapter.model_view(model)
        add(around.embeddings, "TOKEN_EMBD")
        add(around.final_norm, "OUTPUT_NORM")
        add(around.output, "OUTPUT")
        for view, spec in zip(adapter.layer_views(model), layer_specs(file)):
            block = view.index
            add(view.attention_norm, "ATTN_NORM", block=block)
            self._attention(add, view, config, block, permute)
            if view.kind == "dropped":
                continue
            add(view.ffn_norm, host.ffn_norm, block=block)
            if view.kind == "dense":
                for kind, projection in zip(DENSE_FFN, _mlp(view.ffn)):
                    add(projection, kind, block=block)
                continue
            add(view.router, "FFN_GATE_INP", block=block, experts=spec.num_experts)
            if getattr(view.router, "bias", None) is not None:  # gpt-oss's, -1e9 on any pads that follow
                add(view.router, "FFN_GATE_INP", block=block, parameter="bias", suffix=".bias",
                    experts=spec.num_experts)
            if adapter.selection_bias is not None:  # ours [E] (pads after the real experts); the converter's [1, E]
                owner, _, parameter = f"{adapter.router}.{adapter.selection_bias}".rpartition(".")
                bias = names("FFN_EXP_PROBS_B", block, host.selection_bias_suffix)
                experts = spec.num_experts if bias in file.tensors and len(file.tensors[bias].shape) == 1 else None
                add(get_path(view.ffn, owner), "FFN_EXP_PROBS_B", block=block, parameter=parameter,
                    suffix=host.selection_bias_suffix, experts=experts)
            if view.experts is not None:
                stem = module_names[id(view.experts)]
                layout = view.layout
                gate, up, down = (names(kind, block) for kind in ROUTED_FFN)
                self.sources[f"{stem}.gate_up_proj"] = Source(
                    (gate, up), experts=spec.num_experts, shape=tuple(view.experts.gate_up_proj.shape),
                    interleaved=layout.interleaved, transposed=layout.transposed)
                self.sources[f"{stem}.down_proj"] = Source((down,), experts=spec.num_experts,
                                                           shape=tuple(view.experts.down_proj.shape),
                                                           transposed=layout.transposed)
                if layout.biases:  # [E, 2 * ffn] joined as the weights' rows are, and [E, hidden]
                    gate, up, down = (names(kind, block, ".bias") for kind in ROUTED_FFN)
                    self.sources[f"{stem}.gate_up_proj_bias"] = Source(
                        (gate, up), experts=spec.num_experts, shape=tuple(view.experts.gate_up_proj_bias.shape),
                        interleaved=layout.interleaved)
                    self.sources[f"{stem}.down_proj_bias"] = Source(
                        (down,), experts=spec.num_experts, shape=tuple(view.experts.down_proj_bias.shape))
            for shared in view.shared_experts:
                for kind, projection in zip(SHARED_FFN, _mlp(shared)):
                    add(projection, kind, block=block)
            if view.shared_expert_gate is not None:
                add(view.shared_expert_gate, "FFN_GATE_INP_SHEXP", block=block)
        check_mapping(file, self.sources, {name: tuple(tensor.shape)
                                           for name, tensor in model.state_dict(keep_vars=True).items()})

    @staticmethod
    def _attention(add, view, config, block: int, permute: bool) -> None:
        attention = view.attention
        if config.latent is not None:
            if config.latent.q_lora_rank is None:
                add(attention.q_proj, "ATTN_Q", block=block)
            else:
                add(attention.q_a_proj, "ATTN_Q_A", block=block)
                add(attention.q_a_layernorm, "ATTN_Q_A_NORM", block=block)
                add(attention.q_b_proj, "ATTN_Q_B", block=block)
            add(attention.kv_a_proj_with_mqa, "ATTN_KV_A_MQA", block=block)
            add(attention.kv_a_layernorm, "ATTN_KV_A_NORM", block=block)
            add(attention.kv_b_proj, "ATTN_K_B", block=block, latent_heads=config.num_heads)
            add(attention.o_proj, "ATTN_OUT", block=block)
            return
        add(attention.q_proj, "ATTN_Q", block=block, permute_heads=config.num_heads if permute else 0)
        add(attention.k_proj, "ATTN_K", block=block, permute_heads=config.num_kv_heads if permute else 0)
        add(attention.v_proj, "ATTN_V", block=block)
        add(attention.o_proj, "ATTN_OUT", block=block)
        for kind, projection in (("ATTN_Q", attention.q_proj), ("ATTN_K", attention.k_proj),
                                 ("ATTN_V", attention.v_proj), ("ATTN_OUT", attention.o_proj)):
            if projection.bias is not None:
                add(projection, kind, block=block, parameter="bias", suffix=".bias")
        if getattr(attention, "sinks", None) is not None:  # gpt-oss: a logit per head in every softmax
            add(attention, "ATTN_SINKS", block=block, parameter="sinks")
        for kind, norm in (("ATTN_Q_NORM", getattr(attention, "q_norm", None)),
                           ("ATTN_K_NORM", getattr(attention, "k_norm", None))):
            if norm is not None:
                add(norm, kind, block=block)

    # -- what a LayerStream asks -----------------------------------------------------------

    # matrices are read in row blocks as they are used (gate and up apart, the head a block at a time): a
    # GGUF stores gate and up apart, and dequantizing a matrix whole would hold it in float32 at once
    reads_in_blocks = True

    def has(self, name: str) -> bool:
        return name in self.sources

    def rows(self, name: str, indices):
        """Rows `indices` of a matrix stored whole (the embeddings, the head), dequantized one run at a time."""
        import torch

        source = self.sources[name]
        out = np.empty((len(indices), *source.shape[1:]), np.float32)
        indices = indices.tolist()
        first = 0
        while first < len(indices):  # consecutive rows are read together
            run = 1
            while first + run < len(indices) and indices[first + run] == indices[first] + run:
                run += 1
            self.file.dequantized(source.tensors[0], indices[first], run, out=out[first:first + run])
            first += run
        return torch.from_numpy(out)

    def shape(self, name: str) -> list[int]:
        return list(self.sources[name].shape)

    def stored_dtype(self, name: str):
        import torch

        return torch.float32  # dequantized values are float32 (a compressed checkpoint saves them so)

    def tensor(self, name: str):
        import torch

        source = self.sources[name]
        if source.latent_heads:
            return torch.from_numpy(self._kv_b(source))
        if len(source.tensors) > 1:  # expert biases of gate and up (whole weight stacks are read an expert at a time)
            joined = _joined([self.file.dequantized(tensor, 0, source.experts) for tensor in source.tensors],
                             source.interleaved, axis=1)
            return torch.from_numpy(np.ascontiguousarray(joined).reshape(source.shape))
        values = self.file.dequantized(source.tensors[0], 0, source.experts)
        if source.permute_heads:
            values = _unpermute_rows(values, source.permute_heads)
        return torch.from_numpy(np.ascontiguousarray(values).reshape(source.shape))

    def expert(self, name: str, expert: int, part: int | None, parts: int, rows: tuple[int, int] | None = None):
        """One expert's matrix (or its `part` of `parts` row blocks: gate or up of gate_up_proj; or of that
        only `rows`: first, count)."""
        import torch

        source = self.sources[name]
        tensors = source.tensors
        if source.interleaved or source.transposed:  # the model's own layout, whole, then the part asked
            matrix = _joined([self.file.dequantized(tensor, expert, 1)[0] for tensor in tensors], source.interleaved,
                             axis=0)
            matrix = matrix.T if source.transposed else matrix
            if part is not None:
                height = matrix.shape[0] // parts
                matrix = matrix[part * height:(part + 1) * height]
            if rows is not None:
                matrix = matrix[rows[0]:rows[0] + rows[1]]
            return torch.from_numpy(np.ascontiguousarray(matrix))
        if part is None and len(tensors) == 1:
            part, parts = 0, 1
        if part is not None and len(tensors) == parts:
            if rows is not None:
                return torch.from_numpy(self.file.matrix_rows(tensors[part], expert, *rows))
            return torch.from_numpy(self.file.dequantized(tensors[part], expert, 1)[0])
        if rows is not None:
            first, count = rows
            return self.expert(name, expert, part, parts)[first:first + count]
        matrix = np.empty(self.sources[name].shape[1:], np.float32)  # gate and up dequantized into their rows
        first = 0
        for tensor in tensors:
            height = self.file.tensors[tensor].shape[1]
            self.file.dequantized(tensor, expert, 1, out=matrix[None, first:first + height])
            first += height
        if part is not None:
            height = matrix.shape[0] // parts
            matrix = matrix[part * height:(part + 1) * height]
        return torch.from_numpy(np.ascontiguousarray(matrix))

    def _kv_b(self, source: Source) -> np.ndarray:
        """kv_b_proj [heads * (nope + v), kv_lora] from k_b [heads, kv_lora, nope] and v_b [heads, v, kv_lora]."""
        k_b = self.file.dequantized(source.tensors[0])
        v_b = self.file.dequantized(source.tensors[0].replace("attn_k_b", "attn_v_b"))
        joined = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1)
        return np.ascontiguousarray(joined.reshape(source.shape))

    def headers(self) -> dict:
        """name -> (shape, dtype, file) as moeexport.memory plans from: the model's names, float32 values."""
        return {name: (list(source.shape), "F32", self.file.path) for name, source in self.sources.items()}


def _joined(parts: list[np.ndarray], interleaved: bool, axis: int) -> np.ndarray:
    """Gate's and up's rows (axis 0 of expert matrices) or entries (axis 1 of [E, ffn] biases) joined along
    `axis`: alternating, one of each in turn, or all of gate's then all of up's."""
    if not interleaved:
        return np.concatenate(parts, axis=axis)
    shape = list(parts[0].shape)
    shape[axis] *= len(parts)
    return np.stack(parts, axis=axis + 1).reshape(shape)


def _mlp(mlp) -> tuple:
    return mlp.gate_proj, mlp.up_proj, mlp.down_proj


def _unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's interleaved q/k rows (NORM RoPE) back to HF's rotate-half order: writer._permute_rows undone."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def carried_codes(source: str | Path, output: str | Path) -> dict[str, str]:
    """For each tensor of `output`, how it relates to `source`, read a slice at a time: "carried" (the bytes of
    an input tensor, or each expert or router row the bytes of one input slice), "zeros" (a stand-in that is
    all zero), or "rewritten". Blocks renumbered by Block Drop are matched by content, like experts."""
    source, output = GGUFFile(source), GGUFFile(output)
    found = {}
    for name, tensor in output.tensors.items():
        candidates = [stored for stored in source.tensors.values()
                      if stored.qtype == tensor.qtype and stored.shape[1:] == tensor.shape[1:]
                      and stored.name.split(".")[-2:] == name.split(".")[-2:]]
        candidates.sort(key=lambda stored: stored.name != name)  # the same block first: where it usually is
        slices = range(tensor.shape[0]) if per_expert(name) else [None]
        verdicts = {_slice_origin(source, candidates, output, name, index) for index in slices}
        found[name] = verdicts.pop() if len(verdicts) == 1 else "rewritten"  # a mixture is a rewrite
    return found


def _slice_origin(source: GGUFFile, candidates: list, output: GGUFFile, name: str, index: int | None) -> str:
    """How output tensor `name` (or only its slice `index`) came from the input's `candidates`."""
    if index is None:  # rows may be reordered (q and k carried between RoPE layouts): compare them as sets
        made = output.raw(name)
        carried = any(stored.shape[0] == len(made) and _same_rows(source.raw(stored.name), made)
                      for stored in candidates)
    else:
        made = output.raw(name, index, 1)
        carried = any(np.array_equal(source.raw(stored.name, first, 1), made)
                      for stored in candidates for first in range(stored.shape[0]))
    if carried:
        return "carried"
    return "zeros" if not output.dequantized(name, index or 0, None if index is None else 1).any() else "rewritten"


def _same_rows(given: np.ndarray, made: np.ndarray) -> bool:
    """Whether `made` holds exactly the rows of `given`, in any order."""
    return np.array_equal(given, made) or sorted(map(bytes, given)) == sorted(map(bytes, made))
