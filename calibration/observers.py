"""One pass over the calibration set, layer by layer, collecting what the passes score with.

The calibration activations are captured at the input of the first decoder
layer, then carried forward through one decoder layer at a time; each layer's
statistics are gathered with hooks while it runs. Only one layer runs at a time,
so a later streaming loader can bring layers in from disk without a redesign.

Per MoE layer (He et al.; MC-SMoE; REAP):
- expert_tokens: top-k selections per expert (tokens seen per expert);
- routing_mass: mean share per expert of a token's routing scores (its softmax probability over all experts;
  sigmoid scores, each in (0, 1), as a share of the token's sum);
- reap: mean over an expert's routed tokens of gate weight x ||expert output||;
- router_logit_similarity: cosine between experts' router-logit columns;
- moe_similarity: mean token cosine of x and x + MoE(norm(x)) (Layer Drop).
Per block: block_similarity = cos(h_in, h_out), and cos(h_i, h_j) for every pair
within `max_block_window` blocks (consecutive Block Drop).
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from moeexport.adapters import LayerView, Routing, adapter_for
from moeexport.adapters.declaration import SOFTMAX
from moeexport.adapters.experts import expert_intermediate, expert_output
from moeexport.adapters.routing import scores
from moeexport.adapters.surgery import decoder_layers, sublayer_hidden
from moeexport.streaming import first_layer_inputs, layer_views, run_layer
from moeexport.errors import MoeExportError

STATISTICS_VERSION = 1


@dataclass
class LayerStatistics:
    kind: str  # moe | dense | dropped
    tokens: int
    block_similarity: float
    moe_similarity: float | None = None
    top_k: int | None = None
    expert_tokens: list[int] | None = None
    routing_mass: list[float] | None = None
    reap: list[float] | None = None
    router_logit_similarity: list[list[float]] | None = None

    def expert_frequency(self) -> list[float]:
        """Share of the layer's routing decisions each expert received."""
        total = sum(self.expert_tokens) or 1
        return [count / total for count in self.expert_tokens]


@dataclass
class Statistics:
    key: str  # which model (and compression history) on which calibration set
    calibration: dict
    layers: list[LayerStatistics]
    # block_pair_similarity[i][w-1] = cos(input of block i, input of block i+w), w = 1..max window
    block_pair_similarity: list[list[float]] = field(default_factory=list)
    version: int = STATISTICS_VERSION

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self)) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Statistics":
        raw = json.loads(Path(path).read_text())
        if raw.get("version") != STATISTICS_VERSION:
            raise MoeExportError(f"{path} was written by another moeexport version; delete it to recompute")
        raw["layers"] = [LayerStatistics(**layer) for layer in raw["layers"]]
        return cls(**raw)

    def window_similarity(self, start: int, width: int) -> float:
        """cos(input of block `start`, output of block `start + width - 1`)."""
        row = self.block_pair_similarity[start]
        if width > len(row):
            raise MoeExportError(
                f"block similarities were collected for windows up to {len(self.block_pair_similarity[0])} "
                f"blocks; {width} needs --max-block-window {width} or more"
            )
        return row[width - 1]


def routed_intermediate(view: LayerView, expert: int, tokens: torch.Tensor) -> torch.Tensor:
    """What one routed expert of the layer feeds its down projection, for `tokens` [T, hidden]."""
    if hasattr(view.experts, "intermediate"):  # a streamed layer's (moeexport.streaming.ExpertsOnDemand)
        return view.experts.intermediate(expert, tokens)
    return expert_intermediate(view.layout, view.experts, expert, tokens)


def _token_cosine_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    """Sum over tokens of cos(a_t, b_t): per-token in float32, the sum in float64."""
    return F.cosine_similarity(a.flatten(0, -2).float(), b.flatten(0, -2).float(), dim=-1).double().sum().item()


