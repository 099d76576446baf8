"""Training-free repair after removal (`repair: refit`): least-squares refits on calibration tokens.

Expert Drop: rebuild each kept expert from its own and the dropped experts'
neurons. An expert is a sum over its ffn neurons i of h_i(x) d_i, with h_i(x) =
act(g_i x) * (u_i x) and d_i a row of its down projection; a MoE layer's routed
output is y(x) = sum over the selected experts j of w_j(x) sum_i h_i(x) d_i. Once
experts are dropped, the routing over the kept ones is fixed, so for any choice
of ffn neurons per kept expert, taken from the layer's whole pool (its gate and
up rows move with it), y is linear in the chosen neurons' down rows D:

    min_D  sum_t |y_t - Z_t D|^2 + lam |D - D_0|^2,   Z_t = [w_j(x_t) h_i(x_t)] over kept j, chosen i,

with y the ORIGINAL layer's routed output plus the drift (the original model's
residual after the layer minus the residual the layer now gives, all its experts
still in, on the inputs the layers already rebuilt give it: each layer also
absorbs what the layers before it lost), D_0 the chosen neurons' own down rows
and lam = ridge x the mean diagonal of Z^T Z (a pull towards the original rows
along directions the calibration tokens do not reach). The neurons are chosen by
greedy forward selection on the same ridge system (each step takes the
neuron that lowers the residual most, ffn per kept expert): a dropped expert's
most useful neurons move into the kept experts that now receive its tokens.
Against refitting only the kept experts' own down rows to the layer's own
output, this more than halved the 8 -> 2 damage on the fixture (README).

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
hidden). An expert rebuild holds the original residual after every rebuilt
layer (tokens x hidden each); its system has a column per candidate neuron,
kept x (dropped + 1) x ffn, and its selection a basis of kept x ffn of them:
the fixture's worst layer (4 kept of 8, ffn 512) takes 1 GB, an 8x7B model's
would take terabytes.

So a layer whose system would exceed MAX_GRAM_BYTES is rebuilt one kept expert
at a time (_PerExpertRebuild), in the order kept, each fit to what the layer
still misses with the experts before it rebuilt: its target is its own routed
contribution plus the layer's remaining error on its tokens. Its own neurons'
down rows are refit first; then the dropped experts' neurons that would lower
the ridge objective most on what is still missed replace the own neurons that
lower it least, as long as one would lower it more than the other does, and
the chosen neurons' down rows are fit by the same ridge least squares, a block
of BLOCK neurons at a time (block coordinate descent, SWEEPS passes). It holds
about two experts, its tokens' intermediates and a BLOCK^2 Gram, and reads each
expert of the layer once for the layer's outputs and each candidate twice more
per kept expert (its gate, up and down for the choice, the chosen rows after
it). It is the separable version of the joint rebuild: neurons are judged one
by one, and experts one after the other.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch

from moeexport.adapters import adapter_for
from moeexport.adapters.experts import activate, gate_and_up_weights
from moeexport.adapters.routing import check_routing, route
from moeexport.adapters.surgery import keep_experts
from moeexport.calibration.expert_inputs import layer_by_layer
from moeexport.errors import MoeExportError
from moeexport.memory import MAX_GRAM_BYTES, rebuild_system_bytes, release_freed_memory
from moeexport.streaming import SpilledBatches, SpilledExperts, child_name, stream_of



def _rebuilt_layers(adapter, model, keep: dict[int, list[int]]) -> list[int]:
    """The MoE layers whose experts a rebuild changes: those that keep some of their experts, not all."""
    views = {layer: adapter.layer_view(model, layer) for layer in keep}
    return [layer for layer, kept in keep.items()
            if views[layer].experts is not None and 0 < len(kept) < views[layer].num_experts]


def expert_refit_refusal(config) -> str:
    """Why Expert Drop's rebuild cannot take a model of this config ("" when it can): it moves neurons as
    bias-free gate and up rows, and reroutes tokens by the family's rule over all experts."""
    adapter = adapter_for(config)
    layout = adapter.expert_layout(config)
    if not layout.concatenated:
        return (f"the rebuild writes bias-free experts stored gate rows then up rows, which {adapter.family}'s "
                "(biases, interleaved and transposed) are not")
    if not layout.gated:
        return f"the rebuild moves neurons as gate and up rows, and {adapter.family}'s experts have no gate"
    routing = adapter.model_config(config).routing
    if routing.groups > 1:  # one group (GLM-4.5's noaux_tc) is top-k over all experts
        return "the rebuild needs greedy top-k routing over all experts, and this model routes within expert groups"
    if routing.per_expert_scale:
        return (f"the rebuild reroutes tokens by a rule without {adapter.family}'s per-expert scale on the routing "
                "weights")
    return ""


