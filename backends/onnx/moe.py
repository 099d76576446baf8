"""Two lowerings of one routed-expert block: ONNX Runtime's MoE / QMoE op, or standard ops.

Both compute the layer's routing (softmax or sigmoid scores -> top-k, chosen
with any selection bias within the best expert groups -> (renormalize) x
scale; or a softmax over the top-k logits), then the k experts' weighted sum,
from the block's stacks as the family's ExpertLayout stores them (gate_up
[E, 2I, H], gate rows then up rows, and down [E, H, I] by default).

`com.microsoft::MoE` (onnxruntime >= 1.23, research/onnx_trt.md §1): the op
takes RAW router logits (it applies the softmax itself), weights output-major
[E, N, K], and on CPU only the fused SwiGLU with gate/up rows interleaved
(swiglu_fusion=1). Its defaults (k=1, relu, no renormalization) are wrong for
every family here, so every attribute is set explicitly. A routed scale
(a routed_scaling_factor) is folded into the down weights.

`QMoE` stores symmetric integer codes as uint8 with the implicit zero point
2^(bits-1), int4 two per byte (even K index in the low nibble), and one float
scale per `block_size` inputs. Weights that a quantize pass already put on a
grid of the same bits and group size keep their exact codes and scales.

The plain lowering uses only default-domain ops TensorRT parses: TopK with a
constant k, the k weights spread into a dense [tokens, E] matrix with
Equal/Cast/Mul/ReduceSum (no scatter), every expert computed by one batched
MatMul over stacked weights, and the dense weights reducing the results. It
spends E/k times the FLOPs of the routed computation, a fair price for static
shapes and no data-dependent control flow.

The plain-routed lowering adds that control flow for decoding: an `If` on the
token count sends a single token through the k experts it selects, Gathered
from the stacks (a copy of k experts, then the MatMuls read it: 3k expert
reads against E), and a prompt through the dense computation above, which
would otherwise gather a copy of k experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from moeexport.adapters.declaration import CLAMPED_SWIGLU, ExpertLayout
from moeexport.adapters.experts import down_weights, gate_and_up_biases, gate_and_up_weights
from moeexport.backends.onnx.graph import CONTRIB_DOMAIN, Graph
from moeexport.errors import MoeExportError

if TYPE_CHECKING:
    from moeexport.quantization import WeightGrid


@dataclass(frozen=True)
class RoutedExperts:
    """One layer's routed experts: the router as an array, the expert stacks as anything that gives one
    expert's matrix by index (a tensor, or a streamed layer's ExpertStack, which reads it from disk)."""

    router: np.ndarray  # [E, H]
    gate_up: object  # stored as `layout` says: [E, 2I, H], gate rows then up rows, by default
    down: object  # [E, H, I] by default
    top_k: int
    renormalize: bool
    scale: float  # multiplier on the routed weights
    sigmoid: bool = False  # each expert's score is sigmoid(logit), not a softmax over the experts
    selection_bias: np.ndarray | None = None  # [E], added to the scores to choose the k, not to weigh them
    groups: int = 1  # the k are chosen within the `top_groups` best of `groups` equal, consecutive groups...
    top_groups: int = 1
    group_score: str = "top2_sum"  # ...a group scoring the sum of its best two choice scores, or its "max"
    layout: ExpertLayout = ExpertLayout()  # how the stacks are stored and what an expert computes
    router_bias: np.ndarray | None = None  # [E], added to the router logits
    softmax_over_top_k: bool = False  # the k weights are a softmax over the k chosen logits (gpt-oss)
    gate_up_bias: np.ndarray | None = None  # [E, 2I] stored as `layout` says (with layout.biases)
    down_bias: np.ndarray | None = None  # [E, H]

    def gate_and_up(self, expert: int) -> tuple[np.ndarray, np.ndarray]:
        """One expert's gate and up weights [I, H] (a row per neuron)."""
        matrix = self.gate_up[expert]
        matrix = matrix if isinstance(matrix, torch.Tensor) else torch.from_numpy(np.asarray(matrix))
        return tuple(_float(part) for part in gate_and_up_weights(self.layout, matrix))

    def down_rows(self, expert: int) -> np.ndarray:
        """One expert's down weights [H, I] (a row per output)."""
        matrix = self.down[expert]
        matrix = matrix if isinstance(matrix, torch.Tensor) else torch.from_numpy(np.asarray(matrix))
        return _float(down_weights(self.layout, matrix))

    def gate_and_up_biases(self) -> tuple[np.ndarray, np.ndarray]:
        """The gate and up biases [E, I]."""
        return tuple(np.ascontiguousarray(part) for part in gate_and_up_biases(self.layout, self.gate_up_bias))

    @property
    def count(self) -> int:
        return self.router.shape[0]

    @property
    def chosen_apart(self) -> bool:
        """The k experts are chosen on other numbers than the softmax they are weighed by."""
        return self.sigmoid or self.selection_bias is not None or self.groups > 1 and self.top_groups < self.groups


