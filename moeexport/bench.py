"""`bench`: artifacts side by side on this machine, each against the speed its memory bandwidth allows.

    from moeexport.bench import BenchOptions, bench
    report = bench(["out/a/model-q8_0.gguf", "out/b/model-int4.onnx"], "demo", BenchOptions(repeats=3))
    report.to_dict()                                   # what report.json and --json hold

Every artifact (a .gguf file run by llama.cpp, a .onnx file by ONNX Runtime, a checkpoint directory or
"demo" by torch eager) runs in a fresh process (backends/profile.py), so its memory numbers are its
runtime's alone, `repeats` times, interleaved across artifacts so that drift on the machine reaches all of
them alike. Each figure is the median of the runs with their min and max; speeds are also given as ratios
to the baseline's median, measured in the same run.

Decoding one token reads every weight it touches once, so it cannot run faster than the machine's memory
bandwidth divided by those bytes: the bound. Bytes per token come from each artifact's own tensors at
the types its runtime reads them: the stored ones, but an ONNX graph's f16 weights at float32, which ONNX
Runtime widens when it loads the graph (each target's `token_bytes`: `bytes_per_token` beside its runner,
backends/gguf/runner.py, backends/onnx/runner.py; moeexport/validate.py for torch). The formats bench runs
are the registry's targets whose runner loads a file alone (moeexport.backends.runnable_suffixes). The
bandwidth is measured here (`measure_bandwidth`), and the achieved fraction of the bound is the median decode
speed over it. KV-cache reads are left out: the bound is the weights'.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from moeexport.backends.profile import TORCH, profile_in_subprocess
from moeexport.errors import MoeExportError
from moeexport.events import EventStream
from moeexport.threads import default_threads, torch_threads

GIB = 2**30
FIRST_ORDINARY_TOKEN = 3  # prompt ids start past the usual <unk> <s> </s>
CONTEXT_SLACK = 16  # positions the runners get beyond prompt + new tokens


@dataclass(frozen=True)
class BenchOptions:
    repeats: int = 3  # runs of each artifact, interleaved
    prompt_tokens: int = 128
    new_tokens: int = 32  # greedy decode steps timed per run
    threads: int | None = None  # CPU threads of every runtime and of the bandwidth probe; None: the physical cores
    bandwidth_buffer: int | None = None  # bytes summed to measure bandwidth; None: max(1 GiB, 4 x last-level cache)
    bandwidth_runs: int = 5
    out: str | None = None  # a directory for report.json and report.html
    seed: int = 0  # of the prompt's token ids

    def __post_init__(self):
        for name in ("repeats", "prompt_tokens", "new_tokens", "threads", "bandwidth_runs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise MoeExportError(f"--{name.replace('_', '-')} must be at least 1")
        if self.bandwidth_buffer is not None and self.bandwidth_buffer < 2**20:
            raise MoeExportError("--bandwidth-buffer must be at least 1MiB")


@dataclass
class Spread:
    """The median of a quantity over the repeated runs, and its range."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> "Spread":
        return cls(statistics.median(values), min(values), max(values))


@dataclass
class Bandwidth:
    """This machine's memory read bandwidth: torch.sum over a float32 buffer far larger than the caches."""

    bytes_per_s: float  # median of the runs
    min_bytes_per_s: float
    max_bytes_per_s: float
    buffer_bytes: int
    threads: int
    runs: int
    last_level_cache_bytes: int | None  # None: the system does not say
    method: str = "torch.sum over a float32 buffer, after one untimed pass"


@dataclass
class ArtifactResult:
    artifact: str  # as given
    label: str  # the shortest tail of its path that tells it from the others
    format: str  # gguf | onnx | torch
    runtime: str
    file_bytes: int
    baseline: bool
    token_bytes: dict  # backends.decoding.TokenBytes.to_dict(): weight bytes one decoded token reads, by part
    prefill_tokens_per_s: Spread
    decode_tokens_per_s: Spread
    time_to_first_token_s: Spread
    peak_rss_bytes: Spread  # the process's peak (a torch process includes torch)
    runtime_rss_bytes: Spread  # what the runtime holds after decoding: weights, KV cache, arenas
    prefill_ratio: float  # median prefill speed / the baseline's
    decode_ratio: float
    bound_tokens_per_s: float  # bandwidth / token_bytes["total"]
    bound_fraction: float  # median decode speed / bound_tokens_per_s
    runs: list[dict] = field(default_factory=list)  # each run's own numbers, in order


