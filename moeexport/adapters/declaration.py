"""What a family is, as plain data: its module names, config spellings, expert layout and routing rule.

This module imports no torch, so that what reads only a checkpoint's names and
config (the memory plan's early refusal) can use it before torch is loaded. The
torch side reads it: surgery.py finds and edits the modules a `Family` names,
experts.py and routing.py compute what its `ExpertLayout` and `Routing` declare.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable, Literal

LayerKind = Literal["moe", "dense", "dropped"]
# what mixes tokens in a decoder layer of a hybrid family ("none": the layer is a feed-forward block alone)
MixerKind = Literal["attention", "linear_attention", "mamba", "none"]

SOFTMAX, SIGMOID = "softmax", "sigmoid"  # Routing.scores
# Routing.method of DeepSeek-V3's router: its groups are scored by their best two experts even when there is one
# group, so every group (every layer, with one) needs two experts left
NOAUX_TC = "noaux_tc"
CLAMPED_SWIGLU = "clamped_swiglu"  # ExpertLayout.activation of gpt-oss's experts


@dataclass(frozen=True)
class Routing:
    """How a family turns router logits into the k experts a token goes to and their weights.

    softmax (or sigmoid) scores -> top-k, chosen on the scores plus any selection
    bias and only within the best expert groups -> the chosen experts' scores,
    renormalized or not -> x scale. gpt-oss instead takes the top-k raw logits
    and a softmax over those k (`softmax_over_top_k`).
    """

    renormalize: bool  # the k weights are divided by their sum (Mixtral) or not (OLMoE)
    scale: float = 1.0  # multiplier on the routed weights (DeepSeek's routed_scaling_factor)
    method: str = "greedy"  # the family's name for its top-k rule, as messages name it (DeepSeek's topk_method)
    scores: str = SOFTMAX  # SOFTMAX over the experts, or a SIGMOID per expert
    selection_bias: bool = False  # a per-expert bias added to the scores to choose the k, not to weigh them
    groups: int = 1  # group-limited top-k: the experts form `groups` equal groups...
    top_groups: int = 1  # ...and the k are chosen within the `top_groups` best of them
    group_score: str = "top2_sum"  # a group's score: the sum of its best two choice scores, or "max"
    softmax_over_top_k: bool = False  # top-k on the raw logits, softmax over those k (gpt-oss)
    router_bias: bool = False  # the router's linear map has a bias (gpt-oss)
    shared_expert_gate: bool = False  # the shared experts' output is scaled by sigmoid(gate(x)) (Qwen2-MoE)
    dense_mlp_beside: bool = False  # a dense MLP runs beside the experts, its output added (Gemma 4)
    per_expert_scale: bool = False  # the k weights are then scaled by a learned scale per expert (Gemma 4)


@dataclass(frozen=True)
class ExpertLayout:
    """How a family stores one routed expert and what it computes.

    An expert is down(act(gate x) * up x): `gate_up_proj` [E, 2*ffn, hidden] holds
    the gate rows, then the up rows (transformers' concatenated layout), `down_proj`
    [E, hidden, ffn]. Each field says where a family differs.
    """

    activation: str = "silu"  # transformers' ACT2FN name (config.hidden_act), or CLAMPED_SWIGLU
    gated: bool = True  # act(gate) * up; False: act(up) of one projection, `up_proj` (ReLU², Nemotron-H)
    interleaved: bool = False  # gate and up rows alternate (gpt-oss) rather than all gate rows, then all up rows
    transposed: bool = False  # stored [E, in, out], applied as x @ W (gpt-oss), rather than [E, out, in]
    biases: bool = False  # each stack has a bias beside it, named <stack>_bias ([E, 2*ffn], [E, hidden])
    alpha: float = 1.702  # CLAMPED_SWIGLU: gate * sigmoid(alpha * gate) * (up + 1)...
    limit: float = 7.0  # ...with gate <= limit and |up| <= limit

    @property
    def concatenated(self) -> bool:
        """transformers' plain layout: gate rows then up rows, [E, out, in], no biases (what merging and the
        expert rebuild write back)."""
        return not (self.biases or self.interleaved or self.transposed)


@dataclass(frozen=True)
class LatentAttention:
    """Multi-head latent attention sizes (DeepSeek-V2): q and kv go through low-rank latents."""

    q_lora_rank: int | None  # None: q is one full projection (the "Lite" models)
    kv_lora_rank: int  # width of the cached kv latent
    qk_nope_head_dim: int  # per-head q/k width without RoPE
    qk_rope_head_dim: int  # per-head q/k width with RoPE (the rotated key is shared by all heads)
    v_head_dim: int
    rope_interleaved: bool = True  # RoPE rotates pairs (2i, 2i+1) (DeepSeek), rather than (i, i + d/2)


@dataclass(frozen=True)
class MambaSizes:
    """The sizes of a hybrid family's Mamba-2 mixers (the same in every Mamba layer)."""

    conv_kernel: int
    inner: int  # heads x head_dim
    state: int  # the SSM state per group
    heads: int
    groups: int


