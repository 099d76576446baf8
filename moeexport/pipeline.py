"""The pipeline as library calls: `compress`, `evaluate`, `validate` and `build`.

Each takes plain options, returns a plain report (a dataclass with
`to_dict()`, which is what report.json and `--json` hold) and prints nothing:
progress reaches the caller as `moeexport.events.Event`s through `on_event`.
The CLI parses arguments into these options and renders the reports; tools/
call the same functions.

    import moeexport
    report = moeexport.build("demo", "recipes/trim.yaml", "onnx", moeexport.BuildOptions(out="out/demo-onnx"))
    assert report.ok, report.validation.failures
"""

from __future__ import annotations

import functools
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from moeexport import cache
from moeexport import reads
from moeexport.errors import MoeExportError
from moeexport.events import EventStream
from moeexport.outputs import check_output, output_lock, staged
from moeexport.recipe import Recipe, load_recipe, parse_recipe
from moeexport.source import Source, as_source, open_source
from moeexport.threads import torch_threads
from moeexport.validate import RecordedReference, Tolerance, TorchRunner

VALIDATION_WINDOWS = (2, 256)  # >= 510 predicted-token positions per artifact
SAMPLING_LIMIT = 10**9  # parameters; above, text is not sampled from the model unless asked for
QUALITY_WINDOWS = (16, 128)
DAMAGE_LIMIT = 10**9  # parameters; above, analyze ranks drop candidates by its statistics unless asked to measure
PROFILE_PROMPT, PROFILE_NEW_TOKENS = 128, 64
DEFAULT_VERDICT = Tolerance(kl=0.1, top1_agreement=0.75)  # `validate` of a file that records no weight type


@dataclass(frozen=True)
class CalibrationOptions:
    """How the calibration set is drawn and observed. Defaults fit a CPU; the papers used 128 x 2048."""

    # .txt / .jsonl file, hf:NAME[:CONFIG][@SPLIT], or "model" (sampled from the model); None: "model" for
    # models up to SAMPLING_LIMIT parameters, an error above (sampling from a large model takes hours)
    source: str | None = None
    samples: int = 32
    length: int = 256
    seed: int = 0
    batch_size: int = 8
    max_block_window: int = 8  # longest window scored for consecutive Block Drop
    cache: bool = True  # reuse statistics observed before on the same model and calibration set

    def __post_init__(self):
        for name, flag in (("samples", "calib-samples"), ("length", "calib-length"), ("batch_size", "batch-size"),
                           ("max_block_window", "max-block-window")):
            if getattr(self, name) < 1:
                raise MoeExportError(f"--{flag} must be at least 1")


@dataclass(frozen=True)
class CompressOptions:
    out: str | None = None  # required unless dry_run
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    eval_text: str | None = None  # held-out text for quality and validation (default: sampled from the model)
    measure_quality: bool = True  # compare the compressed model with the original
    dry_run: bool = False  # plan and report, write nothing
    overwrite: bool = False
    dtype: str = "auto"  # compute dtype; auto: float32, or the checkpoint's own when only that fits max_memory
    trust_remote_code: bool = False
    allow_nonfinite: bool = False  # load weights with NaN/Inf values (refused by default, named by tensor)
    max_memory: int | None = None  # bytes the run may hold (None: moeexport.memory.default_budget())
    stream: bool | None = None  # one decoder layer at a time from disk; None: when the whole model does not fit
    threads: int | None = None  # CPU threads torch and the profiled runtime compute with (None: torch's own, and
    #                             the physical cores for the runtime)


@dataclass(frozen=True)
class BuildOptions(CompressOptions):
    quant: str | None = None  # None: the target's default for MODEL (f32; a GGUF input to GGUF keeps its types)
    target_options: dict = field(default_factory=dict)  # validated by the target (its Options model)
    validation_windows: tuple[int, int] = VALIDATION_WINDOWS  # (count, tokens) compared with the torch model
    profile: bool = True  # measure speed and memory in a fresh process (benchmarks that time runs themselves skip it)
    save_checkpoint: bool = False  # also write the compressed torch checkpoint to out/compressed/ (no target needs it)