@dataclass
class BenchReport:
    artifacts: list[ArtifactResult]
    baseline: str  # its label
    bandwidth: Bandwidth
    prompt_tokens: int
    new_tokens: int
    repeats: int
    threads: int
    machine: dict
    notes: list[str] = field(default_factory=list)
    machine_load: dict | None = None  # moeexport.machine_load.MachineLoad.to_dict(): other work beside the runs
    files: list[str] = field(default_factory=list)  # report.json and report.html, with --out
    seconds: float = 0.0

    def to_dict(self) -> dict:
        from moeexport import __version__

        return {"moeexport_version": __version__, **asdict(self)}


@dataclass(frozen=True)
class _Subject:
    """One artifact to run: what was given, the path its runner loads, and what runs it."""

    given: str = field(compare=False)  # "./a.gguf" and "a.gguf" are one artifact
    path: Path
    format: str


def bench(artifacts: list[str], baseline: str | None = None, options: BenchOptions = BenchOptions(),
          on_event=None) -> BenchReport:
    """Benchmark `artifacts` (and `baseline`, added when it is not among them; default: the first)."""
    from moeexport.pipeline import _quiet

    return _quiet(_bench)(artifacts, baseline, options, EventStream(on_event))


def _bench(given: list[str], baseline: str | None, options: BenchOptions, events: EventStream) -> BenchReport:
    started = time.perf_counter()
    subjects = _subjects(given)
    chosen = _subject(baseline) if baseline is not None else subjects[0]
    if chosen not in subjects:
        subjects.append(chosen)
    out = _checked_out(options.out)
    threads = options.threads or default_threads()
    events.stage("reading the artifacts' tensors")
    described = {subject: _describe(subject) for subject in subjects}
    vocabulary = min(token_bytes.embedding_rows for _, token_bytes, _ in described.values())
    if vocabulary <= FIRST_ORDINARY_TOKEN:
        raise MoeExportError("the artifacts' token embeddings are too small to make a prompt from")
    for subject in subjects:
        _require_context(subject, options.prompt_tokens + options.new_tokens)
    prompt = np.random.default_rng(options.seed).integers(FIRST_ORDINARY_TOKEN, vocabulary, options.prompt_tokens)
    notes = []
    bandwidth = measure_bandwidth(threads, options.bandwidth_buffer, options.bandwidth_runs, events, notes)

    runs: dict[_Subject, list[dict]] = {subject: [] for subject in subjects}
    labels = _labels(subjects)
    task = events.add_task(f"{len(subjects)} artifacts x {options.repeats} runs", total=len(subjects) * options.repeats)
    for repeat in range(options.repeats):  # interleaved: drift on the machine reaches every artifact alike
        for subject in subjects:
            events.stage(f"run {repeat + 1}/{options.repeats}: {labels[subject]}")
            runs[subject].append(profile_in_subprocess(
                subject.format, subject.path, prompt.tolist(), options.new_tokens,
                options.prompt_tokens + options.new_tokens + CONTEXT_SLACK, threads))
            events.advance(task)
    events.remove_task(task)

    base = {key: statistics.median(run[key] for run in runs[chosen])
            for key in ("prefill_tokens_per_s", "decode_tokens_per_s")}
    results = []
    for subject in subjects:
        runtime, token_bytes, file_bytes = described[subject]
        measured = {key: Spread.of([run[key] for run in runs[subject]]) for key in (
            "prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s", "peak_rss_bytes",
            "runtime_rss_bytes")}
        bound = bandwidth.bytes_per_s / token_bytes.total
        results.append(ArtifactResult(
            artifact=subject.given, label=labels[subject], format=subject.format, runtime=runtime,
            file_bytes=file_bytes, baseline=subject == chosen, token_bytes=token_bytes.to_dict(), **measured,
            prefill_ratio=measured["prefill_tokens_per_s"].median / base["prefill_tokens_per_s"],
            decode_ratio=measured["decode_tokens_per_s"].median / base["decode_tokens_per_s"],
            bound_tokens_per_s=bound, bound_fraction=measured["decode_tokens_per_s"].median / bound,
            runs=runs[subject]))
    report = BenchReport(results, labels[chosen], bandwidth, options.prompt_tokens, options.new_tokens,
                         options.repeats, threads, _machine(), notes, _machine_load(runs, threads).to_dict())
    report.seconds = time.perf_counter() - started
    if out is not None:
        _write(report, out)
    return report


