"""Loading MoE checkpoints and saving compressed ones.

A compressed checkpoint is written in one of two forms:
- stock: config.json + model.safetensors that plain transformers loads
  (Block Drop, uniform Expert Drop);
- manifest: config.json (largest expert count) + moeexport.safetensors + the
  per-layer structure in moeexport.json, which `load` replays before loading
  the weights strictly. The weights file has a non-standard name on purpose:
  stock `from_pretrained` then fails loudly instead of filling the missing
  experts with random values.
Both forms carry moeexport.json (what was done, to what) and the tokenizer.

Loading refuses a damaged checkpoint before transformers sees it: opening it
(moeexport.source) reads only .safetensors files (never a pickle, also not
through an index) whose headers must parse, and `check_checkpoint` requires the
tensor names, shapes and dtypes in the headers to be the ones config.json implies
(no parameter is ever left at random initialization). After loading, every weight
is checked finite.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from moeexport import mxfp4, streaming
from moeexport import reads
from moeexport.adapters import adapter_for
from moeexport.adapters.experts import expert_stacks
from moeexport.adapters.surgery import structure, sync_expert_config
from moeexport.backends import model_reader
from moeexport.checkpoint_files import (MANIFEST, MANIFEST_INDEX, MANIFEST_WEIGHTS, SAFE_INDEX, SAFE_WEIGHTS,
                                        TOKENIZER_FILES, check_finite, is_gguf, one_line, resolve_model_dir)
from moeexport.errors import MoeExportError
from moeexport.memory import OUTER_ROWS
from moeexport.outputs import staged
from moeexport.skeleton import DTYPES, EXPERTS_IMPLEMENTATION, apply_structure, own_copy, skeleton
from moeexport.source import Source, as_source
from moeexport.stream_registry import detach

SHARD_BYTES = 2**30  # a streamed save writes shards of about this size (each is serialized in memory once)
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def check_checkpoint(source: Source, trust_remote_code: bool = False) -> None:
    """Refuse, by name, a weights file whose tensors are not exactly the ones config.json implies.

    Reads only the source's headers. The model is built on the meta device (no memory) to list its
    tensors; a checkpoint may hold them as the model names them, or in the layout
    transformers saves and converts on load (the hub's per-expert w1/w2/w3, ...).
    """
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    found, files = _unpacked(source), source.weight_files
    try:
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(own_copy(source.config), trust_remote_code=trust_remote_code)
    except Exception as error:  # a value the config class let through: an unknown activation or rope type, ...
        reason = f"it names an unknown {error}" if isinstance(error, KeyError) else one_line(error)
        raise MoeExportError(f"{source.path / 'config.json'} describes a model transformers cannot build: "
                             f"{reason}") from None
    if source.layers is not None:
        apply_structure(lm, list(source.layers))
        layouts = [lm.state_dict()]
    else:
        native = lm.state_dict()
        layouts = [native, revert_weight_conversion(lm, dict(native))]
        layouts += [_prefixed(layout, lm) for layout in layouts]  # under a multimodal model's text-model prefix
    expected = max(layouts, key=lambda layout: len(found.keys() & layout.keys()))  # native wins a tie
    optional = _filled_by_ties(lm, found.keys())
    ignore_missing = getattr(lm, "_keys_to_ignore_on_load_missing", None) or []
    ignore_unexpected = getattr(lm, "_keys_to_ignore_on_load_unexpected", None) or []
    where = files[0] if len(files) == 1 else source.path

    missing = sorted(name for name in expected.keys() - found.keys()
                     if name not in optional and not any(re.search(p, name) for p in ignore_missing))
    if missing:
        raise MoeExportError(
            f"{where} lacks tensor {missing[0]}{_and_more(missing)}: transformers would fill it with random values; "
            "the checkpoint is incomplete or was edited, fetch or export it again"
        )
    other_towers = _under_text_model_prefix(source)  # a multimodal checkpoint's vision / audio towers
    unexpected = sorted(name for name in found.keys() - expected.keys()
                        if not any(re.search(p, name) for p in ignore_unexpected)
                        and not (other_towers and _outside_text_model(name)))
    if unexpected:
        raise MoeExportError(
            f"{found[unexpected[0]][2]} holds tensor {unexpected[0]}{_and_more(unexpected)}, which the model in "
            "config.json has no place for: the weights and config.json do not belong together"
        )
    for name, (shape, dtype, path) in sorted(found.items()):
        want = expected.get(name)
        if want is None:  # a tensor transformers skips on load (GLM-4.5's next-token-prediction layer, ...)
            continue
        if shape != list(want.shape):
            raise MoeExportError(
                f"{path}: tensor {name} has shape {shape} but config.json implies {list(want.shape)}: "
                "the weights and config.json do not belong together"
            )
        if want.is_floating_point() and dtype not in FLOAT_DTYPES:
            raise MoeExportError(
                f"{path}: tensor {name} is {dtype}, but weights must be floating point (F32, F16 or BF16): "
                "the file is corrupt or quantized in a format moeexport does not read"
            )


def _prefixed(layout: dict, lm) -> dict:
    """`layout`'s names as a multimodal checkpoint stores its text model's (model.language_model.*)."""
    change = streaming.text_model_prefix(lm)
    stem = f"{change.model_prefix}." if change.model_prefix else ""
    return {(f"{stem}{change.prefix_to_remove}.{name[len(stem):]}" if name.startswith(stem) else name): value
            for name, value in layout.items()}


def _outside_text_model(name: str) -> bool:
    return name.startswith("model.") and not name.startswith("model.language_model.")


def _under_text_model_prefix(source: Source) -> bool:
    """A multimodal hub checkpoint (its text model under model.language_model.*): read by moeexport's own
    loader, which knows that prefix for every family, where transformers' strips it for some only."""
    return any(name.startswith("model.language_model.") for name in source.headers)


def _unpacked(source: Source) -> dict:
    """The checkpoint's headers, with MXFP4 expert pairs as the parameters they dequantize to."""
    if not mxfp4.packed_parameters(source.headers):
        return source.headers
    return mxfp4.unpacked_headers(source.headers, adapter_for(source.config).expert_layout(source.config).transposed)


def _and_more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def load(model: Source | str | Path, dtype: str = "float32", trust_remote_code: bool = False,
         allow_nonfinite: bool = False) -> nn.Module:
    """A torch causal LM for an original or a moeexport-compressed checkpoint directory (or a GGUF file).

    The checkpoint is checked first (see the module docstring); `allow_nonfinite` lets
    NaN/Inf weights through. The finite check is one pass over the weights after loading.
    `dtype` "auto" is float32 (a streamed run may choose the checkpoint's dtype; see moeexport.memory).
    """
    dtype = _checked_dtype(dtype)
    source = as_source(model, trust_remote_code)
    if source.is_gguf or mxfp4.packed_parameters(source.headers) or _under_text_model_prefix(source):
        return _materialized(load_streamed(source, dtype, trust_remote_code, allow_nonfinite))
    check_checkpoint(source, trust_remote_code)
    if source.kind == "manifest":
        lm = _load_manifest_checkpoint(source, DTYPES[dtype])
    else:
        lm = _load_stock_checkpoint(source.path, DTYPES[dtype], trust_remote_code)
    reads.count(sum(path.stat().st_size for path in source.weight_files))  # both loaders read every weight file whole
    if not allow_nonfinite:
        check_finite(lm, source.path)
    lm.eval()
    lm.requires_grad_(False)
    return lm


def _checked_dtype(dtype: str) -> str:
    dtype = "float32" if dtype == "auto" else dtype
    if dtype not in DTYPES:
        raise MoeExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return dtype


def load_streamed(model: Source | str | Path, dtype: str = "float32", trust_remote_code: bool = False,
                  allow_nonfinite: bool = False, progress=None) -> nn.Module:
    """`load`'s model without its decoder layers in memory: each is read from disk when it is walked
    (moeexport.streaming). Checked like `load`; the finite check runs on each layer as it is read.
    A GGUF's layers are read from the file and dequantized (backends/gguf/reader.py). `progress`: an
    EventStream that shows every pass over the layers."""
    dtype = _checked_dtype(dtype)
    source = as_source(model, trust_remote_code)
    if not source.is_gguf:
        check_checkpoint(source, trust_remote_code)
    lm = skeleton(source.config, dtype, trust_remote_code, list(source.layers) if source.layers is not None else None)
    if mxfp4.packed_parameters(source.headers) and hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config  # the experts are read dequantized: what is saved is not MXFP4
    if source.is_gguf:
        reader = model_reader(source.path)
        checkpoint = reader.GGUFCheckpoint(lm, reader.GGUFFile(source.path))
    else:
        checkpoint = streaming.SafetensorsCheckpoint(lm, source.headers)
    return streaming.streamed(lm, checkpoint, DTYPES[dtype], not allow_nonfinite, progress)


def _materialized(lm: nn.Module) -> nn.Module:
    """A streamed model with every weight read into memory, and its stream detached: an ordinary model."""
    layers = adapter_for(lm.config).layers
    checkpoint, packed = streaming.stream_of(lm).checkpoint, {}
    with streaming.outer(lm):
        weights = {name: tensor.clone() for name, tensor in lm.state_dict().items()
                   if not name.startswith(layers + ".")}
        computed = {name: tensor.clone() for name, tensor in lm.named_buffers()  # e.g. a scaled embedding's factor
                    if not name.startswith(layers + ".") and name not in weights and not tensor.is_meta}
    for view in streaming.layer_views(lm):
        prefix = f"{layers}.{view.index}."
        weights |= {prefix + name: tensor.clone() for name, tensor in view.module.state_dict().items()}
        if view.experts is not None:
            stem = prefix + streaming.child_name(view.module, view.experts) + "."
            if (codes := _packed_codes(lm, checkpoint, stem)) is not None:
                packed[view.index] = codes
            for name, tensor in _per_expert_tensors(view.experts).items():  # read whole: small (biases)
                weights[stem + name] = tensor.clone()
            for name, on_demand in _expert_stacks(view.experts).items():
                weights[stem + name] = torch.stack([on_demand[e] for e in range(len(on_demand))])
    detach(lm)
    lm.load_state_dict(weights, assign=True, strict=False)
    for name, tensor in computed.items():
        owner, _, attribute = name.rpartition(".")
        setattr(lm.get_submodule(owner), attribute, tensor)
    lm.tie_weights()
    for name, tensor in (*lm.named_parameters(), *lm.named_buffers()):
        if tensor.is_meta:
            raise MoeExportError(f"the GGUF left {name} unread: this is a bug in moeexport's GGUF reader")
    for index, codes in packed.items():
        adapter_for(lm.config).layer_view(lm, index).experts.mxfp4_source = codes
    return lm


def _packed_codes(lm: nn.Module, checkpoint, stem: str) -> mxfp4.PackedExperts | None:
    """Where the experts named `stem` lie as MXFP4 pairs in `checkpoint` (None: not stored so)."""
    pair_of = getattr(checkpoint, "mxfp4_pair", None)  # (a GGUF input holds no such pairs)
    pairs = {stack: pair_of(stem + stack) for stack in ("gate_up_proj", "down_proj")} if pair_of else {}
    if not pairs or not all(pairs.values()):
        return None
    adapter = adapter_for(lm.config)
    experts = tuple(range(getattr(lm.config, adapter.num_experts_key)))
    return mxfp4.PackedExperts(checkpoint, pairs, experts, adapter.expert_layout(lm.config).transposed)


def _load_stock_checkpoint(model_dir: Path, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=dtype,
            use_safetensors=True,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            experts_implementation=EXPERTS_IMPLEMENTATION,
        )
    except (OSError, RuntimeError, ValueError) as error:  # what check_checkpoint did not foresee
        raise MoeExportError(f"transformers cannot load {model_dir}: {one_line(error)}") from None


def _filled_by_ties(lm: nn.Module, present) -> set[str]:
    """Tensor names a weight tie fills from its other end: each tied copy, and a tie's source where only the copy
    is stored (safetensors' save_model keeps the alphabetically first name of a shared tensor: lm_head.weight)."""
    ties = getattr(lm, "all_tied_weights_keys", None) or {}
    return set(ties) | {source for target, source in ties.items() if target in present}


def _load_manifest_checkpoint(source: Source, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        lm = AutoModelForCausalLM.from_config(own_copy(source.config), dtype=dtype,
                                              experts_implementation=EXPERTS_IMPLEMENTATION)
    lm.tie_weights()  # no_init_weights skips it; tied, the one stored end of a tie fills both
    apply_structure(lm, list(source.layers))
    expected, loaded = set(lm.state_dict()), set()
    for weights in source.weight_files:
        _, unexpected = load_model(lm, weights, strict=False)
        if unexpected:
            raise MoeExportError(f"{weights} holds {sorted(unexpected)[:3]}, which its manifest has no place for: "
                                 "the checkpoint is corrupt or was edited")
        with safe_open(weights, "pt") as handle:
            loaded |= set(handle.keys())
    missing = expected - loaded - _filled_by_ties(lm, loaded)
    if missing:
        raise MoeExportError(f"{source.path} lacks {sorted(missing)[:3]} of its manifest's structure: "
                             "the checkpoint is corrupt or was edited")
    lm.config.name_or_path = str(source.path)
    return lm


def load_tokenizer(model: Source | str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    model_dir = model.path if isinstance(model, Source) else resolve_model_dir(model)
    if is_gguf(model_dir):
        return model_reader(model_dir).load_tokenizer(model_dir)
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise MoeExportError(f"cannot load the tokenizer from {model_dir}: {one_line(error)}") from None


def parameter_count(lm: nn.Module) -> int:
    return sum(p.numel() for p in lm.parameters())


def parameter_bytes(lm: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in lm.parameters())


def _save_weights(lm: nn.Module, staging: Path, stock_loadable: bool) -> str:
    """The config and weights into `staging`; the name of the weights file (or index) written."""
    if streaming.is_streamed(lm):
        lm.config.save_pretrained(staging)
        return _save_streamed(lm, staging, stock_loadable)
    if stock_loadable:
        lm.save_pretrained(staging, safe_serialization=True)
        return SAFE_WEIGHTS
    lm.config.save_pretrained(staging)
    save_model(lm, str(staging / MANIFEST_WEIGHTS), metadata={"format": "pt"})
    return MANIFEST_WEIGHTS


def save(lm: nn.Module, out_dir: str | Path, manifest: dict, overwrite: bool = False) -> Path:
    """Write a compressed checkpoint atomically (moeexport.outputs.staged): whole under its name, or not at all."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise MoeExportError(f"output {out_dir} already exists; pass --overwrite or choose another --out")
    adapter = adapter_for(lm.config)
    stock_loadable = sync_expert_config(adapter, lm)
    with staged(out_dir, overwrite) as staging:
        try:
            weights = _save_weights(lm, staging, stock_loadable)
        except SafetensorError as error:  # safetensors reports a full disk as its own error, not an OSError
            raise MoeExportError(f"writing the checkpoint under {out_dir} failed ({error}): free disk space "
                                 "or choose another --out") from None
        source = Path(lm.config.name_or_path or "")
        if is_gguf(source):  # the vocabulary is in the GGUF's metadata
            model_reader(source).load_tokenizer(source).save_pretrained(staging)
        for name in TOKENIZER_FILES:
            if (source / name).is_file() and not (staging / name).exists():
                shutil.copyfile(source / name, staging / name)
        record = {
            "format": "moeexport-checkpoint",
            "version": 1,
            "model_type": lm.config.model_type,
            "stock_loadable": stock_loadable,
            "weights": weights,
            "layers": [asdict(spec) for spec in structure(adapter, lm)],
            **manifest,
        }
        (staging / MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
    return out_dir


def _save_streamed(lm: nn.Module, directory: Path, stock_loadable: bool) -> str:
    """Write a streamed model's weights layer by layer, and its experts one at a time, as shards of about
    SHARD_BYTES with their index; each tensor in the dtype its source stores it in (streamed passes only
    remove weights, so that is lossless).

    A stock-loadable checkpoint is written in the layout transformers saves (the
    hub's, e.g. per-expert w1/w2/w3); a manifest checkpoint in the
    model's own names, as `save` writes moeexport.safetensors. Returns the index's name.
    """
    from transformers.core_model_loading import revert_weight_conversion

    adapter, stream = adapter_for(lm.config), streaming.stream_of(lm)
    shards = _ShardWriter(directory, "model" if stock_loadable else "moeexport")
    tied = set(getattr(lm, "all_tied_weights_keys", None) or {})
    outer = adapter.layers + "."

    def add(tensors: dict[str, torch.Tensor], source_layer: int | None = None) -> None:
        stored = {}
        for name, tensor in tensors.items():
            source = name if source_layer is None else stream.source_name(name, source_layer)
            dtype = stream.stored_dtype(source)
            stored[name] = (_InBlocks.rows(tensor, dtype) if isinstance(tensor, streaming.WeightRows)
                            else tensor.to(dtype))
        shards.add(revert_weight_conversion(lm, stored) if stock_loadable else stored)

    by_rows = {child_name: stream.weight_rows(part) for part, child_name in (
        ("input", adapter.embeddings + ".weight"),
        ("output", streaming.child_name(lm, lm.get_output_embeddings()) + ".weight"))}
    with streaming.outer(lm, "besides_rows"):  # the embeddings and head are written a block of rows at a time
        add({name: by_rows.get(name, tensor) for name, tensor in lm.state_dict().items()
             if not name.startswith(outer) and name not in tied})
    for view in streaming.layer_views(lm):
        prefix = f"{outer}{view.index}."
        add({prefix + name: tensor for name, tensor in view.module.state_dict().items()},
            stream.edits[view.index].source)
        if view.experts is not None:
            stem = prefix + streaming.child_name(view.module, view.experts) + "."
            add({stem + name: tensor for name, tensor in _per_expert_tensors(view.experts).items()},
                stream.edits[view.index].source)
            _save_experts(lm, shards, prefix + streaming.child_name(view.module, view.experts) + ".",
                          view.experts.stored(), stock_loadable)
    index_name = SAFE_INDEX if stock_loadable else MANIFEST_INDEX
    shards.finish(directory / index_name)
    return index_name


def _save_experts(lm: nn.Module, shards: "_ShardWriter", prefix: str, experts, stock_loadable: bool) -> None:
    """A streamed layer's routed experts (moeexport.streaming.ExpertsOnDemand): one expert at a time in the
    hub's layout, or as the two stacked tensors the model names."""
    from transformers.core_model_loading import revert_weight_conversion

    stacks = {prefix + name: stack for name, stack in _expert_stacks(experts).items()}
    probes = {name: stack[0][None] for name, stack in stacks.items()}
    first = revert_weight_conversion(lm, dict(probes))
    if not stock_loadable or not any(".experts.0." in name for name in first):  # stored stacked (gpt-oss's hub)
        unconverted = first.keys() == probes.keys() and all(first[name] is probes[name] for name in probes)
        for name, stack in stacks.items():
            if not stock_loadable or unconverted:  # saved as read, an expert at a time
                shards.add({name: _InBlocks.experts(stack)})
                continue
            whole = {name: torch.stack([stack[e] for e in range(len(stack))])}
            shards.add(revert_weight_conversion(lm, whole))
        return
    for expert in range(experts.num_experts):
        one = revert_weight_conversion(lm, {name: stack[expert][None] for name, stack in stacks.items()})
        # converted as a stack of one; the hub numbers experts as `.experts.N.`
        shards.add({name.replace(".experts.0.", f".experts.{expert}."): tensor for name, tensor in one.items()})


def _expert_stacks(experts) -> dict[str, "streaming.ExpertStack"]:
    """A streamed layer's expert matrices (ExpertsOnDemand's stacks, read one expert at a time), by name."""
    return {name: stack for name in expert_stacks(experts.layout)
            if isinstance(stack := getattr(experts, name), streaming.ExpertStack)}


def _per_expert_tensors(experts) -> dict[str, torch.Tensor]:
    """A streamed layer's per-expert tensors held whole (ExpertsOnDemand's biases), by name."""
    return {name: tensor for name in expert_stacks(experts.layout)
            if isinstance(tensor := getattr(experts, name), torch.Tensor)}


class _InBlocks:
    """A tensor to save that is made a block at a time, in order along its first axis, and never whole: the rows
    of a streamed weight, the experts of a streamed stack."""

    ROWS = OUTER_ROWS

    def __init__(self, shape, dtype: torch.dtype, blocks):
        self.shape, self.dtype, self.blocks = torch.Size(shape), dtype, blocks
        self.nbytes = self.shape.numel() * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def rows(cls, rows: "streaming.WeightRows", dtype: torch.dtype) -> "_InBlocks":
        """A streamed 2-D weight in `dtype`, converted ROWS rows at a time."""
        return cls(rows.shape, dtype, lambda: (rows[first:first + cls.ROWS].to(dtype)
                                               for first in range(0, rows.shape[0], cls.ROWS)))

    @classmethod
    def experts(cls, stack: "streaming.ExpertStack") -> "_InBlocks":
        """A streamed expert stack as its experts read (one read first for their dtype)."""
        return cls(stack.shape, stack[0].dtype, lambda: (stack[e] for e in range(len(stack))))


def _save_file_in_blocks(tensors: dict, path: Path) -> None:
    """The file safetensors' save_file writes for `tensors` (metadata format: pt), byte for byte, with each
    _InBlocks written a block at a time. The order of the tensors and their dtype names are
    safetensors' own, read from what it writes for a one-element stand-in of each."""
    import struct

    from safetensors.torch import save

    stand_ins = save({name: torch.zeros(1, dtype=tensor.dtype) for name, tensor in tensors.items()},
                     metadata={"format": "pt"})
    order = json.loads(stand_ins[8:8 + struct.unpack("<Q", stand_ins[:8])[0]])
    header, offset = {"__metadata__": order.pop("__metadata__")}, 0
    for name, entry in order.items():
        header[name] = {"dtype": entry["dtype"], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + tensors[name].nbytes]}
        offset += tensors[name].nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        for name in order:
            tensor = tensors[name]
            for block in tensor.blocks() if isinstance(tensor, _InBlocks) else [tensor]:
                block.contiguous().reshape(-1).view(torch.uint8).numpy().tofile(handle)


class _ShardWriter:
    """Safetensors shards of about SHARD_BYTES, each written as soon as it is full or its layer is done."""

    def __init__(self, directory: Path, stem: str):
        self.directory, self.stem = directory, stem
        self.pending: dict[str, torch.Tensor] = {}
        self.written: list[tuple[Path, dict[str, int]]] = []  # temporary file, tensor name -> bytes

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            if self.pending and sum(t.nbytes for t in self.pending.values()) + tensor.nbytes > SHARD_BYTES:
                self._flush()
            self.pending[name] = tensor if isinstance(tensor, _InBlocks) else tensor.contiguous()
        self._flush()  # a layer's tensors never wait in memory for the next layer's

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.directory / f".{self.stem}-shard-{len(self.written):05d}.safetensors"
        if any(isinstance(tensor, _InBlocks) for tensor in self.pending.values()):
            _save_file_in_blocks(self.pending, path)
        else:
            save_file(self.pending, str(path), metadata={"format": "pt"})
        self.written.append((path, {name: tensor.nbytes for name, tensor in self.pending.items()}))
        self.pending = {}

    def finish(self, index: Path) -> None:
        """Give the shards their numbered names and write the index transformers reads."""
        weight_map = {}
        for number, (path, sizes) in enumerate(self.written, start=1):
            final = path.with_name(f"{self.stem}-{number:05d}-of-{len(self.written):05d}.safetensors")
            path.rename(final)
            weight_map |= dict.fromkeys(sizes, final.name)
        total = sum(size for _, sizes in self.written for size in sizes.values())
        document = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        index.write_text(json.dumps(document, indent=2) + "\n")
