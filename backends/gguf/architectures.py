"""Which llama.cpp architecture hosts which HF model_type: the GGUF backend's one family table.

Facts from research/gguf_llamacpp.md (checked against llama.cpp's loader and graphs):
- `llama` (Mixtral) uses NORM RoPE, so HF's rotate-half q/k rows are permuted;
  the other hosts use NEOX RoPE and take them as they are.
- Each host has a fixed routing rule: llama and qwen3moe renormalize the top-k
  weights, qwen2moe and olmoe do not. A model whose router differs is refused.
- Every host needs MoE tensors in every layer and one global expert count.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GGUFArchitecture:
    name: str  # llama.cpp's general.architecture
    renormalizes: bool  # the host's fixed top-k rule
    permute_qk: bool = False  # NORM RoPE wants interleaved q/k rows
    expert_width_key: str = "expert_feed_forward_length"  # or feed_forward_length, where experts use it
    bpe_pre: str = "default"  # tokenizer.ggml.pre for BPE vocabularies


ARCHITECTURES = {
    "mixtral": GGUFArchitecture(name="llama", renormalizes=True, permute_qk=True, expert_width_key="feed_forward_length"),
    "qwen2_moe": GGUFArchitecture(name="qwen2moe", renormalizes=False, bpe_pre="qwen2"),
    "qwen3_moe": GGUFArchitecture(name="qwen3moe", renormalizes=True, bpe_pre="qwen2"),
    "olmoe": GGUFArchitecture(name="olmoe", renormalizes=False, expert_width_key="feed_forward_length", bpe_pre="olmo"),
}
