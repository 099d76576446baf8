"""Checks the family test files share: transformers' own model of a saved checkpoint, a tiny model saved with the
demo tokenizer and built to an f32 GGUF, and an F16 GGUF compared with llama.cpp's converter's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

import moeexport
from moeexport import BuildOptions
from moeexport.calibration.sources import CalibrationConfig
from moeexport.checkpoint_files import DEMO_MODEL
from moeexport.compress import StatisticsProvider
from moeexport.modelio import EXPERTS_IMPLEMENTATION, save
from tests.tiny_models import random_tokens

HELD_OUT = Path(__file__).with_name("held_out_text.txt")


def logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


def tiny_statistics_provider() -> StatisticsProvider:
    """Calibration statistics of a tiny model on random tokens (no text, no cache)."""
    return StatisticsProvider(None, CalibrationConfig(), "tiny", cache_dir=None, tokens=random_tokens(6, 32, seed=1))


def reloaded(model, path):
    """transformers' own model of what moeexport saved."""
    save(model, path, {})
    return AutoModelForCausalLM.from_pretrained(path, experts_implementation=EXPERTS_IMPLEMENTATION).eval()


def saved_with_demo_tokenizer(model, directory: Path) -> Path:
    """`model` as save_pretrained writes it, with the demo model's tokenizer beside it (its vocabulary must be the
    demo's)."""
    model.save_pretrained(directory)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((DEMO_MODEL / name).read_bytes())
    return directory


def saved_in_hub_multimodal_layout(model, directory: Path, multimodal: dict, skip=(), extra_tensors=None) -> Path:
    """`model` saved as the hub's multimodal checkpoints are: `multimodal` (model_type, architectures, ...) with the
    text model's config under text_config, its tensors under model.language_model.* (`skip` left out, e.g. a tied
    head), and `extra_tensors` (towers the causal LM leaves out) beside them."""
    import json

    from safetensors.torch import save_file

    model.save_pretrained(directory / "text")
    text = json.loads((directory / "text" / "config.json").read_text())
    hub = directory / "hub"
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps(multimodal | {
        "text_config": {key: value for key, value in text.items() if key not in ("architectures", "dtype")}}))
    tensors = {name.replace("model.", "model.language_model.", 1): tensor.contiguous()
               for name, tensor in model.state_dict().items() if name not in skip}
    save_file(tensors | (extra_tensors or {}), hub / "model.safetensors", metadata={"format": "pt"})
    return hub


def build_f32_gguf(source: Path, passes: list, out: Path, stream: bool = False):
    """`build --target gguf --quant f32` of `source` with `passes`, validated on a few short held-out windows; the
    compressed checkpoint saved too (the family tests load it in stock transformers)."""
    options = BuildOptions(out=str(out), quant="f32", profile=False, validation_windows=(2, 48), stream=stream,
                           calibration=moeexport.CalibrationOptions(source=str(HELD_OUT), samples=4, length=32),
                           eval_text=str(HELD_OUT), measure_quality=False, save_checkpoint=True)
    return moeexport.build(source, {"passes": passes}, "gguf", options)


def assert_tensors_as_the_converters(our_tensors: dict, their_tensors: dict) -> None:
    """Every tensor of the converter's F16 file is in ours with the same type and bytes, shapes equal up to unit
    dims, apart from the token embedding, which ours keeps F32 in an F16 file (writer.py): the same values rounded."""
    for name, their in their_tensors.items():
        our = our_tensors[name]
        if name == "token_embd.weight":
            assert our.tensor_type.name == "F32" and their.tensor_type.name == "F16"
            assert np.array_equal(np.asarray(our.data).astype(np.float16), np.asarray(their.data))
            continue
        assert our.tensor_type == their.tensor_type, name
        assert np.array_equal(np.asarray(our.data).reshape(-1), np.asarray(their.data).reshape(-1)), name
        assert [int(n) for n in our.shape if n != 1] == [int(n) for n in their.shape if n != 1], name


def architecture_keys(reader) -> dict:
    """A GGUF's keys under its architecture's prefix, without the prefix."""
    prefix = f"{reader.fields['general.architecture'].contents()}."
    return {name.removeprefix(prefix): field.contents() for name, field in reader.fields.items()
            if name.startswith(prefix)}
