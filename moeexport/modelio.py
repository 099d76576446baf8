"""Loading MoE checkpoints from a directory and saving compressed ones.

A compressed checkpoint is written in one of two forms:
- stock: config.json + model.safetensors that plain transformers loads
  (Block Drop, uniform Expert Drop);
- manifest: config.json (largest expert count) + moeexport.safetensors + the
  per-layer structure in moeexport.json, which `load` replays before loading
  the weights strictly. The weights file has a non-standard name on purpose:
  stock `from_pretrained` then fails loudly instead of filling the missing
  experts with random values.
Both forms carry moeexport.json (what was done, to what) and the tokenizer.

Loading refuses a damaged checkpoint before transformers sees it: only
.safetensors files are read (never a pickle, also not through an index), every
file's header must parse, and the tensor names, shapes and dtypes in the headers
must be the ones config.json implies (no parameter is ever left at random
initialization). After loading, every weight is checked finite.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from moeexport.adapters import LayerSpec, adapter_for
from moeexport.adapters.surgery import drop_moe_sublayer, keep_experts, structure, sync_expert_config
from moeexport.errors import MoeExportError
from moeexport.outputs import replace_atomically, sha256_of_file, staged

MANIFEST = "moeexport.json"
MANIFEST_WEIGHTS = "moeexport.safetensors"
MANIFEST_INDEX = "moeexport.safetensors.index.json"
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"  # what transformers reads, in order
SHARD_BYTES = 2**30  # a streamed save writes shards of about this size (each is serialized in memory once)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TO_SAFETENSORS = ("convert it to safetensors where you trust it (load it there and save_pretrained(..., "
                  "safe_serialization=True))")
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
# A file at least this big has its SHA-256 remembered (by inode, size, mtime and ctime) in the cache.
DIGEST_MEMO_BYTES = 256 * 2**20
DEMO_MODEL = Path(__file__).parent / "demo"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# transformers' default grouped_mm experts kernel costs seconds per forward on CPU; the
# per-expert loop is far faster there and computes the same thing.
EXPERTS_IMPLEMENTATION = "grouped_mm" if torch.cuda.is_available() else "eager"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def resolve_model_dir(model: str | Path) -> Path:
    """`demo` names the bundled demo model; a `.gguf` file is itself; anything else is a checkpoint directory."""
    path = DEMO_MODEL if str(model) == "demo" else Path(model)
    if is_gguf(path):
        if not path.is_file():
            raise MoeExportError(f"GGUF file {str(model)!r} does not exist")
        return path
    if not path.is_dir():
        raise MoeExportError(f"model directory {str(model)!r} does not exist (give a checkpoint directory or 'demo')")
    if not (path / "config.json").is_file():
        raise MoeExportError(f"{path} has no config.json: is it a Hugging Face checkpoint directory?")
    return path


def read_config(model_dir: Path, trust_remote_code: bool = False):
    """The HF config, after checking that transformers and moeexport both know the model_type
    and that the values that size the MoE make sense (of a GGUF: from its metadata)."""
    from transformers import CONFIG_MAPPING, AutoConfig

    if is_gguf(model_dir):
        return gguf_reader().read_config(model_dir)
    path = model_dir / "config.json"
    try:
        raw = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MoeExportError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise MoeExportError(f"{path} holds a JSON {type(raw).__name__}, not an object: it is not a model config")
    model_type = raw.get("model_type")
    if not isinstance(model_type, str):
        raise MoeExportError(f"{path}: model_type is {model_type!r}; it must be a string such as \"mixtral\"")
    if model_type not in CONFIG_MAPPING and not trust_remote_code:
        raise MoeExportError(
            f"unknown model_type {model_type!r} in {path} "
            "(transformers does not know it; moeexport never runs remote code unless --trust-remote-code)"
        )
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as error:  # StrictDataclassError, or whatever else a wrongly typed value raises in transformers
        raise MoeExportError(f"{path} is not a valid {model_type} config: {_one_line(error)}") from None
    adapter = adapter_for(config)  # unsupported or dense families stop here, before any weight is read
    _check_config_values(config, adapter, path, compressed=(model_dir / MANIFEST).is_file())
    return config


def is_gguf(model: str | Path) -> bool:
    return str(model).endswith(".gguf")


def gguf_reader():
    """backends/gguf/reader.py: a GGUF as a model (imported when a .gguf is given)."""
    from moeexport.backends.gguf import reader

    return reader


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__


def _check_config_values(config, adapter, path: Path, compressed: bool) -> None:
    """Sizes are positive integers; top-k lies between 1 and the expert count (a compressed
    checkpoint's config holds the largest per-layer count, so only its top-k >= 1 is checked)."""
    experts, top_k = adapter.num_experts_key, adapter.top_k_key
    minimum = {key: 1 for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", top_k)}
    minimum[experts] = 0 if compressed else 1
    for key, least in minimum.items():
        value = getattr(config, key, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise MoeExportError(f"{path}: {key} is {value!r}; it must be an integer of at least {least}")
    if not compressed and getattr(config, top_k) > getattr(config, experts):
        raise MoeExportError(
            f"{path}: {top_k} is {getattr(config, top_k)} but the model has {getattr(config, experts)} experts "
            f"({experts}); each token can be routed to at most all of them"
        )


def read_manifest(model_dir: Path) -> dict | None:
    path = model_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_bytes())
        layers = [LayerSpec(**layer) for layer in manifest["layers"]]
        stock_loadable = manifest["stock_loadable"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise MoeExportError(
            f"{path} is not a valid moeexport manifest ({type(error).__name__}: {_one_line(error)}): "
            "the checkpoint is corrupt or was edited; re-create it with moeexport compress"
        ) from None
    if not isinstance(stock_loadable, bool):
        raise MoeExportError(f"{path}: stock_loadable must be true or false, not {stock_loadable!r}")
    return manifest | {"layers": [asdict(layer) for layer in layers]}


def weight_files(model_dir: Path, manifest: dict | None = None) -> list[Path]:
    """The safetensors files loading `model_dir` reads, each one checked to be a safetensors file.

    These are exactly the files transformers picks (model.safetensors, else the shards
    that model.safetensors.index.json names), or the manifest's weights file. Pickles
    (.bin, .pt, ...) are refused wherever they appear: in the directory or in an index.
    """
    if manifest and not manifest["stock_loadable"]:
        files = [model_dir / MANIFEST_WEIGHTS]
        if (model_dir / MANIFEST_INDEX).is_file():  # written layer by layer by a streamed build
            files = _index_shards(model_dir / MANIFEST_INDEX)
        elif not files[0].is_file():
            raise MoeExportError(f"{model_dir} has {MANIFEST} but no {MANIFEST_WEIGHTS}: the checkpoint is incomplete")
    elif (model_dir / SAFE_WEIGHTS).is_file():
        files = [model_dir / SAFE_WEIGHTS]
    elif (model_dir / SAFE_INDEX).is_file():
        files = _index_shards(model_dir / SAFE_INDEX)
    else:
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise MoeExportError(
                f"{model_dir / pickles[0]} is a pickled checkpoint, which moeexport never loads (a pickle can run "
                f"code): {TO_SAFETENSORS}"
            )
        others = sorted(p.name for p in model_dir.glob("*.safetensors"))
        found = f" (it has {', '.join(others)})" if others else ""
        raise MoeExportError(f"{model_dir} has no {SAFE_WEIGHTS} or {SAFE_INDEX}{found}: it holds no weights to load")
    for path in files:
        _check_safetensors_file(path)
    return files


def _index_shards(index: Path) -> list[Path]:
    try:
        document = json.loads(index.read_bytes())
        shards = sorted(set(document["weight_map"].values()))
        if not isinstance(document["metadata"], dict):  # transformers reads it
            raise TypeError("metadata is not an object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
        raise MoeExportError(
            f"{index} is not a valid safetensors index ({type(error).__name__}: {_one_line(error)}): it must be an "
            "object with a metadata object and a weight_map from tensor names to shard file names"
        ) from None
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise MoeExportError(f"{index} names shard {shard!r}, which is not a file name in {index.parent}")
        if not shard.endswith(".safetensors"):
            raise MoeExportError(
                f"{index} names shard {shard}, which is not a .safetensors file; moeexport never loads pickled "
                f"weights: {TO_SAFETENSORS}"
            )
        if not (index.parent / shard).is_file():
            raise MoeExportError(f"{index} names shard {shard}, which is not in {index.parent}: the copy is incomplete")
    return [index.parent / shard for shard in shards]


def weight_headers(model_dir: Path, config) -> dict:
    """name -> (shape, dtype, file) of the weights loading reads, from headers alone; a GGUF's under the
    model's parameter names, as the float32 values it is dequantized to."""
    if not is_gguf(model_dir):
        return read_headers(weight_files(model_dir, read_manifest(model_dir)))
    reader = gguf_reader()
    file = reader.GGUFFile(model_dir)
    return reader.GGUFCheckpoint(skeleton(config, "float32", layers=reader.layer_specs(file)), file).headers()


def _check_safetensors_file(path: Path) -> None:
    """The header parses (safe_open reads only the header and checks that it covers the file)."""
    try:
        with path.open("rb") as handle:
            start = handle.read(4)
    except OSError as error:
        raise MoeExportError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        with safe_open(path, "pt"):
            return
    except Exception as error:  # SafetensorError, or whatever else a damaged header raises
        reason = _one_line(error).removeprefix("Error while deserializing header: ")
    if not start:
        raise MoeExportError(f"{path} is empty (0 bytes): the download or copy was interrupted; fetch it again")
    if start.startswith(b"PK\x03\x04") or start[:1] == b"\x80":
        raise MoeExportError(
            f"{path} is a pickle (a torch.save file) named .safetensors; moeexport never loads pickles: "
            f"{TO_SAFETENSORS}"
        )
    raise MoeExportError(
        f"{path} is not a readable safetensors file ({reason}): it is truncated or corrupt; fetch or export it again"
    )


def read_headers(files: list[Path]) -> dict[str, tuple[list[int], str, Path]]:
    """name -> (shape, safetensors dtype, file) for every tensor in the (already checked) files."""
    tensors: dict[str, tuple[list[int], str, Path]] = {}
    for path in files:
        with safe_open(path, "pt") as handle:
            for name in handle.keys():
                if name in tensors:
                    raise MoeExportError(f"tensor {name} is in both {tensors[name][2]} and {path}: the shards overlap")
                view = handle.get_slice(name)
                tensors[name] = (list(view.get_shape()), view.get_dtype(), path)
    return tensors


def check_checkpoint(model_dir: Path, config, manifest: dict | None, trust_remote_code: bool = False) -> None:
    """Refuse, by name, a weights file whose tensors are not exactly the ones config.json implies.

    Reads only headers. The model is built on the meta device (no memory) to list its
    tensors; a checkpoint may hold them as the model names them, or in the layout
    transformers saves and converts on load (Mixtral's per-expert w1/w2/w3, ...).
    """
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    files = weight_files(model_dir, manifest)
    found = read_headers(files)
    try:
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as error:  # a value the config class let through: an unknown activation or rope type, ...
        reason = f"it names an unknown {error}" if isinstance(error, KeyError) else _one_line(error)
        raise MoeExportError(f"{model_dir / 'config.json'} describes a model transformers cannot build: {reason}") from None
    if manifest and not manifest["stock_loadable"]:
        apply_structure(lm, [LayerSpec(**layer) for layer in manifest["layers"]])
        layouts = [lm.state_dict()]
    else:
        native = lm.state_dict()
        layouts = [native, revert_weight_conversion(lm, dict(native))]
    expected = max(layouts, key=lambda layout: len(found.keys() & layout.keys()))  # native wins a tie
    optional = set(getattr(lm, "all_tied_weights_keys", None) or {})
    ignore_missing = getattr(lm, "_keys_to_ignore_on_load_missing", None) or []
    ignore_unexpected = getattr(lm, "_keys_to_ignore_on_load_unexpected", None) or []
    where = files[0] if len(files) == 1 else model_dir

    missing = sorted(name for name in expected.keys() - found.keys()
                     if name not in optional and not any(re.search(p, name) for p in ignore_missing))
    if missing:
        raise MoeExportError(
            f"{where} lacks tensor {missing[0]}{_and_more(missing)}: transformers would fill it with random values; "
            "the checkpoint is incomplete or was edited, fetch or export it again"
        )
    unexpected = sorted(name for name in found.keys() - expected.keys()
                        if not any(re.search(p, name) for p in ignore_unexpected))
    if unexpected:
        raise MoeExportError(
            f"{found[unexpected[0]][2]} holds tensor {unexpected[0]}{_and_more(unexpected)}, which the model in "
            "config.json has no place for: the weights and config.json do not belong together"
        )
    for name, (shape, dtype, path) in sorted(found.items()):
        want = expected[name]
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


def _and_more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def check_finite(lm: nn.Module, where: Path, prefix: str = "") -> None:
    """Every floating-point weight is finite. One aminmax pass per tensor (NaN and +-Inf
    propagate into its min or max); only a tensor that fails is looked at again. `prefix`
    says which part of the model `lm` is (a streamed layer)."""
    for name, parameter in lm.named_parameters():
        weights = parameter.detach()
        if not weights.is_floating_point() or weights.numel() == 0:
            continue
        low, high = torch.aminmax(weights)
        if torch.isfinite(low) and torch.isfinite(high):
            continue
        bad = ~torch.isfinite(weights)
        experts = ""
        if weights.dim() == 3 and "expert" in name:  # stacked experts [E, out, in]
            rows = bad.flatten(1).any(1).nonzero().flatten().tolist()
            experts = f" in expert{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows[:8]))}"
        raise MoeExportError(
            f"{where}: {prefix}weight {name} has {int(bad.sum())} non-finite values (NaN or Inf){experts}: "
            "the checkpoint is corrupt or diverged in training; fetch or export it again (or pass --allow-nonfinite)"
        )


def fingerprint(model_dir: Path) -> str:
    """Identity of a checkpoint by content: SHA-256 of every file loading reads.

    That is config.json, the manifest, the tokenizer files and all weight bytes (so two
    swapped layers or one edited weight give another fingerprint). Hashing runs at about
    0.6 s per GiB; a file of DIGEST_MEMO_BYTES or more has its digest remembered in the
    cache by (device, inode, size, mtime, ctime), which any write to the file changes.
    """
    if is_gguf(model_dir):
        return file_sha256(model_dir)[:16]
    manifest = read_manifest(model_dir)
    files = [model_dir / "config.json", model_dir / MANIFEST, model_dir / SAFE_INDEX]
    files += [model_dir / name for name in TOKENIZER_FILES] + weight_files(model_dir, manifest)
    digest = hashlib.sha256()
    for path in sorted(set(files)):
        if path.is_file():
            digest.update(f"{path.name}\0{file_sha256(path)}\0".encode())
    return digest.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    status = path.stat()
    if status.st_size < DIGEST_MEMO_BYTES:
        return sha256_of_file(path)
    from moeexport import compress  # the cache root; read at call time so that tests can move it

    memo_name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    memo = compress.DEFAULT_CACHE.parent / "digests" / f"{memo_name}.json"
    identity = [status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns]
    try:
        remembered = json.loads(memo.read_text())
        if remembered["stat"] == identity:
            return remembered["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no memo yet, or an unreadable one: hash again
    value = sha256_of_file(path)
    try:
        entry = json.dumps({"stat": identity, "sha256": value})
        replace_atomically(memo, lambda temporary: temporary.write_text(entry))
    except OSError:
        pass  # a cache that cannot be written costs time, not correctness
    return value


def load(model: str | Path, dtype: str = "float32", trust_remote_code: bool = False,
         allow_nonfinite: bool = False) -> nn.Module:
    """A torch causal LM for an original or a moeexport-compressed checkpoint directory.

    The checkpoint is checked first (see the module docstring); `allow_nonfinite` lets
    NaN/Inf weights through. The finite check is one pass over the weights after loading.
    `dtype` "auto" is float32 (a streamed run may choose the checkpoint's dtype; see moeexport.memory).
    """
    dtype = "float32" if dtype == "auto" else dtype
    if is_gguf(model):
        return _materialized(load_streamed(model, dtype, trust_remote_code, allow_nonfinite))
    model_dir, config, manifest = _checked(model, dtype, trust_remote_code)
    if manifest and not manifest["stock_loadable"]:
        lm = _load_manifest_checkpoint(model_dir, config, manifest, DTYPES[dtype])
    else:
        lm = _load_stock_checkpoint(model_dir, DTYPES[dtype], trust_remote_code)
    if not allow_nonfinite:
        check_finite(lm, model_dir)
    lm.eval()
    lm.requires_grad_(False)
    return lm


def _checked(model: str | Path, dtype: str, trust_remote_code: bool) -> tuple[Path, object, dict | None]:
    """(directory, config, manifest) of a checkpoint that passed every check before loading."""
    if dtype not in DTYPES:
        raise MoeExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    model_dir = resolve_model_dir(model)
    config = read_config(model_dir, trust_remote_code)
    manifest = read_manifest(model_dir)
    check_checkpoint(model_dir, config, manifest, trust_remote_code)
    return model_dir, config, manifest


def load_streamed(model: str | Path, dtype: str = "float32", trust_remote_code: bool = False,
                  allow_nonfinite: bool = False) -> nn.Module:
    """`load`'s model without its decoder layers in memory: each is read from disk when it is walked
    (moeexport.streaming). Checked like `load`; the finite check runs on each layer as it is read.
    A GGUF's layers are read from the file and dequantized (backends/gguf/reader.py)."""
    from moeexport.streaming import LayerStream, SafetensorsCheckpoint

    if is_gguf(model):
        reader = gguf_reader()
        file = reader.GGUFFile(resolve_model_dir(model))
        lm = skeleton(reader.read_config(file), dtype, trust_remote_code, reader.layer_specs(file))
        checkpoint = reader.GGUFCheckpoint(lm, file)
    else:
        model_dir, config, manifest = _checked(model, dtype, trust_remote_code)
        layers = [LayerSpec(**layer) for layer in manifest["layers"]] if manifest and not manifest["stock_loadable"] \
            else None
        lm = skeleton(config, dtype, trust_remote_code, layers)
        checkpoint = SafetensorsCheckpoint(lm, weight_files(model_dir, manifest))
    lm.moeexport_stream = LayerStream(lm, checkpoint, DTYPES[dtype], not allow_nonfinite)
    lm.moeexport_stream.rebuild_rotary()
    return lm


def skeleton(config, dtype: str, trust_remote_code: bool = False, layers: list[LayerSpec] | None = None) -> nn.Module:
    """The model `config` builds, on the meta device (no weights), reshaped to `layers` when given."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                                              experts_implementation=EXPERTS_IMPLEMENTATION)
    if layers is not None:
        apply_structure(lm, layers)
    lm.config.name_or_path = config.name_or_path
    lm.eval()
    lm.requires_grad_(False)
    return lm


def _materialized(lm: nn.Module) -> nn.Module:
    """A streamed model with every weight read into memory, and its stream detached: an ordinary model."""
    from moeexport import streaming

    layers = adapter_for(lm.config).layers
    with streaming.outer(lm):
        weights = {name: tensor.clone() for name, tensor in lm.state_dict().items()
                   if not name.startswith(layers + ".")}
    for view in streaming.layer_views(lm):
        prefix = f"{layers}.{view.index}."
        weights |= {prefix + name: tensor.clone() for name, tensor in view.module.state_dict().items()}
        if view.experts is not None:
            stem = prefix + streaming.child_name(view.module, view.experts) + "."
            for stack in ("gate_up_proj", "down_proj"):
                on_demand = getattr(view.experts, stack)
                weights[stem + stack] = torch.stack([on_demand[e] for e in range(len(on_demand))])
    del lm.moeexport_stream
    lm.load_state_dict(weights, assign=True, strict=False)
    lm.tie_weights()
    for name, tensor in (*lm.named_parameters(), *lm.named_buffers()):
        if tensor.is_meta:
            raise MoeExportError(f"the GGUF left {name} unread: this is a bug in moeexport's GGUF reader")
    return lm


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
        raise MoeExportError(f"transformers cannot load {model_dir}: {_one_line(error)}") from None


def _load_manifest_checkpoint(model_dir: Path, config, manifest: dict, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        lm = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation=EXPERTS_IMPLEMENTATION)
    apply_structure(lm, [LayerSpec(**layer) for layer in manifest["layers"]])
    expected, loaded = set(lm.state_dict()), set()
    for weights in weight_files(model_dir, manifest):
        _, unexpected = load_model(lm, weights, strict=False)
        if unexpected:
            raise MoeExportError(f"{weights} holds {sorted(unexpected)[:3]}, which its manifest has no place for: "
                                 "the checkpoint is corrupt or was edited")
        with safe_open(weights, "pt") as handle:
            loaded |= set(handle.keys())
    missing = expected - loaded - set(getattr(lm, "all_tied_weights_keys", None) or {})
    if missing:
        raise MoeExportError(f"{model_dir} lacks {sorted(missing)[:3]} of its manifest's structure: "
                             "the checkpoint is corrupt or was edited")
    lm.config.name_or_path = str(model_dir)
    return lm


def apply_structure(lm: nn.Module, layers: list[LayerSpec]) -> None:
    """Reshape a freshly built model to a recorded per-layer structure (weights are loaded after)."""
    adapter = adapter_for(lm.config)
    current = structure(adapter, lm)
    if len(current) != len(layers):
        raise MoeExportError(f"manifest lists {len(layers)} layers but config.json builds {len(current)}")
    for index, (built, wanted) in enumerate(zip(current, layers)):
        if wanted.kind == "dropped":
            drop_moe_sublayer(adapter, lm, index)
        elif wanted.kind == "moe" and wanted.num_experts != built.num_experts:
            keep_experts(adapter, lm, index, list(range(wanted.num_experts)))


def load_tokenizer(model: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(model)
    if is_gguf(model_dir):
        return gguf_reader().load_tokenizer(model_dir)
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise MoeExportError(f"cannot load the tokenizer from {model_dir}: {_one_line(error)}") from None


def parameter_count(lm: nn.Module) -> int:
    return sum(p.numel() for p in lm.parameters())


def parameter_bytes(lm: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in lm.parameters())


def _save_weights(lm: nn.Module, staging: Path, stock_loadable: bool) -> str:
    """The config and weights into `staging`; the name of the weights file (or index) written."""
    if getattr(lm, "moeexport_stream", None) is not None:
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
            gguf_reader().load_tokenizer(source).save_pretrained(staging)
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
    hub's, e.g. Mixtral's per-expert w1/w2/w3); a manifest checkpoint in the
    model's own names, as `save` writes moeexport.safetensors. Returns the index's name.
    """
    from transformers.core_model_loading import revert_weight_conversion

    from moeexport import streaming

    adapter, stream = adapter_for(lm.config), lm.moeexport_stream
    shards = _ShardWriter(directory, "model" if stock_loadable else "moeexport")
    tied = set(getattr(lm, "all_tied_weights_keys", None) or {})
    outer = adapter.layers + "."

    def add(tensors: dict[str, torch.Tensor], source_layer: int | None = None) -> None:
        stored = {}
        for name, tensor in tensors.items():
            source = name if source_layer is None else stream.source_name(name, source_layer)
            stored[name] = tensor.to(stream.stored_dtype(source))
        shards.add(revert_weight_conversion(lm, stored) if stock_loadable else stored)

    with streaming.outer(lm):
        add({name: tensor for name, tensor in lm.state_dict().items()
             if not name.startswith(outer) and name not in tied})
    for view in streaming.layer_views(lm):
        prefix = f"{outer}{view.index}."
        add({prefix + name: tensor for name, tensor in view.module.state_dict().items()},
            stream.edits[view.index].source)
        if view.experts is not None:
            _save_experts(lm, shards, prefix + streaming.child_name(view.module, view.experts) + ".",
                          view.experts.stored(), stock_loadable)
    index_name = SAFE_INDEX if stock_loadable else MANIFEST_INDEX
    shards.finish(directory / index_name)
    return index_name


def _save_experts(lm: nn.Module, shards: "_ShardWriter", prefix: str, experts, stock_loadable: bool) -> None:
    """A streamed layer's routed experts (moeexport.streaming.ExpertsOnDemand): one expert at a time in the
    hub's layout, or as the two stacked tensors the model names."""
    from transformers.core_model_loading import revert_weight_conversion

    stacks = {prefix + "gate_up_proj": experts.gate_up_proj, prefix + "down_proj": experts.down_proj}
    if not stock_loadable:
        for name, stack in stacks.items():
            shards.add({name: torch.stack([stack[e] for e in range(len(stack))])})
        return
    for expert in range(experts.num_experts):
        one = revert_weight_conversion(lm, {name: stack[expert][None] for name, stack in stacks.items()})
        # converted as a stack of one; the hub numbers experts as `.experts.N.`
        shards.add({name.replace(".experts.0.", f".experts.{expert}."): tensor for name, tensor in one.items()})


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
            self.pending[name] = tensor.contiguous()
        self._flush()  # a layer's tensors never wait in memory for the next layer's

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.directory / f".{self.stem}-shard-{len(self.written):05d}.safetensors"
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