@dataclass
class CompressionReport:
    model: str
    source: dict
    calibration: dict | None
    passes: list[dict]  # name, options, plan, summary lines
    layers_before: list[dict]
    layers_after: list[dict]
    new_block_index: list[int | None]
    parameters: dict
    bytes: dict
    memory: dict | None = None  # moeexport.memory.MemoryPlan: the bound, and in memory or streamed
    quality_vs_source: dict | None = None
    out: str | None = None
    timings: dict = field(default_factory=dict)
    peak_rss_bytes: dict = field(default_factory=dict)  # per stage
    input_file_bytes: int | None = None  # MODEL's weight files as stored on disk (a GGUF: the file), the user's size
    read_bytes: dict = field(default_factory=dict)  # per stage, of MODEL's files (moeexport.reads), and in total

    def manifest(self) -> dict:
        """What moeexport.json records about how the checkpoint was made."""
        return {
            "source": self.source,
            "calibration": self.calibration,
            "passes": [{key: step[key] for key in ("name", "options", "plan")} for step in self.passes],
            "new_block_index": self.new_block_index,
            "parameters": self.parameters,
            "quality_vs_source": self.quality_vs_source,
        }

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BuildReport:
    model: str
    target: str
    quant: str
    options: dict
    out: str
    compression: CompressionReport
    artifact: dict | None = None
    validation: dict | None = None
    profile: dict | None = None
    engine: dict | None = None
    timings: dict = field(default_factory=dict)
    peak_rss_bytes: dict = field(default_factory=dict)  # per stage, this process (the runtimes' are in theirs)
    failures: list[str] = field(default_factory=list)  # validation's, and the device step's
    quality_vs_input: dict | None = None  # a GGUF input: the artifact against it, both run in llama.cpp
    read_bytes: dict = field(default_factory=dict)  # per stage, of MODEL's files (moeexport.reads), and in total
    disk_read: dict | None = None  # the sequential read speed of MODEL's disk (moeexport.reads.disk_read_speed)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        from moeexport import __version__
        from moeexport.report import read_profile

        compression = self.compression.to_dict()
        timings, read_bytes = self.compression.timings | self.timings, self.compression.read_bytes | self.read_bytes
        return {
            "moeexport_version": __version__,
            "model": self.model, "target": self.target, "quant": self.quant, "options": self.options,
            "out": self.out, "ok": self.ok, "failures": self.failures,
            "compression": {key: value for key, value in compression.items()
                            if key not in ("quality_vs_source", "timings", "peak_rss_bytes", "out", "model",
                                           "read_bytes")},
            "quality_vs_source": self.compression.quality_vs_source, "quality_vs_input": self.quality_vs_input,
            "artifact": self.artifact, "validation": self.validation, "profile": self.profile, "engine": self.engine,
            "timings": timings,
            "peak_rss_bytes": self.compression.peak_rss_bytes | self.peak_rss_bytes,
            "read_bytes": read_bytes, "disk_read": self.disk_read,
            "read_profile": read_profile(timings, read_bytes, self.disk_read),
        }


def _quiet(function):
    """Keep transformers' own progress bars and warnings out of a library call (restored afterwards)."""

    @functools.wraps(function)
    def quiet(*args, **kwargs):
        from transformers.utils import logging

        bars, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
        logging.disable_progress_bar()
        logging.set_verbosity_error()
        try:
            return function(*args, **kwargs)
        finally:
            logging.set_verbosity(verbosity)
            if bars:
                logging.enable_progress_bar()

    return quiet


class _Stages:
    """Times each stage, measures its peak resident memory (this process's; children report their own) and
    announces it as an event."""

    def __init__(self, events: EventStream):
        from moeexport.memory import StagePeaks

        self.events, self.seconds, self.peaks = events, {}, {}
        self.read = {}  # bytes of the model's files each stage read (moeexport.reads)
        self._started = time.perf_counter()
        self._read_before = reads.total()
        self._memory = StagePeaks()

    @contextmanager
    def __call__(self, name: str, message: str):
        from moeexport.memory import release_freed_memory

        self.events.stage(message)
        release_freed_memory()  # what earlier stages freed is not held (nor counted) in this one
        started, read_before = time.perf_counter(), reads.total()
        with self._memory.measure() as memory:
            yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
        self.peaks[name] = max(self.peaks.get(name, 0), memory.peak)
        self.read[name] = self.read.get(name, 0) + reads.total() - read_before

    def total(self) -> dict:
        self._memory.close()
        return self.seconds | {"total": time.perf_counter() - self._started}

    def read_bytes(self) -> dict:
        """Bytes of the model's files read per stage, and in total (between the stages too: the fingerprint)."""
        return self.read | {"total": reads.total() - self._read_before}


# --- compress ---------------------------------------------------------------------------


@dataclass
class _Compressed:
    """What compressing leaves for the steps after it (build's export, compress's save)."""

    model: object
    tokenizer: object
    statistics: object  # StatisticsProvider
    report: CompressionReport