def _machine_load(runs: dict, threads: int):
    """The other work beside the runs (averaged over the readings before each) and the largest spread of a speed
    over the repeats, judged together."""
    from moeexport.machine_load import judge, relative_spread, usable_cores

    every_run = [run for subject_runs in runs.values() for run in subject_runs]
    loads = [run["machine_load"]["load"] for run in every_run if "machine_load" in run]
    spreads = [relative_spread([run[key] for run in subject_runs]) for subject_runs in runs.values()
               for key in ("prefill_tokens_per_s", "decode_tokens_per_s")]
    spreads = [spread for spread in spreads if spread is not None]
    return judge(statistics.fmean(loads) if loads else 0.0, usable_cores(), threads, max(spreads, default=None))


# --- the artifacts ----------------------------------------------------------------------


def _subjects(given: list[str]) -> list[_Subject]:
    if not given:
        raise MoeExportError("name at least one artifact to benchmark")
    subjects = []
    for item in given:
        subject = _subject(item)
        if subject in subjects:
            raise MoeExportError(f"{item} is given twice")
        subjects.append(subject)
    return subjects


def _subject(given: str) -> _Subject:
    """What runs `given`, or one line saying why nothing can."""
    from moeexport.modelio import resolve_model_dir

    path = Path(given)
    if given == "demo" or path.is_dir():
        return _Subject(given, resolve_model_dir(given).resolve(), TORCH)
    if not path.exists():
        raise MoeExportError(f"{given} does not exist")
    formats = formats_run()
    suffix = Path(path.name.removesuffix(".failed")).suffix  # an artifact that missed its validation is set aside
    if suffix not in formats:
        kind = f"a {suffix} file" if suffix else "a file without an extension"
        raise MoeExportError(f"{given} is {kind}: bench runs {' and '.join(formats)} files (or those set aside as "
                             "*.failed) and model directories (or demo)")
    return _Subject(given, path.resolve(), formats[suffix])


def formats_run() -> dict[str, str]:
    """File suffix -> the target that runs it; a directory (or "demo") runs in torch."""
    from moeexport.backends import runnable_suffixes

    return runnable_suffixes()


def _describe(subject: _Subject):
    """(the runtime in words, the weight bytes one decoded token reads, the artifact's bytes on disk)."""
    if subject.format == TORCH:
        return _describe_torch(subject)
    from moeexport.backends import target_for

    target = target_for(subject.format)
    try:
        runtime = target.runtime()
    except ImportError:  # each target's runtime is the package extra of its name
        extra = subject.format
        raise MoeExportError(f"running {subject.given} needs its runtime: pip install 'moeexport[{extra}]'") from None
    files = target.stored_files(subject.path)
    return runtime, target.token_bytes(subject.path), sum(path.stat().st_size for path in files if path.is_file())


def _require_context(subject: _Subject, positions: int) -> None:
    """The prompt and the new tokens fit the context the model was trained for (a GGUF's context_length, a
    checkpoint's max_position_embeddings), refused before any run otherwise; an ONNX graph states none."""
    if subject.format == TORCH:
        from moeexport.source import open_source

        context = open_source(subject.path).config.max_position_embeddings
    else:
        from moeexport.backends import target_for

        context = target_for(subject.format).context_of(subject.path)
    if isinstance(context, int) and positions > context:
        raise MoeExportError(f"--prompt-tokens plus --new-tokens make {positions} positions, more than the "
                             f"{context} that {subject.given} was trained for: give a shorter prompt")


