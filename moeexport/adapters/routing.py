"""Routing by a family's declared rule (declaration.Routing): router logits -> the k experts and their weights.

The damage scorer and repair route through `route`, the observers' routing mass
through `scores`; the ONNX and GGUF lowering read the same rule's fields. For
softmax -> top-k -> renormalize these are the float operations of transformers'
routers, so results stay the model's own.
"""

from __future__ import annotations

import torch

from moeexport.adapters.declaration import SOFTMAX, Routing
from moeexport.errors import MoeExportError


def route(rule: Routing, logits: torch.Tensor, top_k: int, removed: torch.Tensor | None = None,
          selection_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k weights, top-k index) [T, k] of `logits` [T, E], in float32, over the experts not `removed`
    (a boolean mask [E]: how a layer routes once Expert Drop has taken their rows). `selection_bias` [E] is
    the family's selection-only bias, where its rule has one."""
    left = logits.shape[-1] - (0 if removed is None else int(removed.sum()))
    logits = logits.float() if removed is None else logits.float().masked_fill(removed, float("-inf"))
    if rule.softmax_over_top_k:
        top, index = logits.topk(min(top_k, left), dim=-1)
        weights = top.softmax(dim=-1)
    else:
        weights, index = _chosen_scores(rule, scores(rule, logits), min(top_k, left), removed, selection_bias)
    if rule.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * rule.scale, index


def scores(rule: Routing, logits: torch.Tensor) -> torch.Tensor:
    """Each expert's routing score: a softmax over the experts, or a sigmoid of each logit."""
    return logits.softmax(dim=-1) if rule.scores == SOFTMAX else logits.sigmoid()


def _chosen_scores(rule: Routing, scores: torch.Tensor, k: int, removed: torch.Tensor | None,
                   selection_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best experts' scores and index: chosen on the scores plus the selection bias, within the best
    groups; weighed by the scores alone."""
    if selection_bias is None and rule.groups == 1:
        return scores.topk(k, dim=-1)
    choice = scores if selection_bias is None else scores + selection_bias
    if removed is not None:
        choice = choice.masked_fill(removed, float("-inf"))
    if rule.groups > 1:
        choice = _within_best_groups(rule, choice)
    index = choice.topk(k, dim=-1).indices
    return scores.gather(-1, index), index


def _within_best_groups(rule: Routing, choice: torch.Tensor) -> torch.Tensor:
    """The choice scores with every expert outside the `top_groups` best groups out of the choice."""
    grouped = choice.unflatten(-1, (rule.groups, -1))
    if rule.group_score == "max":
        group_scores = grouped.max(dim=-1).values
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    best = torch.zeros_like(group_scores).scatter_(-1, group_scores.topk(rule.top_groups, dim=-1).indices, 1.0)
    return grouped.masked_fill(best[..., None] == 0, float("-inf")).flatten(-2)


def check_routing(router, output, top_k: int, rule: Routing, selection_bias: torch.Tensor | None = None) -> None:
    """Refuse a router whose own output is not `route`'s rule on its logits (and selection bias): removals
    routed by the rule would then measure or repair some other model."""
    logits, weights, index = output
    own_weights, own_index = route(rule, logits, top_k, selection_bias=selection_bias)
    # compared per expert: some routers return their k unsorted
    own = torch.zeros_like(logits, dtype=weights.dtype).scatter_(-1, own_index, own_weights.to(weights.dtype))
    theirs = torch.zeros_like(own).scatter_(-1, index, weights)
    if not (torch.equal(own != 0, theirs != 0) and torch.allclose(own, theirs)):
        raise MoeExportError(f"this model's router ({type(router).__name__}) does not route as its family declares "
                             f"({rule.scores} -> top-k ...): its experts cannot be removed by measurement or repaired")
