"""The device bundle: everything a Jetson needs to build, validate and profile an engine without torch or the model.

An engine can only be built on the GPU and TensorRT version that will run it,
and the machine that compresses the model usually has neither. So `moeexport
build --target tensorrt` writes a directory to copy to the device:

    bundle.json     manifest: model shape, graph interface, profile sizes, per-file
                    sizes and SHA-256, the ONNX Runtime check made here, tolerances
    model.onnx      the plain-ops decoder (+ model.onnx.data past 1 GiB of weights)
    reference.npz   token windows and the compressed torch model's logits on them
                    (numpy only; read with allow_pickle=False)
    README.txt      the commands that finish the job on the device

and `moeexport trt-build BUNDLE` on the device builds the engine next to them,
compares its logits with the bundled reference (the same `compare` every
target uses), profiles it and writes report.json. The bundle directory is
written under a temporary name and renamed when complete; an engine that misses
its tolerance is renamed *.failed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeexport.backends.tensorrt.support import check_decoder_io, check_onnx, decoder_io, operators_used, support_table
from moeexport.errors import MoeExportError
from moeexport.validate import Fidelity, Tolerance, compare

FORMAT = "moeexport-tensorrt-bundle"
FORMAT_VERSION = 1
MANIFEST = "bundle.json"
ONNX_FILE = "model.onnx"
REFERENCE = "reference.npz"
INSTRUCTIONS = "README.txt"
TIMING_CACHE = "timing.cache"
REPORT = "report.json"
DEFAULT_CONTEXT = 2048  # engine activations are sized for the largest profile shape: keep it modest on a Jetson
DEFAULT_MAX_PROMPT = 512

# What a TensorRT engine must reach against the torch reference. fp32 (TF32 off) is
# the exactness check, as tight as the GGUF f32 one; the reduced precisions are
# judged by KL and top-1 like the quantized GGUF types. These are starting values
# chosen from the f16/int8 ONNX results here, not yet measured on a device.
ENGINE_TOLERANCES = {
    "fp32": Tolerance(max_abs_logit=1e-3, top1_agreement=1.0),
    "fp16": Tolerance(kl=1e-2, top1_agreement=0.95),
    "bf16": Tolerance(kl=3e-2, top1_agreement=0.9),
    "int8": Tolerance(kl=5e-2, top1_agreement=0.85),
    "fp8": Tolerance(kl=5e-2, top1_agreement=0.85),
}


class ArrayReference:
    """A runner whose logits are the bundled reference: looked up by the exact token window."""

    def __init__(self, windows: np.ndarray, logits: np.ndarray):
        if windows.ndim != 2 or logits.shape[:2] != windows.shape:
            raise MoeExportError(f"reference logits {logits.shape} do not match the windows {windows.shape}")
        self._logits = {windows[i].astype(np.int64).tobytes(): logits[i] for i in range(len(windows))}

    def logits(self, token_ids) -> np.ndarray:
        key = np.asarray(list(token_ids), dtype=np.int64).tobytes()
        if key not in self._logits:
            raise MoeExportError("no bundled reference logits for this token window")
        return self._logits[key]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


def _model_summary(model) -> dict:
    config = model.config
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "num_experts_per_tok")
    return {key: getattr(config, key, None) for key in keys}


def instructions(bundle_name: str, manifest: dict) -> str:
    """README.txt: how to finish on the device (also printed by `build` when TensorRT is absent here)."""
    return f"""\
moeexport TensorRT bundle ({manifest['model']['model_type']}, {manifest['onnx']['quant']} weights)

Engines are built on the device that runs them. On a Jetson (JetPack 6.x: TensorRT 10.3, CUDA 12.6):

  1. copy this directory:     scp -r {bundle_name} jetson:~/
  2. on the Jetson:           sudo apt install python3-libnvinfer   # JetPack's TensorRT for Python
                              pip install NVIDIA's JetPack torch wheel, then moeexport (this repository)
  3. build, validate, profile: moeexport trt-build ~/{bundle_name} [--precision fp16|fp32|bf16|int8|fp8]