def joint_rebuild_fits(num_experts: int, kept: int, ffn: int) -> bool:
    """Whether a layer's joint rebuild system fits MAX_GRAM_BYTES (else it is rebuilt one kept expert at a time)."""
    return rebuild_system_bytes(num_experts, kept, ffn) <= MAX_GRAM_BYTES


@torch.no_grad()
def refit_and_keep(model, keep: dict[int, list[int]], tokens: torch.Tensor, ridge: float,
                   progress=None) -> tuple[dict[int, list[float]], dict[int, list[int]], list[int]]:
    """Keep `keep[layer]`'s experts in every MoE layer, rebuilding them first (see the module docstring).
    Returns per rebuilt layer the relative error of its routed output against its target on the calibration
    tokens [dropped, dropped and rebuilt] (the first is what the drop alone would leave), the neurons each
    kept expert took from the dropped ones, and the layers rebuilt one kept expert at a time."""
    adapter = adapter_for(model.config)
    routing = adapter.model_config(model.config).routing
    errors, borrowed, per_expert = {}, {}, []
    rebuilt = _rebuilt_layers(adapter, model, keep)
    targets = residuals_at(model, {layer: "output" for layer in rebuilt}, tokens)
    task = progress.add_task("expert_drop: rebuild kept experts", total=len(keep)) if progress else None
    for index, module, run in layer_by_layer(adapter, model, tokens):
        if index not in keep:
            continue
        view = adapter.layer_view(model, index)
        kept = keep[index]
        rebuilt_experts = _RebuiltExperts(adapter, model, index)
        if index in rebuilt:
            joint = joint_rebuild_fits(view.num_experts, len(kept), view.experts.down_proj.shape[-1])
            rebuild = (_ExpertRebuild if joint else _PerExpertRebuild)(view, kept, routing)
            per_expert += [] if joint else [index]
            batches = iter(targets.pop(index))
            _run_hooked(run, view.ffn_norm.register_forward_hook(lambda _, args, output: rebuild.add(output)),
                        module.register_forward_hook(lambda _, args, output: rebuild.add_drift(
                            next(batches) - (output[0] if isinstance(output, tuple) else output))))
            errors[index], borrowed[index] = rebuild.solve(ridge, rebuilt_experts)
        rebuilt_experts.keep(kept)  # the next layer's inputs come from the layer as it now is
        if progress:
            progress.advance(task)
    if progress:
        progress.remove_task(task)
    return errors, borrowed, per_expert


def _routing_before_and_after(view, kept: list[int], routing, normed: torch.Tensor):
    """(inputs [T, hidden] float32, every expert's routing weight per token before the drop, and after it with
    only `kept` left [T, E]) for one batch of a MoE layer's inputs."""
    inputs = normed.reshape(-1, normed.shape[-1])
    output = view.router(inputs)
    check_routing(view.router, output, view.top_k, routing, view.selection_bias)
    logits, weights, index = output
    removed = torch.ones(view.num_experts, dtype=torch.bool)
    removed[kept] = False
    new_weights, new_index = route(routing, logits, view.top_k, removed, view.selection_bias)
    before = torch.zeros(len(inputs), view.num_experts).scatter_add_(1, index, weights.float())
    after = torch.zeros_like(before).scatter_add_(1, new_index, new_weights)
    return inputs.float(), before, after


