"""M-SMoE expert merging (Li et al., "Merge, Then Compress"), saved as a genuinely smaller model.

Per MoE layer: the `keep` most frequently selected experts are dominant; every
other expert, in descending frequency, joins the dominant expert whose router
logits it resembles most (cosine of router-logit columns on the calibration
set). Before averaging, each member's FFN neurons are aligned to its dominant
expert by weight matching (an assignment problem over gate, up and down
weights, solved exactly), which leaves the member's function unchanged. Each
group becomes ONE expert: its weights are the frequency-weighted average of the
members, and so is its router row (`router: frequency_weighted`, the default;
`router: dominant` keeps the dominant expert's row). Unlike the paper's public
merging code, which points several router outputs at one shared module, the merged
model has fewer experts in its config and file. `scope: global` gives layers an
adaptive number of groups from one frequency threshold (MC-SMoE's global budget).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from scipy.optimize import linear_sum_assignment

from moeexport.adapters import LayerSpec, adapter_for
from moeexport.adapters.base import check_expert_count_change, moe_block, replace_experts
from moeexport.calibration.observers import Statistics
from moeexport.passes.base import CompressionPass, PassOptions, check_expert_keep


class MergeOptions(PassOptions):
    keep: int = Field(ge=1, description="experts per MoE layer after merging (the average, for scope global)")
    scope: Literal["layer", "global"] = "layer"
    router: Literal["frequency_weighted", "dominant"] = "frequency_weighted"
    align: bool = True  # weight-matching permutation alignment before averaging


@dataclass
class MergePlan:
    groups: dict[int, list[list[int]]]  # MoE layer -> groups, each [dominant, members...]
    weights: dict[int, list[list[float]]]  # the members' selection frequencies (averaging weights)
    router: str
    align: bool

    def describe(self) -> list[str]:
        merged = sum(len(g) - 1 for groups in self.groups.values() for g in groups)
        lines = [f"targeted {len(self.groups)} MoE layers; merged {merged} experts into their groups' dominant ones"]
        for layer, groups in sorted(self.groups.items()):
            lines.append(f"layer {layer}: {len(groups)} experts from groups {groups}")
        return lines


class Merge(CompressionPass):
    name = "merge"
    Options = MergeOptions

    def check(self, options: MergeOptions, layers: list[LayerSpec]) -> None:
        check_expert_keep(self.name, options.keep, options.scope, layers)

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
        return MergePlan(groups, weights, options.router, options.align)

    def apply(self, model, plan: MergePlan) -> None:
        adapter = adapter_for(model.config)
        check_expert_count_change(adapter, model.config)
        for layer, groups in plan.groups.items():
            block = moe_block(adapter, model, layer)
            experts, router = getattr(block, adapter.experts), getattr(block, adapter.router)
            merged = [
                _merge_group(experts.gate_up_proj.data, experts.down_proj.data, router.weight.data, group, w, plan)
                for group, w in zip(groups, plan.weights[layer])
            ]
            gate_up, down, rows = (torch.stack(parts) for parts in zip(*merged))
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
