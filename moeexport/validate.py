"""Fidelity of an artifact against the torch model it was exported from.

Every runner (torch, llama.cpp, ONNX Runtime, TensorRT, or logits recorded
earlier) has `logits(token_ids) -> [T, vocab]`, so the comparison is written
once: per predicted token, max |delta logit|, KL(reference || artifact), top-1
agreement and both perplexities. A target declares its tolerance per weight
type; `validate_artifact` is the one place an artifact is judged against it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from moeexport.errors import MoeExportError

# torch is imported where it is used: a process that only runs an artifact (backends/profile.py) never loads it


class TorchRunner:
    """The compressed torch model: the reference every artifact is checked against."""

    def __init__(self, model):
        self.model = model

    def logits(self, token_ids) -> np.ndarray:
        return self.window_logits(np.asarray(list(token_ids), dtype=np.int64)[None])[0]

    def window_logits(self, windows) -> np.ndarray:
        """[N, L, vocab] float32 logits of windows [N, L]: one at a time in memory (the numbers every earlier
        build recorded), all together when streamed (each decoder layer is read from disk once)."""
        import torch

        from moeexport import streaming

        windows = torch.as_tensor(windows, dtype=torch.long)
        if streaming.is_streamed(self.model):
            return streaming.logits(self.model, windows)
        with torch.no_grad():
            return np.stack([self.model(input_ids=window[None], use_cache=False).logits[0].float().numpy()
                             for window in windows])

    @property
    def streamed(self) -> bool:
        from moeexport import streaming

        return streaming.is_streamed(self.model)

    def logit_blocks(self, windows):
        """(first window, float32 logits [n, L, vocab] of the next few windows), covering windows [N, L]: a
        streamed model's logits a few windows at a time (moeexport.streaming.window_logits)."""
        import torch

        from moeexport import streaming

        return streaming.window_logits(self.model, torch.as_tensor(windows, dtype=torch.long))

    def generate(self, prompt, max_new_tokens: int, temperature: float = 0.0, seed: int = 0) -> list[int]:
        """New token ids after `prompt`: greedy at temperature 0, else sampled from softmax(logits / T)."""
        import torch

        from moeexport import streaming

        if streaming.is_streamed(self.model):
            raise MoeExportError("a streamed model (read from disk a layer at a time) does not generate; "
                                 "generate with the exported artifact")
        ids = torch.as_tensor(list(prompt), dtype=torch.long)[None]
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature else {}
        with torch.no_grad():
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens, do_sample=bool(temperature), pad_token_id=0, **sampling,
            )
        return out[0, ids.shape[1]:].tolist()

    def profile(self, prompt, new_tokens: int = 64) -> dict:
        """Prefill and greedy-decode speed through transformers' KV cache, timed as the other runners time
        themselves (a warm-up first, then the prompt, then `new_tokens` one-token steps)."""
        import torch

        from moeexport.backends.decoding import speed_report

        prompt = [int(t) for t in prompt]
        self.generate(prompt[: min(len(prompt), 8)], 2)  # warm-up: lazy initialisation is paid once
        with torch.no_grad():
            started = time.perf_counter()
            step = self.model(input_ids=torch.tensor([prompt]), use_cache=True)
            prefill = time.perf_counter() - started
            started = time.perf_counter()
            for _ in range(new_tokens):
                token = step.logits[0, -1].argmax().view(1, 1)
                step = self.model(input_ids=token, cache=step.cache, use_cache=True)
            decode = time.perf_counter() - started
        return speed_report(len(prompt), prefill, new_tokens, decode)


def bytes_per_token(model):
    """The weight bytes the torch model reads to decode one token (a backends.decoding.TokenBytes), at its
    parameters' dtype: k / E of each routed expert stack (k the layer's top-k, E the stack's outer axis), one
    row of the token embedding, and everything else (attention, norms, routers, shared experts, dense MLPs,
    the head) whole. Shapes and dtypes only: a model on the meta device (moeexport.modelio.load_streamed's)
    will do."""
    from moeexport.adapters import adapter_for
    from moeexport.backends.decoding import TokenBytes, experts_read

    def stored(parameter) -> int:
        return parameter.numel() * parameter.element_size()

    adapter = adapter_for(model.config)
    routed, seen, pairs = 0, set(), set()
    for view in adapter.layer_views(model):
        for parameter in view.experts.parameters() if view.experts is not None else ():
            count = parameter.shape[0]
            k = min(view.top_k, count)
            routed += stored(parameter) * k // count
            seen.add(id(parameter))
            pairs.add((k, count))
    around = adapter.model_view(model)
    embedding, head = around.embeddings.weight, around.output.weight
    seen |= {id(embedding), id(head)}
    other = sum(stored(parameter) for parameter in model.parameters() if id(parameter) not in seen)
    return TokenBytes(routed_experts=routed, head=stored(head), lookups=stored(embedding) // embedding.shape[0],
                      other=other, experts_read=experts_read(pairs), embedding_rows=embedding.shape[0])


