"""Write a (compressed) torch MoE model as a GGUF file that stock llama.cpp loads.

Built on gguf-py's GGUFWriter and numpy quantizers. Layout (llama.cpp's loader
checks every shape exactly): per layer the experts are three stacked 3-D
tensors, `ffn_gate_exps`/`ffn_up_exps` numpy (E, ffn, hidden) and
`ffn_down_exps` (E, hidden, ffn); the router `ffn_gate_inp` (E, hidden) and all
norms stay F32.

Structure:
- Block Drop: blocks are already renumbered in the torch model; written as is.
- A layer without routed experts (Layer Drop, or an expert drop that emptied
  it) keeps zero expert tensors and a zero `ffn_norm`: the MoE input is then 0
  and so is its output, exactly. This saves no expert bytes beyond storing the
  zeros in a 4-bit type; the representation is recorded in the file's metadata.
- Different expert counts per layer cannot be expressed in the `llama` host and
  are refused with the recipe change that makes the model exportable.
Weight types: f32, f16, bf16, q8_0, q4_0 through gguf-py. In f16/bf16 files the
token embedding stays F32: it is a row lookup (no compute), and its rounding is
what moved logits most (fixture: max |delta logit| 0.46 with it in F16, 4.4e-3
with it in F32). The file is written under a temporary name, renamed when complete.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moeexport.adapters import adapter_for
from moeexport.adapters.base import decoder_layers, get_path, structure
from moeexport.backends.gguf.architectures import ARCHITECTURES
from moeexport.errors import MoeExportError

from moeexport.validate import Tolerance

# gguf-py quantizes these in numpy; K-quants need llama.cpp's own quantizer
QUANT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# what a build must reach against the torch reference (F32 KV cache, flash attention off)
TOLERANCES = {
    "f32": Tolerance(max_abs_logit=1e-3, top1_agreement=1.0),
    "f16": Tolerance(max_abs_logit=5e-2),
    "bf16": Tolerance(kl=1e-3),
    "q8_0": Tolerance(kl=2e-3),
    "q4_0": Tolerance(kl=2e-2),
}
REPRESENTATION_KEY = "moeexport.representation"


@dataclass
class GGUFExport:
    path: Path
    architecture: str
    quant: str
    representation: str  # how dropped MoE sublayers are written
    fallbacks: list[str] = field(default_factory=list)  # tensors kept at a wider type than asked, and why


def _gguf():
    try:
        import gguf
    except ImportError:
        raise MoeExportError("the GGUF target needs gguf-py: pip install 'moeexport[gguf]'") from None
    return gguf


def check(model, quant: str = "f32") -> tuple:
    """Raise before anything is written when the model or type cannot be exported.

    Returns (architecture, per-layer structure, the one routed expert count).
    """
    _gguf()
    if quant not in QUANT_TYPES:
        raise MoeExportError(f"unknown GGUF type {quant!r}; this release writes {', '.join(QUANT_TYPES)}")
    adapter = adapter_for(model.config)
    architecture = ARCHITECTURES.get(adapter.model_type)
    if architecture is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise MoeExportError(f"the GGUF exporter does not write {adapter.family} yet (it writes: {supported})")
    layers = structure(adapter, model)
    routed = {spec.num_experts for spec in layers if spec.kind == "moe" and spec.num_experts > 0}
    if len(routed) != 1:
        counts = [spec.num_experts if spec.kind == "moe" else 0 for spec in layers]
        raise MoeExportError(
            f"per-layer expert counts {counts} differ; the GGUF `{architecture.name}` host needs one count for every "
            "layer: use expert_drop with scope: layer (the same keep everywhere)"
        )
    return architecture, layers, routed.pop()


def export(model, out_path: str | Path, quant: str = "f32", overwrite: bool = False) -> GGUFExport:
    gguf = _gguf()
    architecture, layers, num_experts = check(model, quant)
    adapter = adapter_for(model.config)
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise MoeExportError(f"output {out_path} already exists; pass --overwrite or choose another --out")
    emptied = [i for i, spec in enumerate(layers) if spec.kind == "dropped" or spec.num_experts == 0]
    representation = "uniform" if not emptied else f"zero ffn_norm for MoE-less layers {emptied}"

    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.partial")
    writer = gguf.GGUFWriter(str(partial), architecture.name)
    result = GGUFExport(out_path, architecture.name, quant, representation)
    try:
        _write_hparams(writer, gguf, model, adapter, num_experts, len(layers), quant)
        writer.add_string(REPRESENTATION_KEY, representation)
        _write_vocab(writer, gguf, model)
        tensors = _TensorSink(writer, gguf, quant, result.fallbacks)
        _write_tensors(tensors, model, adapter, architecture, layers, num_experts)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        os.replace(partial, out_path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return result


def _write_hparams(writer, gguf, model, adapter, num_experts: int, block_count: int, quant: str) -> None:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(Path(str(config.name_or_path or "moeexport-model")).name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(block_count)
    writer.add_feed_forward_length(_expert_width(model, adapter))
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_expert_count(num_experts)
    writer.add_expert_used_count(min(getattr(config, adapter.top_k_key), num_experts))
    writer.add_vocab_size(config.vocab_size)
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }
    writer.add_file_type(file_types[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_vocab(writer, gguf, model) -> None:
    """SentencePiece vocabulary, special tokens and chat template from the checkpoint directory."""
    from sentencepiece import SentencePieceProcessor

    source = Path(model.config.name_or_path or "")
    if not (source / "tokenizer.model").is_file():
        raise MoeExportError(f"no SentencePiece tokenizer.model in {source}: the GGUF needs the model's vocabulary")
    processor = SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)  # it warns about post-processors it ignores
    tokens, scores, types = [], [], []
    for token_id in range(processor.vocab_size()):
        tokens.append(processor.id_to_piece(token_id).encode("utf-8"))
        scores.append(processor.get_score(token_id))
        if processor.is_unknown(token_id):
            types.append(gguf.TokenType.UNKNOWN)
        elif processor.is_control(token_id):
            types.append(gguf.TokenType.CONTROL)
        elif processor.is_unused(token_id):
            types.append(gguf.TokenType.UNUSED)
        elif processor.is_byte(token_id):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    for padding in range(len(tokens), model.config.vocab_size):  # embedding rows past the tokenizer
        tokens.append(f"[PAD{padding}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(source, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


class _TensorSink:
    """Adds tensors in the requested type, falling back per tensor where the shape cannot take it."""

    def __init__(self, writer, gguf, quant: str, fallbacks: list[str]):
        self.writer, self.gguf, self.quant, self.fallbacks = writer, gguf, quant, fallbacks

    def add(self, name: str, tensor: torch.Tensor | np.ndarray, keep_f32: bool = False, quant: str | None = None):
        data = tensor.detach().float().numpy() if isinstance(tensor, torch.Tensor) else tensor.astype(np.float32)
        quant = "f32" if keep_f32 or data.ndim == 1 else (quant or self.quant)
        if quant == "f32":
            self.writer.add_tensor(name, data)
        elif quant == "f16":
            self.writer.add_tensor(name, data.astype(np.float16))
        else:
            qtype = getattr(self.gguf.GGMLQuantizationType, quant.upper())
            block = self.gguf.GGML_QUANT_SIZES[qtype][0]
            if data.shape[-1] % block:
                self.fallbacks.append(f"{name}: rows of {data.shape[-1]} are not a multiple of {block} -> f16")
                self.writer.add_tensor(name, data.astype(np.float16))
                return
            self.writer.add_tensor(name, self.gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def _permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF rotate-half q/k rows -> the interleaved pairs that llama.cpp's NORM RoPE rotates."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _write_tensors(tensors: _TensorSink, model, adapter, architecture, layers, num_experts: int) -> None:
    config = model.config
    embedding = get_path(model, adapter.embeddings).weight
    tensors.add("token_embd.weight", embedding, keep_f32=tensors.quant in ("f16", "bf16"))
    for index, (layer, spec) in enumerate(zip(decoder_layers(adapter, model), layers)):
        prefix = f"blk.{index}"
        attention = get_path(layer, adapter.attention)
        q, k = attention.q_proj.weight, attention.k_proj.weight
        if architecture.permute_qk:
            q = _permute_rows(q, config.num_attention_heads)
            k = _permute_rows(k, config.num_key_value_heads)
        tensors.add(f"{prefix}.attn_norm.weight", get_path(layer, adapter.attention_norm).weight)
        tensors.add(f"{prefix}.attn_q.weight", q)
        tensors.add(f"{prefix}.attn_k.weight", k)
        tensors.add(f"{prefix}.attn_v.weight", attention.v_proj.weight)
        tensors.add(f"{prefix}.attn_output.weight", attention.o_proj.weight)
        if spec.kind == "moe" and spec.num_experts > 0:
            block = get_path(layer, adapter.moe)
            experts = getattr(block, adapter.experts)
            gate, up = experts.gate_up_proj.chunk(2, dim=1)
            tensors.add(f"{prefix}.ffn_norm.weight", get_path(layer, adapter.moe_norm).weight)
            tensors.add(f"{prefix}.ffn_gate_inp.weight", getattr(block, adapter.router).weight, keep_f32=True)
            tensors.add(f"{prefix}.ffn_gate_exps.weight", gate)
            tensors.add(f"{prefix}.ffn_up_exps.weight", up)
            tensors.add(f"{prefix}.ffn_down_exps.weight", experts.down_proj)
        else:
            _add_silent_moe(tensors, prefix, config.hidden_size, num_experts, _expert_width(model, adapter))
    tensors.add("output_norm.weight", get_path(model, adapter.final_norm).weight)
    tensors.add("output.weight", model.get_output_embeddings().weight)


def _expert_width(model, adapter) -> int:
    for layer in decoder_layers(adapter, model):
        experts = getattr(get_path(layer, adapter.moe), adapter.experts, None)
        if experts is not None and hasattr(experts, "down_proj"):
            return experts.down_proj.shape[-1]
    raise MoeExportError("the model has no MoE layer with experts left; there is nothing to host in a MoE GGUF")


def _add_silent_moe(tensors: _TensorSink, prefix: str, hidden: int, num_experts: int, width: int) -> None:
    """A MoE sublayer that adds exactly nothing: zero norm -> zero input -> zero expert output."""
    tensors.add(f"{prefix}.ffn_norm.weight", np.zeros(hidden, np.float32))
    tensors.add(f"{prefix}.ffn_gate_inp.weight", np.zeros((num_experts, hidden), np.float32), keep_f32=True)
    zeros_type = "q4_0"  # zeros are exact in any type: store them small
    tensors.add(f"{prefix}.ffn_gate_exps.weight", np.zeros((num_experts, width, hidden), np.float32), quant=zeros_type)
    tensors.add(f"{prefix}.ffn_up_exps.weight", np.zeros((num_experts, width, hidden), np.float32), quant=zeros_type)
    tensors.add(f"{prefix}.ffn_down_exps.weight", np.zeros((num_experts, hidden, width), np.float32), quant=zeros_type)
