"""Which llama.cpp architecture hosts which HF model_type: the GGUF backend's one family table.

Facts from research/gguf_llamacpp.md (checked against llama.cpp's loader):
- Mixtral is written as `llama`: softmax -> top-k -> renormalize, and NORM
  (interleaved) RoPE, so the HF q/k rows (rotate-half layout) are permuted.
- `llama` requires MoE tensors in every layer and one global expert count.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GGUFArchitecture:
    name: str  # llama.cpp's general.architecture
    permute_qk: bool  # NORM RoPE wants interleaved q/k rows
    tokenizer: str  # tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (BPE)


ARCHITECTURES = {
    "mixtral": GGUFArchitecture(name="llama", permute_qk=True, tokenizer="llama"),
}
