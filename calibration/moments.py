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
from moeexport.calibration.observers import routed_intermediate


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
    adapter = adapter_for(model.config)
    moments = InputMoments(chunks=len(input_ids), chunk_size=input_ids.shape[-1])

    def dense(key):
        def hook(module, args):
            flat = args[0].reshape(-1, args[0].shape[-1])
            moments.add(key, flat.double().pow(2).sum(0), len(flat))
        return hook

    def experts_hook(view, routed_input):
        def hook(module, args, output):
            tokens = routed_input["x"].reshape(-1, routed_input["x"].shape[-1])
            index = output[2].reshape(len(tokens), -1)
            count = view.experts.down_proj.shape[0]
            inputs = torch.zeros(count, tokens.shape[-1], dtype=torch.float64)
            middles = torch.zeros(count, view.experts.down_proj.shape[-1], dtype=torch.float64)
            seen = torch.zeros(count, dtype=torch.long)
            for expert in range(count):
                rows = torch.where(index == expert)[0]
                if len(rows):
                    inputs[expert] = tokens[rows].double().pow(2).sum(0)
                    middles[expert] = routed_intermediate(view, expert, tokens[rows]).double().pow(2).sum(0)
                    seen[expert] = len(rows)
            moments.add((view.index, "experts_in"), inputs, seen)
            moments.add((view.index, "experts_mid"), middles, seen)
        return hook

    with ExitStack() as stack:
        def pre_hook(module, hook):
            stack.callback(module.register_forward_pre_hook(hook).remove)

        for view in adapter.layer_views(model):
            index = view.index
            pre_hook(view.attention.q_proj, dense((index, "attention_in")))
            pre_hook(view.attention.o_proj, dense((index, "attention_out")))
            for shared in view.shared_experts:
                pre_hook(shared.up_proj, dense((index, "shared_in")))  # the input gate_proj reads too, if any
                pre_hook(shared.down_proj, dense((index, "shared_mid")))
            if view.experts is not None:
                routed_input = {}
                pre_hook(view.router, lambda module, args, store=routed_input: store.update(x=args[0]))
                stack.callback(view.router.register_forward_hook(experts_hook(view, routed_input)).remove)
        pre_hook(adapter.model_view(model).output, dense((-1, "output_in")))
        for batch in input_ids.split(batch_size):
            model(input_ids=batch, use_cache=False)
    return moments
