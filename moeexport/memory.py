"""The memory bound of a run (`--max-memory`): what a model needs whole or streamed, and the choice between them.

Estimates come from the checkpoint's safetensors headers alone (no weight is
read, nothing heavy is imported), so a model that cannot fit is refused at once,
before any work. The constants are measured on this project's builds, not guessed:
RUNTIME is the resident size of a process that has imported torch, transformers,
llama.cpp and ONNX Runtime; IN_MEMORY_FACTOR is an in-memory build's peak RSS
over its float32 weight bytes (8x7B widths, one layer: 14.1 GB for 6.9 GB).
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from moeexport.adapters import supported_families
from moeexport.checkpoint_files import is_gguf, read_headers, read_manifest, resolve_model_dir, weight_files
from moeexport.mxfp4 import unpacked_headers
from moeexport.errors import MoeExportError

GIB = 2**30
RUNTIME = int(0.8 * GIB)
IN_MEMORY_FACTOR = 2.1
DEFAULT_FRACTION = 0.75  # of the memory available when the run starts
MAX_GRAM_BYTES = 4 * GIB  # the largest least-squares system Expert Drop's rebuild solves (passes/repair.py)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# a streamed run never holds the embeddings, the head or all the recorded logits whole (moeexport.streaming):
OUTER_ROWS = 4096  # rows of the embeddings or head read at once (by the head, the GGUF writer and the saver)
LOGIT_POSITIONS = 256  # positions whose float32 logits are computed at once; validation holds two windows'
_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}  # safetensors' names -> torch's
_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9, "T": 10**12,
          "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
# how checkpoint tensor names number decoder layers and routed experts, as the families declare it
_TENSOR_NAMES = sorted({family.tensor_names for family in supported_families().values()}, key=repr)


def parse_size(text: str) -> int:
    """'24GB', '3.5GiB', '800MB' -> bytes (decimal units for GB/MB, binary for GiB/MiB)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise MoeExportError(f"--max-memory {text!r} is not a size: write it like 16GB, 3.5GiB or 800MB")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size < 1:  # 0.5 (bytes) would be 0, which reads as "no --max-memory given"
        raise MoeExportError(f"--max-memory {text!r} is less than a byte: write it like 16GB, 3.5GiB or 800MB")
    return size


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), else physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget() -> int:
    return int(available_memory() * DEFAULT_FRACTION)


@dataclass(frozen=True)
class Workload:
    """What a run holds besides weights: activations of the calibration set and recorded logits."""

    calibration_tokens: int = 0
    block_window: int = 8  # observers keep this many earlier layers' inputs (Block Drop scores)
    logit_positions: int = 0  # positions whose logits are recorded (quality + validation windows)
    moment_values: int = 0  # float64 input moments held for the whole run (moment_values: an importance matrix)
    gram_values: int = 0  # float32 values of one expert's Gram matrices and their solver's (gram_values: GPTQ)
    refits: tuple[str, ...] = ()  # what each `repair: refit` solves for (refit_bytes)
    residuals_held: int = 0  # further copies of the calibration set's hidden states held (a refit's targets)
    spilled_experts: float = 0  # float32 copies of the routed experts the passes spill when streamed (spill_bytes)


@dataclass(frozen=True)
class MemoryPlan:
    budget: int
    streamed: bool
    dtype: str  # what the weights are computed in
    parameters: int
    in_memory_bytes: int  # estimated peak, whole model in float32
    streamed_bytes: int  # estimated peak, one layer at a time in `dtype`
    largest_layer: int
    largest_layer_parameters: int  # besides its routed experts (read one at a time)
    outer_parameters: int  # embeddings, final norm, head
    spill_bytes: int = 0  # streamed: what the passes write to `spill_dir` at most (spill_bytes)
    spill_dir: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        how = (f"streamed, one decoder layer at a time in {self.dtype} (about {self.streamed_bytes / GIB:.1f} GiB)"
               if self.streamed else f"whole in memory (about {self.in_memory_bytes / GIB:.1f} GiB)")
        count = f"{self.parameters / 1e9:.2f} B" if self.parameters >= 1e8 else f"{self.parameters / 1e6:.1f} M"
        spilled = f", and up to {self.spill_bytes / 1e9:.1f} GB on disk in {self.spill_dir}" if self.spill_bytes else ""
        return f"{count} parameters, {how}, within --max-memory {self.budget / GIB:.1f} GiB{spilled}"