class _MoEAccumulator:
    """Hooks on one MoE layer's norm, router and block that add up its statistics."""

    def __init__(self, view: LayerView, routing: Routing):
        self.view, self.routing, self.router, self.norm, self.block = view, routing, view.router, view.ffn_norm, view.ffn
        experts = view.num_experts
        self.expert_tokens = torch.zeros(experts, dtype=torch.long)
        self.routing_mass = torch.zeros(experts, dtype=torch.float64)
        self.reap_sum = torch.zeros(experts, dtype=torch.float64)
        self.logit_gram = torch.zeros(experts, experts, dtype=torch.float64)
        self.moe_cosine_sum = 0.0
        self._residual = None
        # a streamed layer's experts hand REAP their outputs as the forward computes them; others are recomputed
        self._outputs_observed = hasattr(view.experts, "outputs_observed")

    def hooks(self, stack: ExitStack) -> None:
        for module, hook in ((self.norm, self._on_norm), (self.router, self._on_router), (self.block, self._on_block)):
            stack.callback(module.register_forward_hook(hook).remove)
        if self._outputs_observed:
            stack.enter_context(self.view.experts.outputs_observed(self._on_expert_output))

    def _on_norm(self, module, args, output):
        self._residual = args[0]

    def _on_router(self, module, args, output):
        logits, weights, index = output
        tokens = args[0].reshape(-1, args[0].shape[-1])
        if self.view.experts_norm is not None:  # what the experts see of the router's input
            tokens = self.view.experts_norm(tokens)
        logits = logits.reshape(-1, logits.shape[-1]).double()
        if self.view.router_returns_probabilities:  # log-scores: logits up to a per-token shift, softmax unchanged
            logits = logits.clamp_min(torch.finfo(torch.float64).tiny).log()
        self.expert_tokens += torch.bincount(index.flatten(), minlength=len(self.expert_tokens))
        token_scores = scores(self.routing, logits)
        if self.routing.scores != SOFTMAX:  # sigmoid scores: a share of the token's sum, as softmax's already are
            token_scores = token_scores / token_scores.sum(-1, keepdim=True)
        self.routing_mass += token_scores.sum(0)
        self.logit_gram += logits.T @ logits
        self._weights = weights.reshape(index.shape)
        if not self._outputs_observed:
            self._reap(tokens, index)

    def _reap(self, tokens, index) -> None:
        """Each expert's output recomputed for the tokens routed to it, in the order the experts' forward takes
        them (slot by slot), so that REAP is the same number whether it is recomputed here or, on a streamed
        layer, observed in the forward."""
        for expert in range(len(self.reap_sum)):
            slots, token_rows = torch.where(index.T == expert)
            if len(token_rows):
                intermediate = routed_intermediate(self.view, expert, tokens[token_rows])
                output = expert_output(self.view.layout, self.view.experts, expert, intermediate)
                self._on_expert_output(expert, slots, token_rows, output)

    def _on_expert_output(self, expert: int, slots, token_rows, output) -> None:
        """Add gate weight x ||expert output|| over these routed tokens to the expert's REAP numerator."""
        self.reap_sum[expert] += (self._weights[token_rows, slots].double() * output.double().norm(dim=-1)).sum()

    def _on_block(self, module, args, output):
        self.moe_cosine_sum += _token_cosine_sum(self._residual, self._residual + sublayer_hidden(output))

    def result(self, tokens: int, top_k: int, block_similarity: float) -> LayerStatistics:
        counts = self.expert_tokens.double()
        norms = self.logit_gram.diagonal().sqrt().clamp_min(1e-12)
        similarity = self.logit_gram / norms[:, None] / norms[None, :]
        return LayerStatistics(
            kind="moe",
            tokens=tokens,
            block_similarity=block_similarity,
            moe_similarity=self.moe_cosine_sum / tokens,
            top_k=top_k,
            expert_tokens=self.expert_tokens.tolist(),
            routing_mass=(self.routing_mass / tokens).tolist(),
            # an expert that saw no tokens has no saliency evidence: 0, and its token count says why
            reap=torch.where(counts > 0, self.reap_sum / counts.clamp_min(1), 0.0).tolist(),
            router_logit_similarity=similarity.tolist(),
        )


@torch.no_grad()
def observe(
    model,
    input_ids: torch.Tensor,
    key: str,
    calibration: dict,
    batch_size: int = 8,
    max_block_window: int = 8,
    progress=None,
) -> Statistics:
    """Collect every statistic in one layer-by-layer pass over `input_ids` [N, L]."""
    adapter = adapter_for(model.config)
    routing = adapter.model_config(model.config).routing
    layers = decoder_layers(adapter, model)
    batches = list(input_ids.split(batch_size))
    hidden, call_kwargs = zip(*(first_layer_inputs(model, batch) for batch in batches))
    hidden = list(hidden)
    tokens = input_ids.numel()
    window = min(max_block_window, len(layers))
    recent_inputs: list[list[torch.Tensor]] = []  # inputs of the last `window` blocks
    pair_similarity: list[list[float]] = [[] for _ in layers]
    layer_statistics = []
    task = progress.add_task("observing layers", total=len(layers)) if progress else None

    for view in layer_views(model):
        index, layer_module, kind = view.index, view.module, view.kind
        accumulator = _MoEAccumulator(view, routing) if kind == "moe" else None
        recent_inputs = (recent_inputs + [hidden])[-window:]
        with ExitStack() as stack:
            if accumulator:
                accumulator.hooks(stack)
            hidden = [run_layer(layer_module, h, kwargs) for h, kwargs in zip(hidden, call_kwargs)]
        # the output of block `index` is the input of block index+1: close every window ending here
        for offset, earlier in enumerate(recent_inputs):
            start = index - len(recent_inputs) + 1 + offset
            cosine = sum(_token_cosine_sum(a, b) for a, b in zip(earlier, hidden)) / tokens
            pair_similarity[start].append(cosine)
        block_similarity = pair_similarity[index][0]
        if accumulator:
            top_k = getattr(accumulator.router, "top_k", None)
            layer_statistics.append(accumulator.result(tokens, top_k, block_similarity))
        else:
            layer_statistics.append(LayerStatistics(kind=kind, tokens=tokens, block_similarity=block_similarity))
        if progress:
            progress.advance(task)

    return Statistics(key=key, calibration=calibration, layers=layer_statistics, block_pair_similarity=pair_similarity)
