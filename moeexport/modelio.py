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
Pickles are never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from moeexport.adapters import adapter_for
from moeexport.adapters.base import LayerSpec, drop_moe_sublayer, keep_experts, structure, sync_expert_config
from moeexport.errors import MoeExportError

MANIFEST = "moeexport.json"
MANIFEST_WEIGHTS = "moeexport.safetensors"
DEMO_MODEL = Path(__file__).parent / "demo"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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
    """`demo` names the bundled demo model; anything else is a checkpoint directory."""
    path = DEMO_MODEL if str(model) == "demo" else Path(model)
    if not path.is_dir():
        raise MoeExportError(f"model directory {str(model)!r} does not exist (give a checkpoint directory or 'demo')")
    if not (path / "config.json").is_file():
        raise MoeExportError(f"{path} has no config.json: is it a Hugging Face checkpoint directory?")
    return path


def read_config(model_dir: Path, trust_remote_code: bool = False):
    """The HF config, after checking that transformers and moeexport both know the model_type."""
    from transformers import CONFIG_MAPPING, AutoConfig

    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MoeExportError(f"{model_dir / 'config.json'} is not valid JSON: {error}") from None
    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING and not trust_remote_code:
        raise MoeExportError(
            f"unknown model_type {model_type!r} in {model_dir / 'config.json'} "
            "(transformers does not know it; moeexport never runs remote code unless --trust-remote-code)"
        )
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code, local_files_only=True)
    adapter_for(config)  # unsupported or dense families stop here, before any weight is read
    return config


def read_manifest(model_dir: Path) -> dict | None:
    path = model_dir / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def fingerprint(model_dir: Path) -> str:
    """Identity of a checkpoint without reading its weights: config plus safetensors headers."""
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for weights in sorted(model_dir.glob("*.safetensors")):
        with weights.open("rb") as handle:
            header_length = int.from_bytes(handle.read(8), "little")
            digest.update(weights.name.encode())
            digest.update(handle.read(header_length))
    return digest.hexdigest()[:16]


def load(model: str | Path, dtype: str = "float32", trust_remote_code: bool = False) -> nn.Module:
    """A torch causal LM for an original or a moeexport-compressed checkpoint directory."""
    if dtype not in DTYPES:
        raise MoeExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    model_dir = resolve_model_dir(model)
    config = read_config(model_dir, trust_remote_code)
    manifest = read_manifest(model_dir)
    if manifest and not manifest["stock_loadable"]:
        lm = _load_manifest_checkpoint(model_dir, config, manifest, DTYPES[dtype])
    else:
        lm = _load_stock_checkpoint(model_dir, DTYPES[dtype], trust_remote_code)
    lm.eval()
    lm.requires_grad_(False)
    return lm


def _load_stock_checkpoint(model_dir: Path, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if not any(model_dir.glob("*.safetensors")):
        raise MoeExportError(
            f"no .safetensors weights in {model_dir}; moeexport never loads pickled (.bin/.pt) checkpoints "
            "(re-save the model with safe_serialization=True)"
        )
    return AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=dtype,
        use_safetensors=True,
        local_files_only=True,
        trust_remote_code=trust_remote_code,
        experts_implementation=EXPERTS_IMPLEMENTATION,
    )


def _load_manifest_checkpoint(model_dir: Path, config, manifest: dict, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    weights = model_dir / MANIFEST_WEIGHTS
    if not weights.is_file():
        raise MoeExportError(f"{model_dir} has {MANIFEST} but no {MANIFEST_WEIGHTS}: the checkpoint is incomplete")
    with no_init_weights():
        lm = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation=EXPERTS_IMPLEMENTATION)
    apply_structure(lm, [LayerSpec(**layer) for layer in manifest["layers"]])
    missing, unexpected = load_model(lm, weights, strict=False)
    if missing or unexpected:
        raise MoeExportError(
            f"{weights} does not match its manifest (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}): the checkpoint is corrupt or was edited"
        )
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
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise MoeExportError(f"cannot load the tokenizer from {model_dir}: {error}") from None


def parameter_count(lm: nn.Module) -> int:
    return sum(p.numel() for p in lm.parameters())


def parameter_bytes(lm: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in lm.parameters())


def _apply_umask(directory: Path) -> None:
    """mkdtemp and safetensors create owner-only entries; give them the user's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for entry in directory.iterdir():
        entry.chmod(0o666 & ~umask)


def save(lm: nn.Module, out_dir: str | Path, manifest: dict, overwrite: bool = False) -> Path:
    """Write a compressed checkpoint atomically: a temp directory renamed at the end."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise MoeExportError(f"output {out_dir} already exists; pass --overwrite or choose another --out")
    adapter = adapter_for(lm.config)
    stock_loadable = sync_expert_config(adapter, lm)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        if stock_loadable:
            lm.save_pretrained(staging, safe_serialization=True)
        else:
            lm.config.save_pretrained(staging)
            save_model(lm, str(staging / MANIFEST_WEIGHTS), metadata={"format": "pt"})
        source = Path(lm.config.name_or_path or "")
        for name in TOKENIZER_FILES:
            if (source / name).is_file() and not (staging / name).exists():
                shutil.copyfile(source / name, staging / name)
        record = {
            "format": "moeexport-checkpoint",
            "version": 1,
            "model_type": lm.config.model_type,
            "stock_loadable": stock_loadable,
            "weights": "model.safetensors" if stock_loadable else MANIFEST_WEIGHTS,
            "layers": [asdict(spec) for spec in structure(adapter, lm)],
            **manifest,
        }
        (staging / MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
        _apply_umask(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