@dataclass(frozen=True)
class LayerSize:
    """Parameters of one decoder layer: what is read with it, and its largest routed expert (read alone)."""

    resident: int  # attention, norms, router, shared experts
    expert: int


def checkpoint_sizes(headers: dict) -> tuple[dict[int, LayerSize], int]:
    """(per decoder layer its LayerSize, parameters outside the layers) from tensor headers (name -> (shape, ...)).

    Routed experts are the tensors named `...experts.N....` (the hub's layout) or 3-D `...experts.*` stacks
    (the model's own): a streamed layer reads them one expert at a time.
    """
    resident: dict[int, int] = {}
    experts: dict[tuple[int, int], int] = {}
    outer = 0
    for name, (shape, _, _) in unpacked_headers(headers, transposed=False).items():  # MXFP4 pairs as stacks
        count = math.prod(shape)
        layer = _layer_number(name)
        if layer is None:
            outer += count
            continue
        expert = _expert_number(name)
        if expert is not None:
            experts[layer, expert] = experts.get((layer, expert), 0) + count
        elif _is_expert_stack(name, shape):  # a stack [E, rows, columns]
            experts[layer, -1] = experts.get((layer, -1), 0) + count // shape[0]
        else:
            resident[layer] = resident.get(layer, 0) + count
    layers = {layer: LayerSize(resident.get(layer, 0),
                               max((count for (at, _), count in experts.items() if at == layer), default=0))
              for layer in set(resident) | {layer for layer, _ in experts}}
    return layers, outer


def stored_dtype(headers: dict) -> str:
    """The floating-point dtype most of a checkpoint's weights are stored in, from its headers."""
    stored: dict[str, int] = {}
    for shape, dtype, _ in unpacked_headers(headers, transposed=False).values():
        stored[dtype] = stored.get(dtype, 0) + math.prod(shape)
    return _DTYPE_NAMES.get(max(stored, key=stored.get), "float32") if stored else "float32"


def plan(headers: dict, hidden_size: int, vocab_size: int, budget: int, workload: Workload,
         stream: bool | None = None, dtype: str = "auto", storage_dtype: str | None = None) -> MemoryPlan:
    """Choose in-memory or streamed and the compute dtype, or refuse (MoeExportError) when neither fits `budget`.

    `stream` None: in memory when the whole model fits, else streamed. `dtype` "auto":
    float32 when it fits, else the checkpoint's own storage dtype (bf16 weights computed
    in bf16, accumulating in float32 inside the matrix products); `storage_dtype` None: read
    from the headers.
    """
    storage_dtype = storage_dtype or stored_dtype(headers)
    per_layer, outer = checkpoint_sizes(headers)
    block = _outer_block(headers)
    total = outer + sum(size.resident for size in per_layer.values()) + _expert_total(headers)
    layer, size = _largest(per_layer) if per_layer else (0, LayerSize(0, 0))
    in_memory = RUNTIME + int(total * DTYPE_BYTES["float32"] * IN_MEMORY_FACTOR)

    def streamed_parts(compute: str) -> tuple[int, int, int]:
        """(weights and runtime, activations and logits, what the passes hold: moments and solvers)."""
        copies = workload.block_window + 3 + workload.residuals_held
        activations = workload.calibration_tokens * hidden_size * DTYPE_BYTES[compute] * copies
        logits = min(workload.logit_positions, 2 * LOGIT_POSITIONS) * vocab_size * 4
        # passes run one after the other: one's Gram matrices or refit at a time, beside the moments
        solving = max([workload.gram_values * 4] + [refit_bytes(headers, kind, hidden_size,
                                                                 workload.calibration_tokens, compute)
                                                    for kind in workload.refits])
        return _streamed_bytes(size, block, compute), activations + logits, workload.moment_values * 8 + solving

    def streamed_peak(compute: str) -> int:
        return sum(streamed_parts(compute))

    streamed = stream if stream is not None else in_memory > budget
    candidates = [dtype] if dtype != "auto" else (["float32"] if storage_dtype == "float32" or not streamed
                                                  else ["float32", storage_dtype])
    if not streamed:
        chosen = "float32" if dtype == "auto" else dtype
        return MemoryPlan(budget, False, chosen, total, in_memory, streamed_peak(chosen), layer, size.resident, outer)
    for compute in candidates:
        if streamed_peak(compute) <= budget:
            spill = spill_bytes(headers, hidden_size, workload, compute)
            return MemoryPlan(budget, True, compute, total, in_memory, streamed_peak(compute), layer, size.resident,
                              outer, spill, _spill_room(spill))
    compute = candidates[-1]
    _, activations, solving = streamed_parts(compute)
    raise MoeExportError(_does_not_fit(budget, streamed_peak(compute), layer, size, compute, activations, solving))