trt-build writes model-PRECISION.plan, timing.cache and report.json here; an engine
whose logits miss the tolerance against reference.npz is renamed *.plan.failed and
the command exits 1. Profiles: prefill up to {manifest['profiles']['max_prompt']} new tokens, context
{manifest['profiles']['context']} tokens (change with --max-prompt / --context).
"""


@dataclass
class BundleResult:
    path: Path
    manifest: dict
    fidelity: Fidelity
    failures: list[str]


def write_bundle(
    model,
    out_dir: str | Path,
    windows,
    windows_source: str = "",
    quant: str = "f32",
    source_manifest: dict | None = None,
    context: int | None = None,
    max_prompt: int | None = None,
    progress=None,
) -> BundleResult:
    """Export the plain-ops ONNX, check it for TensorRT, validate it in ONNX Runtime, write the bundle atomically.

    `windows` [N, L] are the token windows whose torch logits become the
    reference. A graph TensorRT's parser would refuse raises before anything
    is left on disk; an ONNX that misses its ONNX Runtime tolerance is kept
    as model.onnx.failed in a complete bundle, and the result lists why.
    """
    from moeexport.backends import onnx as onnx_backend
    from moeexport.validate import TorchRunner

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise MoeExportError(f"bundle directory {out_dir} already exists; choose another or remove it")
    windows = np.asarray(windows.tolist() if hasattr(windows, "tolist") else windows, dtype=np.int64)
    positions = min(model.config.max_position_embeddings, context or DEFAULT_CONTEXT)
    max_prompt = min(max_prompt or DEFAULT_MAX_PROMPT, positions)
    if windows.shape[1] > max_prompt:
        raise MoeExportError(f"reference windows of {windows.shape[1]} tokens are longer than the prefill profile ({max_prompt})")
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        artifact = onnx_backend.export(model, partial / ONNX_FILE, quant=quant, moe_ops="plain", context=positions)
        problems = check_onnx(artifact.path) + check_decoder_io(artifact.path)
        if problems:
            raise MoeExportError(
                f"the plain-ops ONNX has {len(problems)} thing(s) TensorRT would refuse, first: {problems[0]}"
            )
        reference = TorchRunner(model)
        logits = np.stack([reference.logits(window) for window in windows.tolist()]).astype(np.float32)
        fidelity = compare(
            ArrayReference(windows, logits),
            onnx_backend.OnnxRunner(artifact.path, context=positions, providers=["CPUExecutionProvider"]),
            _as_torch(windows),
            progress,
        )
        failures = fidelity.failures(onnx_backend.TOLERANCES[quant])
        np.savez(partial / REFERENCE, windows=windows, logits=logits)
        onnx_path = artifact.path
        if failures:  # kept for inspection, under a name nothing will build from
            onnx_path = artifact.path.rename(artifact.path.with_name(artifact.path.name + ".failed"))
        manifest = _manifest(model, partial, artifact, onnx_path, quant, windows, windows_source, fidelity, failures,
                             source_manifest, positions, max_prompt)
        _write_json(partial / MANIFEST, manifest)
        (partial / INSTRUCTIONS).write_text(instructions(out_dir.name, manifest))
        os.replace(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return BundleResult(out_dir, manifest, fidelity, failures)


def _as_torch(windows: np.ndarray):
    import torch

    return torch.from_numpy(windows)


def _manifest(model, directory, artifact, onnx_path, quant, windows, windows_source, fidelity, failures,
              source_manifest, context, max_prompt) -> dict:
    import onnx
    import onnxruntime

    from moeexport import __version__
    from moeexport.backends import onnx as onnx_backend

    graph = onnx.load(str(onnx_path), load_external_data=False)
    io = decoder_io(graph)
    qdq = sorted({
        onnx.TensorProto.DataType.Name(tensor.data_type)
        for node in graph.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
        for tensor in graph.graph.initializer if len(node.input) > 2 and tensor.name == node.input[2]
    })
    files = sorted(path.name for path in directory.iterdir() if path.name.startswith(ONNX_FILE)) + [REFERENCE]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "moeexport_version": __version__,
        "model": _model_summary(model),
        "onnx": {
            "file": ONNX_FILE,
            "failed": bool(failures),
            "quant": quant,
            "moe_ops": "plain",
            "representation": artifact.representation,
            "opset": next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
            "operators": operators_used(graph),
            "qdq": qdq,
            "io": {"inputs": io["inputs"], "outputs": io["outputs"], "cache": io["cache"], "layers": io["layers"]},
        },
        "tensorrt_support": {"checked_against": support_table()["describes"], "problems": []},
        "profiles": {"max_prompt": max_prompt, "context": context, "batch": 1},
        "reference": {"file": REFERENCE, "windows": list(windows.shape), "text": windows_source,
                      "logits_dtype": "float32"},
        "validation_here": {
            "runtime": f"onnxruntime {onnxruntime.__version__} CPU on {platform.machine()}",
            **fidelity.to_dict(),
            "tolerance": onnx_backend.TOLERANCES[quant].__dict__,
            "failures": failures,
        },
        "engine_tolerances": {name: tolerance.__dict__ for name, tolerance in ENGINE_TOLERANCES.items()},
        "files": {name: {"bytes": (directory / name).stat().st_size, "sha256": _sha256(directory / name)} for name in files},
        "compression": source_manifest,
    }


class Bundle:
    """A bundle directory, read back and checked: the manifest, the files it lists, the reference."""

    def __init__(self, path: str | Path, verify: bool = True):
        path = Path(path)
        if not (path / MANIFEST).is_file() and (path / "bundle" / MANIFEST).is_file():
            path = path / "bundle"  # the build's output directory was given
        if not path.is_dir():
            raise MoeExportError(f"{path} is not a directory; give the bundle directory written by `moeexport build --target tensorrt`")
        if not (path / MANIFEST).is_file():
            raise MoeExportError(f"{path} has no {MANIFEST}: it is not a bundle written by `moeexport build --target tensorrt`")
        self.path = path
        try:
            self.manifest = json.loads((path / MANIFEST).read_text())
        except json.JSONDecodeError as error:
            raise MoeExportError(f"{path / MANIFEST} is not valid JSON ({error}); copy the bundle again") from None
        if self.manifest.get("format") != FORMAT:
            raise MoeExportError(f"{path / MANIFEST} is not a moeexport TensorRT bundle manifest")
        if self.manifest.get("format_version", 0) > FORMAT_VERSION:
            raise MoeExportError(
                f"bundle format {self.manifest['format_version']} is newer than this moeexport reads ({FORMAT_VERSION}); "
                "install the moeexport version that wrote it"
            )
        if self.manifest["onnx"].get("failed"):
            raise MoeExportError(f"this bundle's ONNX failed validation where it was built ({'; '.join(self.manifest['validation_here']['failures'])}); rebuild the bundle")
        if verify:
            self.verify()

    @property
    def onnx_path(self) -> Path:
        return self.path / self.manifest["onnx"]["file"]

    def verify(self) -> None:
        """Every listed file is present with its size and SHA-256 (a partial copy fails here, not mid-build)."""
        for name, expected in self.manifest["files"].items():
            path = self.path / name
            if not path.is_file():
                raise MoeExportError(f"{name} is missing from the bundle {self.path}; copy the whole directory again")
            if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
                raise MoeExportError(f"{name} in {self.path} differs from the one the bundle was written with; copy it again")

    def reference(self) -> tuple[np.ndarray, np.ndarray]:
        """(windows int64 [N, L], logits float32 [N, L, vocab]); never unpickles."""
        with np.load(self.path / REFERENCE, allow_pickle=False) as data:
            windows, logits = data["windows"], data["logits"]
        if windows.dtype != np.int64 or logits.dtype != np.float32:
            raise MoeExportError(f"{REFERENCE} holds {windows.dtype} windows / {logits.dtype} logits; expected int64 / float32")
        return windows, logits

    def io(self) -> dict:
        return self.manifest["onnx"]["io"]