class _RebuiltExperts:
    """Where one layer's rebuilt experts go as each is solved: into the model's expert stacks, or for a streamed
    layer into files (SpilledExperts) that every later read of the layer reads them from."""

    def __init__(self, adapter, model, index: int):
        self.adapter, self.model, self.index = adapter, model, index
        self.stream = stream_of(model)
        self.spill = SpilledExperts() if self.stream is not None else None
        self.changed = False

    def put(self, expert: int, stack: str, matrix: torch.Tensor) -> None:
        """Expert `expert`'s (its index in the layer) new matrix of `stack`, as the stack stores it."""
        self.changed = True
        if self.stream is None:
            getattr(self.adapter.layer_view(self.model, self.index).experts, stack).data[expert] = matrix
            return
        source = self.stream.kept_experts(self.stream.edits[self.index])[expert]  # what a transform is told
        self.spill.put((stack, source), matrix)
        release_freed_memory()

    def keep(self, kept: list[int]) -> None:
        """Keep experts `kept` of the layer (read in now); a streamed layer is read in again as it now is."""
        if self.stream is None:
            keep_experts(self.adapter, self.model, self.index, kept)
            return

        def surgery():
            keep_experts(self.adapter, self.model, self.index, kept)
            if self.changed:
                self.stream.transform_experts(self.index, self.spill)

        self.stream.edit_read_layer(self.index, surgery)


def _run_hooked(run, *handles) -> None:
    """run() the calibration batches through a layer, then remove the hooks `handles`, whatever happens."""
    with ExitStack() as stack:
        for handle in handles:
            stack.callback(handle.remove)
        run()


class _LeastSquares:
    """The normal equations of min_W sum_t |y_t - z_t W|^2 + lam |W - W_0|^2, summed over calibration batches,
    with the error the unrepaired model leaves, to report before and after."""

    def __init__(self, original: torch.Tensor):
        self.original = original.double()  # W_0: (inputs, outputs)
        self.gram = torch.zeros(len(original), len(original), dtype=torch.float64)  # Z^T Z
        self.cross = torch.zeros_like(self.original)  # Z^T y
        self.target_energy = 0.0  # sum |y|^2
        self.original_error = 0.0  # sum |y - unrepaired output|^2

    def add(self, z: torch.Tensor, y: torch.Tensor, unrepaired: torch.Tensor | None = None) -> None:
        """One batch: inputs z, targets y, and what the unrepaired model outputs (default z W_0)."""
        z, y = z.double(), y.double()
        self.gram += z.T @ z
        self.cross += z.T @ y
        self.target_energy += float(y.pow(2).sum())
        unrepaired = z @ self.original if unrepaired is None else unrepaired.double()
        self.original_error += float((y - unrepaired).pow(2).sum())

    def solve(self, ridge: float, columns: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float]]:
        """(W, relative error of the target [unrepaired, with W]) over the inputs `columns` (default all);
        lam = ridge x the mean diagonal of their Z^T Z."""
        gram, cross, original = self.gram, self.cross, self.original
        if columns is not None:
            gram, cross, original = gram[columns][:, columns], cross[columns], original[columns]
        damping = ridge * float(gram.diagonal().mean()) + 1e-12
        system = gram + damping * torch.eye(len(gram), dtype=torch.float64)
        refit = torch.linalg.solve(system, cross + damping * original)
        # the error after refit, from the normal equations: |y|^2 - 2 tr(W^T Z^T y) + tr(W^T Z^T Z W)
        refit_error = self.target_energy - 2 * float((refit * cross).sum()) + float((refit * (gram @ refit)).sum())
        energy = max(self.target_energy, 1e-30)
        return refit, [(self.original_error / energy) ** 0.5, (max(refit_error, 0.0) / energy) ** 0.5]