def moment_values(headers: dict, hidden_size: int) -> int:
    """How many values every weight matrix's input moments hold (calibration.moments, a slimming pass's per-expert
    input norms): one vector of its input width per matrix of each decoder layer and per expert (gate and up
    counted apart, a bound), and the head's."""
    matrices = unpacked_headers(headers, transposed=False).items()
    return hidden_size + sum(math.prod(shape[:-2]) * shape[-1] for name, (shape, _, _) in matrices
                             if len(shape) >= 2 and _layer_number(name) is not None)


def gram_values(headers: dict, act_order: bool = False) -> int:
    """Float32 values a streamed GPTQ or SparseGPT holds at once for one expert (a bound): the Gram matrices of
    its inputs (hidden and intermediate width squared; the solver's factor is computed in the widest's place,
    passes/slimming.inverse_hessian_factor, or beside it when GPTQ's act_order permutes it), and three copies
    of its largest matrix (in float32 as read, the solver's working copy or the new matrix, and the codes)."""
    shapes = [shape[-2:] for name, (shape, _, _) in unpacked_headers(headers, transposed=False).items()
              if _layer_number(name) is not None and (_expert_number(name) is not None or _is_expert_stack(name, shape))]
    if not shapes:
        return 0
    widths = {width for _, width in shapes}
    return (sum(width**2 for width in widths) + (max(widths) ** 2 if act_order else 0)
            + 3 * max(rows * width for rows, width in shapes))


def spill_bytes(headers: dict, hidden_size: int, workload: Workload, compute: str) -> int:
    """Bytes a streamed run's passes write to the temporary directory at most (streaming.SpilledTensors), a bound:
    the routed experts they compute in float32 (`workload.spilled_experts` copies: GPTQ's, SparseGPT's, Expert
    Drop's rebuild's), each decoder layer's resident weights in float32 for an attention refit (its output
    projection is less), and the calibration set's hidden states at every layer for a refit's targets."""
    per_layer, _ = checkpoint_sizes(headers)
    experts = int(_expert_total(headers) * 4 * workload.spilled_experts)
    projections = sum(size.resident for size in per_layer.values()) * 4 if "attention" in workload.refits else 0
    targets = workload.calibration_tokens * hidden_size * DTYPE_BYTES[compute] * len(per_layer) if workload.refits else 0
    return experts + projections + targets


def _spill_room(spill: int) -> str:
    """The temporary directory the passes spill to, after making sure `spill` bytes fit there."""
    directory = tempfile.gettempdir()
    free = shutil.disk_usage(directory).free
    if spill > free:
        raise MoeExportError(f"the passes write up to {spill / 1e9:.1f} GB to {directory} while streaming, and it has "
                             f"{free / 1e9:.1f} GB free: set TMPDIR to a directory on a disk with room")
    return directory


def rebuild_system_bytes(num_experts: int, kept: int, ffn: int) -> int:
    """Bytes of one layer's joint expert rebuild system (passes/repair.py): a float64 Gram over its candidate
    neurons, kept x (dropped + 1) x ffn, and its forward selection's basis of kept x ffn of them."""
    candidates = kept * (num_experts - kept + 1) * ffn
    return 8 * candidates * (candidates + kept * ffn)


