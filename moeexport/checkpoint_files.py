"""What a checkpoint is on disk: where it lies, which files loading reads, and their tensor headers.

Torch-free (the finite check imports torch inside itself), so the command line's
early memory refusal (moeexport.memory.refuse_early) reads the same files, chosen
the same way, as loading does, before anything heavy is imported. Only
.safetensors files are read (never a pickle, also not through an index), and each
one's header must parse.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from moeexport.errors import MoeExportError

MANIFEST = "moeexport.json"
MANIFEST_WEIGHTS = "moeexport.safetensors"
MANIFEST_INDEX = "moeexport.safetensors.index.json"
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"  # what transformers reads, in order
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TO_SAFETENSORS = ("convert it to safetensors where you trust it (load it there and save_pretrained(..., "
                  "safe_serialization=True))")
DEMO_MODEL = Path(__file__).parent / "demo"
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

Headers = dict[str, tuple[list[int], str, Path]]  # tensor name -> (shape, safetensors dtype, file)


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


def is_gguf(model: str | Path) -> bool:
    return str(model).endswith(".gguf")


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__


def read_manifest(model_dir: Path) -> dict | None:
    """moeexport.json of a compressed checkpoint (None: there is none), checked to hold `layers` and a boolean
    `stock_loadable` (each layer's fields are checked where they become LayerSpecs: moeexport.source)."""
    path = model_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_bytes())
        manifest["layers"]  # present (a KeyError otherwise), whatever it holds
        stock_loadable = manifest["stock_loadable"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise invalid_manifest(path, error) from None
    if not isinstance(stock_loadable, bool):
        raise MoeExportError(f"{path}: stock_loadable must be true or false, not {stock_loadable!r}")
    return manifest


def invalid_manifest(path: Path, error: Exception) -> MoeExportError:
    return MoeExportError(
        f"{path} is not a valid moeexport manifest ({type(error).__name__}: {one_line(error)}): "
        "the checkpoint is corrupt or was edited; re-create it with moeexport compress"
    )


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
            f"{index} is not a valid safetensors index ({type(error).__name__}: {one_line(error)}): it must be an "
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


def _check_safetensors_file(path: Path) -> None:
    """The header parses (safe_open reads only the header and checks that it covers the file)."""
    try:
        with path.open("rb") as handle:
            start = handle.read(4)
    except OSError as error:
        raise MoeExportError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        with safe_open(path, "numpy"):
            return
    except Exception as error:  # SafetensorError, or whatever else a damaged header raises
        reason = one_line(error).removeprefix("Error while deserializing header: ")
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


def read_headers(files: list[Path]) -> Headers:
    """name -> (shape, safetensors dtype, file) for every tensor in the (already checked) files."""
    tensors: Headers = {}
    for path in files:
        with safe_open(path, "numpy") as handle:
            for name in handle.keys():
                if name in tensors:
                    raise MoeExportError(f"tensor {name} is in both {tensors[name][2]} and {path}: the shards overlap")
                view = handle.get_slice(name)
                tensors[name] = (list(view.get_shape()), view.get_dtype(), path)
    return tensors


def check_finite(lm, where: Path, prefix: str = "") -> None:
    """Every floating-point weight of the torch module `lm` is finite. One aminmax pass per tensor (NaN and
    +-Inf propagate into its min or max); only a tensor that fails is looked at again. `prefix` says which
    part of the model `lm` is (a streamed layer)."""
    import torch

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
