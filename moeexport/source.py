"""A model opened once, into a value: what it is, where it lies, its config and the headers of its weights.

A command opens its model once (`open_source`) and hands the Source on: the
memory plan reads its headers, loading checks them against its config and reads
its files, the statistics cache keys on its fingerprint, and an exporter learns
from it what the input was. Opening refuses, by name, a model that cannot be
loaded: an unknown or unsupported model_type, config values that make no sense,
an invalid manifest, a missing, pickled or damaged weights file. No weight is read.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from moeexport.adapters import adapter_for, supported_families
from moeexport.adapters.declaration import LayerSpec
from moeexport.cache import digests_dir
from moeexport.checkpoint_files import (MANIFEST, Headers, invalid_manifest, is_gguf, one_line, read_headers,
                                        read_manifest, resolve_model_dir, weight_files)
from moeexport.errors import MoeExportError
from moeexport.fingerprint import fingerprint
from moeexport.skeleton import skeleton

SourceKind = Literal["safetensors", "manifest", "gguf", "demo"]


@dataclass(frozen=True)
class Source:
    """A model as a command opened it."""

    given: str  # as the caller named it: "demo", a checkpoint directory, a .gguf file
    # "safetensors": a checkpoint as transformers saves it; "manifest": a compressed checkpoint whose layers its
    # manifest reshapes; "gguf": a GGUF file (read as the model it holds); "demo": the bundled demo model
    kind: SourceKind
    path: Path  # the checkpoint directory, or the GGUF file
    config: object  # the transformers config, checked (a GGUF's from its metadata)
    manifest: dict | None  # moeexport.json of a compressed checkpoint (what was done, to what)
    layers: tuple[LayerSpec, ...] | None  # the per-layer structure the weights have (None: as the config builds)
    weight_files: tuple[Path, ...]  # the files loading reads (a GGUF: the file itself)
    headers: Headers  # name -> (shape, dtype, file); a GGUF's under the model's names, as float32
    cache_root: Path | None = None  # where the digests of large files are remembered (None: hashed each time)

    @property
    def is_gguf(self) -> bool:
        return self.kind == "gguf"

    @functools.cached_property
    def fingerprint(self) -> str:
        """Identity by content (moeexport.fingerprint), computed when first asked: it reads every weight byte,
        which a run refused before it observes anything never pays."""
        return fingerprint(self.path, self.weight_files, digests_dir(self.cache_root) if self.cache_root else None)


def open_source(model: str | Path, trust_remote_code: bool = False, cache_root: Path | None = None) -> Source:
    """MODEL ("demo", a checkpoint directory or a .gguf file) opened and checked, from its config and headers."""
    path = resolve_model_dir(model)
    if is_gguf(path):
        return _open_gguf(str(model), path, trust_remote_code, cache_root)
    config = read_config(path, trust_remote_code)
    manifest = read_manifest(path)
    layers = _manifest_layers(path, manifest)
    files = weight_files(path, manifest)
    kind = "demo" if str(model) == "demo" else "manifest" if layers is not None else "safetensors"
    headers = read_headers(files)
    _check_counts_against_headers(config, headers, path)
    return Source(str(model), kind, path, config, manifest, layers, tuple(files), headers, cache_root)


def as_source(model: Source | str | Path, trust_remote_code: bool = False, cache_root: Path | None = None) -> Source:
    """`model` itself when it is a Source, else the one it names, opened (for callers that name a model)."""
    return model if isinstance(model, Source) else open_source(model, trust_remote_code, cache_root)


def _manifest_layers(path: Path, manifest: dict | None) -> tuple[LayerSpec, ...] | None:
    """The structure a manifest checkpoint's weights have (every manifest's layers are checked; a stock-loadable
    checkpoint's config builds its structure itself: None)."""
    if manifest is None:
        return None
    try:
        layers = tuple(LayerSpec(**layer) for layer in manifest["layers"])
    except TypeError as error:
        raise invalid_manifest(path / MANIFEST, error) from None
    return None if manifest["stock_loadable"] else layers


