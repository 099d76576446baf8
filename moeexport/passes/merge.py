"""M-SMoE expert merging and MC-SMoE's compression of the merged experts (Li et al., "Merge, Then Compress").

Per MoE layer: the `keep` most frequently selected experts are dominant; every
other expert, in descending frequency, joins the dominant expert whose router
logits it resembles most (cosine of router-logit columns on the calibration
set). Before averaging, each member's FFN neurons are aligned to its dominant
expert by weight matching (an assignment problem over gate, up and down
weights, solved exactly), which leaves the member's function unchanged. A
group's weights are the frequency-weighted average of its members'.
`scope: global` gives layers an adaptive number of groups from one frequency
threshold (MC-SMoE's global budget).

Layout of the result:
- `layout: grouped` (default): each group becomes ONE expert, so the model has
  fewer experts in its config and file. Its router row is the
  frequency-weighted average of the members' rows (`router:
  frequency_weighted`) or the dominant expert's row (`router: dominant`).
- `layout: alias`: the paper code's baseline. The router is untouched and
  keeps all E rows; every member's slot holds its group's merged weights, so a
  token that picks two members of one group runs the merged expert twice. The
  model keeps E experts in config and file: as big as the original.

`compress: {rank: r, sparsity: s}` is MC-SMoE's second stage, done without its
retraining. As in MC-SMoE (LoSparse on every unique expert of the merged
layers), every merged expert of every targeted layer is compressed, groups of
one included. Each of its gate, up and down matrices W (m x n) becomes
U·V + S: U·V the rank-r truncated SVD, S the residual W - U·V with only its
largest-magnitude (1 - s) share of entries kept. MC-SMoE scores S by PLATON
|θ·∇θ| while it fine-tunes; with no training there is no gradient, and the
training-free choices are magnitude and Wanda (|S|·||input||). This pass uses
magnitude: it needs no activations, so the pass stays free of per-expert
calibration activations (the inputs of rarely routed experts are thin anyway),
and on the 8 -> 4 merge of the trained fixture Wanda scores (input column
norms of each merged expert's routed calibration tokens) came within 0.01 KL
of magnitude at rank 32/64 and sparsity 0.5/0.9, better at two settings and
worse at one: not worth the dependency. The effective parameter count
r·(m+n) + nnz(S) per matrix is reported against dense m·n. The result is
materialized as dense expert weights, because every backend exports dense
experts: in GGUF and ONNX a compressed expert is stored (and quantized, and
run) as a full m x n matrix, so this stage changes quality but saves nothing
in the file or in compute. The saving is real only for a runtime that keeps
U, V and a sparse S.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from scipy.optimize import linear_sum_assignment

from moeexport.adapters import LayerSpec, adapter_for
from moeexport.adapters.surgery import check_expert_count_change, check_experts_can_merge, replace_experts
from moeexport.calibration.observers import Statistics
from moeexport.errors import MoeExportError
from moeexport.pass_options import CompressOptions, MergeOptions
from moeexport.passes.base import CompressionPass, check_expert_keep


@dataclass
class MergePlan:
    groups: dict[int, list[list[int]]]  # MoE layer -> groups, each [dominant, members...]
    weights: dict[int, list[list[float]]]  # the members' selection frequencies (averaging weights)
    router: str
    align: bool
    layout: str = "grouped"
    compress: dict | None = None  # {"rank": r, "sparsity": s}
    # filled by apply: MoE layer -> [effective, dense] parameters of its merged experts' matrices
    compressed_parameters: dict[int, list[int]] = field(default_factory=dict)

    def describe(self) -> list[str]:
        merged = sum(len(g) - 1 for groups in self.groups.values() for g in groups)
        lines = [f"targeted {len(self.groups)} MoE layers; merged {merged} experts into their groups' dominant ones"]
        if self.layout == "alias":
            lines.append("layout alias: router and expert count unchanged; each member's slot holds its group's weights")
        for layer, groups in sorted(self.groups.items()):
            lines.append(f"layer {layer}: {len(groups)} merged experts from groups {groups}")
        if self.compress:
            what = (f"compress every merged expert's gate, up and down to rank {self.compress['rank']} + "
                    f"{1 - self.compress['sparsity']:.0%} of the residual (by magnitude), stored dense")
            if self.compressed_parameters:
                effective = sum(e for e, _ in self.compressed_parameters.values())
                dense = sum(d for _, d in self.compressed_parameters.values())
                what += f": effective {effective:,} of {dense:,} dense expert parameters ({effective / dense:.1%})"
            lines.append(what)
        return lines


class Merge(CompressionPass):
    name = "merge"
    Options = MergeOptions

    def experts_left(self, options: MergeOptions) -> int:
        return options.keep

    def check(self, options: MergeOptions, layers: list[LayerSpec]) -> None:
        check_expert_keep(self.name, options.keep, options.scope, layers)
        if options.layout == "alias" and "router" in options.model_fields_set:
            raise MoeExportError("merge layout=alias keeps every router row; the router option is for layout grouped")

    def check_model(self, options: MergeOptions, model) -> None:
        check_experts_can_merge(adapter_for(model.config), model.config)  # before any calibration

    def plan(self, statistics: Statistics | None, layers: list[LayerSpec], options: MergeOptions) -> MergePlan:
        moe_layers = [i for i, spec in enumerate(layers) if spec.kind == "moe" and spec.num_experts > 0]
        frequency = {layer: statistics.layers[layer].expert_frequency() for layer in moe_layers}
        group_counts = (
            {layer: min(options.keep, len(frequency[layer])) for layer in moe_layers}
            if options.scope == "layer"
            else _global_group_counts(frequency, options.keep)
        )
        groups, weights = {}, {}
        for layer in moe_layers:
            similarity = statistics.layers[layer].router_logit_similarity
            groups[layer] = _group(frequency[layer], similarity, group_counts[layer])
            weights[layer] = [[frequency[layer][e] for e in group] for group in groups[layer]]
        compress = options.compress.model_dump() if options.compress else None
        return MergePlan(groups, weights, options.router, options.align, options.layout, compress)

    def apply(self, model, plan: MergePlan) -> None:
        adapter = adapter_for(model.config)
        check_experts_can_merge(adapter, model.config)  # for callers of apply without check_model
        if plan.layout == "grouped":
            check_expert_count_change(adapter, model.config)
        views = {layer: adapter.layer_view(model, layer) for layer in plan.groups}
        if plan.compress:
            for view in views.values():
                hidden, ffn = view.experts.down_proj.shape[1:]
                _check_rank(plan.compress["rank"], ffn, hidden)
        for layer, groups in plan.groups.items():
            experts, router = views[layer].experts, views[layer].router
            merged = [
                _merge_group(experts.gate_up_proj.data, experts.down_proj.data, router.weight.data, group, w, plan)
                for group, w in zip(groups, plan.weights[layer])
            ]
            gate_up, down, rows = (torch.stack(parts) for parts in zip(*merged))
            if plan.compress:
                gate_up, down, plan.compressed_parameters[layer] = _compressed(gate_up, down, **plan.compress)
            if plan.layout == "alias":
                group_of = {expert: g for g, group in enumerate(groups) for expert in group}
                slot_group = torch.tensor([group_of[expert] for expert in range(len(group_of))])
                gate_up, down, rows = gate_up[slot_group], down[slot_group], router.weight.data.clone()
            replace_experts(adapter, model, layer, gate_up, down, rows)


def _global_group_counts(frequency: dict[int, list[float]], keep_average: int) -> dict[int, int]:
    """MC-SMoE's adaptive budget: one frequency threshold across layers; every layer keeps at least one."""
    budget = keep_average * len(frequency)
    ranked = sorted((f for layer_frequency in frequency.values() for f in layer_frequency), reverse=True)
    threshold = ranked[min(budget, len(ranked)) - 1]
    counts = {layer: max(1, sum(f >= threshold for f in fs)) for layer, fs in frequency.items()}
    # ties at the threshold can overshoot: trim the layers with the most groups first
    while sum(counts.values()) > budget:
        largest = max(counts, key=lambda layer: counts[layer])
        counts[largest] -= 1
    return counts