@dataclass(frozen=True)
class Quantization:
    bits: int
    block_size: int
    grid: WeightGrid | None = None  # the grid a quantize pass left the experts on, if the caller passed it


def routed_experts(graph: Graph, x: str, name: str, experts: RoutedExperts, lowering: str,
                   quantization: Quantization | None, router_input: str | None = None) -> str:
    """The routed part of one MoE block, x [B, S, H] -> [B, S, H]; the router reads `router_input` where it
    differs from the experts' input (a router with its own norm and scale, applied by the caller)."""
    tokens = graph.op("Reshape", x, graph.const([-1, experts.router.shape[1]]))
    routed = tokens if router_input is None else graph.op("Reshape", router_input,
                                                           graph.const([-1, experts.router.shape[1]]))
    logits = graph.op("MatMul", routed, graph.weight(f"{name}.router.weight", experts.router.T))
    if experts.router_bias is not None:
        logits = graph.op("Add", logits, graph.weight(f"{name}.router.bias", experts.router_bias))
    if lowering == "contrib" and experts.layout.activation not in ("silu", CLAMPED_SWIGLU):
        lowering = "plain"  # the MoE op's gated activations are SwiGLUs: a GELU GLU's experts in standard ops
    if lowering == "contrib" and experts.chosen_apart:
        y = _contrib_chosen_apart(graph, tokens, logits, name, experts, quantization)
    elif lowering == "contrib":
        y = _contrib(graph, tokens, logits, name, experts, quantization)
    else:
        y = _plain(graph, tokens, logits, name, experts, routed=lowering == "plain-routed")
    return graph.op("Reshape", y, graph.op("Shape", x))


def _selected(graph: Graph, logits: str, name: str, experts: RoutedExperts) -> tuple[str, str]:
    """(top-k weights [T, k], top-k index [T, k]): scores (softmax or sigmoid); the k chosen on the scores plus
    the selection bias, within the best groups; weighed by the scores alone (not renormalized, not scaled). Or
    the k largest logits, weighed by a softmax over those k (softmax_over_top_k)."""
    if experts.softmax_over_top_k:
        top_logits, top_index = graph.op("TopK", logits, graph.const([experts.top_k]), outputs=2, axis=-1)
        return graph.op("Softmax", top_logits, axis=-1), top_index
    if not experts.chosen_apart:
        probabilities = graph.op("Softmax", logits, axis=-1)
        return graph.op("TopK", probabilities, graph.const([experts.top_k]), outputs=2, axis=-1)
    scores = graph.op("Sigmoid", logits) if experts.sigmoid else graph.op("Softmax", logits, axis=-1)
    choice = scores
    if experts.selection_bias is not None:
        choice = graph.op("Add", scores, graph.raw(f"{name}.router.selection_bias",
                                                    np.asarray(experts.selection_bias, np.float32)))
    if experts.groups > 1 and experts.top_groups < experts.groups:
        choice = _within_best_groups(graph, choice, experts)
    _, index = graph.op("TopK", choice, graph.const([experts.top_k]), outputs=2, axis=-1)
    return graph.op("GatherElements", scores, index, axis=-1), index