def _forward_selection(gram: torch.Tensor, cross: torch.Tensor, group: torch.Tensor, quota: int,
                       damping: float) -> torch.Tensor:
    """Columns of Z, `quota` per group, chosen greedily to minimise min_D |Y - Z_chosen D|^2 + damping |D|^2 from
    the normal equations (gram = Z^T Z, cross = Z^T Y): each step takes the column whose part orthogonal to those
    already taken explains most of the residual. The damping (the ridge's) keeps a column the calibration tokens
    barely reach from being chosen to fit their noise. A group left short (its columns never carry signal) fills
    up with its first columns not taken."""
    diagonal = gram.diagonal() + damping
    tolerance = 1e-9 * diagonal  # a column this close to the span of the chosen ones adds nothing
    groups = int(group.max()) + 1
    basis = torch.zeros(len(gram), groups * quota, dtype=torch.float64)  # Z^T u for the orthonormal u so far
    residual_cross = cross.clone()  # Z^T (Y - projection of Y on the chosen columns)
    remaining = diagonal.clone()  # |part of each column orthogonal to the chosen ones|^2
    open_ = gram.diagonal() > 0  # a column no calibration token reaches is only a filler
    taken = [0] * groups
    chosen = []
    for step in range(groups * quota):
        usable = open_ & (remaining > tolerance)
        if not usable.any():
            break
        gain = residual_cross.pow(2).sum(1) / remaining.clamp_min(1e-300)
        column = int(torch.where(usable, gain, -1.0).argmax())
        chosen.append(column)
        open_[column] = False
        taken[int(group[column])] += 1
        if taken[int(group[column])] == quota:
            open_ &= group != group[column]
        norm = remaining[column].sqrt()
        basis[:, step] = (gram[:, column] - basis[:, :step] @ basis[column, :step]) / norm
        basis[column, step] += damping / norm
        residual_cross -= basis[:, step, None] * (residual_cross[column] / norm)
        remaining -= basis[:, step].pow(2)
    picked = set(chosen)
    for g in range(groups):
        spare = [c for c in torch.where(group == g)[0].tolist() if c not in picked]
        chosen += spare[: quota - taken[g]]
    return torch.tensor(sorted(chosen))


