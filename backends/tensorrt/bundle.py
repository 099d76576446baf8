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
import json
import os
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moeexport.backends.target import Artifact
from moeexport.backends.tensorrt.support import check_decoder_io, check_onnx, decoder_io, operators_used, support_table
from moeexport.errors import MoeExportError
from moeexport.outputs import replace_atomically, sha256_of_file
from moeexport.validate import Fidelity, RecordedReference, Tolerance, TorchRunner, Validation, validate_artifact

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


def write_json(path: Path, data: dict) -> None:
    replace_atomically(path, lambda temporary: temporary.write_text(json.dumps(data, indent=2) + "\n"))


def model_summary(model) -> dict:
    """The model's shape for the manifest, as its config states it globally (a config whose layers differ, e.g.
    in key-value heads, refuses a plain read of such a key)."""
    from moeexport.adapters.declaration import global_value

    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "num_experts_per_tok")
    return {key: global_value(model.config, key) for key in keys}


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


@dataclass
class BundleArtifact(Artifact):
    quant: str = "f32"
    context: int = DEFAULT_CONTEXT  # positions the ONNX has rotary tables for
    max_prompt: int = DEFAULT_MAX_PROMPT  # longest prefill of the engine's profile
    model: dict = field(default_factory=dict)  # the model's shape, for the manifest


def profile_sizes(model, context: int | None = None, max_prompt: int | None = None) -> tuple[int, int]:
    positions = min(model.config.max_position_embeddings, context or DEFAULT_CONTEXT)
    return positions, min(max_prompt or DEFAULT_MAX_PROMPT, positions)


def export_bundle_onnx(model, bundle_dir: Path, quant: str, context: int, max_prompt: int) -> BundleArtifact:
    """The plain-ops ONNX in `bundle_dir`, refused before anything else if TensorRT's parser would refuse it."""
    from moeexport.backends import onnx as onnx_backend

    bundle_dir.mkdir(parents=True, exist_ok=True)
    written = onnx_backend.export(model, bundle_dir / ONNX_FILE, quant=quant, moe_ops="plain", context=context)
    problems = check_onnx(written.path) + check_decoder_io(written.path)
    if problems:
        raise MoeExportError(f"the plain-ops ONNX has {len(problems)} thing(s) TensorRT would refuse, first: {problems[0]}")
    data = written.path.with_name(written.path.name + ".data")
    return BundleArtifact(written.path, written.representation, written.fallbacks, [data], quant=quant,
                          context=context, max_prompt=max_prompt, model=model_summary(model))


def finish_bundle(artifact: BundleArtifact, reference: RecordedReference, validation: Validation,
                  source_manifest: dict | None) -> dict:
    """Write reference.npz, bundle.json and README.txt beside the validated ONNX; returns the manifest."""
    directory = artifact.path.parent
    if reference.windows.shape[1] > artifact.max_prompt:
        raise MoeExportError(f"reference windows of {reference.windows.shape[1]} tokens are longer than the prefill "
                             f"profile ({artifact.max_prompt})")
    np.savez(directory / REFERENCE, windows=reference.windows, logits=reference.recorded)
    manifest = _manifest(directory, artifact, validation, reference.windows, source_manifest)
    write_json(directory / MANIFEST, manifest)
    (directory / INSTRUCTIONS).write_text(instructions(directory.name, manifest))
    return manifest


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
    (`moeexport build --target tensorrt` runs the same steps through the pipeline.)
    """
    from moeexport.backends import onnx as onnx_backend

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise MoeExportError(f"bundle directory {out_dir} already exists; choose another or remove it")
    positions, max_prompt = profile_sizes(model, context, max_prompt)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        artifact = export_bundle_onnx(model, partial, quant, positions, max_prompt)
        reference = RecordedReference.record(TorchRunner(model), windows)
        runner = onnx_backend.OnnxRunner(artifact.path, context=positions, providers=["CPUExecutionProvider"])
        validation = validate_artifact(reference, runner, reference.windows, onnx_backend.TOLERANCES[quant],
                                       artifact.path, windows_source, onnxruntime_here(), progress)
        manifest = finish_bundle(artifact, reference, validation, source_manifest)
        os.replace(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return BundleResult(out_dir, manifest, validation.fidelity, validation.failures)


def onnxruntime_here() -> str:
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__} CPU on {platform.machine()}"


def _manifest(directory: Path, artifact: BundleArtifact, validation: Validation, windows: np.ndarray,
              source_manifest: dict | None) -> dict:
    import onnx

    from moeexport import __version__

    onnx_path = validation.artifact  # model.onnx, or model.onnx.failed
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
        "model": artifact.model,
        "onnx": {
            "file": ONNX_FILE,
            "failed": not validation.passed,
            "quant": artifact.quant,
            "moe_ops": "plain",
            "representation": artifact.representation,
            "opset": next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
            "operators": operators_used(graph),
            "qdq": qdq,
            "io": {"inputs": io["inputs"], "outputs": io["outputs"], "cache": io["cache"], "layers": io["layers"]},
        },
        "tensorrt_support": {"checked_against": support_table()["describes"], "problems": []},
        "profiles": {"max_prompt": artifact.max_prompt, "context": artifact.context, "batch": 1},
        "reference": {"file": REFERENCE, "windows": list(windows.shape), "text": validation.text,
                      "logits_dtype": "float32"},
        "validation_here": validation.to_dict() | {"artifact": onnx_path.name},
        "engine_tolerances": {name: tolerance.__dict__ for name, tolerance in ENGINE_TOLERANCES.items()},
        "files": {name: {"bytes": (directory / name).stat().st_size, "sha256": sha256_of_file(directory / name)} for name in files},
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
            if path.stat().st_size != expected["bytes"] or sha256_of_file(path) != expected["sha256"]:
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