@_quiet
def compress(model: str | Path, recipe: str | Path | Recipe | dict, options: CompressOptions = CompressOptions(),
             on_event=None) -> CompressionReport:
    """Apply a recipe to MODEL and save the result to `options.out` (nothing is written on a dry run)."""
    with torch_threads(options.threads):
        return _compress_command(model, recipe, options, on_event)


def _compress_command(model, recipe, options: CompressOptions, on_event) -> CompressionReport:
    from moeexport.modelio import save

    events = EventStream(on_event)
    stages = _Stages(events)
    recipe = _recipe(recipe)
    source = _open(model, options)
    options = _with_shipped_text(source, options, calibrates=bool(recipe.steps))
    memory = memory_plan(source, recipe, options)
    if not options.dry_run:
        _require_out(options, source)
    if options.dry_run:
        done = _compress(source, recipe, options, events, stages, memory)
    else:
        with output_lock(options.out):
            done = _compress(source, recipe, options, events, stages, memory)
            with stages("save", f"saving {options.out}"):
                done.report.out = str(save(done.model, options.out, done.report.manifest(), overwrite=options.overwrite))
    done.report.timings, done.report.peak_rss_bytes = stages.total(), stages.peaks
    done.report.read_bytes = stages.read_bytes()
    return done.report


def _open(model: str | Path, options: CompressOptions) -> Source:
    """MODEL opened, once for the whole command; what is computed about it is cached under the cache root."""
    return open_source(model, options.trust_remote_code, cache.ROOT)


def _require_out(options: CompressOptions, source: Source) -> None:
    if not options.out:
        raise MoeExportError("--out is required (or use --dry-run to only print the plan)")
    check_output(options.out, source.path, options.overwrite)


def _compress(source: Source, recipe: Recipe, options: CompressOptions, events: EventStream, stages: _Stages,
              memory, check=None, also_calibrates: bool = False) -> _Compressed:
    """Load, calibrate, apply; `check(model)` runs on the result before its quality is measured.
    `also_calibrates`: the caller draws the calibration set besides the recipe's passes (an importance matrix)."""
    from moeexport.compress import compress as apply_recipe, resolve_recipe
    from moeexport.modelio import load_tokenizer

    resolved, _ = resolve_recipe(recipe, source.config)  # applying `recipe` says how (AppliedStep.decided)
    options = replace(options, calibration=_calibration_source(memory, _observes(resolved), options, events))
    if options.calibration.source != "model" and (_calibrates(resolved) or also_calibrates):
        from moeexport.calibration.sources import read_documents

        read_documents(options.calibration.source)  # a missing or malformed source fails now, before the model runs
    if memory.streamed:
        events.note(memory.describe())
    with stages("load", f"loading {source.given}" + (" (streamed)" if memory.streamed else "")):
        lm = _load(source, memory, options, events)
        tokenizer = load_tokenizer(source, options.trust_remote_code)
    original = None  # the original's logits on the quality windows: the model itself need not be kept
    if options.measure_quality and not options.dry_run and not recipe.steps:
        events.note("the recipe is empty: the model is not changed, so its quality against the source is not "
                    "measured (the export's fidelity is its quality)")
    elif options.measure_quality and not options.dry_run:
        with stages("quality", "recording the original model's logits"):
            original = _record(lm, tokenizer, options, *QUALITY_WINDOWS)
            if memory.streamed:  # held on disk while the model is compressed
                original = original.spilled()
    provider = statistics_provider(source, tokenizer, options.calibration, events)
    passes = []  # each applied pass as the report and the event give it

    def applied(step) -> None:
        passes.append(step.to_dict() | {"summary": step.summary()})
        events.step(step.name, passes[-1])

    with stages("compress", f"compressing with {len(recipe.steps)} pass(es)"):
        result = apply_recipe(lm, recipe, provider, on_step=applied)
    report = CompressionReport(
        model=source.given,
        source={"model": source.given, "fingerprint": provider.source_key},
        calibration=provider.calibration.to_dict(),
        passes=passes,
        layers_before=[asdict(spec) for spec in result.layers_before],
        layers_after=[asdict(spec) for spec in result.layers_after],
        new_block_index=result.new_block_index,
        parameters={"before": result.parameters_before, "after": result.parameters_after},
        bytes={"before": result.bytes_before, "after": result.bytes_after},
        memory=memory.to_dict(),
        input_file_bytes=sum(path.stat().st_size for path in source.weight_files),
    )
    if check is not None:
        check(lm)
    if original is not None:
        from moeexport.evaluate import evaluate as score

        with stages("quality", "measuring quality against the original"):
            windows = torch.from_numpy(original.windows)
            scored = RecordedReference.record(TorchRunner(lm), windows) if memory.streamed else lm
            batch = 1 if memory.streamed else 4  # recorded logits: a window at a time holds the least
            report.quality_vs_source = {"text": original.text, **score(scored, windows, reference=original,
                                                                       batch_size=batch, progress=events).to_dict()}
    return _Compressed(lm, tokenizer, provider, report)


