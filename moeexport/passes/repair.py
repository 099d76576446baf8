"""Training-free repair after removal (`repair: refit`): least-squares refits on calibration tokens.

Expert Drop: refit the kept experts' down projections. A MoE layer's routed
output is y(x) = sum over the selected experts j of w_j(x) D_j h_j(x), with h_j
the expert's intermediate activation act(gate x) * up x and D_j its down
projection. Once experts are dropped, the routing over the kept ones (w, and
which are selected) and their h are fixed, so y is linear in the kept D: the D
that best reproduce the ORIGINAL layer's routed output on the calibration tokens
solve a ridge least-squares problem,

    min_D  sum_t |y_t - Z_t D|^2 + lam |D - D_0|^2,   Z_t = [w_j(x_t) h_j(x_t)]_j kept,

with lam = ridge x the mean diagonal of Z^T Z, pulling towards the original
weights along directions the calibration tokens do not reach.

Block Drop and Layer Drop: refit an attention output projection O (it writes
straight into the residual stream, r = h + O a) so that the residual after it
matches the original model's at the same point, absorbing what was removed:

    min_O  sum_t |r_t - h_t - O a_t|^2 + lam |O - O_0|^2.

Layer Drop refits the attention just before the dropped MoE sublayer, whose
context a is untouched by the drop, to the original layer's output. Block Drop
refits the attention of the first block kept after the dropped ones, to the
original residual after that attention; a drop at the end of the model has no
attention after it and stays unrepaired (reported).

Both run layer by layer on the compressed model's own activations: each layer
is refit on the inputs the layers already repaired (and trimmed) give it.

Cost, per refit layer: one pass of the calibration tokens through the layer and
a Gram matrix solved once. An attention refit's is (heads x head_dim)^2 float64
(134 MB at 8x7B widths) and holds the original residual at that point (tokens x
hidden). An expert refit's is (kept x ffn)^2: the fixture's 8 x 512 columns take
134 MB, an 8x7B model's 4 x 14336 would take 26 GB, so a layer above
MAX_GRAM_BYTES is refused before any work.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch

from moeexport.adapters import adapter_for
from moeexport.adapters.base import keep_experts
from moeexport.calibration.damage import check_routing, route
from moeexport.calibration.expert_inputs import layer_by_layer
from moeexport.calibration.observers import expert_intermediate
from moeexport.errors import MoeExportError

MAX_GRAM_BYTES = 4 * 2**30


def check_refit_size(model, keep: dict[int, list[int]]) -> None:
    """Refuse, before any work, a layer whose least-squares system would not fit MAX_GRAM_BYTES."""
    adapter = adapter_for(model.config)
    for layer, kept in keep.items():
        experts = adapter.layer_view(model, layer).experts
        columns = len(kept) * (experts.down_proj.shape[-1] if experts is not None else 0)
        if columns**2 * 8 > MAX_GRAM_BYTES:
            raise MoeExportError(
                f"expert_drop repair: refit would solve a {columns:,}-column least-squares system in layer {layer} "
                f"({columns**2 * 8 / 2**30:.0f} GiB): use repair: none for experts this wide")


@torch.no_grad()
def refit_and_keep(model, keep: dict[int, list[int]], tokens: torch.Tensor, ridge: float,
                   progress=None) -> dict[int, list[float]]:
    """Keep `keep[layer]`'s experts in every MoE layer, refitting their down projections first (see the module
    docstring). Returns, per refit layer, the relative error of its routed output on the calibration tokens
    [dropped, dropped and refit]: the first is what the drop alone would leave."""
    adapter = adapter_for(model.config)
    routing = adapter.model_config(model.config).routing
    if routing.method != "greedy":
        raise MoeExportError("expert_drop repair: refit needs greedy top-k routing (topk_method: greedy)")
    errors = {}
    task = progress.add_task("expert_drop: refit down projections", total=len(keep)) if progress else None
    for index, _, run in layer_by_layer(adapter, model, tokens):
        if index not in keep:
            continue
        view = adapter.layer_view(model, index)
        kept = keep[index]
        if view.experts is not None and 0 < len(kept) < view.num_experts:
            system = _System(view, kept, routing)
            _run_hooked(run, view.ffn_norm.register_forward_hook(lambda module, args, output: system.add(output)))
            errors[index] = system.solve(ridge)
        keep_experts(adapter, model, index, kept)  # the next layer's inputs come from the layer as it now is
        if progress:
            progress.advance(task)
    if progress:
        progress.remove_task(task)
    return errors


def _run_hooked(run, *handles) -> None:
    """run() the calibration batches through a layer, then remove the hooks `handles`, whatever happens."""
    with ExitStack() as stack:
        for handle in handles:
            stack.callback(handle.remove)
        run()


class _LeastSquares:
    """The normal equations of min_W sum_t |y_t - z_t W|^2 + lam |W - W_0|^2, summed over calibration batches,
    with the error the unrefit W_0 leaves, to report before and after."""

    def __init__(self, original: torch.Tensor):
        self.original = original.double()  # W_0: (inputs, outputs)
        self.gram = torch.zeros(len(original), len(original), dtype=torch.float64)  # Z^T Z
        self.cross = torch.zeros_like(self.original)  # Z^T y
        self.target_energy = 0.0  # sum |y|^2
        self.original_error = 0.0  # sum |y - Z W_0|^2

    def add(self, z: torch.Tensor, y: torch.Tensor) -> None:
        z, y = z.double(), y.double()
        self.gram += z.T @ z
        self.cross += z.T @ y
        self.target_energy += float(y.pow(2).sum())
        self.original_error += float((y - z @ self.original).pow(2).sum())

    def solve(self, ridge: float) -> tuple[torch.Tensor, list[float]]:
        """(W, relative error of the target [with W_0, with W]); lam = ridge x the mean diagonal of Z^T Z."""
        damping = ridge * float(self.gram.diagonal().mean()) + 1e-12
        system = self.gram + damping * torch.eye(len(self.gram), dtype=torch.float64)
        refit = torch.linalg.solve(system, self.cross + damping * self.original)
        # the error after refit, from the normal equations: |y|^2 - 2 tr(W^T Z^T y) + tr(W^T Z^T Z W)
        refit_error = self.target_energy - 2 * float((refit * self.cross).sum()) + float((refit * (self.gram @ refit)).sum())
        energy = max(self.target_energy, 1e-30)
        return refit, [(self.original_error / energy) ** 0.5, (max(refit_error, 0.0) / energy) ** 0.5]


class _System:
    """One layer's expert refit: the kept experts' intermediates, weighted by their new routing, against the
    original layer's routed output."""

    def __init__(self, view, kept: list[int], routing):
        self.view, self.kept, self.routing = view, kept, routing
        self.ffn = view.experts.down_proj.shape[-1]
        # the kept experts' down projections as one (kept x ffn, hidden) matrix D_0: Z @ D_0 is the dropped output
        self.least_squares = _LeastSquares(torch.cat([view.experts.down_proj[e].double().T for e in kept]))

    def add(self, normed: torch.Tensor) -> None:
        x = normed.reshape(-1, normed.shape[-1])
        experts, router = self.view.experts, self.view.router
        output = router(x)
        check_routing(router, output, self.view.top_k, self.routing)
        logits, weights, index = output
        original = self._mixture(x, weights.float(), index, range(self.view.num_experts))
        removed = torch.ones(self.view.num_experts, dtype=torch.bool)
        removed[self.kept] = False
        new_weights, new_index = route(logits, self.view.top_k, self.routing, removed)
        z = torch.zeros(len(x), len(self.kept) * self.ffn, dtype=torch.float64)
        for slot, expert in enumerate(self.kept):
            rows, position = torch.where(new_index == expert)
            if len(rows):
                activation = expert_intermediate(experts, expert, x[rows]).float()
                z[rows, slot * self.ffn:(slot + 1) * self.ffn] = (new_weights[rows, position, None] * activation).double()
        self.least_squares.add(z, original)

    def _mixture(self, x, weights, index, experts):
        """The routed output sum_k weights[:, k] * expert(index[:, k]) for the selected experts."""
        out = torch.zeros(len(x), self.view.experts.down_proj.shape[1])
        for expert in experts:
            rows, position = torch.where(index == expert)
            if len(rows):
                activation = expert_intermediate(self.view.experts, expert, x[rows]).float()
                out[rows] += weights[rows, position, None] * (activation @ self.view.experts.down_proj[expert].float().T)
        return out

    def solve(self, ridge: float) -> list[float]:
        refit, errors = self.least_squares.solve(ridge)
        down = self.view.experts.down_proj
        for slot, expert in enumerate(self.kept):
            down.data[expert] = refit[slot * self.ffn:(slot + 1) * self.ffn].T.to(down.dtype)
        return errors


