"""llama.cpp's own quantizer, one tensor slice at a time: K-quant files without a whole-model intermediate;
and its dequantizer (`dequantize_rows`), which the GGUF reader uses.

`llama_model_quantize` rewrites a whole GGUF and memory-maps its input, so the
F32 intermediate of a large model is written to disk first (13 GB for a
6 B-parameter checkpoint of 12 GB in bf16: twice its size). The K-quant mixes are llama.cpp's
rules, so we keep llama.cpp deciding and computing, in two smaller steps:

- `tensor_types`: llama.cpp quantizes a *proxy* GGUF, written with the real
  file's metadata, tensor names, counts and expert axes, but rows of at most
  512 columns with the same remainder modulo 256 (the K-quant block: its
  fallback rules look at that and at names, layer indices and hyperparameters,
  never at sizes or values); the types it chose are read back.
- `quantize_rows`: the data is quantized with `ggml_quantize_chunk`, the
  function `llama_model_quantize` itself calls per row block (per expert, with
  that expert's importance), as each slice is written.

The result has the tensors, types and bytes llama_model_quantize would write
(tests/test_gguf.py compares them tensor by tensor).
"""

from __future__ import annotations

import ctypes
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np

from moeexport.errors import MoeExportError

K_BLOCK = 256  # QK_K: the K-quants' super-block width
PROXY_COLUMNS = 512


def proxy_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A small stand-in shape that llama.cpp's type rules treat alike: the expert axis and the row width's
    remainder modulo 256 kept, at most a few rows."""
    columns = shape[-1] if shape[-1] <= PROXY_COLUMNS else K_BLOCK + shape[-1] % K_BLOCK
    if len(shape) == 1:
        return (columns,)
    return (*shape[:-2], min(shape[-2], 8), columns)


def tensor_types(write_proxy, quantize_file) -> dict[str, int]:
    """GGUF tensor name -> ggml type, as llama.cpp's quantizer chooses them.

    `write_proxy(path)` writes the proxy GGUF (see the module docstring); `quantize_file(source, target)`
    runs llama_model_quantize with the build's file type and overrides.
    """
    import gguf

    with tempfile.TemporaryDirectory(prefix="moeexport-proxy-") as scratch:
        source, target = Path(scratch) / "proxy-f32.gguf", Path(scratch) / "proxy.gguf"
        write_proxy(source)
        quantize_file(source, target)
        return {tensor.name: int(tensor.tensor_type) for tensor in gguf.GGUFReader(target).tensors}


@cache
def _library():
    try:
        import llama_cpp
    except ImportError:
        raise MoeExportError("reading a GGUF, K-quants and tensor-type overrides need llama-cpp-python (ggml): "
                             "pip install 'moeexport[gguf]'") from None
    found = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.so*"))
    if not found:
        raise MoeExportError(f"llama-cpp-python has no libggml-base in {Path(llama_cpp.__file__).parent / 'lib'}: "
                             "reinstall it (pip install --force-reinstall llama-cpp-python)")
    library = ctypes.CDLL(str(found[0]))
    floats = ctypes.POINTER(ctypes.c_float)
    library.ggml_quantize_chunk.argtypes = [ctypes.c_int, floats, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                            ctypes.c_int64, floats]
    library.ggml_quantize_chunk.restype = ctypes.c_size_t
    library.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    library.ggml_row_size.restype = ctypes.c_size_t
    library.ggml_quantize_init.argtypes = [ctypes.c_int]
    library.ggml_get_type_traits.argtypes = [ctypes.c_int]
    library.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    return library


class _TypeTraits(ctypes.Structure):
    """ggml.h's struct ggml_type_traits."""
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


@cache
def _to_float(ggml_type: int):
    pointer = _library().ggml_get_type_traits(ggml_type).contents.to_float
    if not pointer:
        raise MoeExportError(f"ggml has no dequantizer for its type {ggml_type}")
    return _TO_FLOAT(pointer)


def dequantize_rows(ggml_type: int, raw: np.ndarray, out: np.ndarray, threads: int = 2) -> np.ndarray:
    """Stored rows `raw` (uint8 [n, row bytes]) into float32 `out` [n, columns] by ggml's own `to_float`, split
    over `threads`: the values gguf-py's numpy dequantizer gives, bit for bit (tests/test_gguf_input.py), about
    ten times as fast."""
    if not out.flags.c_contiguous or out.dtype != np.float32:
        raise ValueError("dequantize_rows writes into a C-contiguous float32 array")
    to_float = _to_float(ggml_type)
    raw = np.ascontiguousarray(raw)
    floats = ctypes.POINTER(ctypes.c_float)

    def run(start: int, stop: int) -> None:
        to_float(raw[start:stop].ctypes.data, out[start:stop].ctypes.data_as(floats), (stop - start) * out.shape[1])

    bounds = np.linspace(0, len(raw), min(threads, len(raw)) + 1, dtype=int)
    with ThreadPoolExecutor(len(bounds) - 1) as pool:
        list(pool.map(run, bounds[:-1], bounds[1:]))
    return out


def row_bytes(ggml_type: int, columns: int) -> int:
    return _library().ggml_row_size(ggml_type, columns)


def quantize_rows(ggml_type: int, rows: np.ndarray, importance: np.ndarray | None = None,
                  threads: int = 2) -> np.ndarray:
    """float32 rows [n, columns] -> their ggml blocks as bytes [n, row_bytes], split over `threads`
    (ctypes releases the GIL while ggml runs)."""
    library = _library()
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    count, columns = rows.shape
    width = row_bytes(ggml_type, columns)
    out = np.empty((count, width), np.uint8)
    library.ggml_quantize_init(ggml_type)
    weights = None if importance is None else np.ascontiguousarray(importance, np.float32)
    floats = ctypes.POINTER(ctypes.c_float)
    imatrix = weights.ctypes.data_as(floats) if weights is not None else None

    def run(start: int, stop: int) -> int:
        source = rows[start:stop]
        return library.ggml_quantize_chunk(ggml_type, source.ctypes.data_as(floats), out[start:stop].ctypes.data, 0,
                                           stop - start, columns, imatrix)

    bounds = np.linspace(0, count, min(threads, count) + 1, dtype=int)
    with ThreadPoolExecutor(len(bounds) - 1) as pool:
        written = sum(pool.map(run, bounds[:-1], bounds[1:]))
    if written != out.nbytes:
        raise MoeExportError(f"ggml quantized {written} bytes where {out.nbytes} were expected")
    return out
