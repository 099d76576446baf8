"""Finish a bundle on the device: build the engine, validate it against the bundled logits, profile it.

This is `moeexport trt-build BUNDLE`, and also the tail of `moeexport build
--target tensorrt` on a machine that has TensorRT. It needs tensorrt and torch
with CUDA, and nothing of the original model: the reference logits travel in
the bundle.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path

from moeexport.backends.tensorrt.bundle import ENGINE_TOLERANCES, REPORT, TIMING_CACHE, Bundle, write_json
from moeexport.errors import MoeExportError


def jetson_release() -> str | None:
    """The L4T release line of a Jetson (/etc/nv_tegra_release), None elsewhere."""
    path = Path("/etc/nv_tegra_release")
    return path.read_text().splitlines()[0].strip("# ").strip() if path.is_file() else None


@dataclass
class DeviceResult:
    report: dict
    failures: list[str]
    engine_path: Path


def finish_on_device(
    bundle: Bundle,
    precision: str | None = None,
    workspace_bytes: int | None = None,
    context: int | None = None,
    max_prompt: int | None = None,
    progress=None,
    verbose: bool = False,
) -> DeviceResult:
    """Build model-PRECISION.plan in the bundle, validate and profile it, write report.json; rename it *.failed on a miss."""
    import torch

    from moeexport.backends.tensorrt.builder import Profiles, build_engine
    from moeexport.backends.tensorrt.runner import TensorRTRunner
    from moeexport.backends.tensorrt.runtime import status
    from moeexport.validate import RecordedReference, validate_artifact

    found = status()
    if not found.available:
        raise MoeExportError(f"{found.reason}; the bundle {bundle.path} is ready for a machine that has it")
    manifest = bundle.manifest
    windows, logits = bundle.reference()
    profiles = Profiles(
        max_prompt=max_prompt or manifest["profiles"]["max_prompt"],
        context=context or manifest["profiles"]["context"],
    )
    if profiles.context > manifest["profiles"]["context"]:
        raise MoeExportError(
            f"--context {profiles.context} is longer than the {manifest['profiles']['context']} positions the bundle's "
            "ONNX has rotary tables for; write the bundle again for a longer context"
        )
    if windows.shape[1] > profiles.max_prompt:
        raise MoeExportError(f"--max-prompt {profiles.max_prompt} is shorter than the reference windows ({windows.shape[1]} tokens)")
    started = time.perf_counter()
    built = build_engine(
        bundle.onnx_path,
        bundle.path,
        bundle.io(),
        profiles,
        precision=precision,
        workspace_bytes=workspace_bytes,
        timing_cache=bundle.path / TIMING_CACHE,
        onnx_info={"qdq": manifest["onnx"]["qdq"]},
        verbose=verbose,
    )
    build_info = built.to_dict()
    torch.cuda.reset_peak_memory_stats()
    runner = TensorRTRunner(built.engine_path)
    speed = runner.profile(windows[0, :128].tolist(), new_tokens=64)
    memory = runner.memory()
    validation = validate_artifact(
        RecordedReference(windows, logits), runner, windows, ENGINE_TOLERANCES[built.precision], built.engine_path,
        manifest["reference"]["text"], f"TensorRT {built.tensorrt_version} on {torch.cuda.get_device_name()}", progress,
    )
    failures, engine_path = validation.failures, validation.artifact
    report = {
        "target": "tensorrt",
        "bundle": str(bundle.path),
        "device": {
            "gpu": torch.cuda.get_device_name(),
            "compute_capability": ".".join(map(str, torch.cuda.get_device_capability())),
            "jetson_l4t": jetson_release(),
            "machine": platform.machine(),
            "tensorrt": built.tensorrt_version,
            "cuda": torch.version.cuda,
        },
        "engine": {**build_info, "engine": str(engine_path), "failed": bool(failures)},
        "validation": {"reference": manifest["reference"], **validation.to_dict()},
        "profile": {**speed, **memory},
        "seconds": time.perf_counter() - started,
    }
    write_json(bundle.path / REPORT, report)
    return DeviceResult(report, failures, engine_path)
