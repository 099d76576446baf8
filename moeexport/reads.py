"""How many bytes of the model's files a run reads, and how fast the disk under them reads.

Every reader of the model's weights adds what it read to one counter, where it
reads: the safetensors stream (moeexport.streaming), the in-memory loader
(moeexport.modelio), the GGUF reader (backends/gguf/reader.py) and the content
fingerprint (moeexport.fingerprint). A build's stages take the counter's
difference (moeexport.pipeline), so report.json says what each stage read and
at what speed, against the disk's sequential speed measured by `disk_read_speed`.
Torch-free.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from pathlib import Path

PROBE_BYTES = 256 * 2**20  # the disk's speed is measured on at most this much of a file
PROBE_SECONDS = 1.0  # and for at most this long
PROBE_CHUNK = 8 * 2**20  # bytes per read: large sequential reads, as the readers' tensors are
# the range dropped from the page cache is rounded up to this: the kernel keeps a large folio (up to 2 MiB on
# x86-64) that the range covers only in part
DROP_ALIGNMENT = 2 * 2**20

_lock = threading.Lock()
_read = 0


def count(nbytes: int) -> None:
    """Add `nbytes` read from the model's files."""
    global _read
    with _lock:
        _read += int(nbytes)


def total() -> int:
    """Bytes of the model's files read by this process so far (a stage's read: the difference)."""
    return _read


def disk_read_speed(path: str | Path) -> dict:
    """The sequential read speed of the disk holding `path`: its first PROBE_BYTES read in PROBE_CHUNK reads for
    at most PROBE_SECONDS, after their pages were dropped from the page cache (posix_fadvise DONTNEED). Where
    pages stay cached (mapped by another process, a tmpfs), the speed is the cache's, not the disk's: `cache` is
    "cached" then, with the share of the pages that stayed; "dropped" when none did; "unknown" where the system
    cannot tell. The pages read stay cached: the run reads them next anyway."""
    path = Path(path)
    length = min(path.stat().st_size, PROBE_BYTES)
    with path.open("rb", buffering=0) as handle:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(handle.fileno(), 0, -(-length // DROP_ALIGNMENT) * DROP_ALIGNMENT, os.POSIX_FADV_DONTNEED)
        resident = _resident_share(handle.fileno(), length)
        buffer = memoryview(bytearray(PROBE_CHUNK))
        done, started = 0, time.perf_counter()
        while done < length and time.perf_counter() - started < PROBE_SECONDS:
            got = handle.readinto(buffer[:min(PROBE_CHUNK, length - done)])
            if not got:
                break
            done += got
        seconds = time.perf_counter() - started
    cache = "unknown" if resident is None else "cached" if resident > 0 else "dropped"
    return {"file": str(path), "bytes": done, "seconds": seconds,
            "bytes_per_s": done / seconds if seconds > 0 else None, "cache": cache, "resident_share": resident}


def _resident_share(fd: int, length: int) -> float | None:
    """The share of the first `length` bytes' pages that are in the page cache (mincore on a mapping of
    them), None where the system cannot say (no libc mincore)."""
    if length == 0:
        return 0.0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    address = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        return None
    try:
        pages = -(-length // mmap.PAGESIZE)
        vector = (ctypes.c_ubyte * pages)()
        if libc.mincore(address, length, vector) != 0:
            return None
        return sum(byte & 1 for byte in vector) / pages
    finally:
        libc.munmap(address, length)
