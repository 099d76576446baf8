"""Mean squared input of every weight matrix, per routed expert from its own tokens.

This is what llama.cpp calls an importance matrix: quantizers weigh each input
column's rounding error by how large that input usually is. Experts are
measured only on the tokens routed to them, and each expert's token count is
kept, so that an expert which saw no calibration tokens is visible (the caller
decides the fallback and reports it) instead of being scored from nothing.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from moeexport.adapters import adapter_for
from moeexport.calibration.expert_inputs import on_routed_tokens
from moeexport.calibration.observers import routed_intermediate
from moeexport.streaming import first_layer_inputs, layer_views, outer, run_layer


@dataclass
class InputMoments:
    """Sums of squared inputs and token counts, keyed by (layer, role); layer -1 is the output head.

    Roles: attention_in (q/k/v), attention_out (o), shared_in / shared_mid (shared
    expert up+gate / down), experts_in / experts_mid ([E, width] per routed expert).
    """

    sums: dict = field(default_factory=lambda: defaultdict(lambda: 0))
    counts: dict = field(default_factory=lambda: defaultdict(lambda: 0))
    chunks: int = 0  # calibration sequences measured, and their length in tokens (llama.cpp's chunks)
    chunk_size: int = 0
    dataset: str = ""  # what the calibration text was, for the file the moments are written to

    def add(self, key, squares: torch.Tensor, count) -> None:
        self.sums[key] = self.sums[key] + squares.double()
        self.counts[key] = self.counts[key] + count

    def mean(self, key) -> torch.Tensor:
        counts = torch.as_tensor(self.counts[key], dtype=torch.float64)
        return self.sums[key] / (counts[..., None] if counts.ndim else counts).clamp_min(1)


@torch.no_grad()
def input_moments(model, input_ids: torch.Tensor, batch_size: int = 8) -> InputMoments:
    """The moments of `model`'s weight inputs on `input_ids` [N, L], measured one decoder layer at a time (a
    streamed model's layers, and its experts, are each read once and released: what is held is the moments,
    a few vectors per expert, and the activations carried from layer to layer)."""
    moments = InputMoments(chunks=len(input_ids), chunk_size=input_ids.shape[-1])
    batches = [first_layer_inputs(model, batch) for batch in input_ids.split(batch_size)]
    hidden = [h for h, _ in batches]
    for view in layer_views(model):
        with ExitStack() as stack:
            finish = _layer_hooks(view, moments, stack)
            hidden = [run_layer(view.module, h, kwargs) for h, (_, kwargs) in zip(hidden, batches)]
            finish()
    adapter = adapter_for(model.config)
    with outer(model, "final_norm"):  # what the head reads
        for h in hidden:
            _add_rows(moments, (-1, "output_in"), adapter.model_view(model).final_norm(h))
    return moments


def _add_rows(moments: InputMoments, key, inputs: torch.Tensor) -> None:
    flat = inputs.reshape(-1, inputs.shape[-1])
    moments.add(key, flat.double().pow(2).sum(0), len(flat))


def _layer_hooks(view, moments: InputMoments, stack: ExitStack):
    """Hooks (removed with `stack`) that add one layer's moments while it runs; returns what adds its
    routed experts' moments, to call once it has run over the calibration set."""

    def dense(key):
        return lambda module, args: _add_rows(moments, key, args[0])

    def pre_hook(module, hook):
        stack.callback(module.register_forward_pre_hook(hook).remove)

    index = view.index
    pre_hook(view.attention.q_proj, dense((index, "attention_in")))
    pre_hook(view.attention.o_proj, dense((index, "attention_out")))
    for shared in view.shared_experts:
        pre_hook(shared.up_proj, dense((index, "shared_in")))  # the input gate_proj reads too, if any
        pre_hook(shared.down_proj, dense((index, "shared_mid")))
    if view.experts is None:
        return lambda: None
    count = view.num_experts
    sums = {"experts_in": [0.0] * count, "experts_mid": [0.0] * count}
    seen = torch.zeros(count, dtype=torch.long)

    def on_expert_tokens(expert: int, rows: torch.Tensor) -> None:
        if len(rows):
            sums["experts_in"][expert] = sums["experts_in"][expert] + rows.double().pow(2).sum(0)
            middle = routed_intermediate(view, expert, rows)
            sums["experts_mid"][expert] = sums["experts_mid"][expert] + middle.double().pow(2).sum(0)
            seen[expert] += len(rows)

    def finish() -> None:
        for role, per_expert in sums.items():
            width = next(len(row) for row in per_expert if isinstance(row, torch.Tensor))
            moments.add((index, role), torch.stack([row if isinstance(row, torch.Tensor) else
                                                    torch.zeros(width, dtype=torch.float64) for row in per_expert]),
                        seen)

    on_routed_tokens(view, stack, on_expert_tokens)
    return finish
