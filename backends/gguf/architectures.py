"""Which llama.cpp architecture hosts which HF model_type: the GGUF backend's one family table.

Facts from research/gguf_llamacpp.md (checked against llama.cpp's loader and graphs):
- `llama` (Mixtral) uses NORM RoPE, so HF's rotate-half q/k rows are permuted;
  the other hosts use NEOX RoPE and take them as they are.
- Each host has a fixed routing rule: llama and qwen3moe renormalize the top-k
  weights, qwen2moe and olmoe do not. A model whose router differs is refused.
- Every host needs MoE tensors in every layer and one global expert count.
  Different counts per layer need a host with a selection bias (`exp_probs_b`,
  added to the routing scores for selection only): every layer is padded to
  the largest count with zero experts biased by -1e9, never selected. That is
  exact only where the host renormalizes the top-k weights (the pads' softmax
  mass then cancels): ernie4_5-moe for Mixtral (llama attention, NORM RoPE),
  hy_v3 for Qwen3-MoE (per-head q/k norms, NEOX RoPE, softmax gating set
  explicitly since its default is sigmoid).
- hy_v3 also decides dense-or-MoE per layer by tensor presence, so a MoE-less
  layer becomes a tiny all-zero dense FFN there: exact, and its experts' bytes
  are really gone. Its MoE layers need shared-expert tensors (without them
  llama.cpp adds silu(x)), so a model without one gets a tiny all-zero one.
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
    pads_experts: bool = False  # takes per-layer expert counts by padding with never-selected experts
    selection_bias_suffix: str = ".bias"  # what follows "blk.N.exp_probs_b" in that per-layer bias tensor's name
    dense_silent_layers: bool = False  # MoE-less layers become tiny all-zero dense FFNs (real byte savings)
    softmax_gating: bool = False  # write expert_gating_func=softmax and expert_weights_norm explicitly
    requires_shared_expert: bool = False  # MoE layers need shared-expert tensors (zeros if the model has none)
    leading_dense: bool = False  # dense layers are allowed as a leading prefix (leading_dense_block_count)
    latent_attention: bool = False  # multi-head latent attention (DeepSeek-V2): kv_a / k_b / v_b tensors
    padded_host: GGUFArchitecture | None = None  # the host this family moves to when its expert counts differ


ARCHITECTURES = {
    "mixtral": GGUFArchitecture(
        name="llama",
        renormalizes=True,
        permute_qk=True,
        expert_width_key="feed_forward_length",
        padded_host=GGUFArchitecture(name="ernie4_5-moe", renormalizes=True, permute_qk=True, pads_experts=True),
    ),
    "qwen2_moe": GGUFArchitecture(name="qwen2moe", renormalizes=False, bpe_pre="qwen2"),
    "qwen3_moe": GGUFArchitecture(
        name="qwen3moe",
        renormalizes=True,
        bpe_pre="qwen2",
        padded_host=GGUFArchitecture(
            name="hy_v3",
            renormalizes=True,
            bpe_pre="qwen2",
            pads_experts=True,
            selection_bias_suffix="",
            dense_silent_layers=True,
            softmax_gating=True,
            requires_shared_expert=True,
        ),
    ),
    "olmoe": GGUFArchitecture(name="olmoe", renormalizes=False, expert_width_key="feed_forward_length", bpe_pre="olmo"),
    # HF applies RoPE to interleaved pairs here, which is llama.cpp's NORM layout already: no permutation
    "deepseek_v2": GGUFArchitecture(
        name="deepseek2", renormalizes=False, bpe_pre="deepseek-llm", leading_dense=True, latent_attention=True
    ),
}