def refit_bytes(headers: dict, solves_for: str, hidden_size: int, tokens: int, compute: str) -> int:
    """What a `repair: refit` on `tokens` calibration tokens holds at once (a bound). For "attention" (Block,
    Layer Drop): the float64 Gram matrix of an output projection's inputs, the right-hand side, the original
    weights and the solver's system, four squares of the widest input of a decoder layer's matrices. For
    "experts" (Expert Drop's rebuild), over every layer and every number of experts it may keep: a joint system
    that fits MAX_GRAM_BYTES with a float32 and a `compute` copy of the layer's experts; else the per-expert
    rebuild's: an expert read and the gate and up rows it chooses in `compute`, the chosen down rows before and
    after in float32, four float32 intermediates of its tokens and four copies of the layer's inputs."""
    if solves_for == "attention":
        widths = [shape[-1] for name, (shape, _, _) in headers.items()
                  if len(shape) == 2 and _layer_number(name) is not None and _expert_number(name) is None]
        return 4 * max(widths, default=0) ** 2 * 8
    width, largest = DTYPE_BYTES[compute], 0
    for count, parameters in _experts_per_layer(headers).values():
        ffn = parameters // max(3 * count * hidden_size, 1)
        per_expert = (parameters // count * width + 2 * ffn * hidden_size * (width + 4)
                      + 4 * tokens * (ffn + hidden_size) * 4)
        for kept in range(1, count):
            joint = rebuild_system_bytes(count, kept, ffn)
            largest = max(largest, joint + parameters * (4 + width) if joint <= MAX_GRAM_BYTES else per_expert)
    return largest


def _outer_block(headers: dict) -> int:
    """Elements of the embeddings or head a streamed run reads at once: OUTER_ROWS rows of the widest matrix
    outside the decoder layers."""
    widths = [shape[-1] for name, (shape, _, _) in headers.items() if len(shape) == 2 and _layer_number(name) is None]
    return OUTER_ROWS * max(widths, default=0)


def _streamed_bytes(size: LayerSize, outer_block: int, compute: str) -> int:
    """The runtime and the weights a streamed run holds at its peak in the `compute` dtype: a layer's
    resident part plus the larger of one expert's gate_up (2/3 of a SwiGLU expert) in the compute dtype and
    as stored (bf16 at most) while it is read, or an exporter's float32 copy of one of its three matrices
    with the quantizer's temporaries; or a block of `outer_block` elements of the embeddings or head, as
    stored (4 bytes at most), in the compute dtype and in float32 for a writer."""
    width = DTYPE_BYTES[compute]
    reading, exporting = size.expert * 2 // 3 * (width + 2 * 2), size.expert // 3 * 4 * 4
    return RUNTIME + max(outer_block * (4 + width + 4), size.resident * width + max(reading, exporting))


def _does_not_fit(budget: int, need: int, layer: int, size: LayerSize, compute: str, activations: int = 0,
                  solving: int = 0) -> str:
    width = DTYPE_BYTES[compute]
    held = f", {activations / GIB:.2f} GiB of activations and logits" if activations else ""
    held += f", {solving / GIB:.2f} GiB for the passes' statistics and solvers (GPTQ, repair)" if solving else ""
    fewer = " or use fewer --calib-samples" if activations > need / 10 else ""
    return (
        f"the model does not fit --max-memory {budget / GIB:.1f} GiB: even streamed one layer at a time it needs "
        f"about {need / GIB:.1f} GiB (layer {layer} holds {size.resident * width / GIB:.2f} GiB in {compute} "
        f"besides its experts, one expert {size.expert * width / GIB:.2f} GiB, embeddings and head read "
        f"{OUTER_ROWS} rows at a time{held}, the runtime {RUNTIME / GIB:.1f} GiB); raise --max-memory to "
        f"{math.ceil(need / GIB * 10) / 10:.1f}GiB or more{fewer}"
    )


def refuse_early(model: str, budget: int) -> None:
    """Refuse at once a model that cannot fit `budget` even streamed in its own storage dtype with nothing but
    the runtime besides: from the weight headers alone, before torch is imported (the command line calls
    this first). Whatever this cannot read is left to the full checks, which say what is wrong."""
    headers = _headers_if_readable(model)
    if not headers:
        return
    per_layer, _ = checkpoint_sizes(headers)
    if not per_layer:
        return
    layer, size = _largest(per_layer)
    stored = unpacked_headers(headers, transposed=False).values()
    compute = min((_DTYPE_NAMES.get(dtype, "float32") for _, dtype, _ in stored), key=DTYPE_BYTES.get)
    need = _streamed_bytes(size, _outer_block(headers), compute)
    if need > budget:
        raise MoeExportError(_does_not_fit(budget, need, layer, size, compute))