def _within_best_groups(graph: Graph, choice: str, experts: RoutedExperts) -> str:
    """The choice scores [T, E] with the experts outside each token's `top_groups` best groups at -inf."""
    grouped = graph.op("Reshape", choice, graph.const([-1, experts.groups, experts.count // experts.groups]))
    if experts.group_score == "top2_sum":
        best_two, _ = graph.op("TopK", grouped, graph.const([2]), outputs=2, axis=-1)
        group_scores = graph.op("ReduceSum", best_two, graph.const([-1]), keepdims=0)
    else:
        group_scores = graph.op("ReduceMax", grouped, axes=[-1], keepdims=0)
    _, best = graph.op("TopK", group_scores, graph.const([experts.top_groups]), outputs=2, axis=-1)  # [T, g]
    # [T, g, 1] == [G] -> one-hot [T, g, G], summed over the g (each group at most once): 1 for a chosen group
    chosen = graph.op("ReduceSum", graph.op("Cast", graph.op("Equal", graph.op("Unsqueeze", best, graph.const([-1])),
                                                              graph.const(np.arange(experts.groups))), to=1),
                      graph.const([1]), keepdims=0)
    inside = graph.op("Cast", graph.op("Unsqueeze", chosen, graph.const([-1])), to=9)  # [T, G, 1] bool
    masked = graph.op("Where", inside, grouped, graph.const(float("-inf"), np.float32))
    return graph.op("Reshape", masked, graph.const([-1, experts.count]))


def _dense_weights(graph: Graph, weights: str, index: str, count: int) -> str:
    """Top-k weights [T, k] at their experts' columns of a [T, count] matrix, zero elsewhere (no scatter)."""
    one_hot = graph.op("Cast", graph.op("Equal", graph.op("Unsqueeze", index, graph.const([-1])),
                                        graph.const(np.arange(count))), to=1)  # [T, k, E]
    return graph.op("ReduceSum", graph.op("Mul", one_hot, graph.op("Unsqueeze", weights, graph.const([-1]))),
                    graph.const([1]), keepdims=0)


def _contrib_chosen_apart(graph: Graph, tokens: str, logits: str, name: str, experts: RoutedExperts,
                          quantization: Quantization | None) -> str:
    """The MoE / QMoE op with the k experts chosen beforehand: it is given log(w) for the k chosen weights and
    -inf elsewhere, so its softmax and top-k take exactly those k, weighed w / sum(w); without renormalization
    its output is multiplied back by sum(w) (the experts' sum is linear in the weights)."""
    weights, index = _selected(graph, logits, name, experts)
    dense = _dense_weights(graph, weights, index, experts.count)  # [T, E], the chosen weights are > 0
    picked = graph.op("Greater", dense, graph.const(0.0, np.float32))
    forced = graph.op("Where", picked, graph.op("Log", dense), graph.const(float("-inf"), np.float32))
    y = _contrib(graph, tokens, forced, name, experts, quantization)
    if experts.renormalize:
        return y
    return graph.op("Mul", y, graph.op("ReduceSum", weights, graph.const([-1]), keepdims=1))


def _float(matrix) -> np.ndarray:
    return matrix.detach().float().numpy() if hasattr(matrix, "detach") else np.asarray(matrix, np.float32)


def _interleaved(gate: np.ndarray, up: np.ndarray, axis: int = 0) -> np.ndarray:
    """Gate and up along `axis` (rows of one expert's [I, H], or an [E, I] bias stack's axis 1) -> g0, u0, g1,
    u1, ... (swiglu_fusion=1)."""
    stacked = np.stack([gate, up], axis=axis + 1)
    return stacked.reshape(*gate.shape[:axis], 2 * gate.shape[axis], *gate.shape[axis + 1:])


def _contrib(graph: Graph, tokens: str, logits: str, name: str, experts: RoutedExperts,
             quantization: Quantization | None) -> str:
    layout = experts.layout
    clamped = layout.activation == CLAMPED_SWIGLU
    attributes = dict(
        k=experts.top_k,
        activation_type="swiglu",
        swiglu_fusion=1,
        # the k weights of a softmax over every expert, renormalized, are the softmax over the k chosen logits
        normalize_routing_weights=int(experts.renormalize or experts.softmax_over_top_k),
        activation_alpha=layout.alpha if clamped else 1.0,  # gate * sigmoid(alpha * gate) * (up + beta)
        activation_beta=1.0 if clamped else 0.0,
    )
    if clamped:
        attributes["swiglu_limit"] = layout.limit
    count = experts.count
    fc1_bias, fc2_bias = "", ""  # float32, as the op's input and (widened) weights
    if experts.gate_up_bias is not None:
        fc1_bias = graph.raw(f"{name}.fc1.bias", _interleaved(*experts.gate_and_up_biases(), axis=1))
        fc2_bias = graph.raw(f"{name}.fc2.bias", np.asarray(experts.down_bias, np.float32) * np.float32(experts.scale))
    if quantization is None:
        fc1 = graph.weight_stack(f"{name}.fc1", count, lambda e: _interleaved(*experts.gate_and_up(e)))
        fc2 = graph.weight_stack(f"{name}.fc2", count, lambda e: experts.down_rows(e) * experts.scale)
        return graph.op("MoE", *_given(tokens, logits, fc1, fc1_bias, fc2, fc2_bias), domain=CONTRIB_DOMAIN,
                        **attributes)
    fc1_codes, fc1_scales = _quantized_stack(graph, f"{name}.fc1", count,
                                             lambda e: _interleaved(*experts.gate_and_up(e)), quantization)
    fc2_codes, fc2_scales = _quantized_stack(graph, f"{name}.fc2", count, experts.down_rows, quantization)
    return graph.op(
        "QMoE", *_given(tokens, logits,
                        fc1_codes, graph.raw(f"{name}.fc1.scales", fc1_scales), fc1_bias,
                        fc2_codes, graph.raw(f"{name}.fc2.scales", fc2_scales * np.float32(experts.scale)), fc2_bias),
        domain=CONTRIB_DOMAIN, expert_weight_bits=quantization.bits, block_size=quantization.block_size, **attributes,
    )


def _given(*inputs: str) -> list[str]:
    """A node's inputs without the trailing optional ones left out ("" names an omitted input): a bias-free
    layer's node is the one it always was."""
    inputs = list(inputs)
    while inputs and inputs[-1] == "":
        inputs.pop()
    return inputs


def _quantized_stack(graph: Graph, name: str, count: int, expert_rows, quantization: Quantization) -> tuple[str, np.ndarray]:
    """(the initializer of packed codes [E, N, K * bits / 8], block scales [E, N, K / block]) of the experts'
    matrices [N, K] (`expert_rows(e)`), quantized and written one expert at a time; the scales (1/16 of a
    float32 stack at most) are kept to be scaled."""
    scales = []

    def codes(expert: int) -> np.ndarray:
        expert_codes, expert_scales = _quantized(expert_rows(expert), quantization, name)
        scales.append(expert_scales)
        return _pack(expert_codes, quantization.bits)

    written = graph.raw_stack(f"{name}.codes", count, codes)
    return written, np.stack(scales)


def _quantized(weight: np.ndarray, quantization: Quantization, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric codes [..., N, K] and block scales [..., N, K / block]: the grid a quantize pass chose, else RTN."""
    import torch

    from moeexport.quantization import quantize_rtn, recover_grid

    grid = quantization.grid
    tensor = torch.from_numpy(np.ascontiguousarray(weight))
    if grid is not None and grid.bits == quantization.bits and grid.group_size == quantization.block_size:
        codes, scales = recover_grid(tensor, quantization.bits, quantization.block_size)
    else:
        codes, scales = quantize_rtn(tensor, quantization.bits, quantization.block_size)
    if not np.isfinite(scales.numpy()).all():
        raise MoeExportError(f"quantizing {what} produced a non-finite scale")
    return codes.numpy().astype(np.int8), scales.numpy().astype(np.float32)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Signed codes -> uint8 with zero point 2^(bits-1); int4 two per byte, even index low."""
    stored = (codes.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    if bits == 8:
        return stored
    return (stored[..., 0::2] | (stored[..., 1::2] << 4)).astype(np.uint8)


def _plain(graph: Graph, tokens: str, logits: str, name: str, experts: RoutedExperts, routed: bool) -> str:
    top_values, top_index = _selected(graph, logits, name, experts)
    if experts.renormalize:
        top_values = graph.op("Div", top_values, graph.op("ReduceSum", top_values, graph.const([-1]), keepdims=1))
    if experts.scale != 1.0:
        top_values = graph.op("Mul", top_values, graph.const(experts.scale, np.float32))
    count = experts.count
    # stored stacks, widened where each branch uses them: ONNX Runtime 1.32 fails to load a graph whose
    # Cast of an f16 initializer feeds only an If's branches
    gate_up = graph.stored_stack(f"{name}.gate_up", count,
                                 lambda e: np.concatenate(experts.gate_and_up(e)).T)  # [E, H, 2I], gate then up
    down = graph.stored_stack(f"{name}.down", count, lambda e: experts.down_rows(e).T)  # [E, I, H]
    biases = None
    if experts.gate_up_bias is not None:  # [E, 1, 2I] and [E, 1, H]: broadcast over the tokens
        biases = (graph.raw(f"{name}.gate_up.bias", np.concatenate(experts.gate_and_up_biases(), axis=-1)[:, None]),
                  graph.raw(f"{name}.down.bias", np.asarray(experts.down_bias, np.float32)[:, None]))
    activation = experts.layout

    def every_expert() -> str:
        # [T, k, 1] == [E] -> one-hot [T, k, E], weighted and summed over k: dense routing weights [T, E]
        one_hot = graph.op("Cast", graph.op("Equal", graph.op("Unsqueeze", top_index, graph.const([-1])),
                                            graph.const(np.arange(count))), to=1)
        weighted = graph.op("Mul", one_hot, graph.op("Unsqueeze", top_values, graph.const([-1])))
        routing = graph.op("ReduceSum", weighted, graph.const([1]), keepdims=0)
        out = _swiglu(graph, tokens, graph.as_float(gate_up), graph.as_float(down), activation, biases)  # [E, T, H]
        per_expert = graph.op("Unsqueeze", graph.op("Transpose", routing, perm=[1, 0]), graph.const([-1]))  # [E, T, 1]
        return graph.op("ReduceSum", graph.op("Mul", out, per_expert), graph.const([0]), keepdims=0)

    def selected_experts() -> str:
        # each token's k experts gathered from the stacks: [T, 1, 1, H] @ [T, k, H, 2I] ... -> [T, k, 1, H]
        x = graph.op("Unsqueeze", tokens, graph.const([1, 2]))
        gathered = [graph.as_float(graph.op("Gather", stack, top_index, axis=0)) for stack in (gate_up, down)]
        chosen = biases and tuple(graph.op("Gather", bias, top_index, axis=0) for bias in biases)  # [T, k, 1, N]
        out = _swiglu(graph, x, *gathered, activation, chosen)
        weights = graph.op("Unsqueeze", top_values, graph.const([2, 3]))  # [T, k, 1, 1]
        return graph.op("ReduceSum", graph.op("Mul", out, weights), graph.const([1, 2]), keepdims=0)

    if not routed:
        return every_expert()
    one_token = graph.op("Equal", graph.op("Shape", tokens, start=0, end=1), graph.const([1]))
    return graph.if_(one_token, selected_experts, every_expert)


def _swiglu(graph: Graph, x: str, gate_up: str, down: str, layout: ExpertLayout,
            biases: tuple[str, str] | None) -> str:
    """down(act(gate) * up) of x against stacked [..., H, 2I] gate-then-up and [..., I, H] down weights (with
    their biases): silu(gate) * up, or the layout's clamped SwiGLU."""
    projected = graph.op("MatMul", x, gate_up)
    if biases:
        projected = graph.op("Add", projected, biases[0])
    gate, up = graph.op("Split", projected, axis=-1, outputs=2)
    if layout.activation == CLAMPED_SWIGLU:  # min(g, limit) * sigmoid(alpha * min(g, limit)) * (clamp(u) + 1)
        limit = graph.const(layout.limit, np.float32)
        gate = graph.op("Min", gate, limit)
        up = graph.op("Clip", up, graph.const(-layout.limit, np.float32), limit)
        glu = graph.op("Mul", gate, graph.op("Sigmoid", graph.op("Mul", gate, graph.const(layout.alpha, np.float32))))
        hidden = graph.op("Mul", graph.op("Add", up, graph.const(1.0, np.float32)), glu)
    else:
        hidden = graph.op("Mul", graph.activation(gate, layout.activation), up)
    out = graph.op("MatMul", hidden, down)
    return graph.op("Add", out, biases[1]) if biases else out