@dataclass(frozen=True)
class LinearAttention:
    """Gated DeltaNet sizes (Qwen3.5's linear attention): q/k heads share `key_heads`, v and the output gate
    have `value_heads` (a multiple of them), all after one causal depthwise convolution of `conv_kernel` taps."""

    conv_kernel: int
    key_head_dim: int
    value_head_dim: int
    key_heads: int
    value_heads: int


@dataclass(frozen=True)
class ModelConfig:
    """The config facts passes and backends use, under one spelling for every family."""

    model_type: str
    name_or_path: str  # the checkpoint directory (tokenizer files live there), "" when unknown
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # the dense MLP width (in an all-MoE family, the expert width)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    context_length: int  # max_position_embeddings
    rms_norm_eps: float
    rope_theta: float
    hidden_act: str
    num_experts: int  # routed experts per MoE layer (the largest, once layers differ)
    top_k: int
    routing: Routing
    shared_expert_count: int  # always-on experts per MoE layer (0 without any)
    clip_qkv: float | None = None  # q, k and v are clamped to +-clip_qkv (OLMoE), None: not clamped
    latent: LatentAttention | None = None  # set for families with multi-head latent attention
    experts: ExpertLayout = ExpertLayout()
    sliding_layers: tuple[bool, ...] = ()  # per layer: it attends only to the last sliding_window tokens
    sliding_window: int | None = None  # that window (None: no layer slides)
    rope_scaling: dict = field(default_factory=dict)  # rope_parameters besides rope_theta, e.g. YaRN's
    rotary_dim: int | None = None  # q/k dims per head that RoPE rotates (the leading ones); None: all of head_dim
    # q/k/v biases and per-head q/k norms, as a GGUF's tensors state them (read_config: the config keys a family
    # spells them with); from a transformers config the views hold the modules themselves, and these stay False
    qkv_bias: bool = False
    qk_norm: bool = False
    layer_mixers: tuple[MixerKind, ...] = ()  # per layer, in hybrid families; (): self-attention in every layer
    mamba: MambaSizes | None = None  # the Mamba-2 mixers' sizes, in families that have them
    logit_softcap: float | None = None  # logits = cap x tanh(logits / cap) (final_logit_softcapping), None: none
    linear: LinearAttention | None = None  # the sizes of the linear-attention layers, in families with them
    # zero-centred RMSNorms scale by (norm_weight_offset + weight): 1.0 in Qwen3.5, whose checkpoints store w - 1
    norm_weight_offset: float = 0.0


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer as the passes see it."""

    kind: LayerKind
    num_experts: int = 0  # routed experts (0 for dense layers and dropped MoE sublayers)
    top_k: int = 0
    shared_experts: bool = False


@dataclass(frozen=True)
class FFNWidths:
    """The feed-forward widths a config must state besides the canonical ones (see Family.config_values)."""

    expert: int  # one routed expert's ffn width
    shared: int = 0  # the shared expert's (all shared experts together), 0 without one
    dense_layers: tuple[int, ...] = ()  # the layers with a dense MLP instead of experts
    layers: int = 0  # the decoder layers in all (config_values sets it; for configs that list every layer's kind)


@dataclass(frozen=True)
class TensorNames:
    """How checkpoint tensor names number decoder layers and routed experts: `...layers.N.` and, in the hub's
    per-expert layout, `.experts.N.` (the model's own layout stacks the experts in 3-D `.experts.` tensors)."""

    layers: str  # the last part of the path to the decoder layers
    experts: str  # the experts' module name

    def layer(self, name: str) -> int | None:
        match = re.search(rf"(?:^|\.){re.escape(self.layers)}\.(\d+)\.", name)
        return int(match.group(1)) if match else None

    def expert(self, name: str) -> int | None:
        match = re.search(rf"\.{re.escape(self.experts)}\.(\d+)\.", name)
        return int(match.group(1)) if match else None

    def in_experts(self, name: str) -> bool:
        return f".{self.experts}." in name


def _rotary_dim(config, rope: dict) -> int | None:
    """transformers' partial rotary (rope_parameters' partial_rotary_factor): the leading head dims rotated."""
    factor = rope.get("partial_rotary_factor")
    if factor is None or factor == 1.0:
        return None
    head_dim = global_value(config, "head_dim") or config.hidden_size // config.num_attention_heads
    return int(head_dim * factor)


def global_value(config: object, key: str, default=None):
    """A config value as the config states it globally, also where transformers' heterogeneous (per-layer)
    configs refuse a plain read of a key some layers override (their layers' own values: the modules)."""
    read = getattr(config, "_getattr_without_heterogeneous_validation", None)
    if read is not None:
        return read(key, default)
    return getattr(config, key, default)


def _no_dense_layer_keys(config: object, kept: list[int]) -> None:
    """Families whose dense layers are not named in the config need no rewrite."""


def _any_expert_count(config: object) -> str | None:
    return None


def concatenated_glu(config: object) -> ExpertLayout:
    """transformers 5's layout for every supported family, with the config's activation on the gate."""
    return ExpertLayout(activation=getattr(config, "hidden_act", "silu"))


@dataclass(frozen=True)
class Family:
    """Everything moeexport knows about one model family (keyed by HF model_type), as data."""

    model_type: str
    family: str  # human name for messages and docs
    num_experts_key: str  # config key holding the routed expert count
    routing: Callable[[object], Routing]  # config -> routing rule
    expert_layout: Callable[[object], ExpertLayout] = concatenated_glu  # config -> how its experts are stored
    top_k_key: str = "num_experts_per_tok"
    layers: str = "model.layers"  # path from the causal LM to its decoder layers
    embeddings: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    rotary_embedding: str = "model.rotary_emb"  # module(x, position_ids) -> (cos, sin), or complex freqs; "": none (NoPE)
    attention: str = "self_attn"  # with q_proj, k_proj, v_proj, o_proj
    attention_norm: str = "input_layernorm"
    moe: str = "mlp"  # the MoE (or dense MLP) sublayer of a decoder layer
    moe_norm: str = "post_attention_layernorm"  # the norm feeding that sublayer
    moe_returns_router_scores: bool = False  # the MoE sublayer returns (hidden states, router scores) (gpt-oss)
    router: str = "gate"
    # the router's per-expert tensors (dotted paths inside it), sliced with their experts by Expert Drop
    router_tensors: tuple[str, ...] = ("weight",)
    selection_bias: str | None = None  # the router's selection-only bias (a dotted path inside it), if any
    experts: str = "experts"
    shared_experts: tuple[str, ...] = ()  # always-on expert modules inside the MoE block
    shared_expert_gate: str | None = None  # a sigmoid gate scaling the shared expert's output, if any
    # config key with the number of experts fused into the shared module; without one, one per module name
    shared_expert_count_key: str | None = None
    clip_qkv_key: str | None = None  # config key of a clamp on q, k and v, if the family has one
    latent_attention: Callable[[object], LatentAttention] | None = None  # config -> its latent sizes, if MLA
    # config -> each decoder layer's token mixer, for hybrid families; None: self-attention in every layer
    layer_mixers: Callable[[object], tuple[MixerKind, ...]] | None = None
    # Families whose decoder layer itself holds the router and the experts beside a dense MLP (Gemma 4): `moe`
    # is then "" (the layer), and these say what differs from a router that is one linear map
    router_weight: str = "weight"  # the router's [E, hidden] matrix, a dotted path inside it
    router_returns_probabilities: bool = False  # router(x)[0] is the softmax scores, not the logits
    experts_norm: str | None = None  # a norm on the router's input that only the experts see, a path in the layer
    # there, Layer Drop removes these modules of the layer (the router's place keeps a stand-in) and sets the
    # layer's `moe_switch` attribute False, so that the layer runs its dense MLP alone
    moe_modules: tuple[str, ...] = ()
    moe_switch: str | None = None
    # the router reads top-k from the model's config rather than holding its own: a layer whose experts change
    # gets the router its own copy of the config, with its top-k
    router_reads_config_top_k: bool = False
    # the embeddings module multiplies its rows by this (config -> factor), held in a buffer that checkpoints do
    # not store (Gemma's scaled embeddings; a streamed model computes it, and scales the rows it reads)
    embedding_scale: Callable[[object], float] | None = None
    # config -> the decoder layers Block Drop must keep (Gemma 4's last, which must stay a full-attention layer)
    blocks_kept: Callable[[object], tuple[int, ...]] = lambda config: ()
    # (mixer kind, module name in the decoder layer) for mixers other than `attention` (Qwen3.5's linear_attn)
    mixer_modules: tuple[tuple[MixerKind, str], ...] = ()
    linear_attention: Callable[[object], LinearAttention] | None = None  # config -> its DeltaNet sizes, if any
    intermediate_size_key: str = "intermediate_size"  # config key of the dense width (or the experts', if none)
    norm_weight_offset: float = 0.0  # see ModelConfig.norm_weight_offset
    # Rewrites the config keys that name dense layers after Block Drop (kept = surviving old indices).
    renumber_dense_layers: Callable[[object, list[int]], None] = _no_dense_layer_keys
    # An error message when the family's routing cannot survive a change of expert count.
    expert_count_change_blocker: Callable[[object], str | None] = _any_expert_count
    # (canonical config, FFN widths) -> this family's own config keys; the inverse of what model_config reads
    own_config_values: Callable[[ModelConfig, FFNWidths], dict] = lambda config, widths: {}
    rms_norm_eps_key: str = "rms_norm_eps"  # config key of the RMSNorm epsilon (Nemotron-H: layer_norm_epsilon)
    hidden_act_key: str = "hidden_act"  # config key of the MLPs' activation (Nemotron-H: mlp_hidden_act)
    mamba_sizes: Callable[[object], MambaSizes] | None = None  # config -> its Mamba-2 mixers' sizes, if it has them

    @property
    def tensor_names(self) -> TensorNames:
        return TensorNames(layers=self.layers.rpartition(".")[2], experts=self.experts)

    def model_config(self, config) -> ModelConfig:
        """The config under canonical names (transformers' common keys plus this family's own)."""
        rope = getattr(config, "rope_parameters", None) or {}
        sliding = tuple(kind == "sliding_attention" for kind in getattr(config, "layer_types", None) or ())
        shared = (getattr(config, self.shared_expert_count_key) if self.shared_expert_count_key
                  else len(self.shared_experts))
        return ModelConfig(
            model_type=self.model_type,
            name_or_path=str(config.name_or_path or ""),
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=getattr(config, self.intermediate_size_key),
            num_heads=config.num_attention_heads,
            num_kv_heads=global_value(config, "num_key_value_heads"),
            head_dim=global_value(config, "head_dim") or config.hidden_size // config.num_attention_heads,
            context_length=config.max_position_embeddings,
            rms_norm_eps=getattr(config, self.rms_norm_eps_key),
            rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
            hidden_act=getattr(config, self.hidden_act_key, "silu"),
            num_experts=getattr(config, self.num_experts_key),
            top_k=getattr(config, self.top_k_key),
            routing=self.routing(config),
            shared_expert_count=shared,
            clip_qkv=getattr(config, self.clip_qkv_key, None) if self.clip_qkv_key else None,
            latent=self.latent_attention(config) if self.latent_attention else None,
            experts=self.expert_layout(config),
            sliding_layers=sliding,
            sliding_window=getattr(config, "sliding_window", None) if any(sliding) else None,
            rope_scaling={key: value for key, value in rope.items() if key != "rope_theta"},
            rotary_dim=_rotary_dim(config, rope),
            layer_mixers=self.layer_mixers(config) if self.layer_mixers else (),
            mamba=self.mamba_sizes(config) if self.mamba_sizes else None,
            logit_softcap=getattr(config, "final_logit_softcapping", None),
            linear=self.linear_attention(config) if self.linear_attention else None,
            norm_weight_offset=self.norm_weight_offset,
        )

    def mixer_module(self, config, index: int) -> str:
        """The name of decoder layer `index`'s token mixer (its attention module, or e.g. its DeltaNet)."""
        kind = self.layer_mixers(config)[index] if self.layer_mixers else "attention"
        return dict(self.mixer_modules).get(kind, self.attention)

    def config_values(self, config: ModelConfig, layers: int, widths: FFNWidths, tied: bool) -> dict:
        """transformers config keys (with model_type) for a model described under canonical names, e.g. one
        read from a GGUF: the inverse of model_config."""
        values = {
            "model_type": self.model_type,
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": layers,
            "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads,
            "head_dim": config.head_dim,
            "max_position_embeddings": config.context_length,
            "rms_norm_eps": config.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
            "hidden_act": config.hidden_act,
            "tie_word_embeddings": tied,
            self.num_experts_key: config.num_experts,
            self.top_k_key: config.top_k,
        }
        if self.clip_qkv_key:
            values[self.clip_qkv_key] = config.clip_qkv
        if config.sliding_layers:  # the inverse of model_config's reading of layer_types
            values["layer_types"] = ["sliding_attention" if slides else "full_attention"
                                     for slides in config.sliding_layers]
            values["sliding_window"] = config.sliding_window
        if config.rope_scaling:
            values["rope_parameters"] = {**values["rope_parameters"], **config.rope_scaling}
        return values | self.own_config_values(config, replace(widths, layers=layers))