def _load(source: Source, memory, options: CompressOptions, events: EventStream):
    """The model as `memory` plans it: whole, or streamed with every pass over its layers shown through `events`."""
    from moeexport.modelio import load, load_streamed

    if memory.streamed:
        return load_streamed(source, memory.dtype, options.trust_remote_code, options.allow_nonfinite, events)
    return load(source, memory.dtype, options.trust_remote_code, options.allow_nonfinite)


def memory_plan(model: Source | str | Path, recipe: Recipe, options: CompressOptions, validation_windows=(0, 0),
                observes: bool | None = None, moments: bool = False):
    """How MODEL runs within `options.max_memory` (moeexport.memory.MemoryPlan): whole or streamed, in which
    dtype. Reads only config.json and the weight headers (opening MODEL when it is not a Source yet); refuses,
    before any work, what cannot fit or stream.
    `observes`: the run observes the calibration set (default: when a pass of `recipe` needs statistics).
    `moments`: the run holds every weight matrix's input moments (an importance matrix); a pass that computes
    weights from calibration activations holds them too."""
    from moeexport import memory
    from moeexport.compress import resolve_recipe
    from moeexport.passes import PASSES

    source = as_source(model, options.trust_remote_code)  # an unsupported model stops here, by name
    config, stream = source.config, options.stream
    recipe, _ = resolve_recipe(recipe, config)  # what the passes will do: a refit or not (said when they run)
    if source.is_gguf:  # streamed always: the stream's record of each layer is what carries its codes
        if stream is False:
            raise MoeExportError(f"{source.path} is a GGUF, which is always read one layer at a time: drop --no-stream")
        stream = True
    calibration = options.calibration
    observes = _observes(recipe) if observes is None else observes
    quality = QUALITY_WINDOWS[0] * QUALITY_WINDOWS[1] * 2 if options.measure_quality else 0
    workload = memory.Workload(calibration.samples * calibration.length if observes else 0,
                               calibration.max_block_window, quality + validation_windows[0] * validation_windows[1])
    if moments or _computes_from_activations(recipe):
        workload = replace(workload, moment_values=memory.moment_values(source.headers, config.hidden_size))
    if _solves_with_grams(recipe):
        act_order = any(getattr(step.options, "act_order", False) for step in recipe.steps)
        workload = replace(workload, gram_values=memory.gram_values(source.headers, act_order))
    refits = tuple(kind for kind in (PASSES[step.name].refits(step.options) for step in recipe.steps) if kind)
    if refits:  # a refit's target residuals wait on disk when streamed (repair.residuals_at): one held at a time
        workload = replace(workload, calibration_tokens=calibration.samples * calibration.length, refits=refits,
                           residuals_held=1)
    workload = replace(workload, spilled_experts=_spilled_experts(recipe, memory.routed_experts(source.headers)))
    budget = options.max_memory or memory.default_budget()
    plan = memory.plan(source.headers, config.hidden_size, config.vocab_size, budget, workload, stream, options.dtype)
    if plan.streamed:
        _check_streamable(recipe, options, plan, observes, gguf=source.is_gguf)
    return plan


def _spilled_experts(recipe: Recipe, experts: int) -> float:
    """How many copies of the routed experts the passes compute and spill when streamed (GPTQ, SparseGPT, Expert
    Drop's rebuild), each the share of the experts the recipe has kept by then."""
    from moeexport.passes import PASSES

    share, copies = 1.0, 0.0
    for step in recipe.steps:
        compression_pass = PASSES[step.name]
        left = compression_pass.experts_left(step.options)
        share = min(share, left / experts) if left is not None and experts else share
        copies += share if compression_pass.refits(step.options) == "experts" or _solves_with_gram(step) else 0
    return copies


def _observes(recipe: Recipe) -> bool:
    from moeexport.passes import PASSES

    return any(PASSES[step.name].needs_statistics(step.options) or PASSES[step.name].needs_scorer(step.options)
               for step in recipe.steps)


def _computes_from_activations(recipe: Recipe) -> bool:
    from moeexport.passes import PASSES

    return any(PASSES[step.name].needs_activations(step.options) for step in recipe.steps)


