"""What each expert's weights see, gathered layer by layer for passes that compute weights from it.

Pruning (Wanda, SparseGPT) and quantization (GPTQ) need, for every weight
matrix, the Gram matrix X^T X of its inputs (GPTQ and SparseGPT's Hessian, up to
a factor) or only its diagonal (Wanda's squared input-column norms). A routed
expert is measured ONLY on the tokens routed to it: its gate_up projection on the
expert input, its down projection on its own act(gate) * up. Shared experts see
every token.

`layer_by_layer` runs the calibration set through one decoder layer at a time,
so the caller can change a layer's weights before its outputs become the next
layer's inputs (sequential calibration, as in GPTQ): later layers are calibrated
on what the compressed earlier layers actually produce, and only one layer's
Gram matrices are held at a time.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from moeexport.adapters import LayerView
from moeexport.calibration.observers import routed_intermediate
from moeexport.streaming import first_layer_inputs, layer_views, run_layer


@torch.no_grad()
def layer_by_layer(adapter, model, input_ids: torch.Tensor, batch_size: int = 8) -> Iterator[tuple[int, object, Callable]]:
    """Yield (index, layer module, run) per decoder layer; `run()` feeds the calibration activations
    through the layer (outputs discarded). When the caller resumes, the layer's outputs, computed with
    whatever weights it has by then, become the next layer's inputs. A streamed model's layer is in memory
    from its yield until then (its experts as its stream's edit says at the time they are read)."""
    hidden, call_kwargs = zip(*(first_layer_inputs(model, batch) for batch in input_ids.split(batch_size)))
    hidden = list(hidden)
    for view in layer_views(model):  # a streamed model's layer is read in until the caller resumes
        index, layer_module = view.index, view.module

        def run(layer_module=layer_module):
            with torch.no_grad():
                for h, kwargs in zip(hidden, call_kwargs):
                    run_layer(layer_module, h, kwargs)

        yield index, layer_module, run
        with torch.no_grad():
            hidden = [run_layer(layer_module, h, kwargs) for h, kwargs in zip(hidden, call_kwargs)]


@dataclass
class MatrixInputs:
    """Sum over the tokens a weight matrix saw of x x^T (or of x^2 only, `diagonal`), and how many tokens."""

    gram: torch.Tensor | float = 0.0
    tokens: int = 0

    def add(self, rows: torch.Tensor, diagonal: bool) -> None:
        """Add a batch's rows [T, K], in place: a down projection's Gram matrix is ffn x ffn (0.8 GB at
        ffn 14336) and is never held twice."""
        if not len(rows):
            return
        rows = rows.float()
        if not isinstance(self.gram, torch.Tensor):
            self.gram = torch.zeros(rows.shape[-1], dtype=torch.float32) if diagonal else torch.zeros(rows.shape[-1], rows.shape[-1])
        if diagonal:
            self.gram += rows.pow(2).sum(0)
        else:
            self.gram.addmm_(rows.T, rows)
        self.tokens += len(rows)


@dataclass
class LayerInputs:
    """The inputs of one MoE layer's weight matrices: per routed expert (gate_up, down) and per shared expert module."""

    gate_up: list[MatrixInputs]
    down: list[MatrixInputs]
    # per shared expert, in LayerView.shared_experts order: (gate/up input, down input)
    shared: list[tuple[MatrixInputs, MatrixInputs]] = field(default_factory=list)

    @property
    def expert_tokens(self) -> list[int]:
        return [inputs.tokens for inputs in self.gate_up]


def on_routed_tokens(view: LayerView, stack: ExitStack, each: Callable[[int, torch.Tensor], None]) -> None:
    """Hooks on a MoE layer's router (removed with `stack`): at every forward, `each(expert, rows)` for every
    routed expert in order, `rows` [T, hidden] the tokens routed to it (T may be 0) as the experts see them."""
    routed_input = {}

    def on_router_input(module, args):
        routed_input["x"] = args[0].reshape(-1, args[0].shape[-1])
        if view.experts_norm is not None:  # what the experts see of the router's input
            routed_input["x"] = view.experts_norm(routed_input["x"])

    def on_routing(module, args, output):
        tokens = routed_input["x"]
        index = output[2].reshape(len(tokens), -1)
        for expert in range(view.num_experts):
            each(expert, tokens[torch.where(index == expert)[0]])

    stack.callback(view.router.register_forward_pre_hook(on_router_input).remove)
    stack.callback(view.router.register_forward_hook(on_routing).remove)


@torch.no_grad()
def collect_layer_inputs(view: LayerView, run: Callable, diagonal: bool, shared: bool) -> LayerInputs:
    """Run one MoE layer over the calibration set and gather its matrices' inputs."""
    count = view.num_experts
    inputs = LayerInputs([MatrixInputs() for _ in range(count)], [MatrixInputs() for _ in range(count)])

    def on_expert_tokens(expert: int, rows: torch.Tensor) -> None:
        _add_expert_inputs(view, expert, rows, inputs.gate_up[expert], inputs.down[expert], diagonal)

    def on_linear_input(target: MatrixInputs):
        return lambda module, args: target.add(args[0].reshape(-1, args[0].shape[-1]), diagonal)

    with ExitStack() as stack:
        on_routed_tokens(view, stack, on_expert_tokens)
        for module in view.shared_experts if shared else ():
            into, middle = MatrixInputs(), MatrixInputs()
            inputs.shared.append((into, middle))
            # gate_proj and up_proj read the same input: one hook on up_proj (every shared expert has one) measures both
            stack.callback(module.up_proj.register_forward_pre_hook(on_linear_input(into)).remove)
            stack.callback(module.down_proj.register_forward_pre_hook(on_linear_input(middle)).remove)
        run()
    return inputs


def _add_expert_inputs(view: LayerView, expert: int, rows: torch.Tensor, gate_up: MatrixInputs,
                       down: MatrixInputs, diagonal: bool) -> None:
    """Add what one routed expert's matrices read of its routed tokens `rows`: its input, its intermediate."""
    gate_up.add(rows, diagonal)
    if len(rows):
        down.add(routed_intermediate(view, expert, rows), diagonal)


@dataclass
class RoutedRows:
    """The calibration tokens routed to each expert of one MoE layer, batch by batch, from which each expert's
    Gram matrices are made when asked for, one expert at a time (a streamed layer: never all of them at once)."""

    view: LayerView
    rows: list[list[torch.Tensor]]  # per expert, per batch: [T, hidden]

    @property
    def expert_tokens(self) -> list[int]:
        return [sum(len(rows) for rows in batches) for batches in self.rows]

    def inputs(self, expert: int) -> tuple[MatrixInputs, MatrixInputs]:
        """(gate_up, down) Gram matrices of `expert`, summed as collect_layer_inputs sums them."""
        gate_up, down = MatrixInputs(), MatrixInputs()
        for rows in self.rows[expert]:
            _add_expert_inputs(self.view, expert, rows, gate_up, down, diagonal=False)
        return gate_up, down


@torch.no_grad()
def collect_routed_rows(view: LayerView, run: Callable) -> RoutedRows:
    """Run one MoE layer over the calibration set, keeping each expert's routed tokens (top-k copies of the
    layer's input at most)."""
    routed = RoutedRows(view, [[] for _ in range(view.num_experts)])
    with ExitStack() as stack:
        on_routed_tokens(view, stack, lambda expert, rows: routed.rows[expert].append(rows))
        run()
    return routed


def output_error(delta: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor) -> float:
    """||delta X||^2 / ||W X||^2 over the calibration inputs, from their Gram matrix X^T X."""
    original = quadratic_form(weight, gram)
    return quadratic_form(delta, gram) / original if original > 0 else 0.0


def quadratic_form(weight: torch.Tensor, gram: torch.Tensor, rows: int = 256) -> float:
    """tr(W G W^T) = ||W X||^2 for G = X^T X, a block of W's rows at a time (no second copy of W)."""
    weight = weight.float()
    return float(sum(((block @ gram) * block).sum() for block in weight.split(rows)))