# --- Block / Layer Drop: attention output projections ------------------------------------


@torch.no_grad()
def residuals_at(model, points: dict[int, str], tokens: torch.Tensor) -> dict[int, list[torch.Tensor]]:
    """The model's residual stream on the calibration tokens, per batch, at `points[layer]` of each listed layer:
    "attention" (after the layer's attention) or "output" (after the whole layer). Run before the removal."""
    if not points:
        return {}
    adapter = adapter_for(model.config)
    captured: dict[int, list[torch.Tensor]] = {layer: [] for layer in points}
    for index, module, run in layer_by_layer(adapter, model, tokens):
        if index not in points:
            continue
        if points[index] == "output":
            handles = [module.register_forward_hook(
                lambda _, args, output: captured[index].append(output[0] if isinstance(output, tuple) else output))]
        else:
            inputs = []
            handles = [module.register_forward_pre_hook(lambda _, args: inputs.append(args[0])),
                       adapter.layer_view(model, index).attention.o_proj.register_forward_hook(
                           lambda _, args, output: captured[index].append(inputs.pop() + output))]
        _run_hooked(run, *handles)
        if index == max(points):
            break
    return captured


@torch.no_grad()
def refit_attention_outputs(model, targets: dict[int, list[torch.Tensor]], tokens: torch.Tensor, ridge: float,
                            what: str, progress=None) -> dict[int, list[float]]:
    """Refit the attention output projection of each layer in `targets` (indices of the model as it now is) so
    that the residual after it reproduces the target residuals (per calibration batch, from `residuals_at`).
    Returns, per layer, the relative error of that residual [before, after refit]."""
    if not targets:
        return {}
    adapter = adapter_for(model.config)
    errors = {}
    task = progress.add_task(f"{what}: refit attention outputs", total=len(targets)) if progress else None
    for index, module, run in layer_by_layer(adapter, model, tokens):
        if index not in targets:
            continue
        projection = adapter.layer_view(model, index).attention.o_proj
        bias = projection.bias if projection.bias is not None else 0.0
        least_squares = _LeastSquares(projection.weight.T)
        batches, inputs = iter(targets[index]), []

        def add(_, args, output):
            context, target = args[0].reshape(-1, args[0].shape[-1]), next(batches)
            wanted = (target - inputs.pop() - bias).reshape(-1, output.shape[-1])
            least_squares.add(context, wanted)

        _run_hooked(run, module.register_forward_pre_hook(lambda _, args: inputs.append(args[0])),
                    projection.register_forward_hook(add))
        refit, errors[index] = least_squares.solve(ridge)
        projection.weight.data = refit.T.to(projection.weight.dtype).contiguous()
        if progress:
            progress.advance(task)
        if index == max(targets):
            break
    if progress:
        progress.remove_task(task)
    return errors