def _open_gguf(given: str, path: Path, trust_remote_code: bool, cache_root: Path | None) -> Source:
    """A GGUF as the model it holds (read by its target's reader): its headers are the parameters it is read into."""
    from moeexport.backends import model_reader

    reader = model_reader(path)
    file = reader.GGUFFile(path)
    config = reader.read_config(file)
    layers = tuple(reader.layer_specs(file))
    headers = reader.GGUFCheckpoint(skeleton(config, "float32", trust_remote_code, list(layers)), file).headers()
    return Source(given, "gguf", path, config, None, layers, (path,), headers, cache_root)


def read_config(model_dir: Path, trust_remote_code: bool = False):
    """The HF config, after checking that transformers and moeexport both know the model_type
    and that the values that size the MoE make sense."""
    from transformers import CONFIG_MAPPING, AutoConfig

    path = model_dir / "config.json"
    try:
        raw = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MoeExportError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise MoeExportError(f"{path} holds a JSON {type(raw).__name__}, not an object: it is not a model config")
    model_type = raw.get("model_type")
    if not isinstance(model_type, str):
        raise MoeExportError(f"{path}: model_type is {model_type!r}; it must be a string, one of "
                             f"{', '.join(supported_families())}")
    if model_type not in CONFIG_MAPPING and not trust_remote_code:
        raise MoeExportError(
            f"unknown model_type {model_type!r} in {path} "
            "(transformers does not know it; moeexport never runs remote code unless --trust-remote-code)"
        )
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as error:  # StrictDataclassError, or whatever else a wrongly typed value raises in transformers
        raise MoeExportError(f"{path} is not a valid {model_type} config: {one_line(error)}") from None
    if config.get_text_config() is not config:  # a multimodal hub checkpoint: its text model, the
        config.get_text_config().name_or_path = config.name_or_path  # model AutoModelForCausalLM builds from it
        config = config.get_text_config()
    adapter = adapter_for(config)  # unsupported or dense families stop here, before any weight is read
    _check_config_values(config, adapter, path, compressed=(model_dir / MANIFEST).is_file())
    return config


def _check_counts_against_headers(config, headers: Headers, path: Path) -> None:
    """The layer and expert counts and the widths config.json states, borne out by the weight headers, before
    any model is built from it: a config stating 1e9 experts or 1e5 layers would build for minutes and gigabytes
    (a compressed checkpoint's config states its largest per-layer expert count, which the headers hold too)."""
    family = supported_families()[config.model_type]
    names = family.tensor_names
    where = path / "config.json"
    layers = 1 + max((number for name in headers if (number := names.layer(name)) is not None), default=-1)
    # none found: names this check cannot read, left to loading; more found: layers transformers skips on load
    # (GLM's next-token-prediction layer), or that loading refuses as unexpected tensors
    if layers and config.num_hidden_layers > layers:
        raise MoeExportError(f"{where}: num_hidden_layers is {config.num_hidden_layers} but the weights hold "
                             f"{layers} layers: the config and the weights do not belong together")
    experts = max([1 + number for name in headers if (number := names.expert(name)) is not None]
                  + [shape[0] for name, (shape, _, _) in headers.items() if len(shape) == 3 and names.in_experts(name)],
                  default=0)
    stated = getattr(config, family.num_experts_key)
    if experts and stated != experts:
        raise MoeExportError(f"{where}: {family.num_experts_key} is {stated} but the weights hold at most "
                             f"{experts} experts per layer: the config and the weights do not belong together")
    embeddings = headers.get(family.embeddings + ".weight")
    if embeddings is not None and list(embeddings[0]) != [config.vocab_size, config.hidden_size]:
        raise MoeExportError(f"{where}: vocab_size {config.vocab_size} and hidden_size {config.hidden_size} do not "
                             f"match the embeddings' shape {list(embeddings[0])}: the config and the weights do not "
                             "belong together")


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