def perplexity(total_nll: float, tokens: int) -> float:
    """exp(mean negative log-likelihood); inf, not OverflowError, for a damaged artifact's huge logits."""
    mean = total_nll / tokens
    return math.exp(mean) if mean < 700 else math.inf


@dataclass(frozen=True)
class Tolerance:
    max_abs_logit: float | None = None
    kl: float | None = None
    top1_agreement: float | None = None


@dataclass
class Fidelity:
    tokens: int
    max_abs_logit: float
    kl: float  # mean KL(reference || artifact), nats per token
    top1_agreement: float
    reference_perplexity: float
    perplexity: float

    def to_dict(self) -> dict:
        return asdict(self)

    def failures(self, tolerance: Tolerance) -> list[str]:
        """Human-readable reasons this fidelity misses the tolerance (empty when it passes)."""
        failed = []
        if tolerance.max_abs_logit is not None and self.max_abs_logit > tolerance.max_abs_logit:
            failed.append(f"max |delta logit| {self.max_abs_logit:.3g} > {tolerance.max_abs_logit:g}")
        if tolerance.kl is not None and self.kl > tolerance.kl:
            failed.append(f"KL {self.kl:.3g} > {tolerance.kl:g}")
        if tolerance.top1_agreement is not None and self.top1_agreement < tolerance.top1_agreement:
            failed.append(f"top-1 agreement {self.top1_agreement:.2%} < {tolerance.top1_agreement:.2%}")
        return failed


POSITIONS_PER_BLOCK = 64
LOGITS_PER_BLOCK = 2**22  # ... and fewer where the vocabulary is larger than 65536 (float64 temporaries of this many)