class _ExpertRebuild:
    """One layer's expert rebuild: every kept expert's ffn neurons, chosen from its own and the dropped experts',
    and their down rows, fit so that the layer's output matches the original model's (see the module docstring)."""

    def __init__(self, view, kept: list[int], routing):
        self.view, self.kept, self.routing = view, kept, routing
        experts = view.experts
        count, double_ffn, hidden = experts.gate_up_proj.shape
        self.ffn = double_ffn // 2
        # every neuron of the layer, indexed expert x ffn + i: its gate and up rows, its down row
        self.gate, self.up = (part.reshape(count * self.ffn, hidden).float()
                              for part in gate_and_up_weights(view.layout, _whole(experts.gate_up_proj)))
        down = _whole(experts.down_proj)
        self.dtype = down.dtype  # what the layer computes in
        self.down = down.transpose(1, 2).reshape(count * self.ffn, -1).float()
        dropped = [e for e in range(count) if e not in kept]
        # the neurons each kept expert may take: its own first, then every dropped expert's
        self.pools = [torch.cat([self._neurons(e) for e in [k, *dropped]]) for k in kept]
        self.least_squares = _LeastSquares(self.down[torch.cat(self.pools)])

    def _neurons(self, expert: int) -> torch.Tensor:
        return torch.arange(expert * self.ffn, (expert + 1) * self.ffn)

    def add(self, normed: torch.Tensor) -> None:
        """One batch of the layer's MoE inputs: held until `add_drift` gives the batch's target."""
        x, before, after = _routing_before_and_after(self.view, self.kept, self.routing, normed)
        activation = activate(self.view.layout, x @ self.gate.T, x @ self.up.T)
        original = (activation * before.repeat_interleave(self.ffn, dim=1)) @ self.down
        dropped = (activation * after.repeat_interleave(self.ffn, dim=1)) @ self.down
        z = torch.cat([after[:, k, None] * activation[:, pool] for k, pool in zip(self.kept, self.pools)], dim=1)
        self.pending = z, original, dropped

    def add_drift(self, drift: torch.Tensor) -> None:
        """The same batch's drift: the original model's residual after this layer minus the residual the layer
        now outputs (with all its experts, on the inputs the layers already rebuilt give it). The routed output
        is fit to the original one plus the drift, so each layer also absorbs what the layers before it lost."""
        z, original, dropped = self.pending
        self.least_squares.add(z, original + drift.reshape(original.shape).float(), dropped)

    def solve(self, ridge: float, into: _RebuiltExperts) -> tuple[list[float], list[int]]:
        """Choose the neurons and refit their down rows, the kept experts' new matrices put `into` their place:
        (relative error [dropped, rebuilt], neurons each kept expert took from the dropped ones)."""
        slot = torch.cat([torch.full((len(pool),), s) for s, pool in enumerate(self.pools)])
        gram = self.least_squares.gram
        damping = ridge * float(gram.diagonal().mean())
        columns = _forward_selection(gram, self.least_squares.cross, slot, self.ffn, damping)
        down, errors = self.least_squares.solve(ridge, columns)
        neuron, slot = torch.cat(self.pools)[columns], slot[columns]
        borrowed = []
        for s, expert in enumerate(self.kept):
            mine = neuron[slot == s]
            into.put(expert, "gate_up_proj", torch.cat([self.gate[mine], self.up[mine]]).to(self.dtype))
            into.put(expert, "down_proj", down[slot == s].T.to(self.dtype))
            borrowed.append(int((mine // self.ffn != expert).sum()))
        return errors, borrowed


class _PerExpertRebuild:
    """One layer's expert rebuild one kept expert at a time, for layers whose joint system would not fit (see
    the module docstring). Same interface as _ExpertRebuild: `add` and `add_drift` per batch, then `solve`."""

    BLOCK = 2048  # neurons whose down rows are solved for at once
    SWEEPS = 2  # passes of block coordinate descent over a kept expert's neuron blocks (one block: exact at once)

    def __init__(self, view, kept: list[int], routing):
        self.view, self.kept, self.routing = view, kept, routing
        self.ffn = view.experts.down_proj.shape[-1]
        self.dropped = [e for e in range(view.num_experts) if e not in kept]
        self.batches: list[tuple[torch.Tensor, ...]] = []  # (x, before, after, drift) per calibration batch

    def add(self, normed: torch.Tensor) -> None:
        self.pending = _routing_before_and_after(self.view, self.kept, self.routing, normed)

    def add_drift(self, drift: torch.Tensor) -> None:
        x, before, after = self.pending
        self.batches.append((x, before, after, drift.reshape(x.shape).float()))

    def _gate_and_up(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert `expert`'s gate and up rows [ffn, hidden] each, a row per neuron, in the layer's dtype (read
        when asked: a streamed layer's from disk, so about one expert is held at a time)."""
        return gate_and_up_weights(self.view.layout, self.view.experts.gate_up_proj[expert])

    def _down(self, expert: int) -> torch.Tensor:
        """Expert `expert`'s down rows [ffn, hidden], a row per neuron, in the layer's dtype."""
        down = self.view.experts.down_proj[expert]
        self.dtype = down.dtype  # what the layer computes in
        return down.T

    def _blocks(self, rows: int) -> list[slice]:
        return [slice(first, first + self.BLOCK) for first in range(0, rows, self.BLOCK)]

    def _intermediate(self, gate: torch.Tensor, up: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """act(x gate^T) * (x up^T) in float32, a block of neurons' rows made float32 at a time."""
        return torch.cat([activate(self.view.layout, x @ gate[block].float().T, x @ up[block].float().T)
                          for block in self._blocks(len(gate))], dim=1)

    def _times(self, z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """z @ rows in float32, a block of `rows` made float32 at a time."""
        return sum(z[:, block] @ rows[block].float() for block in self._blocks(len(rows)))

    def solve(self, ridge: float, into: _RebuiltExperts) -> tuple[list[float], list[int]]:
        x, before, after, drift = (torch.cat(parts) for parts in zip(*self.batches))
        del self.batches
        # the original routed output (the target, with the drift) and what the kept experts alone give
        target, dropped = drift, torch.zeros_like(drift)
        for expert in range(self.view.num_experts):
            rows = torch.where((before[:, expert] > 0) | (after[:, expert] > 0))[0]
            output = self._times(self._intermediate(*self._gate_and_up(expert), x[rows]), self._down(expert))
            target[rows] += before[rows, expert, None] * output
            dropped[rows] += after[rows, expert, None] * output
        energy = max(float(target.pow(2).sum()), 1e-30)
        residual = target - dropped
        error_before = float(residual.pow(2).sum())
        borrowed = []
        for expert in self.kept:
            rows = torch.where(after[:, expert] > 0)[0]
            gate, up, down, sources = self._rebuild(expert, x[rows], after[rows, expert, None], residual, rows, ridge)
            into.put(expert, "gate_up_proj", torch.cat([gate, up]))
            into.put(expert, "down_proj", down.T.to(self.dtype))
            borrowed.append(int((sources != expert).sum()))
            del gate, up, down
            release_freed_memory()
        errors = [(error_before / energy) ** 0.5, (float(residual.pow(2).sum()) / energy) ** 0.5]
        return errors, borrowed

    def _rebuild(self, expert: int, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                 rows: torch.Tensor, ridge: float):
        """Kept expert `expert` rebuilt on its tokens `x` (routing weights `weight`): its (gate, up, down) rows and
        each row's source expert. `residual[rows]` becomes what the layer misses with it rebuilt."""
        own_gate, own_up = self._gate_and_up(expert)
        z = weight * self._intermediate(own_gate, own_up, x)
        own_down = self._down(expert)
        target = residual[rows] + self._times(z, own_down)  # its own part and what the layer still misses
        # its own neurons refit first; then the dropped neurons that would lower what is still missed most
        # replace the own neurons that lower it least, while one would lower it more than the other does
        damping = _damping(z, ridge)
        down, left = self._fit(z, target, own_down.float(), ridge)
        contribution = self._values(z, left, own_down, damping, fitted=down).sort()
        del z, down
        gains = torch.cat([self._values(weight * self._intermediate(*self._gate_and_up(source), x), left,
                                        self._down(source), damping) for source in self.dropped]).sort(descending=True)
        swaps = int((gains.values[:self.ffn] > contribution.values[:len(gains.values)]).cumprod(0).sum())
        kept_own, taken = contribution.indices[swaps:].sort().values, gains.indices[:swaps].sort().values
        parts = [(own_gate[kept_own], own_up[kept_own], own_down[kept_own])]
        for slot, source in enumerate(self.dropped):
            neurons = taken[taken // self.ffn == slot] % self.ffn
            if len(neurons):
                parts.append([rows_of[neurons] for rows_of in (*self._gate_and_up(source), self._down(source))])
        gate, up, original = (torch.cat(part) for part in zip(*parts))  # gate and up rows stay as they are
        del parts, own_gate, own_up, own_down
        down, residual[rows] = self._fit(weight * self._intermediate(gate, up, x), target, original.float(), ridge)
        sources = torch.cat([torch.full((len(kept_own),), expert), torch.tensor(self.dropped)[taken // self.ffn]])
        return gate, up, down, sources

    def _fit(self, z: torch.Tensor, target: torch.Tensor, original: torch.Tensor, ridge: float):
        """min_D |target - z D|^2 + lam |D - original|^2 by block coordinate descent over BLOCK columns of z
        (exact in one step when there is one block): (D, target - z D)."""
        damping = _damping(z, ridge)
        down, left = original.clone(), target - z @ original
        blocks = self._blocks(len(original))
        for _ in range(1 if len(blocks) == 1 else self.SWEEPS):
            for block in blocks:
                columns, current = z[:, block].double(), down[block].double()
                system = columns.T @ columns + damping * torch.eye(columns.shape[1], dtype=torch.float64)
                new = torch.linalg.solve(system, columns.T @ (left.double() + columns @ current)
                                         + damping * original[block].double())
                left -= (columns @ (new - current)).float()
                down[block] = new.float()
        return down, left

    def _values(self, z: torch.Tensor, left: torch.Tensor, original: torch.Tensor, damping: float,
                fitted: torch.Tensor | None = None) -> torch.Tensor:
        """Per neuron (column i of z, original down row d0_i): how much it lowers the ridge objective
        |r - z_i d|^2 + lam |d - d0_i|^2 from |r|^2 + ... at its best d, where r is `left`, what the chosen neurons
        leave, plus the neuron's own part z_i d_i when it is one of them (`fitted`: their down rows d).
        With b = z_i^T r, a = |z_i|^2: (|b|^2 + 2 lam b.d0 - lam a |d0|^2) / (a + lam), without the lam^2 terms
        that would cancel."""
        a = z.pow(2).sum(0).double()
        b = self._times(left.T, z).T  # [neurons, hidden]: z^T left, a block at a time
        if fitted is not None:
            b += a.float()[:, None] * fitted
        values = torch.zeros(len(b), dtype=torch.float64)
        for block in self._blocks(len(b)):
            rows_b, rows_d = b[block].double(), original[block].double()
            values[block] = (rows_b.pow(2).sum(1) + 2 * damping * (rows_b * rows_d).sum(1)
                             - damping * a[block] * rows_d.pow(2).sum(1))
        return values / (a + damping)


def _damping(z: torch.Tensor, ridge: float) -> float:
    """lam of a ridge least squares over the columns of z: ridge x the mean of their squared norms."""
    return ridge * float(z.pow(2).sum(0).mean()) + 1e-12


def _whole(stack) -> torch.Tensor:
    """An expert stack [E, rows, columns] whole: a model's own tensor, or a streamed layer's read one expert at a
    time (moeexport.streaming.ExpertStack)."""
    return stack.data if isinstance(stack, torch.Tensor) else torch.stack([stack[e] for e in range(len(stack))])


# --- Block / Layer Drop: attention output projections ------------------------------------


@torch.no_grad()
def residuals_at(model, points: dict[int, str], tokens: torch.Tensor) -> dict:
    """The model's residual stream on the calibration tokens, per batch, at `points[layer]` of each listed layer:
    "attention" (after the layer's attention) or "output" (after the whole layer). Run before the removal. A
    streamed model's wait on disk (SpilledBatches): every layer's would not fit its bound at real sizes."""
    if not points:
        return {}
    adapter, streamed = adapter_for(model.config), stream_of(model) is not None
    captured = {layer: SpilledBatches() if streamed else [] for layer in points}
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
    adapter, stream = adapter_for(model.config), stream_of(model)
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
        if stream is not None:  # the layer is read again from disk by every later pass: read it refit
            stream.replace_weight(index, child_name(module, projection) + ".weight", projection.weight.data)
        if progress:
            progress.advance(task)
        if index == max(targets):
            break
    if progress:
        progress.remove_task(task)
    return errors