def _solves_with_grams(recipe: Recipe) -> bool:
    """Whether a pass computes weights from full Gram matrices of their inputs (GPTQ, SparseGPT)."""
    return any(_solves_with_gram(step) for step in recipe.steps)


def _solves_with_gram(step) -> bool:
    from moeexport.passes import PASSES

    return getattr(PASSES[step.name], "calibrated_methods", {}).get(getattr(step.options, "method", None)) == "full"


def _calibrates(recipe: Recipe) -> bool:
    """Whether a pass of `recipe` runs the calibration set: it observes it, or computes weights from its
    activations."""
    return _observes(recipe) or _computes_from_activations(recipe)


def _needs_held_out(options: CompressOptions) -> bool:
    """Whether the run scores held-out windows (quality vs the original, a build's validation)."""
    return not options.dry_run and (options.measure_quality or isinstance(options, BuildOptions))


def _check_streamable(recipe: Recipe, options: CompressOptions, plan, observes: bool, gguf: bool = False) -> None:
    """What a streamed run cannot do, refused by name before any work."""
    from moeexport.passes import PASSES

    why = f"streamed ({plan.describe()})"
    for step in recipe.steps:
        if not PASSES[step.name].streams(step.options):
            instead = ("compress the model's safetensors checkpoint instead" if gguf else
                       f"raise --max-memory to {plan.in_memory_bytes / 2**30:.0f}GiB")
            raise MoeExportError(f"{step.name} cannot run {why}: it needs whole layers in memory; "
                                 f"{instead}, or leave the pass out")
    if observes and options.calibration.source in (None, "model"):
        raise MoeExportError(f"observing calibration text needs a file when a model runs {why}: it cannot sample "
                             "its own; pass --calib FILE (a .txt or .jsonl file)")
    if options.eval_text is None and _needs_held_out(options):
        if options.measure_quality:
            raise MoeExportError(f"the quality and validation checks of a model run {why} need held-out text: "
                                 "pass --eval-text FILE (or --no-eval to skip the quality check on compress)")
        raise MoeExportError(f"validating the artifact of a model run {why} needs held-out text (--no-eval skips "
                             "only the quality check): pass --eval-text FILE")


SHIPPED_CALIBRATION, SHIPPED_HELD_OUT = "calibration.txt", "held_out.txt"


def _with_shipped_text(source: Source, options: CompressOptions, calibrates: bool) -> CompressOptions:
    """Where the model directory ships text (the demo model: sampled from it once by tools/sample_demo_text.py),
    that text instead of sampling from the model at every run: for calibration (`--calib model` or none given;
    when the run `calibrates`, i.e. has a pass) and for the quality and validation checks (no --eval-text given).
    The report names the files (its calibration source and the quality text); no note is printed, so that an
    error in the arguments found later stays one line."""
    if source.is_gguf:
        return options
    calibration, held_out = (Path(source.path) / name for name in (SHIPPED_CALIBRATION, SHIPPED_HELD_OUT))
    if options.calibration.source in (None, "model") and calibration.is_file() and calibrates:
        options = replace(options, calibration=replace(options.calibration, source=str(calibration)))
    if options.eval_text is None and held_out.is_file() and _needs_held_out(options):
        options = replace(options, eval_text=str(held_out))
    return options


def _calibration_source(plan, observes: bool, options: CompressOptions, events: EventStream) -> CalibrationOptions:
    """The calibration options with their source settled: text sampled from the model only for small models,
    unless asked for (then with a warning of its cost)."""
    calibration = options.calibration
    large = plan.parameters > SAMPLING_LIMIT
    if calibration.source is None and large and observes:
        raise MoeExportError(f"the model has {plan.parameters / 1e9:.1f} B parameters: sampling calibration text from "
                             "it would take hours; pass --calib FILE (or --calib model to sample anyway)")
    if calibration.source == "model" and large and observes:
        events.note(f"sampling {calibration.samples} x {calibration.length} calibration tokens from a "
                    f"{plan.parameters / 1e9:.1f} B-parameter model: this takes long; --calib FILE is faster")
    if options.eval_text is None and large and _needs_held_out(options):
        raise MoeExportError(f"the model has {plan.parameters / 1e9:.1f} B parameters: sampling held-out text from it "
                             "for the quality and validation checks would take hours; pass --eval-text FILE")
    return replace(calibration, source=calibration.source or "model")


