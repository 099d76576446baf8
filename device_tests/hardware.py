"""What this machine offers, each as a skip reason (None when present), probed once.

Device tests skip with the reason printed (`pytest device_tests -rs`), so a run on
a machine without a GPU says exactly what it lacked instead of failing.
"""

from __future__ import annotations

from functools import lru_cache

import pytest


@lru_cache(maxsize=None)
def missing_cuda() -> str | None:
    import torch

    if torch.version.cuda is None:
        return f"no CUDA GPU: torch {torch.__version__} is a CPU build"
    if not torch.cuda.is_available():
        return f"no CUDA GPU: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no device"
    return None


@lru_cache(maxsize=None)
def missing_tensorrt() -> str | None:
    from moeexport.backends.tensorrt import status

    found = status()
    return None if found.available else found.reason


@lru_cache(maxsize=None)
def missing_onnxruntime_cuda() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime is not installed (pip install onnxruntime-gpu)"
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return (f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider "
                "(pip uninstall onnxruntime && pip install onnxruntime-gpu)")
    return missing_cuda()


@lru_cache(maxsize=None)
def missing_llama_cpp_cuda() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return "llama-cpp-python is not installed"
    if not llama_cpp.llama_supports_gpu_offload():
        return (f"llama-cpp-python {llama_cpp.__version__} is a CPU build "
                "(CMAKE_ARGS=-DGGML_CUDA=on pip install --force-reinstall --no-cache-dir llama-cpp-python)")
    return missing_cuda()


def needs(*probes):
    """A skipif marker for the first missing requirement among `probes`."""
    reasons = [reason for reason in (probe() for probe in probes) if reason]
    return pytest.mark.skipif(bool(reasons), reason=reasons[0] if reasons else "")
