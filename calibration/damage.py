"""How much removing blocks, MoE sublayers or experts changes the model's output, on calibration tokens.

`RemovalScorer.damage(removals, metric)` gives, for each removal (a set of
whole blocks, MoE sublayers and routed experts, by layer index), its damage per
token, averaged over the scoring tokens: "perplexity", the rise in next-token
loss (the log of the perplexity ratio), or "kl", KL(original || original
without them). Every removal is
measured in the same pass over the decoder layers: each layer is read once (a
streamed model reads it from disk once), and runs on the hidden states of every
distinct removal prefix up to it, so removals that agree on the layers so far
share their computation. A removal that starts at layer j costs the layers
from j on. An expert is removed as Expert Drop removes it: its router row goes,
the softmax, top-k and renormalization run over the experts left.

Cost, for a greedy step over C candidates of L layers: one read of the model
and about C x L / 2 + L layer forwards on the scoring tokens, holding C + 1
hidden states of tokens x hidden floats. At 8x7B widths (L = 32, hidden 4096) on
8 x 2048 scoring tokens: 16 model forwards per step for Block or Layer Drop and
34 states of 256 MiB; the candidates are split into groups of `max_states` when
that is too much.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeexport.adapters import adapter_for
from moeexport.adapters.routing import check_routing, route
from moeexport.adapters.surgery import silenced
from moeexport.errors import MoeExportError
from moeexport.streaming import first_layer_inputs, layer_views, outer, run_layer

BLOCK, MOE, EXPERT = "block", "moe", "expert"


@dataclass(frozen=True, order=True)
class Removed:
    """One thing a removal takes out of the model: a whole block, the norm + MoE sublayer of a layer, or one
    routed expert of it."""

    layer: int
    what: str  # BLOCK | MOE | EXPERT
    expert: int = -1  # which routed expert (EXPERT), by its index in the layer as it stands


Removal = frozenset  # of Removed


class RemovalScorer:
    """KL of removals against the model as given, on `tokens` [N, L] (a calibration set or a part of it)."""

    def __init__(self, model, tokens: torch.Tensor, batch_size: int = 8, max_states: int = 64, progress=None):
        self.model, self.tokens, self.batch_size = model, tokens, batch_size
        self.routing = adapter_for(model.config).model_config(model.config).routing
        self._routing_checked: set[int] = set()  # layers whose router was seen to route by the rule we mask
        self.max_states = max_states
        self.progress = progress
        self.passes = 0  # reads of the model, for the cost report

    def kl(self, removals: list[Removal]) -> list[float]:
        """KL(model || model without each removal), per token, in the order given."""
        return self.damage(removals, "kl")

    @torch.no_grad()
    def damage(self, removals: list[Removal], metric: str) -> list[float]:
        """Per removal, in the order given, the mean per-token `metric`: "kl", KL(model || model without it);
        "perplexity", the log of its perplexity ratio on the scoring tokens (the rise in next-token loss)."""
        removals = [frozenset(removal) for removal in removals]
        unique = sorted(set(removals), key=lambda removal: sorted(removal))
        scores: dict[Removal, float] = {}
        group = max(1, self.max_states - 1)
        for start in range(0, len(unique), group):
            scores.update(self._pass(unique[start:start + group], metric))
        return [scores[removal] for removal in removals]

    def _pass(self, removals: list[Removal], metric: str) -> dict[Removal, float]:
        self.passes += 1
        batches = [first_layer_inputs(self.model, batch) for batch in self.tokens.split(self.batch_size)]
        # hidden states per removal prefix: the removed items at layers already run
        states: dict[Removal, list[torch.Tensor]] = {frozenset(): [hidden for hidden, _ in batches]}
        task = self.progress.add_task(f"scoring {len(removals)} removals", total=None) if self.progress else None
        for view in layer_views(self.model):
            advanced: dict[Removal, list[torch.Tensor]] = {}
            for removal in [frozenset()] + removals:
                prefix = frozenset(item for item in removal if item.layer < view.index)
                here = frozenset(item for item in removal if item.layer == view.index)
                key = prefix | here
                if key not in advanced:
                    advanced[key] = self._run(view, states[prefix], batches, here)
            states = advanced
            if self.progress:
                self.progress.advance(task)
        if self.progress:
            self.progress.remove_task(task)
        return self._divergence(states, removals, metric)

    def _run(self, view, hidden: list[torch.Tensor], batches, removed: Removal) -> list[torch.Tensor]:
        whats = {item.what for item in removed}
        if BLOCK in whats:
            return hidden
        with ExitStack() as stack:
            if MOE in whats:  # the sublayer adds nothing: the residual passes its input on
                handle = view.ffn.register_forward_hook(lambda module, args, output: silenced(output))
                stack.callback(handle.remove)
            experts = sorted(item.expert for item in removed if item.what == EXPERT)
            if experts:
                handle = view.router.register_forward_hook(self._without_experts(view, experts))
                stack.callback(handle.remove)
            return [run_layer(view.module, h, kwargs) for h, (_, kwargs) in zip(hidden, batches)]

    def _without_experts(self, view, removed: list[int]):
        """A forward hook on the router that routes as if `removed` had no router rows (Expert Drop)."""
        if self.routing.method != "greedy":
            raise MoeExportError("measuring expert removals needs greedy top-k routing (topk_method: greedy)")

        def hook(module, args, output):
            logits, weights, index = output
            if view.index not in self._routing_checked:
                check_routing(module, output, view.top_k, self.routing)
                self._routing_checked.add(view.index)
            mask = torch.zeros(logits.shape[-1], dtype=torch.bool)
            mask[removed] = True
            new_weights, new_index = route(self.routing, logits, view.top_k, mask)
            return logits, new_weights.to(weights.dtype), new_index
        return hook

    def _divergence(self, states: dict[Removal, list[torch.Tensor]], removals: list[Removal],
                    metric: str) -> dict[Removal, float]:
        """Mean per-token `metric` (see `damage`) of each removal, from the final hidden states."""
        around = adapter_for(self.model.config).model_view(self.model)
        totals = {removal: 0.0 for removal in removals}
        count = 0

        def log_probs(hidden: torch.Tensor) -> torch.Tensor:
            return F.log_softmax(around.output(around.final_norm(hidden)).float(), dim=-1)

        with outer(self.model, "output"):
            for index, tokens in enumerate(self.tokens.split(self.batch_size)):
                reference = log_probs(states[frozenset()][index])
                if metric == "perplexity":  # the loss on each next token, from every position but the last
                    targets = tokens[:, 1:, None]
                    reference_loss = -reference[:, :-1].gather(-1, targets).sum().item()
                    count += targets.numel()
                else:
                    count += reference.shape[0] * reference.shape[1]
                for removal in removals:
                    removed = log_probs(states[removal][index])
                    if metric == "perplexity":
                        totals[removal] += -removed[:, :-1].gather(-1, targets).sum().item() - reference_loss
                    else:
                        totals[removal] += F.kl_div(removed, reference, log_target=True, reduction="sum").item()
        return {removal: total / count for removal, total in totals.items()}
