"""Is TensorRT usable here? The one place that imports `tensorrt`, always lazily.

TensorRT is not on PyPI as a self-contained wheel and needs a CUDA GPU for
anything useful (research/onnx_trt.md §3.5): on a Jetson it comes with JetPack
(apt `python3-libnvinfer`), on an x86 CUDA machine from NVIDIA's index. Every
other part of the TensorRT target (the ONNX, its checks, the bundle) works
without it, so nothing imports it at module level, and every failure here is
one line that says what is missing and how to get it.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeexport.errors import MoeExportError

INSTALL_HINT = (
    "on a Jetson, JetPack 6.x provides it (sudo apt install python3-libnvinfer, TensorRT 10.3); "
    "on an x86 CUDA machine, pip install tensorrt-cu12"
)


@dataclass(frozen=True)
class Status:
    available: bool
    reason: str  # why not, or what was found
    version: str | None = None

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0]) if self.version else 0


def import_tensorrt():
    """The tensorrt module, or MoeExportError naming what is missing and how to install it."""
    try:
        import tensorrt
    except ImportError as error:
        raise MoeExportError(f"TensorRT is not installed ({error}); {INSTALL_HINT}") from None
    except OSError as error:  # the bindings are there but libnvinfer is not (bindings-only wheel)
        raise MoeExportError(f"TensorRT's libraries cannot be loaded ({error}); {INSTALL_HINT}") from None
    return tensorrt


def require_cuda_torch():
    """torch with a CUDA device, which the TensorRT runner's buffers live in."""
    import torch

    if not torch.cuda.is_available():
        build = f"torch {torch.__version__} " + ("has no CUDA support" if torch.version.cuda is None else "sees no CUDA GPU")
        raise MoeExportError(
            f"running a TensorRT engine needs torch with CUDA ({build}); on a Jetson install NVIDIA's JetPack "
            "torch wheel, elsewhere a CUDA build of torch"
        )
    return torch


def status() -> Status:
    """Whether this machine can build and run engines: tensorrt imports, a builder starts, torch sees CUDA."""
    try:
        trt = import_tensorrt()
    except MoeExportError as error:
        return Status(False, str(error))
    version = getattr(trt, "__version__", "unknown")
    try:
        require_cuda_torch()
    except MoeExportError as error:
        return Status(False, f"TensorRT {version} is installed but {error}", version)
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except (TypeError, RuntimeError) as error:  # "factory function returned nullptr": CUDA failed to start
        return Status(False, f"TensorRT {version} cannot start a builder (no usable CUDA device or driver: {error})", version)
    del builder
    return Status(True, f"TensorRT {version}", version)
