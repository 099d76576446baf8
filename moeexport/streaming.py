"""Models larger than memory: one decoder layer, and one expert, at a time, read from disk when needed.

A streamed model is the transformers model built on the meta device (modules,
config and shapes, no weights) read by a `LayerStream`, which `stream_of(model)`
finds (the one way to it: it is no attribute of the model). Everything that
walks the layers (observers, the torch reference, the saver, the exporters) asks
`layer_views(model)`, which for a streamed model reads each layer from the
memory-mapped safetensors in the compute dtype, yields it and releases it before
the next. A layer's routed experts stay on disk behind an `ExpertsOnDemand`,
which reads one expert when the forward, an observer or an exporter uses it; the
embeddings and head are read only inside `outer(model)`, at the start and the
end of a pass.

Passes apply to the skeleton as they do to an in-memory model, which keeps its
structure and config right (a dropped MoE sublayer has no weights left to
read). The surgery that removes blocks and experts also tells the stream, as a
`LayerEdit` per layer (which source layer it is, which experts it keeps), so a
layer is read already compressed: only the experts it keeps come off the disk.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
import weakref
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moeexport.adapters import adapter_for
from moeexport.adapters.experts import activate, expert_intermediate, expert_output, expert_stacks
from moeexport.adapters.surgery import decoder_layers, get_path
from moeexport.checkpoint_files import Headers, check_finite
from moeexport.errors import MoeExportError
from moeexport import mxfp4
from moeexport import reads  # what the reads cost (report.json's read_profile)
from moeexport.memory import LOGIT_POSITIONS, OUTER_ROWS, release_freed_memory  # what the memory plan counts on
from moeexport.outputs import process_alive
from moeexport.stream_registry import attach, stream_of

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class LayerEdit:
    """What one decoder layer of the streamed model is, in terms of the checkpoint it is read from."""

    source: int  # the layer's index in the checkpoint
    experts: tuple[int, ...] | None = None  # the routed experts it keeps, in order (None: all of them)
    # functions (float32 expert matrix [rows, columns], its stack's name, the source expert, the slice of the
    # stored matrix's rows it holds) -> the new matrix, applied in order as it is read (row-wise, so a part of
    # a matrix may be transformed alone: the quantize pass's RTN, Wanda, or SpilledExperts' rows)
    transforms: tuple = ()
    float32: bool = False  # a transform's values are exact only in float32 (a quantize pass's grid): read so
    # names (inside the layer) of weights a pass computed (`repair: refit`'s attention output projection): read
    # from the stream's spilled weights, not from the checkpoint
    replaced: frozenset[str] = frozenset()


@dataclass(frozen=True)
class _Piece:
    """One checkpoint tensor and where it lands in a model parameter."""

    key: str
    expert: int | None = None  # stacked experts: which one ([E, ...] first axis)
    part: int = 0  # ... and which of the parts concatenated along its rows (gate, up)
    scales: str | None = None  # an MXFP4 stack: `key` holds its blocks, this its scales (moeexport.mxfp4)


def layer_views(model):
    """The model's decoder layers as LayerViews, in order. For a streamed model each layer's
    weights exist only until the next layer is requested: consumers copy what they keep."""
    stream = stream_of(model)
    if stream is not None:
        yield from stream.layer_views()
        return
    yield from adapter_for(model.config).layer_views(model)


def is_streamed(model) -> bool:
    return stream_of(model) is not None


def outer(model, part: str = "all"):
    """A context in which the model's embeddings ("input"), final norm and head ("output"), or all of them
    are in memory (always, unless streamed: then only inside the context)."""
    stream = stream_of(model)
    return stream.outer(part) if stream is not None else nullcontext()


def streamed(model: nn.Module, checkpoint, dtype: torch.dtype, check_finite: bool = True, progress=None) -> nn.Module:
    """`model` (a skeleton on the meta device) made a streamed model: its layers are read from `checkpoint` when
    they are walked (see LayerStream)."""
    stream = LayerStream(model, checkpoint, dtype, check_finite, progress)
    stream.rebuild_rotary()
    attach(model, stream)
    return model


class LayerStream:
    """Reads the decoder layers of `model` (a skeleton on the meta device) from a checkpoint, one at a time."""

    def __init__(self, model: nn.Module, checkpoint, dtype: torch.dtype, check_finite: bool = True, progress=None):
        """`checkpoint` reads tensors under the model's parameter names: a SafetensorsCheckpoint, or a GGUF
        file's (moeexport.backends.gguf.reader.GGUFCheckpoint). `progress`: an EventStream, which shows every
        pass over the layers as a bar with its ETA."""
        self._model = weakref.ref(model)  # the model owns its stream (moeexport.stream_registry), not the reverse
        self.checkpoint, self.dtype, self.check_finite, self.progress = checkpoint, dtype, check_finite, progress
        self.adapter = adapter_for(model.config)
        self.edits = [LayerEdit(index) for index in range(len(decoder_layers(self.adapter, model)))]
        self.layers_read = 0
        self._found_finite: set = set()  # what was read and checked finite already (a pass reads it again)
        self.replaced_weights = SpilledTensors()  # LayerEdit.replaced's values, by (source layer, name)
        self._skeleton_experts: dict[int, nn.Module | None] = {}  # of the layers read in now
        self._untie_stored_copies()

    @property
    def model(self) -> nn.Module:
        return self._model()

    def _untie_stored_copies(self) -> None:
        """Tie only what transformers' own load ties: a tied pair (the head and the embeddings) whose both
        tensors the checkpoint holds, with different values, stays apart (transformers keeps a file's own
        head even when config.json says tie_word_embeddings), so the model's `all_tied_weights_keys` says what
        is really tied to every reader of it (outer, the saver, the memory plan)."""
        tied = getattr(self.model, "all_tied_weights_keys", None) or {}
        for target, source in list(tied.items()):
            if not (self.checkpoint.has(target) and self.checkpoint.has(source)):
                continue  # one of them stored: the other is tied to it, as transformers does
            if self.checkpoint.shape(target) != self.checkpoint.shape(source) or not torch.equal(
                    self.checkpoint.tensor(target).to(self.dtype), self.checkpoint.tensor(source).to(self.dtype)):
                del tied[target]

    # -- the plain data passes update ----------------------------------------------------

    def keep_blocks(self, kept: list[int]) -> None:
        self.edits = [self.edits[index] for index in kept]

    def keep_experts(self, layer: int, keep: list[int]) -> None:
        edit = self.edits[layer]
        current = self.kept_experts(edit)
        self.edits[layer] = replace(edit, experts=tuple(current[index] for index in keep))

    def transform_experts(self, layer: int, transform, float32: bool = False) -> None:
        """Layer `layer`'s experts are read through `transform` from now on (LayerEdit.transforms); `float32`:
        its values are exact only in float32, so they are read so whatever the compute dtype (the forward
        casts them to its activations' dtype as it applies them)."""
        edit = self.edits[layer]
        self.edits[layer] = replace(edit, transforms=edit.transforms + (transform,), float32=edit.float32 or float32)
        experts = self.adapter.layer_view(self.model, layer).experts
        if isinstance(experts, ExpertsOnDemand):  # the layer is read in now: what runs next reads them transformed
            _, meta, _, prefix = experts._arguments
            setattr(self.adapter.layer_view(self.model, layer).ffn, self.adapter.experts,
                    ExpertsOnDemand(self, meta, self.edits[layer], prefix))

    def replace_weight(self, layer: int, name: str, tensor: torch.Tensor) -> None:
        """Layer `layer`'s weight `name` (inside the layer) is `tensor` from now on, whenever the layer is read."""
        edit = self.edits[layer]
        self.replaced_weights.put((edit.source, name), tensor)
        self.edits[layer] = replace(edit, replaced=edit.replaced | {name})

    def kept_experts(self, edit: LayerEdit) -> tuple[int, ...]:
        """The experts of its source layer that a layer's `edit` keeps, in order (all of them unless it names some)."""
        if edit.experts is not None:
            return edit.experts
        router = self._name(edit.source, ".".join(filter(None, (self.adapter.moe, self.adapter.router,
                                                                 self.adapter.router_weight))))
        return tuple(range(self.checkpoint.shape(router)[0]))

    # -- reading ------------------------------------------------------------------------------

    def layer_views(self):
        progress = self.progress
        task = progress.add_task("decoder layers, read from disk", total=len(self.edits)) if progress else None
        try:
            for index in range(len(self.edits)):
                with self.layer(index) as view:
                    yield view
                if progress:
                    progress.advance(task)
        finally:
            if progress:
                progress.remove_task(task)

    @contextmanager
    def layer(self, index: int):
        """Decoder layer `index` with its weights read in; released (back on the meta device) afterwards.

        Its routed experts are not read here: an ExpertsOnDemand stands in for them, which
        reads one expert when it is used, so a layer's memory is its attention plus one expert.
        """
        self._read_in(index)
        try:
            yield self.adapter.layer_view(self.model, index)
        finally:
            self._release(index)

    def edit_read_layer(self, index: int, surgery) -> None:
        """Run `surgery` (adapters/surgery.py's, which changes the skeleton and tells the stream) on layer
        `index`, which is read in now, and read the layer in again as it leaves it: its modules stay the same
        objects, holding the changed weights (a pass that rebuilds a layer's experts while it runs)."""
        self._release(index)
        surgery()
        self._read_in(index)

    def _read_in(self, index: int) -> None:
        module = decoder_layers(self.adapter, self.model)[index]
        edit = self.edits[index]
        view = self.adapter.layer_view(self.model, index)
        experts_prefix = child_name(module, view.experts) + "." if view.experts is not None else None
        router_prefix = ".".join(filter(None, (self.adapter.moe, self.adapter.router))) + "."
        weights = {
            name: self._read(self._name(edit.source, name), meta.shape, edit.experts, name.startswith(router_prefix))
            for name, meta in module.state_dict(keep_vars=True).items()
            if not (experts_prefix and name.startswith(experts_prefix))
        }
        weights.update({name: self.replaced_weights.tensor((edit.source, name)) for name in edit.replaced})
        module.load_state_dict(weights, assign=True, strict=False)
        del weights
        self._skeleton_experts[index] = view.experts
        if view.experts is not None:
            setattr(view.ffn, self.adapter.experts, ExpertsOnDemand(self, view.experts, edit, experts_prefix))
        try:
            _require_loaded(module, f"layer {index}")
            if self.check_finite and ("layer", edit.source) not in self._found_finite:
                check_finite(module, Path(self.model.config.name_or_path or "."), prefix=f"layer {index}: ")
                self._found_finite.add(("layer", edit.source))
        except BaseException:
            self._release(index)
            raise
        self.layers_read += 1

    def _release(self, index: int) -> None:
        """Layer `index` back on the meta device, its skeleton's routed experts in place of the ExpertsOnDemand."""
        skeleton = self._skeleton_experts.pop(index)
        if skeleton is not None:
            setattr(self.adapter.layer_view(self.model, index).ffn, self.adapter.experts, skeleton)
        decoder_layers(self.adapter, self.model)[index].to("meta")

    def packed(self, index: int, stack: str, slot: int | None = None):
        """Whether layer `index`'s expert stack `stack` (its name inside the layer) is read from MXFP4 pairs that
        no pass changed (slot None), or kept expert `slot`'s (blocks, scales) as the checkpoint stores them:
        what a file type holding MXFP4 carries byte for byte. False (None for a slot) otherwise."""
        edit = self.edits[index]
        pair_of = getattr(self.checkpoint, "mxfp4_pair", None)  # (a GGUF input holds no such pairs)
        pair = pair_of(self._name(edit.source, stack)) if pair_of else None
        if edit.transforms or pair is None:
            return None if slot is not None else False
        if slot is None:
            return True
        expert = edit.experts[slot] if edit.experts is not None else slot
        return tuple(self.checkpoint.stored_slice(key, expert) for key in pair)

    def rebuild_rotary(self) -> None:
        """The rotary tables are computed from the config, not stored: build them for real once."""
        if not self.adapter.rotary_embedding:  # a model without positional rotation (NoPE) has none
            return
        parent_path, _, attribute = self.adapter.rotary_embedding.rpartition(".")
        parent = get_path(self.model, parent_path) if parent_path else self.model
        setattr(parent, attribute, type(getattr(parent, attribute))(config=self.model.config))

    def _fill_embedding_scale(self) -> None:
        """The scaled embeddings' factor (a scalar buffer no checkpoint holds), computed from the config."""
        if self.adapter.embedding_scale is None:
            return
        embeddings = get_path(self.model, self.adapter.embeddings)
        for name, buffer in embeddings.named_buffers(recurse=False):
            if buffer.is_meta and buffer.dim() == 0:
                setattr(embeddings, name, torch.tensor(self.adapter.embedding_scale(self.model.config)))

    @contextmanager
    def outer(self, part: str = "all"):
        """What is not a decoder layer read in, and released after: only the first and the last steps of a
        pass over the model need it. `part`: "input" (the embeddings), "output" (final norm and head, with
        the embeddings when the head is tied to them), "final_norm", "besides_rows" (all but the embeddings and
        head, which weight_rows reads) or "all"."""
        layers = self.adapter.layers + "."
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or {})
        wanted = self._outer_modules(part, bool(tied))
        weights = {
            name: self._read(name, meta.shape)
            for name, meta in self.model.state_dict(keep_vars=True).items()
            if not name.startswith(layers) and not (name in tied and not self.checkpoint.has(name))
            and (wanted is None or name.rpartition(".")[0] in wanted)
        }
        self.model.load_state_dict(weights, assign=True, strict=False)
        self.model.tie_weights(recompute_mapping=False)  # the ties settled when the stream opened, not the config's
        self._fill_embedding_scale()
        _require_as_read(self.model, weights)
        for name, tensor in weights.items():
            self._require_finite(name, tensor)
        del weights
        owners = [module for name, module in self.model.named_modules()
                  if not (name + ".").startswith(layers) and any(True for _ in module.parameters(recurse=False))
                  and (wanted is None or name in wanted)]
        try:
            for name, tensor in (*self.model.named_parameters(), *self.model.named_buffers()):
                if not name.startswith(layers) and tensor.is_meta and (wanted is None or
                                                                       name.rpartition(".")[0] in wanted):
                    raise MoeExportError(f"streaming cannot fill {name} of {self.model.config.model_type}: it is "
                                         "neither in the checkpoint nor computed; build without streaming")
            yield
        finally:
            for module in owners:
                module.to("meta")

    def _outer_modules(self, part: str, tied: bool) -> set[str] | None:
        """The module names `outer(part)` reads (None: every one outside the layers)."""
        if part == "all":
            return None
        embeddings = {self.adapter.embeddings}
        if part == "input":
            return embeddings
        if part == "final_norm":
            return {self.adapter.final_norm}
        if part == "besides_rows":  # what is not read by weight_rows: every module but the embeddings and head
            layers = self.adapter.layers + "."
            rows = {self.adapter.embeddings, child_name(self.model, self.model.get_output_embeddings())}
            return {name for name, module in self.model.named_modules() if not (name + ".").startswith(layers)
                    and any(True for _ in module.parameters(recurse=False)) and name not in rows}
        head = child_name(self.model, self.model.get_output_embeddings())
        return {self.adapter.final_norm, head} | (embeddings if tied else set())

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token embeddings of `input_ids`, reading only the rows of the tokens that occur."""
        name = self.adapter.embeddings + ".weight"
        used, positions = torch.unique(input_ids, return_inverse=True)
        rows = self._require_finite(name, self.checkpoint.rows(name, used)).to(self.dtype)[positions]
        if self.adapter.embedding_scale is None:
            return rows
        # as the embeddings module scales them (its factor, in the compute dtype): the model takes these rows as
        # inputs_embeds, which it does not scale
        return rows * torch.tensor(self.adapter.embedding_scale(self.model.config)).to(self.dtype)

    def head_blocks(self, rows: int = OUTER_ROWS):
        """(first row, the LM head's rows [first, first + rows) in the compute dtype), covering the head."""
        head = self.weight_rows("output")
        for first in range(0, head.shape[0], rows):
            yield first, head[first:first + rows]

    def weight_rows(self, part: str) -> "WeightRows":
        """The embeddings' ("input") or the LM head's ("output"; the embeddings when tied) weight, read a block of
        rows at a time in the compute dtype: what writes or applies them row by row never holds them whole."""
        name = self.adapter.embeddings + ".weight"
        if part == "output":
            head = child_name(self.model, self.model.get_output_embeddings()) + ".weight"
            name = head if self.checkpoint.has(head) else name
        return WeightRows(self.checkpoint.shape(name), lambda first, stop: self._require_finite(
            name, self.checkpoint.rows(name, torch.arange(first, stop))).to(self.dtype))

    def _require_finite(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (the weights of `name`: embeddings, head, final norm, an expert's matrix), refused when it
        holds NaN or Inf unless non-finite weights are allowed."""
        if self.check_finite and tensor.is_floating_point() and tensor.numel() and \
                not all(torch.isfinite(bound) for bound in torch.aminmax(tensor)):
            raise MoeExportError(f"{self.model.config.name_or_path}: {name} has non-finite values (NaN or Inf): the "
                                 "checkpoint is corrupt; fetch it again (or pass --allow-nonfinite)")
        return tensor

    def _name(self, layer: int, name: str) -> str:
        return f"{self.adapter.layers}.{layer}.{name}"

    def source_name(self, name: str, source_layer: int) -> str:
        """A decoder layer's parameter `name` (full model name) as the checkpoint's layer `source_layer` has it."""
        relative = name.removeprefix(self.adapter.layers + ".").partition(".")[2]
        return self._name(source_layer, relative)

    def stored_dtype(self, name: str) -> torch.dtype:
        """The dtype the checkpoint stores parameter `name` (the model's name) in."""
        return self.checkpoint.stored_dtype(name)

    def _read(self, name: str, shape: torch.Size, experts: tuple[int, ...] | None = None,
              per_expert: bool = False) -> torch.Tensor:
        """The parameter `name` (the model's own name) from the checkpoint, in the compute dtype; a per-expert
        tensor (router rows and biases, expert biases) only for the routed experts `experts` kept. (Expert
        matrices are read by expert_matrix.)"""
        if not self.checkpoint.has(name):
            raise MoeExportError(f"the checkpoint has no tensor for {name}: it does not match config.json")
        tensor = self.checkpoint.tensor(name)
        if experts is not None and per_expert and tensor.shape != shape:
            # the expert axis is the one whose length the kept experts changed (rows [E, hidden], [E], [1, E])
            axis = next(d for d, (stored, kept) in enumerate(zip(tensor.shape, shape)) if stored != kept)
            tensor = tensor.index_select(axis, torch.tensor(experts, dtype=torch.long))
        return tensor.to(self.dtype)

    def expert_matrix(self, name: str, expert: int, part: int | None = None, parts: int = 1,
                      stored: bool = False, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Expert `expert`'s matrix of the stacked parameter `name` (the model's name, source layer), or only
        its `part` of `parts` row blocks (gate or up of gate_up_proj), or of that only `rows` (first, count);
        in the compute dtype, or as `stored`."""
        read = (name, expert, part, parts, rows)
        matrix = self.checkpoint.expert(name, expert, part, parts, rows)
        if self.check_finite and read not in self._found_finite:
            self._require_finite(f"{name} of expert {expert}", matrix)
            self._found_finite.add(read)
        return matrix if stored else matrix.to(self.dtype)


class SafetensorsCheckpoint:
    """The tensors of safetensors files, read under the model's parameter names (what a LayerStream asks for)."""

    def __init__(self, model: nn.Module, headers: Headers):
        """`headers`: the files' tensor headers (moeexport.checkpoint_files.read_headers), read once, when the
        model was opened."""
        self.headers = headers
        self.sources = _parameter_sources(model, self.headers)
        # an MXFP4 stack dequantizes to [E, outputs, inputs]; a transposed layout stores the transpose
        self.transposed = adapter_for(model.config).expert_layout(model.config).transposed

    reads_in_blocks = False  # matrices are read whole, as stored

    def has(self, name: str) -> bool:
        return bool(self.sources.get(name))

    def rows(self, name: str, indices: torch.Tensor) -> torch.Tensor:
        """Rows `indices` of a 2-D parameter stored whole, as stored: only those rows are read from the file, a
        run of consecutive indices at a time (the embeddings and head of a large vocabulary are never whole)."""
        piece = self.sources[name][0]
        if piece.scales:  # an MXFP4 stack has no rows of its own to read
            return self.tensor(name).index_select(0, indices)
        indices = indices.tolist()
        starts = [i for i, index in enumerate(indices) if i == 0 or index != indices[i - 1] + 1]
        with safe_open(self.headers[piece.key][2], "pt") as handle:
            stored = handle.get_slice(piece.key)
            if not indices:
                return stored[0:0]
            return _counted(torch.cat([stored[indices[start]:indices[stop - 1] + 1]
                                       for start, stop in zip(starts, starts[1:] + [len(indices)])]))

    def shape(self, name: str) -> list[int]:
        """The shape of a parameter stored whole (not for per-expert pieces)."""
        piece = self.sources[name][0]
        shape = self.headers[piece.key][0]
        return mxfp4.unpacked_shape(shape, self.transposed) if piece.scales else shape

    def stored_dtype(self, name: str) -> torch.dtype:
        piece = self.sources[name][0]
        return torch.bfloat16 if piece.scales else SAFETENSORS_DTYPES[self.headers[piece.key][1]]

    def tensor(self, name: str) -> torch.Tensor:
        piece = self.sources[name][0]
        if piece.scales:
            return mxfp4.dequantize(self._tensor(piece.key), self._tensor(piece.scales), self.transposed)
        return self._tensor(piece.key)

    def expert(self, name: str, expert: int, part: int | None, parts: int,
               rows: tuple[int, int] | None = None) -> torch.Tensor:
        """One expert's matrix of a stacked parameter (or its `part` of `parts` row blocks, or of that only
        `rows`: first, count), as stored."""
        if rows is not None:
            first, count = rows
            return self.expert(name, expert, part, parts)[first:first + count]
        pieces = self.sources[name]
        if pieces[0].scales:  # MXFP4: the one expert's blocks and scales, dequantized
            blocks, scales = (self.stored_slice(key, expert) for key in (pieces[0].key, pieces[0].scales))
            matrix = mxfp4.dequantize(blocks, scales, self.transposed)
            release_freed_memory()  # else glibc keeps the dequantizing temporaries: RSS creeps up per expert read
        elif pieces[0].expert is None:  # stored stacked, as the model names it: slice the one expert out
            with safe_open(self.headers[pieces[0].key][2], "pt") as handle:
                matrix = _counted(handle.get_slice(pieces[0].key)[expert:expert + 1][0])
        else:
            by_slot = {(piece.expert, piece.part): piece.key for piece in pieces}
            stored_parts = 1 + max(piece.part for piece in pieces)
            if part is not None and stored_parts == parts:
                return self._tensor(by_slot[(expert, part)])
            matrix = torch.cat([self._tensor(by_slot[(expert, i)]) for i in range(stored_parts)])
        if part is not None:
            rows = matrix.shape[0] // parts
            matrix = matrix[part * rows:(part + 1) * rows]
        return matrix

    def mxfp4_pair(self, name: str) -> tuple[str, str] | None:
        """(blocks key, scales key) of parameter `name` when the checkpoint holds it as an MXFP4 pair."""
        pieces = self.sources.get(name)
        return (pieces[0].key, pieces[0].scales) if pieces and pieces[0].scales else None

    def stored_slice(self, key: str, index: int) -> torch.Tensor:
        """Checkpoint tensor `key`'s slice `index` along its first axis (one expert of a stack), as stored."""
        with safe_open(self.headers[key][2], "pt") as handle:
            return _counted(handle.get_slice(key)[index:index + 1][0])

    def _tensor(self, key: str) -> torch.Tensor:
        # Opened per tensor: a mapping kept open holds every page read through it in this process's RSS.
        with safe_open(self.headers[key][2], "pt") as handle:
            return _counted(handle.get_tensor(key))


def _counted(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, just read from a checkpoint file, counted as read (moeexport.reads)."""
    reads.count(tensor.numel() * tensor.element_size())
    return tensor


class WeightRows:
    """A 2-D weight [rows, columns] read from disk a block of rows at a time: `weight[first:stop]` (a slice with
    step 1) reads those rows. It offers the little of a tensor's interface that row-wise writers use (`shape`,
    slicing, `reshape(-1, columns)`)."""

    def __init__(self, shape, read):
        self.shape, self._read = torch.Size(shape), read

    def __getitem__(self, rows: slice) -> torch.Tensor:
        first, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("weight rows are read in runs (step 1)")
        return self._read(first, max(first, stop))

    def reshape(self, *shape) -> "WeightRows":
        if tuple(shape) not in ((-1, self.shape[1]), tuple(self.shape)):
            raise ValueError(f"weight rows {tuple(self.shape)} keep their shape")
        return self


class ExpertStack:
    """Stacked expert matrices [E, rows, cols] that are read one expert at a time: `stack[e]`.

    It offers the little of a tensor's interface that the exporters use on expert
    stacks (`shape`, indexing by expert, `chunk` along the rows, `padded`).
    """

    def __init__(self, shape, read):
        self.shape, self._read = torch.Size(shape), read

    def __getitem__(self, expert) -> torch.Tensor:
        return self._read(int(expert))

    def __len__(self) -> int:
        return self.shape[0]

    def chunk(self, chunks: int, dim: int) -> list["ExpertStack"]:
        if dim != 1:
            raise ValueError("expert stacks split along their rows (dim 1) only")
        experts, rows, columns = self.shape
        return [ExpertStack((experts, rows // chunks, columns), lambda e, part=part: self._read_part(e, part, chunks))
                for part in range(chunks)]

    def mapped(self, shape, transform) -> "ExpertStack":
        """The stack [E, rows, cols] = `shape` whose expert e is transform(self[e]): a layout's experts
        rearranged (transposed, split) as each is read."""
        return ExpertStack(shape, lambda e: transform(self._read(e)))

    def padded(self, pads: int) -> "ExpertStack":
        """`pads` all-zero experts appended."""
        experts, rows, columns = self.shape
        return ExpertStack((experts + pads, rows, columns),
                           lambda e: self._read(e) if e < experts else torch.zeros(rows, columns))

    def _read_part(self, expert: int, part: int, parts: int) -> torch.Tensor:
        read_part = getattr(self._read, "part", None)
        if read_part is not None:
            return read_part(expert, part, parts)
        matrix = self._read(expert)
        rows = matrix.shape[0] // parts
        return matrix[part * rows:(part + 1) * rows]


class _ExpertReader:
    """Reads one kept expert of a streamed layer (slot -> the source expert it is), transformed as its edit says."""

    def __init__(self, stream: LayerStream, name: str, edit: LayerEdit, stored: bool = False, stack: str = "",
                 rows: int = 0):
        self.stream, self.name, self.edit, self.stored, self.stack = stream, name, edit, stored, stack
        self.matrix_rows = rows  # of one whole stored matrix

    def __call__(self, slot: int) -> torch.Tensor:
        return self.part(slot, None, 1)

    def part(self, slot: int, part: int | None, parts: int, rows: tuple[int, int] | None = None) -> torch.Tensor:
        expert = self.edit.experts[slot] if self.edit.experts is not None else slot
        transforms = self.edit.transforms
        matrix = self.stream.expert_matrix(self.name, expert, part, parts, self.stored and not transforms, rows)
        first = (part or 0) * (self.matrix_rows // parts) + (rows[0] if rows else 0)
        for transform in transforms:  # in float32 (a quantize pass's grid needs it: it refuses other dtypes)
            matrix = transform(matrix.float(), self.stack, expert, slice(first, first + len(matrix)))
        # the compute dtype, which the forward's activations have (a pruned bf16 expert is exact in bf16)
        return matrix.to(self.stream.dtype) if transforms and not self.edit.float32 else matrix


SPILL_PREFIX = "moeexport-spilled-"  # + the process id: a killed run's files are known by a pid no longer alive


@functools.cache
def remove_spills_of_dead_runs() -> None:
    """Remove what runs killed before they could clean up (SIGKILL, the OOM killer) left in the temporary
    directory: tens of GB each at real widths. Once per process."""
    for directory in Path(tempfile.gettempdir()).glob(f"{SPILL_PREFIX}*-*"):
        pid = directory.name.removeprefix(SPILL_PREFIX).split("-")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(directory, ignore_errors=True)


class SpilledTensors:
    """Tensors a pass computed for a streamed model, held in files (one per key) until they are read; a key put
    again replaces its tensor. The files go with this object."""

    def __init__(self):
        remove_spills_of_dead_runs()
        self.directory = Path(tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.directory, True)
        self.files: dict[object, Path] = {}
        self._written = 0

    def put(self, key, tensor: torch.Tensor) -> None:
        path = self.directory / f"{self._written}.safetensors"  # a new file: a key put again keeps no other's
        self._written += 1
        save_file({"tensor": tensor.contiguous()}, path)
        self.files[key] = path

    def rows(self, key, rows: slice) -> torch.Tensor:
        with safe_open(self.files[key], "pt") as handle:
            return handle.get_slice("tensor")[rows.start:rows.stop]

    def tensor(self, key) -> torch.Tensor:
        with safe_open(self.files[key], "pt") as handle:
            return handle.get_tensor("tensor")


class SpilledBatches:
    """A list of tensors (one per calibration batch) held in files until iterated, read back one at a time: what
    a streamed run keeps of every layer it will need again (`repair: refit`'s target residuals)."""

    def __init__(self):
        self._spilled = SpilledTensors()

    def append(self, tensor: torch.Tensor) -> None:
        self._spilled.put(len(self), tensor)

    def __len__(self) -> int:
        return len(self._spilled.files)

    def __iter__(self):
        return (self._spilled.tensor(batch) for batch in range(len(self)))


class SpilledExperts(SpilledTensors):
    """Expert matrices computed for a streamed layer from what only that layer's calibration run measured (GPTQ,
    SparseGPT), keyed (stack, source expert): a LayerStream transform that gives the rows asked for of the
    matrix stored for the expert it is given, whatever matrix it is given."""

    def __call__(self, matrix: torch.Tensor, stack: str, expert: int, rows: slice) -> torch.Tensor:
        return self.rows((stack, expert), rows)


class ExpertsOnDemand(nn.Module):
    """A streamed layer's routed experts, each read from disk when it is used and dropped after.

    `gate_up_proj` and `down_proj` are ExpertStacks; `forward` is transformers'
    eager expert loop (the same in every supported family), so it computes exactly
    what the in-memory experts compute, holding one expert at a time.
    """

    def __init__(self, stream: LayerStream, experts: nn.Module, edit: LayerEdit, prefix: str, stored: bool = False):
        super().__init__()
        self._arguments = (stream, experts, edit, prefix)  # a tuple, so the meta experts are no submodule
        self.layout = stream.adapter.expert_layout(stream.model.config)
        self.num_experts = experts.down_proj.shape[0]
        source = stream._name(edit.source, prefix)
        for stack in expert_stacks(replace(self.layout, biases=False)):  # gate_up_proj (up_proj, ungated), down_proj
            setattr(self, stack, ExpertStack(getattr(experts, stack).shape,
                                             _ExpertReader(stream, source + stack, edit, stored, stack,
                                                           getattr(experts, stack).shape[1])))
        if self.layout.biases:  # small ([E, rows]): read whole, the kept experts' only
            for name in ("gate_up_proj_bias", "down_proj_bias"):
                setattr(self, name, stream._read(source + name, getattr(experts, name).shape, edit.experts, True))
        self._output_observers = []

    @contextmanager
    def outputs_observed(self, observe):
        """While open, the forward calls observe(expert, slots, token_rows, output) with each expert's output
        before its gate weight (token_rows and slots index the forward's top-k arrays): a statistic of the
        experts' outputs (REAP's) taken from the forward itself, so each expert is read once, not twice."""
        self._output_observers.append(observe)
        try:
            yield
        finally:
            self._output_observers.remove(observe)

    def stored(self) -> "ExpertsOnDemand":
        """The same experts read as the checkpoint stores them (for saving: lossless, and half a float32's size)."""
        return ExpertsOnDemand(*self._arguments, stored=True)

    ROWS_PER_BLOCK = 1024  # weight rows read and multiplied at once by a checkpoint that reads in blocks

    def intermediate(self, expert: int, tokens: torch.Tensor) -> torch.Tensor:
        """act(gate(x)) * up(x) of one expert: the input of its down projection.

        A checkpoint that reads in blocks (a GGUF, which stores gate and up apart and
        is dequantized as it is read) has each matrix read and applied a block of
        rows at a time, so no whole expert matrix is ever in float32; others apply
        gate_up fused, bit for bit what the in-memory model computes.
        """
        if self._arguments[0].checkpoint.reads_in_blocks:
            width = self.gate_up_proj.shape[1] // 2
            gate = self._project(tokens, self.gate_up_proj, expert, 0, 2, width)
            return activate(self.layout, gate, self._project(tokens, self.gate_up_proj, expert, 1, 2, width))
        return expert_intermediate(self.layout, self, expert, tokens)

    def output(self, expert: int, intermediate: torch.Tensor) -> torch.Tensor:
        """The expert's down projection of its intermediate (read in blocks where the checkpoint reads so)."""
        if self._arguments[0].checkpoint.reads_in_blocks:
            return self._project(intermediate, self.down_proj, expert, None, 1, self.down_proj.shape[1])
        return expert_output(self.layout, self, expert, intermediate)

    def _project(self, tokens: torch.Tensor, stack: "ExpertStack", expert: int, part: int | None, parts: int,
                 rows: int) -> torch.Tensor:
        """tokens @ W.T for the expert's matrix W (its `part` of `parts`), ROWS_PER_BLOCK rows of W at a time."""
        reader = stack._read
        return torch.cat([nn.functional.linear(tokens, reader.part(int(expert), part, parts,
                                                                   (first, min(self.ROWS_PER_BLOCK, rows - first)))
                                               .to(tokens.dtype))
                          for first in range(0, rows, self.ROWS_PER_BLOCK)], dim=-1)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
            expert_mask = expert_mask.permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            if expert_idx == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[token_idx]
            current_hidden_states = self.output(expert_idx, self.intermediate(expert_idx, current_state))
            for observe in self._output_observers:
                observe(int(expert_idx), top_k_pos, token_idx, current_hidden_states)
            current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
        return final_hidden_states


def child_name(root: nn.Module, child: nn.Module) -> str:
    return next(name for name, module in root.named_modules() if module is child)


def _require_as_read(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Every parameter read under its own name from the checkpoint is, after tying, still the tensor read: tying
    never replaces a weight the file holds (a stored head by the embeddings) unless transformers' load would."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    for name, tensor in weights.items():
        held = parameters.get(name)
        if held is not None and held.data_ptr() != tensor.data_ptr() and not torch.equal(held, tensor):
            raise MoeExportError(f"the streamed model's {name} is not the checkpoint's {name} after tying: this is "
                                 "a bug in moeexport's streaming; build without streaming (--no-stream)")


def _require_loaded(module: nn.Module, what: str) -> None:
    for name, tensor in (*module.named_parameters(), *module.named_buffers()):
        if tensor.is_meta:
            raise MoeExportError(f"streaming cannot fill {what}'s {name}: build without streaming")


def text_model_prefix(model: nn.Module):
    """Where a multimodal checkpoint stores this text model: transformers' own prefix change where its conversion
    table has one, else the layout transformers 5 saves every multimodal model in (model.language_model.*), which
    its table leaves out for some families, so that their causal LM alone cannot read the hub's files."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    return next((change for change in get_model_conversion_mapping(model)
                 if isinstance(change, PrefixChange) and change.prefix_to_remove),
                PrefixChange(prefix_to_remove="language_model", model_prefix="model"))


def _parameter_sources(model: nn.Module, headers: dict) -> dict[str, list[_Piece]]:
    """Model parameter name -> the checkpoint tensors it is made of.

    A checkpoint holds tensors under the model's own names, or in the layout
    transformers converts on load (the hub's per-expert w1/w3/w2 stacked into
    gate_up_proj / down_proj); transformers' own conversion table says which, and
    only its stack-and-concatenate conversions are streamed (the ones every
    supported family uses).
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (Concatenate, MergeModulelist, WeightConverter, WeightRenaming,
                                                 rename_source_key)

    native = set(model.state_dict().keys())
    packed = mxfp4.packed_parameters(headers)
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)] + [text_model_prefix(model)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    sources: dict[str, list[_Piece]] = defaultdict(list)
    for name, (blocks, scales) in packed.items():
        sources[name].append(_Piece(blocks, scales=scales))
    for key in headers:
        if any(key in pair for pair in packed.values()):
            continue
        if key in native:
            sources[key].append(_Piece(key))
            continue
        target, pattern = rename_source_key(key, renamings, converters)
        if pattern is None:
            sources[target].append(_Piece(key))
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        operations = [(type(op), getattr(op, "dim", None)) for op in converter.operations]
        if operations not in ([(MergeModulelist, 0)], [(MergeModulelist, 0), (Concatenate, 1)]):
            raise MoeExportError(f"{model.config.model_type} checkpoints convert {key} in a way moeexport does not "
                                 f"stream ({converter.operations}); build without streaming (a larger --max-memory)")
        expert = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
        sources[target].append(_Piece(key, int(expert.group(1)), converter.source_patterns.index(pattern)))
    return dict(sources)


# --- running a streamed model -----------------------------------------------------------


class _StopForward(Exception):
    pass


class LayerCalls(dict):
    """The keyword arguments the model calls its first decoder layer with, and in `of(layer)` those of each layer:
    layers may be called differently (gpt-oss's sliding-window layers get an attention mask of their own)."""

    def __init__(self, calls: dict[nn.Module, dict]):
        super().__init__(next(iter(calls.values())))
        self.calls = calls

    def of(self, layer: nn.Module) -> dict:
        return self.calls[layer]


def first_layer_inputs(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, LayerCalls]:
    """Run the model's forward with every decoder layer passing its input on, recording how it calls each:
    (the first layer's hidden states, the keyword arguments of every layer's call).

    What the layers need besides the hidden states (attention masks, rotary tables)
    comes from the model's own forward, so every family is called as it calls itself.
    """
    layers = decoder_layers(adapter_for(model.config), model)
    captured, calls = {}, {}

    def recorder(layer: nn.Module):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            captured.setdefault("hidden", hidden)
            calls[layer] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if len(calls) == len(layers):  # what follows the layers is not needed (nor read, when streamed)
                raise _StopForward
            return hidden
        return forward

    for layer in layers:
        layer.forward = recorder(layer)  # an instance attribute: what nn.Module calls, removed after
    stream = stream_of(model)
    try:
        if stream is not None:  # only the rows of the tokens used are read
            model(inputs_embeds=stream.embed(input_ids), use_cache=False)
        else:
            model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for layer in layers:
            del layer.forward
    return captured["hidden"], LayerCalls(calls)


def run_layer(module: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Decoder layer `module`'s output for `hidden`, called as the model calls it (`kwargs`: first_layer_inputs')."""
    output = module(hidden, **(kwargs.of(module) if isinstance(kwargs, LayerCalls) else kwargs))
    return output[0] if isinstance(output, tuple) else output




# the fewest positions a streamed forward runs per batch: the quality windows (16 x 128) in one, each expert read
# once; no more positions than a batch of 8 windows of 256 tokens already held
STREAMED_BATCH_POSITIONS = 2048


@torch.no_grad()
def logits(model, windows: torch.Tensor, batch_size: int = 8) -> np.ndarray:
    """float32 logits [N, L, vocab] of token windows [N, L], reading each decoder layer once for all of them."""
    out = np.empty((*windows.shape, model.config.vocab_size), np.float32)
    for start, block in window_logits(model, windows, batch_size):
        out[start:start + len(block)] = block
    return out


@torch.no_grad()
def window_logits(model, windows: torch.Tensor, batch_size: int = 8):
    """(first window, float32 logits [n, L, vocab] of windows[first:first + n]), covering windows [N, L] in
    order; each decoder layer is read once for all of them. A streamed model applies its head a block of
    vocabulary rows at a time, to LOGIT_POSITIONS positions' worth of windows at once (the head is read again
    for each such group): neither the head nor all the logits are ever whole in memory. A streamed layer reads
    its experts again for each batch, so it runs at least STREAMED_BATCH_POSITIONS positions at once."""
    if is_streamed(model):
        batch_size = max(batch_size, STREAMED_BATCH_POSITIONS // windows.shape[1])
    batches = [first_layer_inputs(model, batch) for batch in windows.split(batch_size)]
    hidden = [h for h, _ in batches]
    for view in layer_views(model):
        hidden = [run_layer(view.module, h, kwargs) for h, (_, kwargs) in zip(hidden, batches)]
    adapter = adapter_for(model.config)
    around, cap = adapter.model_view(model), adapter.model_config(model.config).logit_softcap

    def capped(logits: torch.Tensor) -> torch.Tensor:  # final logit softcapping, where the model has it
        return logits if not cap else cap * torch.tanh(logits / cap)

    stream = stream_of(model)
    if stream is None:
        for start, h in zip(range(0, len(windows), batch_size), hidden):
            yield start, capped(around.output(around.final_norm(h))).float().numpy()
        return
    with stream.outer("final_norm"):
        normed = torch.cat([around.final_norm(h) for h in hidden])
    del hidden
    group = max(1, LOGIT_POSITIONS // windows.shape[1])
    for start in range(0, len(windows), group):
        h = normed[start:start + group]
        out = np.empty((len(h), windows.shape[1], model.config.vocab_size), np.float32)
        for first, rows in stream.head_blocks():
            out[:, :, first:first + len(rows)] = capped(h @ rows.T).float().numpy()
        yield start, out