def _group(frequency: list[float], similarity: list[list[float]], count: int) -> list[list[int]]:
    """Dominant experts (most frequent) and the others attached to their most similar dominant one."""
    order = sorted(range(len(frequency)), key=lambda e: (-frequency[e], e))
    dominant = sorted(order[:count])
    groups = {d: [d] for d in dominant}
    for expert in order[count:]:
        closest = max(dominant, key=lambda d: (similarity[expert][d], -d))
        groups[closest].append(expert)
    return [groups[d] for d in dominant]


def _merge_group(gate_up, down, router, group: list[int], weights: list[float], plan: MergePlan):
    """(gate_up [2*ffn, hidden], down [hidden, ffn], router row [hidden]) of one merged expert."""
    dominant = group[0]
    total = sum(weights) or 1.0
    share = [w / total if sum(weights) else 1.0 / len(group) for w in weights]
    merged_gate_up = torch.zeros_like(gate_up[dominant])
    merged_down = torch.zeros_like(down[dominant])
    for expert, weight in zip(group, share):
        member_gate_up, member_down = gate_up[expert], down[expert]
        if plan.align and expert != dominant:
            member_gate_up, member_down = _aligned(gate_up[dominant], down[dominant], member_gate_up, member_down)
        merged_gate_up += weight * member_gate_up
        merged_down += weight * member_down
    if plan.router == "dominant":
        row = router[dominant].clone()
    else:
        row = sum(weight * router[expert] for expert, weight in zip(group, share))
    return merged_gate_up, merged_down, row