def _largest(per_layer: dict[int, LayerSize]) -> tuple[int, LayerSize]:
    return max(per_layer.items(), key=lambda item: item[1].resident + item[1].expert)


def _headers_if_readable(model: str) -> dict | None:
    """name -> (shape, dtype, file) of the weight files loading reads, chosen as loading chooses them
    (moeexport.checkpoint_files); None for a GGUF, or when anything is missing or unreadable (the full checks
    report it)."""
    try:
        model_dir = resolve_model_dir(model)
        return None if is_gguf(model_dir) else read_headers(weight_files(model_dir, read_manifest(model_dir)))
    except Exception:  # anything unreadable here is reported, by name, by the full checks
        return None


def _experts_per_layer(headers: dict) -> dict[int, tuple[int, int]]:
    """Per decoder layer with routed experts: (how many, the parameters of all of them)."""
    numbers: dict[int, set] = {}
    parameters: dict[int, int] = {}
    for name, (shape, _, _) in unpacked_headers(headers, transposed=False).items():
        layer, expert = _layer_number(name), _expert_number(name)
        if layer is not None and (expert is not None or _is_expert_stack(name, shape)):
            numbers.setdefault(layer, set()).update([expert] if expert is not None else range(shape[0]))
            parameters[layer] = parameters.get(layer, 0) + math.prod(shape)
    return {layer: (len(numbers[layer]), parameters[layer]) for layer in parameters}


def routed_experts(headers: dict) -> int:
    """The most routed experts a decoder layer has (0 without any)."""
    return max((count for count, _ in _experts_per_layer(headers).values()), default=0)


def _expert_total(headers: dict) -> int:
    return sum(parameters for _, parameters in _experts_per_layer(headers).values())


def _layer_number(name: str) -> int | None:
    return next((number for names in _TENSOR_NAMES if (number := names.layer(name)) is not None), None)


def _expert_number(name: str) -> int | None:
    return next((number for names in _TENSOR_NAMES if (number := names.expert(name)) is not None), None)


def _is_expert_stack(name: str, shape: list[int]) -> bool:
    return len(shape) == 3 and any(names.in_experts(name) for names in _TENSOR_NAMES)


def peak_resident_bytes() -> int:
    """This process's peak resident memory (VmHWM) since it started; 0 where unknown."""
    try:
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return 0


def release_freed_memory() -> None:
    """Hand memory that was freed back to the system (glibc's malloc_trim). Dequantizing makes many
    temporaries of a few MiB, which glibc keeps in its heaps after they are freed: without this, a streamed
    run's resident memory creeps up by tens of MiB per expert read (measured at 8x7B widths)."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to trim this way
            _malloc_trim = lambda pad: 0  # noqa: E731
    _malloc_trim(0)


_malloc_trim = None


def resident_bytes() -> int:
    """This process's resident memory now (0 where /proc is unavailable)."""
    try:
        import os

        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class StagePeaks:
    """The peak resident memory of each stage of a run, without resetting the kernel's high-water mark
    (which /usr/bin/time and a parent's wait4 report for the whole run): exact (VmHWM) when the stage set a
    new high, else the largest of samples taken every `interval` seconds by a background thread."""

    def __init__(self, interval: float = 0.05):
        import threading

        import weakref

        self.interval, self._current, self._stop = interval, 0, threading.Event()
        threading.Thread(target=_sample, args=(weakref.ref(self), self._stop, interval), daemon=True).start()
        weakref.finalize(self, self._stop.set)  # a run that raised stops its sampler too

    def measure(self):
        """A context measuring one stage; its `peak` attribute holds the bytes afterwards."""
        return _StagePeak(self)

    def close(self) -> None:
        self._stop.set()


def _sample(peaks_ref, stop, interval: float) -> None:
    while not stop.wait(interval):
        peaks = peaks_ref()
        if peaks is None:
            return
        peaks._current = max(peaks._current, resident_bytes())
        del peaks


class _StagePeak:
    def __init__(self, peaks: StagePeaks):
        self.peaks, self.peak = peaks, 0

    def __enter__(self):
        self.high = peak_resident_bytes()
        self.peaks._current = resident_bytes()
        return self

    def __exit__(self, *exception) -> None:
        high = peak_resident_bytes()
        self.peak = high if high > self.high else max(self.peaks._current, resident_bytes())
