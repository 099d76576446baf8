"""llama.cpp's importance-matrix files, read and written (gguf-py and numpy only: no torch).

llama.cpp's `llama-imatrix` writes them and `llama-quantize --imatrix FILE` reads them, in two layouts:

- GGUF (current): key general.type "imatrix"; imatrix.datasets (array of strings), imatrix.chunk_count and
  imatrix.chunk_size (uint32; llama-quantize refuses a GGUF imatrix that lacks any of the three). For every
  weight matrix W, two F32 tensors: `W.in_sum2` [matrices, width], the sums of the squared inputs W read (one
  row per expert of an expert stack, one row otherwise), and `W.counts` [matrices, 1], the tokens each row
  summed. An expert that saw no tokens is written with zero sums and count 0; llama-quantize then weighs its
  columns uniformly (by 1).
- legacy `.dat`: int32 entry count; per entry int32 name length, the name, int32 calls, int32 value count and
  the float32 values, each a mean squared input times the calls (an unexercised expert's values: 1 times the
  calls); then, optionally, int32 chunk count, int32 length and one dataset name. Read only.

An `Imatrix` holds either as sums and counts per GGUF tensor name; the GGUF writer (writer.py) turns them into
each tensor's importance, as it does for the moments it measures itself.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moeexport.errors import MoeExportError

SUMS, COUNTS = ".in_sum2", ".counts"
TYPE_KEY, DATASETS_KEY, CHUNK_COUNT_KEY, CHUNK_SIZE_KEY = (
    "general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")
FILE_NAME = "imatrix.gguf"  # written beside a GGUF artifact whose build measured one


@dataclass
class ImatrixEntry:
    """One weight matrix's statistics: `sums` [rows * width] and `counts` [rows] (float64), row r summed over
    counts[r] tokens; a legacy file's entry has one count for all its rows."""

    sums: np.ndarray
    counts: np.ndarray

    def rows(self, experts: int) -> tuple[np.ndarray, np.ndarray]:
        """(sums [experts, width], counts [experts]): one count for several rows stands for each of them."""
        counts = np.full(experts, self.counts[0]) if len(self.counts) == 1 else self.counts
        return self.sums.reshape(experts, -1), counts


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry]  # GGUF tensor name ("blk.0.ffn_down_exps.weight") -> its statistics
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False  # read from a .dat file
    path: Path | None = None  # the file it was read from


def write(path: Path, imatrix: Imatrix) -> None:
    """`imatrix` in llama.cpp's GGUF layout, tensors in name order as llama-imatrix writes them."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="")
    writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # an imatrix, as llama.cpp writes it, names none
    writer.add_string(TYPE_KEY, "imatrix")
    # llama-quantize needs the key, and gguf-py writes no empty array: an unnamed calibration set is named so
    writer.add_array(DATASETS_KEY, imatrix.datasets or ["(calibration set not named)"])
    writer.add_uint32(CHUNK_COUNT_KEY, imatrix.chunk_count)
    writer.add_uint32(CHUNK_SIZE_KEY, imatrix.chunk_size)
    for name in sorted(imatrix.entries):
        entry = imatrix.entries[name]
        rows = len(entry.counts)
        writer.add_tensor(name + SUMS, entry.sums.reshape(rows, -1).astype(np.float32))
        writer.add_tensor(name + COUNTS, entry.counts.reshape(rows, 1).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read(path: str | Path) -> Imatrix:
    """Either layout (GGUF first, as llama.cpp tries it); a file that is neither: MoeExportError naming it."""
    path = Path(path)
    if not path.is_file():
        raise MoeExportError(f"--imatrix {path}: no such file (give llama-imatrix's output, or --imatrix alone to "
                             "measure one)")
    with path.open("rb") as file:
        is_gguf = file.read(4) == b"GGUF"
    imatrix = _read_gguf(path) if is_gguf else _read_legacy(path)
    if not imatrix.entries:
        raise MoeExportError(f"--imatrix {path}: the file holds no importance matrix entries")
    imatrix.path = path
    return imatrix


def _read_gguf(path: Path) -> Imatrix:
    import gguf

    from moeexport.backends.gguf.checks import prescan

    prescan(path)  # every count bounded, before gguf-py expands a file from anyone
    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:  # gguf-py raises bare ValueErrors and struct errors on a damaged file
        raise MoeExportError(f"--imatrix {path}: not a readable GGUF file ({error})") from None
    keys = {key: reader.get_field(key) for key in (DATASETS_KEY, CHUNK_COUNT_KEY, CHUNK_SIZE_KEY)}
    missing = [key for key, value in keys.items() if value is None]
    if missing:
        raise MoeExportError(f"--imatrix {path}: a GGUF importance matrix needs {', '.join(missing)} (llama-quantize "
                             "refuses it too): is this a model file? Give llama-imatrix's output")
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    entries = {}
    for name in sorted({n.removesuffix(SUMS) for n in tensors if n.endswith(SUMS)}
                       | {n.removesuffix(COUNTS) for n in tensors if n.endswith(COUNTS)}):
        sums, counts = tensors.get(name + SUMS), tensors.get(name + COUNTS)
        if sums is None or counts is None:
            raise MoeExportError(f"--imatrix {path}: {name} has {SUMS if counts is None else COUNTS} but not "
                                 f"{COUNTS if counts is None else SUMS}; regenerate the file with llama-imatrix")
        if any(t.tensor_type != gguf.GGMLQuantizationType.F32 for t in (sums, counts)):
            raise MoeExportError(f"--imatrix {path}: {name}'s sums and counts must be F32")
        entries[name] = ImatrixEntry(np.asarray(sums.data, np.float64).reshape(-1),
                                     np.rint(np.asarray(counts.data, np.float64).reshape(-1)))
    return Imatrix(entries, [str(v) for v in keys[DATASETS_KEY].contents()], int(keys[CHUNK_COUNT_KEY].contents()),
                   int(keys[CHUNK_SIZE_KEY].contents()))


def _read_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    offset = 0

    def take(fmt: str):
        nonlocal offset
        size = struct.calcsize(fmt)
        if offset + size > len(data):
            raise MoeExportError(f"--imatrix {path}: neither a GGUF nor a complete legacy .dat importance matrix "
                                 f"(it ends at byte {len(data)}); give llama-imatrix's output")
        values = struct.unpack_from(fmt, data, offset)
        offset += size
        return values

    (count,) = take("<i")
    if count < 1:
        raise MoeExportError(f"--imatrix {path}: neither a GGUF nor a legacy .dat importance matrix (no entries); "
                             "give llama-imatrix's output")
    entries = {}
    for _ in range(count):
        (length,) = take("<i")
        name = take(f"<{max(length, 0)}s")[0].decode("utf-8", "replace")
        calls, values = take("<ii")
        if values < 1:
            raise MoeExportError(f"--imatrix {path}: entry {name!r} has {values} values")
        sums = np.array(take(f"<{values}f"), np.float64)
        entries[name] = ImatrixEntry(sums, np.array([calls], np.float64))
    chunks, datasets = 0, []
    if offset + 4 <= len(data):  # the optional trailer: chunk count, then the dataset's name
        (chunks,) = take("<i")
        if offset + 4 <= len(data):
            (length,) = take("<i")
            if length > 0:
                datasets.append(take(f"<{length}s")[0].decode("utf-8", "replace"))
    return Imatrix(entries, datasets, chunks, 0, legacy=True)