def _recipe(recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(recipe)
    return load_recipe(recipe)


def statistics_provider(model: Source | str | Path, tokenizer, calibration: CalibrationOptions = CalibrationOptions(),
                        progress=None):
    """The calibration statistics of MODEL (observed on demand, cached by content under the source's cache root),
    also for scripts that compress in memory. `progress`: an EventStream, a rich Progress, or None."""
    from moeexport.calibration.sources import CalibrationConfig
    from moeexport.compress import StatisticsProvider

    source = as_source(model, cache_root=cache.ROOT)  # a script names its model
    return StatisticsProvider(
        tokenizer,
        CalibrationConfig(calibration.source or "model", calibration.samples, calibration.length, calibration.seed),
        source.fingerprint,
        cache_dir=cache.statistics_dir(source.cache_root) if calibration.cache and source.cache_root else None,
        batch_size=calibration.batch_size,
        max_block_window=calibration.max_block_window,
        progress=progress,
    )


def _held_out_windows(options: CompressOptions, tokenizer, model, count: int, length: int):
    """(windows, description): `eval_text`, or sequences sampled from `model` apart from calibration."""
    from moeexport.calibration.sources import sample_from_model
    from moeexport.evaluate import eval_windows

    if options.eval_text:
        return eval_windows(tokenizer, options.eval_text, length, count), options.eval_text
    windows = sample_from_model(model, tokenizer, count, length, options.calibration.seed + 1)
    return windows, f"{count} x {length} tokens sampled from the model"


def _record(model, tokenizer, options: CompressOptions, count: int, length: int) -> RecordedReference:
    """`model`'s logits on held-out windows, for comparing later with what it becomes."""
    windows, where = _held_out_windows(options, tokenizer, model, count, length)
    return RecordedReference.record(TorchRunner(model), windows, where)


# --- analyze / evaluate / validate ------------------------------------------------------


@dataclass
class AnalysisReport:
    model: str
    calibration_tokens: int  # tokens each layer was observed on
    layers: list[dict]  # one summary row per layer (moeexport.analysis.layer_rows)
    files: list[str]  # statistics.json, the plots, report.html
    candidates: dict = field(default_factory=dict)  # ranked drop candidates (moeexport.analysis.drop_candidates)

    def to_dict(self) -> dict:
        return asdict(self)


@_quiet
def analyze(model: str | Path, out: str | Path, calibration: CalibrationOptions = CalibrationOptions(),
            dtype: str = "auto", trust_remote_code: bool = False, on_event=None,
            allow_nonfinite: bool = False, max_memory: int | None = None, stream: bool | None = None,
            measure_damage: bool | None = None) -> AnalysisReport:
    """Observe MODEL on the calibration set; write statistics.json, plots and report.html to `out`.
    Within `max_memory` like compress (streamed when the model does not fit whole). With `measure_damage`, the
    drop candidates are ranked by the KL their removal causes, each measured alone on the scoring part of the
    calibration set (about as many layer forwards as two per layer per candidate kind: tens of passes over a
    large model); otherwise by the statistics alone. None: measured up to DAMAGE_LIMIT parameters."""
    from moeexport.analysis import drop_candidates, layer_rows, write_html, write_plots
    from moeexport.modelio import load_tokenizer

    options = CompressOptions(calibration=calibration, measure_quality=False, dtype=dtype,
                              trust_remote_code=trust_remote_code, allow_nonfinite=allow_nonfinite,
                              max_memory=max_memory, stream=stream)
    source = _open(model, options)
    check_output(out, source.path, overwrite=True)  # analysis files are rewritten in place
    events = EventStream(on_event)
    options = _with_shipped_text(source, options, calibrates=True)
    memory = memory_plan(source, Recipe(steps=()), options, observes=True)
    calibration = _calibration_source(memory, True, options, events)
    lm = _load(source, memory, options, events)
    tokenizer = load_tokenizer(source, trust_remote_code)
    provider = statistics_provider(source, tokenizer, calibration, events)
    statistics = provider.statistics(lm, history=[])
    rows = layer_rows(statistics)
    if measure_damage is None:
        measure_damage = memory.parameters <= DAMAGE_LIMIT
        if not measure_damage:
            events.note(f"{memory.parameters / 1e9:.1f} B parameters: drop candidates are ranked by similarity and "
                        "REAP, not measured (that takes tens of passes over the model); --measure-damage measures them")
    candidates = drop_candidates(statistics, provider.scorer(lm) if measure_damage else None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    statistics.save(out / "statistics.json")
    plots = write_plots(statistics, out, candidates)
    page = write_html(statistics, rows, plots, out / "report.html", f"moeexport analyze {model}", candidates)
    files = [str(path) for path in (out / "statistics.json", *plots, page)]
    return AnalysisReport(str(model), statistics.layers[0].tokens, rows, files, candidates)



@_quiet
def evaluate(model: str | Path, text: str, reference: str | Path | None = None, length: int = 256,
             max_sequences: int = 32, dtype: str = "float32", trust_remote_code: bool = False, on_event=None,
             allow_nonfinite: bool = False):
    """Perplexity of MODEL on `text`; with `reference`, KL(reference || MODEL) and top-1 agreement (EvalResult)."""
    from moeexport.evaluate import eval_windows
    from moeexport.evaluate import evaluate as score
    from moeexport.modelio import load, load_tokenizer

    if length < 2 or max_sequences < 1:
        raise MoeExportError("--length must be at least 2 and --max-sequences at least 1")
    source = open_source(model, trust_remote_code)
    lm, tokenizer = load(source, dtype, trust_remote_code, allow_nonfinite), load_tokenizer(source, trust_remote_code)
    reference_lm = load(reference, dtype, trust_remote_code, allow_nonfinite) if reference else None
    if reference_lm is not None and reference_lm.config.vocab_size != lm.config.vocab_size:
        raise MoeExportError("--reference has a different vocabulary than MODEL; compare models that share a tokenizer")
    windows = eval_windows(tokenizer, text, length, max_sequences)
    return score(lm, windows, reference=reference_lm, progress=EventStream(on_event))


@_quiet
def validate(artifact: str | Path, reference: str | Path, text: str, length: int = 256, windows: int = 2,
             tolerance=None, on_event=None):
    """Logits of an artifact file (.gguf, .onnx) against the torch model it came from: a Validation with a verdict.

    The verdict is against `tolerance` (a moeexport.validate.Tolerance), by default the target's tolerance for
    the weight type the file records, or DEFAULT_VERDICT when it records none. The file is never renamed.
    """
    from moeexport.backends import target_for, target_of_file
    from moeexport.evaluate import eval_windows
    from moeexport.modelio import load, load_tokenizer
    from moeexport.validate import TorchRunner, validate_artifact

    artifact = Path(artifact)
    if not artifact.is_file():
        raise MoeExportError(f"{artifact} is not a file")
    target = target_for(target_of_file(artifact))
    if tolerance is None:
        quant = target.quant_of(artifact)
        tolerance = target.tolerance(quant) if quant in target.tolerances else DEFAULT_VERDICT
    source = open_source(reference)
    lm, tokenizer = load(source), load_tokenizer(source)
    token_windows = eval_windows(tokenizer, text, length, windows)
    return validate_artifact(TorchRunner(lm), target.runner(artifact, length), token_windows, tolerance, artifact,
                             text, target.runtime(), EventStream(on_event), set_aside_failed=False)


# --- build ------------------------------------------------------------------------------


@_quiet
def build(model: str | Path, recipe: str | Path | Recipe | dict, target: str, options: BuildOptions,
          on_event=None) -> BuildReport:
    """Compress MODEL, export it for `target`, validate the artifact against the compressed torch model, profile it.

    Everything lands in `options.out` at once when the build is done: the
    artifact, report.json and report.html, and with `options.save_checkpoint`
    the compressed checkpoint (compressed/; no target reads it: the exporters
    read the model in memory, or streamed from MODEL's own files). A build
    whose validation misses its tolerance still lands, with its artifact
    renamed *.failed and `report.ok` False.
    """
    from moeexport.backends import target_for

    chosen = target_for(target)  # before any work: nothing is compressed for options the target refuses
    chosen.check_installed()
    target_options = chosen.options(options.target_options)
    options = replace(options, quant=options.quant or chosen.default_quant(model))
    chosen.check_quant(options.quant)
    recipe = _recipe(recipe)
    source = _open(model, options)
    events = EventStream(on_event)
    options = _with_shipped_text(source, options, calibrates=bool(recipe.steps))
    imatrix = chosen.wants_imatrix(target_options)  # measured on the calibration set, streamed or not
    memory = memory_plan(source, recipe, options, options.validation_windows,
                         observes=_observes(recipe) or imatrix, moments=imatrix)
    _require_out(options, source)
    with output_lock(options.out), torch_threads(options.threads):
        return _build(source, recipe, chosen, target_options, options, memory, events)


def _build(source: Source, recipe: Recipe, chosen, target_options, options: BuildOptions, memory,
           events: EventStream) -> BuildReport:
    from moeexport.adapters import adapter_for
    from moeexport.adapters.surgery import sync_expert_config
    from moeexport.backends.target import ExportInputs
    from moeexport.modelio import save
    from moeexport.quantization import weight_grid
    from moeexport.validate import validate_artifact

    target = chosen.name
    stages = _Stages(events)
    with stages("disk", "measuring the disk's read speed"):
        disk_read = reads.disk_read_speed(max(source.weight_files, key=lambda path: path.stat().st_size))
    done = _compress(source, recipe, options, events, stages, memory,
                     check=lambda lm: chosen.check(lm, options.quant, target_options),
                     also_calibrates=chosen.wants_imatrix(target_options))
    out = Path(options.out)
    report = BuildReport(source.given, target, options.quant, target_options.model_dump(), str(out), done.report,
                         disk_read=disk_read)
    manifest = done.report.manifest()
    with staged(out, options.overwrite) as staging:
        if options.save_checkpoint:
            with stages("save", "saving the compressed checkpoint"):
                save(done.model, staging / "compressed", manifest)
        else:  # the expert counts and top-k that saving writes into the config after a drop, which the targets
            #    read from it too (the TensorRT bundle's top-k)
            sync_expert_config(adapter_for(done.model.config), done.model)
        with stages("reference", "recording the compressed model's logits"):
            reference = _record(done.model, done.tokenizer, options, *options.validation_windows)
            windows, where = reference.windows, reference.text
        inputs = ExportInputs(tokenizer=done.tokenizer, weight_grid=weight_grid(done.model), reference=reference,
                              manifest=manifest, source=source)
        if chosen.wants_imatrix(target_options):
            from moeexport.calibration.moments import input_moments

            with stages("imatrix", "measuring the importance matrix"):
                calibration_set = done.statistics.tokens(done.model)
                inputs.imatrix = input_moments(done.model, calibration_set, batch_size=options.calibration.batch_size)
                inputs.imatrix.dataset = done.statistics.calibration.to_dict()["source"]  # named in its file
        with stages("export", f"exporting to {target} ({options.quant})"):
            artifact = chosen.export(done.model, staging, options.quant, target_options, inputs)
        del done  # the torch model is not needed past here: its logits are recorded
        with stages("validate", "validating the artifact"):
            runner = _artifact_runner(chosen, artifact.path, windows, memory)
            validation = validate_artifact(reference, runner, windows, chosen.tolerance(options.quant, source),
                                           artifact.path, where, chosen.runtime(), events)
            artifact.path = validation.artifact  # *.failed when it missed
        if comparison := chosen.input_comparison(source.path):
            with stages("quality_vs_input", comparison):
                report.quality_vs_input = chosen.quality_vs_input(source.path, runner, windows, where)
        del runner
        if validation.passed and options.profile:
            with stages("profile", "profiling"):
                report.profile = chosen.profile(artifact, windows[0, :PROFILE_PROMPT].tolist(), PROFILE_NEW_TOKENS,
                                                options.threads)
        with stages("finish", f"finishing the {target} artifact"):
            finished = chosen.finish(artifact, validation, inputs, events)
        report.failures = validation.failures + list(finished.failures)
        report.engine = finished.engine
        report.validation = validation.to_dict() | {"artifact": _published(artifact.path, staging, out)}
        files = finished.files or artifact.files()
        report.artifact = {"path": _published(artifact.path, staging, out), "representation": artifact.representation,
                           "fallbacks": artifact.fallbacks, "file_bytes": sum(files.values()), "files": files}
        if artifact.imatrix:  # which importance matrix weighed the rounding, and where the measured one is
            report.artifact["imatrix"] = artifact.imatrix | (
                {"file": _published(artifact.imatrix["file"], staging, out)} if "file" in artifact.imatrix else {})
        report.timings, report.peak_rss_bytes = stages.total(), stages.peaks
        report.read_bytes = stages.read_bytes()
        _write_reports(report, staging)
    return report


def _artifact_runner(target, path: Path, windows: np.ndarray, memory):
    """The artifact's runner; for a streamed build, its logits recorded in a fresh process (which alone then
    holds the artifact's weights, as a deployment would)."""
    if not memory.streamed:
        return target.runner(path, windows.shape[1])
    from moeexport.backends.profile import logits_in_subprocess

    reference, _ = logits_in_subprocess(target.name, path, windows, windows.shape[1])
    return reference  # (the child's peak is the profile's to report)


def _published(path: Path, staging: Path, out: Path) -> str:
    """Where a file written in the staging directory is once the build lands."""
    return str(out / Path(path).relative_to(staging))


def _write_reports(report: BuildReport, directory: Path) -> None:
    from moeexport.report import write_build_html

    data = report.to_dict()
    (directory / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    write_build_html(data, directory / "report.html")