def compare(reference, artifact, windows, progress=None) -> Fidelity:
    """Run both runners on every window [N, L] and compare their next-token distributions."""
    import torch

    max_abs = kl = 0.0
    agree = count = 0
    reference_nll = artifact_nll = 0.0
    task = progress.add_task("validating", total=len(windows)) if progress else None
    for window in windows.tolist():
        expected_logits, actual_logits = reference.logits(window), artifact.logits(window)
        # a block of positions at a time: float64 temporaries of a whole window over a large vocabulary add
        # up to half a GB (a block's sums are in the same order whatever the vocabulary up to 65536)
        positions = max(1, min(POSITIONS_PER_BLOCK, LOGITS_PER_BLOCK // expected_logits.shape[-1]))
        for start in range(0, len(window) - 1, positions):
            stop = min(start + positions, len(window) - 1)
            expected = torch.from_numpy(np.asarray(expected_logits[start:stop])).double()
            actual = torch.from_numpy(np.asarray(actual_logits[start:stop])).double()
            targets = torch.tensor(window[start + 1:stop + 1])
            difference = (expected - actual).abs().max().item()
            max_abs = max(max_abs, difference if math.isfinite(difference) else math.inf)  # NaN must fail
            agree += (expected.argmax(-1) == actual.argmax(-1)).sum().item()
            expected_log = expected.log_softmax(-1)
            del expected  # only the log-probabilities are needed from here: fewer block-sized temporaries at once
            actual_log = actual.log_softmax(-1)
            del actual
            kl += (expected_log.exp() * (expected_log - actual_log)).sum().item()
            reference_nll -= expected_log.gather(1, targets[:, None]).sum().item()
            artifact_nll -= actual_log.gather(1, targets[:, None]).sum().item()
            count += len(targets)
        if progress:
            progress.advance(task)
    return Fidelity(
        tokens=count,
        max_abs_logit=max_abs,
        kl=kl / count,
        top1_agreement=agree / count,
        reference_perplexity=perplexity(reference_nll, count),
        perplexity=perplexity(artifact_nll, count),
    )


class RecordedReference:
    """A runner whose logits were recorded earlier (the torch model's, or a bundle's): looked up by exact window."""

    def __init__(self, windows: np.ndarray, logits: np.ndarray, text: str = ""):
        if windows.ndim != 2 or logits.shape[:2] != windows.shape:
            raise MoeExportError(f"reference logits {logits.shape} do not match the windows {windows.shape}")
        self.windows, self.recorded, self.text = windows, logits, text  # text: where the windows came from
        self._index = {windows[i].astype(np.int64).tobytes(): i for i in range(len(windows))}

    @classmethod
    def record(cls, runner, windows, text: str = "") -> "RecordedReference":
        """Run `runner` (e.g. TorchRunner) once on every window and keep its float32 logits: a streamed torch
        model's in a temporary file, written a few windows at a time (see `spilled`), never all in memory."""
        windows = np.asarray(windows.tolist() if hasattr(windows, "tolist") else windows, dtype=np.int64)
        if getattr(runner, "streamed", False):
            return _SpilledReference.written(windows, runner.logit_blocks(windows), text)
        if hasattr(runner, "window_logits"):
            logits = runner.window_logits(windows).astype(np.float32, copy=False)  # no second copy
        else:
            logits = np.stack([runner.logits(window) for window in windows.tolist()]).astype(np.float32)
        return cls(windows, logits, text)

    def spilled(self) -> "RecordedReference":
        """The same logits kept in a temporary file, mapped: they take no memory until they are read (a
        streamed run keeps the original's while it compresses). The file goes when the object does."""
        return _SpilledReference.written(self.windows, [(0, self.recorded)], self.text)

    def logits(self, token_ids) -> np.ndarray:
        key = np.asarray(list(token_ids), dtype=np.int64).tobytes()
        if key not in self._index:
            raise MoeExportError("no recorded reference logits for this token window")
        return self._window(self._index[key])

    def _window(self, index: int) -> np.ndarray:
        return self.recorded[index]


def write_logit_blocks(path: str | Path, windows: int, blocks) -> None:
    """The logits of `windows` windows as a .npy file [windows, L, vocab] float32, from `blocks`: (first window,
    logits [n, L, vocab]) in order, each appended as it comes (so only one block is ever in memory)."""
    with open(path, "wb") as handle:
        for start, block in blocks:
            block = np.ascontiguousarray(block, dtype=np.float32)
            if start == 0:
                np.lib.format.write_array_header_1_0(handle, {
                    "descr": np.lib.format.dtype_to_descr(block.dtype), "fortran_order": False,
                    "shape": (windows, *block.shape[1:])})
            block.tofile(handle)


def spilled_reference(windows: np.ndarray, fill, text: str = "") -> RecordedReference:
    """A RecordedReference of the logits of `windows` [N, L] that `fill(path)` writes to a .npy file (e.g. by
    write_logit_blocks, in another process), read back a window at a time; the file goes with the object."""
    return _SpilledReference.filled(windows, fill, text)


class _SpilledReference(RecordedReference):
    """Recorded logits in a file: each window's are read from it when asked for, so only that window is in this
    process's resident memory."""

    def __init__(self, windows: np.ndarray, path: str, text: str = ""):
        super().__init__(windows, np.load(path, mmap_mode="r"), text)
        self.path = path

    @classmethod
    def filled(cls, windows: np.ndarray, fill, text: str = "") -> "_SpilledReference":
        """The logits of `windows` [N, L] that `fill(path)` writes as a .npy file (write_logit_blocks) into a
        temporary directory, which goes when the object does."""
        import shutil
        import tempfile
        import weakref

        directory = tempfile.mkdtemp(prefix="moeexport-logits-")
        path = f"{directory}/logits.npy"
        try:
            fill(path)
            spilled = cls(windows, path, text)
        except BaseException:
            shutil.rmtree(directory, True)
            raise
        weakref.finalize(spilled, shutil.rmtree, directory, True)
        return spilled

    @classmethod
    def written(cls, windows: np.ndarray, blocks, text: str = "") -> "_SpilledReference":
        """The logits of `windows` [N, L] from `blocks` (write_logit_blocks') in a temporary file."""
        return cls.filled(windows, lambda path: write_logit_blocks(path, len(windows), blocks), text)

    def spilled(self) -> "_SpilledReference":
        return self

    def _window(self, index: int) -> np.ndarray:
        """Read from the file, not through a mapping: a mapping's pages would count in this process's RSS
        until it closes (the window's size twice over, with the copy)."""
        window = self.recorded[index]  # where it lies (no page of it is touched)
        with open(self.path, "rb") as handle:
            handle.seek(self.recorded.offset + index * window.nbytes)
            return np.fromfile(handle, dtype=window.dtype, count=window.size).reshape(window.shape)


@dataclass
class Validation:
    """An artifact judged against its tolerance; a failed one has been moved aside to `artifact`."""

    text: str  # where the windows came from
    runtime: str  # what ran the artifact
    fidelity: Fidelity
    tolerance: Tolerance
    failures: list[str]
    artifact: Path

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {"text": self.text, "runtime": self.runtime, **self.fidelity.to_dict(),
                "tolerance": asdict(self.tolerance), "failures": self.failures, "artifact": str(self.artifact)}


def set_aside(path: Path) -> Path:
    """Rename a failed artifact to PATH.failed, so nothing loads it under its real name."""
    failed = path.with_name(path.name + ".failed")
    return path.rename(failed)


def validate_artifact(reference, runner, windows, tolerance: Tolerance, artifact: Path, text: str = "",
                      runtime: str = "", progress=None, set_aside_failed: bool = True) -> Validation:
    """Compare `runner` with `reference` on `windows` [N, L]; an artifact that misses `tolerance` is set aside."""
    import torch

    windows = torch.as_tensor(np.asarray(windows.tolist() if hasattr(windows, "tolist") else windows))
    fidelity = compare(reference, runner, windows, progress)
    failures = fidelity.failures(tolerance)
    if failures and set_aside_failed:
        artifact = set_aside(Path(artifact))
    return Validation(text, runtime, fidelity, tolerance, failures, Path(artifact))