def _aligned(reference_gate_up, reference_down, gate_up, down):
    """Permute a member's FFN neurons to best match the reference expert's (function unchanged)."""
    width = down.shape[1]
    ref_gate, ref_up = reference_gate_up[:width], reference_gate_up[width:]
    gate, up = gate_up[:width], gate_up[width:]
    # similarity of neuron i (reference) and j (member) over every weight that touches them
    cost = ref_gate @ gate.T + ref_up @ up.T + reference_down.T @ down
    _, permutation = linear_sum_assignment(cost.double().numpy(), maximize=True)
    index = torch.as_tensor(permutation, dtype=torch.long)
    return torch.cat([gate[index], up[index]]), down[:, index]


def _check_rank(rank: int, ffn: int, hidden: int) -> None:
    """The low-rank part of an ffn x hidden (or hidden x ffn) matrix has rank at most min(ffn, hidden)."""
    if rank > min(ffn, hidden):
        raise MoeExportError(f"merge compress rank={rank} but expert matrices are {ffn}x{hidden} "
                             f"(rank at most {min(ffn, hidden)})")


def _compressed(gate_up, down, rank: int, sparsity: float):
    """Every expert's gate, up and down as dense U·V + S; with [effective, dense] parameter counts."""
    width = down.shape[2]
    effective = dense = 0
    compressed_gate_up, compressed_down = torch.empty_like(gate_up), torch.empty_like(down)
    for expert in range(len(gate_up)):
        for source, target in (
            (gate_up[expert, :width], compressed_gate_up[expert, :width]),
            (gate_up[expert, width:], compressed_gate_up[expert, width:]),
            (down[expert], compressed_down[expert]),
        ):
            low_rank, sparse = _low_rank_plus_sparse(source, rank, sparsity)
            target.copy_(low_rank + sparse)
            effective += rank * sum(source.shape) + int(sparse.count_nonzero())
            dense += source.numel()
    return compressed_gate_up, compressed_down, [effective, dense]


def _low_rank_plus_sparse(weight: torch.Tensor, rank: int, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U·V, S): the rank-`rank` truncated SVD of `weight`, and the largest-magnitude (1 - sparsity) of the rest."""
    u, singular, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    low_rank = (u[:, :rank] * singular[:rank]) @ vh[:rank]
    residual = (weight.double() - low_rank).flatten()
    sparse = torch.zeros_like(residual)
    kept = residual.abs().topk(round((1 - sparsity) * residual.numel())).indices
    sparse[kept] = residual[kept]
    return low_rank.to(weight.dtype), sparse.view_as(weight).to(weight.dtype)