def _describe_torch(subject: _Subject):
    import torch

    from moeexport.memory import available_memory
    from moeexport.modelio import load_streamed
    from moeexport.validate import bytes_per_token

    skeleton = load_streamed(subject.path)  # shapes and dtypes, no weights
    held = sum(parameter.numel() * parameter.element_size() for parameter in skeleton.parameters())
    if held > available_memory():
        raise MoeExportError(f"{subject.given} takes {held / GIB:.1f} GiB in float32 in torch, more than the "
                             f"{available_memory() / GIB:.1f} GiB available: bench its GGUF or ONNX instead")
    files = [path for path in subject.path.iterdir() if path.suffix == ".safetensors"]
    return f"torch {torch.__version__} eager, CPU", bytes_per_token(skeleton), sum(f.stat().st_size for f in files)


def _labels(subjects: list[_Subject]) -> dict[_Subject, str]:
    """The shortest tail of each path (a file name, or a directory and file) that tells the artifacts apart."""
    for parts in range(1, 1 + max(len(s.path.parts) for s in subjects)):
        labels = {s: "demo" if s.given == "demo" else "/".join(s.path.parts[-parts:]) for s in subjects}
        if len(set(labels.values())) == len(subjects):
            return labels
    return {s: str(s.path) for s in subjects}


def _checked_out(out: str | None) -> Path | None:
    """--out checked before any run: a benchmark that cannot be written is not measured."""
    if out is None:
        return None
    from moeexport.outputs import check_output

    return check_output(out, None, overwrite=True)  # report.json and report.html are rewritten in place


def _write(report: BenchReport, out: Path) -> None:
    from moeexport.outputs import replace_atomically
    from moeexport.report import write_bench_html

    out.mkdir(parents=True, exist_ok=True)
    report.files = [str(out / "report.json"), str(out / "report.html")]
    data = report.to_dict()
    replace_atomically(out / "report.json", lambda path: path.write_text(json.dumps(data, indent=2) + "\n"))
    replace_atomically(out / "report.html", lambda path: write_bench_html(data, path))
    umask = os.umask(0)  # the temporary files replace_atomically renames are owner-only: give the user's usual modes
    os.umask(umask)
    for name in report.files:
        Path(name).chmod(0o666 & ~umask)


# --- the machine ------------------------------------------------------------------------


def measure_bandwidth(threads: int, buffer: int | None = None, runs: int = 5, events: EventStream | None = None,
                      notes: list[str] | None = None) -> Bandwidth:
    """Memory read bandwidth with `threads` threads: bytes of a float32 buffer over the time torch.sum takes to
    read it, median of `runs` (after one untimed pass). The buffer is max(1 GiB, 4 x the last-level cache)
    unless `buffer` is given, and at most a quarter of the memory available; what had to give is noted."""
    import torch

    from moeexport.memory import available_memory, release_freed_memory

    events = events or EventStream()
    notes = notes if notes is not None else []
    cache = last_level_cache_bytes()
    wanted = buffer or max(GIB, 4 * (cache or 0))
    size = min(wanted, available_memory() // 4) // 4 * 4
    if size < wanted:
        notes.append(f"bandwidth measured over {size / GIB:.2f} GiB, not {wanted / GIB:.2f} GiB: a quarter of the "
                     "memory available")
    if cache and size < 4 * cache:
        notes.append(f"the bandwidth buffer ({size / 2**20:.0f} MiB) is less than 4x the last-level cache "
                     f"({cache / 2**20:.0f} MiB): part of it is read from the cache, so the bandwidth and the bounds "
                     "are overstated")
    events.stage(f"measuring memory bandwidth ({size / 2**20:.0f} MiB, {threads} threads)")
    data = None
    try:
        with torch_threads(threads):
            data = torch.ones(size // 4, dtype=torch.float32)  # written once: every page is resident before timing
            data.sum()
            seconds = []
            for _ in range(runs):
                started = time.perf_counter()
                data.sum()
                seconds.append(time.perf_counter() - started)
    finally:
        data = None
        release_freed_memory()
    rates = [size / s for s in seconds]
    return Bandwidth(statistics.median(rates), min(rates), max(rates), size, threads, runs, cache)


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache this machine reports (sysfs), or None."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes) if sizes else None


def _machine() -> dict:
    import platform

    from moeexport.memory import available_memory

    model = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor() or platform.machine())
    return {"cpu": model, "cpu_count": os.cpu_count(), "available_memory_bytes": available_memory(),
            "platform": platform.platform()}


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []
