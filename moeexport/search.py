"""`search`: fit a MoE into a memory budget by measurement.

    from moeexport.search import Constraint, SearchOptions, search
    report = search("demo", "gguf", Constraint.parse(max_size="30%"), SearchOptions())
    report.chosen_row()["quant"], report.recipe()          # the build flag and the recipe
    report.to_dict()                                        # what --json prints

From one set of calibration statistics, every candidate of a small grid
(trimming recipes x the target's weight types) is scored by KL(original ||
candidate) on the calibration tokens and sized by the bytes its artifact would
have; the candidates that meet the constraint are ranked by that KL, and the
best is chosen.

- Trimming (block_drop n, layer_drop n, global expert_drop keep): each recipe is
  applied in memory with `moeexport.compress.compress`, every pass with its
  default score, sharing ONE StatisticsProvider (statistics are cached by the
  passes applied so far, so candidates that share a prefix share them; a prefix
  is applied once and copied). Its KL is one forward of the calibration tokens
  against the original's recorded logits.
- Weight types: the untrimmed model is exported once per type and run in
  llama.cpp on the calibration tokens against the torch model: KL(type).
- A candidate's KL is estimated as KL(trim) + KL(type): an additive estimate.
- Size and decode speed: the target sizes each trimmed file from the untrimmed file
  of its type (`Target.layout` and `Target.sizer`; GGUF: backends/gguf/sizes.py,
  the untrimmed file's tensors less what the trimming removes) and counts the
  bytes a decoded token reads (`Target.token_bytes`), against the untrimmed F16
  GGUF's: a memory-bandwidth-bound speedup estimate. Exact for untrimmed files,
  an estimate for trimmed ones (K-quant mixes choose some types by layer index
  and expert count).
- So the candidates that meet the constraint by estimate are then, best first,
  exported for real (`verify` of them at most): the chosen one is the first whose
  real file meets it, with its real size and its KL measured in llama.cpp.

Held-out text plays no part in the choice (a `build` of the chosen recipe uses
it to validate).
"""

from __future__ import annotations

import copy
import math
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from moeexport.errors import MoeExportError
from moeexport.events import EventStream
from moeexport.pipeline import BuildOptions, CalibrationOptions, CompressOptions

BASELINE_TYPE = "f16"  # sizes and decode speedups are relative to the untrimmed model's F16 GGUF
SPILL_BYTES = 512 * 2**20  # the original's recorded calibration logits go to a mapped file above this
NOTES = (
    "KL = KL(original || candidate) per token on the calibration set, estimated as KL(trimming: in torch, on every "
    "calibration sequence) + KL(weight type: the untrimmed file in llama.cpp, on the first --file-windows): an "
    "additive estimate",
    "size: the untrimmed file of each type, tensor by tensor, less what the trimming removes; expert stacks at "
    "the largest count of any layer (the GGUF pads every layer to it); the stand-ins of dropped MoE sublayers "
    "and pads counted by the writer's rules; an estimate, since the K-quant mixes choose some types by layer "
    "index and expert count, and the metadata is taken as the untrimmed file's",
    "decode speedup: weight bytes read per decoded token (every tensor whole, k/E of each expert stack, one "
    "embedding row) of the untrimmed F16 GGUF over the candidate's: the memory-bandwidth-bound estimate",
)


# --- the constraint -----------------------------------------------------------------------


@dataclass(frozen=True)
class Constraint:
    """What the artifact must meet: one of a size relative to the untrimmed F16 file, a size in bytes, or a
    decode speedup (bandwidth-bound, from bytes read per token) over the untrimmed F16 file."""

    kind: str  # max_size (fraction of the F16 file) | max_bytes | min_decode_speedup
    value: float

    KINDS = ("max_size", "max_bytes", "min_decode_speedup")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise MoeExportError(f"unknown constraint {self.kind!r}; one of {', '.join(self.KINDS)}")
        if not (self.value > 0 and math.isfinite(self.value)):
            raise MoeExportError(f"--{self.kind.replace('_', '-')} must be a positive number")

    @classmethod
    def parse(cls, max_size: str | None = None, max_bytes: str | None = None,
              min_decode_speedup: str | None = None) -> "Constraint":
        """From the command line's forms: '30%' (or 0.3), '16GB' / '3.5GiB', '3x' (or 3)."""
        given = [(kind, text) for kind, text in zip(cls.KINDS, (max_size, max_bytes, min_decode_speedup))
                 if text is not None]
        if len(given) != 1:
            raise MoeExportError("give exactly one of --max-size P%, --max-bytes SIZE, --min-decode-speedup Nx")
        kind, text = given[0]
        text = str(text).strip()
        if kind == "max_bytes":
            from moeexport.memory import parse_size

            try:
                return cls(kind, float(parse_size(text)))
            except MoeExportError:
                raise MoeExportError(f"--max-bytes {text!r} is not a size: write it like 16GB, 3.5GiB or 800MB") from None
        if kind == "max_size":
            match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(%?)", text)
            if not match:
                raise MoeExportError(f"--max-size {text!r} is not a share of the F16 GGUF: write it like 30%")
            value = float(match.group(1)) / (100 if match.group(2) else 1)
            if not 0 < value <= 1 and not match.group(2):
                raise MoeExportError(f"--max-size {text!r}: write a percentage like 30% (or a fraction like 0.3)")
            return cls(kind, value)
        match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*[xX]?", text)
        if not match:
            raise MoeExportError(f"--min-decode-speedup {text!r} is not a factor: write it like 3x")
        return cls(kind, float(match.group(1)))

    def describe(self) -> str:
        if self.kind == "max_size":
            return f"--max-size {self.value * 100:g}% of the untrimmed F16 GGUF"
        if self.kind == "max_bytes":
            return f"--max-bytes {self.value / 1e9:.4g} GB"
        return f"--min-decode-speedup {self.value:g}x over the untrimmed F16 GGUF (bytes read per token)"

    def meets(self, file_bytes: float, token_bytes: float, baseline_bytes: float, baseline_token_bytes: float) -> bool:
        if self.kind == "max_size":
            return file_bytes <= self.value * baseline_bytes
        if self.kind == "max_bytes":
            return file_bytes <= self.value
        return baseline_token_bytes / token_bytes >= self.value


# --- options and report -------------------------------------------------------------------


@dataclass(frozen=True)
class SearchOptions:
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    block_drop: tuple[int, ...] = (0, 1, 2)  # blocks dropped (0: no block_drop pass)
    layer_drop: tuple[int, ...] = (0, 1, 2, 3)  # MoE sublayers dropped
    expert_keep: tuple[float, ...] = (1.0, 0.75, 0.5)  # experts kept per layer on average, as a share of E
    expert_scope: str = "global"  # expert_drop scope; global gets min_keep = top-k (llama.cpp's one top-k)
    quant_types: tuple[str, ...] | None = None  # the target's weight types searched (None: its search_types)
    verify: int = 3  # candidates exported for real, best first, until one meets the constraint (0: trust estimates)
    file_windows: int = 8  # calibration sequences each GGUF is run on in llama.cpp (its KL)
    out: str | None = None  # write the chosen recipe here (YAML)
    build: str | None = None  # then build it into this directory
    overwrite: bool = False  # replace `out` / `build` if they exist
    eval_text: str | None = None  # held-out text for the build's validation (never for choosing)
    dtype: str = "auto"
    trust_remote_code: bool = False
    allow_nonfinite: bool = False
    max_memory: int | None = None

    def __post_init__(self):
        for name, values in (("block-drop", self.block_drop), ("layer-drop", self.layer_drop)):
            if not values or any(value < 0 for value in values):
                raise MoeExportError(f"--{name} takes counts >= 0, e.g. 0,1,2")
        if not self.expert_keep or any(not 0 < share <= 1 for share in self.expert_keep):
            raise MoeExportError("--expert-keep takes shares of the experts in (0, 1], e.g. 1,0.75,0.5")
        if self.expert_scope not in ("global", "layer"):
            raise MoeExportError("--expert-scope is global or layer")
        if self.verify < 0:
            raise MoeExportError("--verify must be at least 0")
        if self.file_windows < 1:
            raise MoeExportError("--file-windows must be at least 1")


@dataclass
class TypeResult:
    """The untrimmed model in one weight type: its real file and what the type alone costs."""

    quant: str
    file_bytes: int
    token_bytes: int  # weight bytes read per decoded token
    kl: float  # KL(original torch || this file in llama.cpp) on the calibration windows
    top1_agreement: float
    tokens: int


@dataclass
class Trimming:
    """One trimming recipe applied to the original in torch, and its calibration KL."""

    label: str
    passes: list[dict]  # recipe entries, as a recipe YAML holds them
    block_drop: int
    layer_drop: int
    expert_keep: int  # requested average per MoE layer (E: no expert_drop)
    kl: float
    top1_agreement: float
    experts: list[int]  # routed experts per remaining layer (0: no MoE sublayer)
    file_experts: int  # the expert count of its GGUF (every layer padded to it)
    plans: list[str] = field(default_factory=list)  # the passes' plan summaries


@dataclass
class Candidate:
    """A trimming x a weight type: estimated size, decode bytes and KL; verified ones also measured."""

    trimming: int  # index into SearchReport.trimmings
    quant: str
    file_bytes: int  # estimate (exact for the untrimmed rows)
    token_bytes: int
    kl: float  # KL(trimming) + KL(type): an additive estimate
    kl_trimming: float
    kl_type: float
    size_share: float  # of the untrimmed F16 file
    decode_speedup: float  # bandwidth-bound, over the untrimmed F16 file
    meets: bool  # the constraint, by estimate
    pareto: bool = False  # on the (file_bytes, kl) front of all candidates
    verified: dict | None = None  # the real export: file_bytes, token_bytes, kl, top1_agreement, meets


@dataclass
class SearchReport:
    model: str
    target: str
    constraint: dict  # kind, value, description
    baseline: dict  # the untrimmed F16 file: file_bytes, token_bytes (and the limit in bytes, for sizes)
    calibration: dict
    grid: dict
    types: list[TypeResult]
    trimmings: list[Trimming]
    candidates: list[Candidate]
    chosen: int | None  # index into candidates
    skipped: list[dict]  # trimming recipes the model cannot take: label, reason
    notes: list[str]
    recipe_path: str | None = None
    build: dict | None = None  # the build of the chosen recipe: artifact, size against the limit, validation
    timings: dict = field(default_factory=dict)

    def chosen_row(self) -> dict | None:
        return None if self.chosen is None else self.row(self.chosen)

    def row(self, index: int) -> dict:
        """A candidate with its trimming spelled out."""
        candidate = self.candidates[index]
        trimming = self.trimmings[candidate.trimming]
        return asdict(candidate) | {"index": index, "label": trimming.label, "passes": trimming.passes,
                                    "block_drop": trimming.block_drop, "layer_drop": trimming.layer_drop,
                                    "expert_keep": trimming.expert_keep, "experts": trimming.experts}

    def pareto_rows(self) -> list[dict]:
        """The non-dominated candidates, smallest first."""
        rows = [self.row(i) for i, c in enumerate(self.candidates) if c.pareto]
        return sorted(rows, key=lambda row: (row["file_bytes"], row["kl"]))

    def recipe(self) -> dict:
        """The chosen recipe as moeexport.recipe.parse_recipe takes it."""
        row = self.chosen_row()
        if row is None:
            raise MoeExportError("no candidate was chosen")
        return {"passes": row["passes"]}

    def recipe_yaml(self, command: str | None = None) -> str:
        """The chosen recipe as YAML, under a comment header with the build flags it assumes and its numbers."""
        import yaml

        row = self.chosen_row()
        baseline = self.baseline["file_bytes"]
        flags = f"--target {self.target} --quant {row['quant']}"
        calibration = _calibration_flags(self.calibration)
        lines = [
            f"# Chosen by moeexport search ({self.constraint['description']}): the lowest calibration KL within it.",
            f"# Build flags it assumes: {flags}",
            f"#   moeexport build {self.model} --recipe THIS.yaml {flags}{calibration} --out DIR",
            *(["# (the passes choose what to drop from calibration statistics: build with the same calibration set)"]
              if row["passes"] else []),
            f"# estimated: {row['file_bytes']:,} bytes ({row['size_share']:.1%} of the untrimmed F16 GGUF's "
            f"{baseline:,}), decode x{row['decode_speedup']:.2f}, KL {row['kl']:.4g} "
            f"(trimming {row['kl_trimming']:.4g} + {row['quant']} {row['kl_type']:.4g}: an additive estimate)",
        ]
        verified = row.get("verified")
        if verified:
            lines.append(f"# measured (exported, run in llama.cpp on {self.grid['kl_tokens']['files']:,} calibration "
                         f"tokens): {verified['file_bytes']:,} "
                         f"bytes ({verified['file_bytes'] / baseline:.1%}), KL {verified['kl']:.4g}, "
                         f"top-1 agreement {verified['top1_agreement']:.1%}")
        if command:
            lines.append(f"# search: {command}")
        body = yaml.safe_dump({"passes": row["passes"]}, sort_keys=False, default_flow_style=None)
        return "\n".join(lines) + "\n" + body

    def to_dict(self) -> dict:
        from moeexport import __version__

        data = asdict(self)
        data["moeexport_version"] = __version__
        data["chosen_row"] = self.chosen_row()
        data["pareto"] = [row["index"] for row in self.pareto_rows()]
        return data


def _calibration_flags(calibration: dict) -> str:
    """The command-line flags that draw the same calibration set."""
    defaults = CalibrationOptions()
    flags = []
    source = calibration.get("source")
    if source and source != "model":
        flags.append(f" --calib {source}")
    for key, flag, default in (("num_sequences", "--calib-samples", defaults.samples),
                               ("sequence_length", "--calib-length", defaults.length), ("seed", "--seed", defaults.seed)):
        if calibration.get(key, default) != default:
            flags.append(f" {flag} {calibration[key]}")
    return "".join(flags)


# --- the search ---------------------------------------------------------------------------


def search(model: str | Path, target: str, constraint: Constraint, options: SearchOptions = SearchOptions(),
           on_event=None, command: str | None = None) -> SearchReport:
    """Search trimming recipes x weight types of `target` for the lowest calibration KL that meets `constraint`.

    Writes the chosen recipe to `options.out` (YAML, with its build flags in a comment header) and builds it
    into `options.build` when asked. `command` (the command line) is recorded in the YAML header."""
    from moeexport.modelio import resolve_model_dir
    from moeexport.outputs import check_output, check_output_file, replace_atomically
    from moeexport.pipeline import _quiet

    chosen, types = _check_target(target, options)
    if options.out:
        check_output_file(options.out, resolve_model_dir(model), options.overwrite)
    if options.build:
        check_output(options.build, resolve_model_dir(model), options.overwrite, "--build")
    events = EventStream(on_event)
    started = time.perf_counter()
    report = _quiet(_search)(model, chosen, types, constraint, options, events)
    report.timings["search"] = time.perf_counter() - started
    if options.out:
        path = Path(options.out)
        text = report.recipe_yaml(command)
        replace_atomically(path, lambda temporary: temporary.write_text(text))
        report.recipe_path = str(path)
    if options.build:
        started = time.perf_counter()
        report.build = _build(model, report, constraint, options, on_event)
        report.timings["build"] = time.perf_counter() - started
    return report


def _check_target(target: str, options: SearchOptions):
    """(the Target, the weight types searched); a target search cannot measure is refused before any work."""
    from moeexport.backends import target_for, target_names

    allowed = target_for(target).search_types
    if not allowed:
        searchable = {name: target_for(name).search_types for name in target_names()}
        supported = "; ".join(f"--target {name} ({', '.join(types)})" for name, types in searchable.items() if types)
        raise MoeExportError(f"search sizes and measures {supported} only, not --target {target}")
    types = tuple(options.quant_types or allowed)
    unknown = [quant for quant in types if quant not in allowed]
    if unknown:
        raise MoeExportError(f"--quant-types {','.join(unknown)}: search measures {target} types "
                             f"{', '.join(allowed)}")
    if len(set(types)) != len(types):
        raise MoeExportError("--quant-types lists a type twice")
    return target_for(target), types


def _search(model, target, types: tuple[str, ...], constraint: Constraint, options: SearchOptions,
            events: EventStream) -> SearchReport:
    import torch

    from moeexport.modelio import load, load_tokenizer
    from moeexport.pipeline import _calibration_source, memory_plan, statistics_provider
    from moeexport.recipe import Recipe
    compress_options = CompressOptions(calibration=options.calibration, measure_quality=False, dtype=options.dtype,
                                       trust_remote_code=options.trust_remote_code, max_memory=options.max_memory)
    memory = memory_plan(model, Recipe(steps=()), compress_options, observes=True)
    if memory.streamed:
        raise MoeExportError(f"search holds the model and trimmed copies of it in memory, and this one only runs "
                             f"streamed ({memory.describe()}): raise --max-memory, or search a smaller model")
    calibration = _calibration_source(memory, True, compress_options, events)
    if calibration.source != "model":
        from moeexport.calibration.sources import read_documents

        read_documents(calibration.source)  # a missing or malformed file fails now
    timings = {}
    with _timed(timings, "load"):
        events.stage(f"loading {model}")
        original = load(model, memory.dtype, options.trust_remote_code, options.allow_nonfinite)
        original.eval()
        tokenizer = load_tokenizer(model, options.trust_remote_code)
    provider = statistics_provider(model, tokenizer, calibration, events)
    tokens = provider.tokens(original)
    with _timed(timings, "reference"):
        events.stage("recording the original model's logits on the calibration set")
        reference = _record(original, tokens, calibration.batch_size)
        if reference.recorded.nbytes > SPILL_BYTES:
            reference = reference.spilled()
    with tempfile.TemporaryDirectory(prefix="moeexport-search-") as scratch:
        scratch = Path(scratch)
        file_windows = tokens[:options.file_windows]  # what each file is run on in llama.cpp
        with _timed(timings, "types"):
            measured = _measure_types(original, target, types, file_windows, reference, scratch, events)
        sizers = {quant: sizer for quant, (_, sizer) in measured.items()}
        type_results = [measured[quant][0] for quant in types]
        baseline = measured[BASELINE_TYPE][0]
        with _timed(timings, "trimmings"):
            trimmings, skipped, layouts = _trimmings(original, provider, tokens, reference, options, target, events)
        candidates = _candidates(trimmings, layouts, sizers, type_results, baseline, constraint)
        _mark_pareto(candidates)
        report = SearchReport(
            model=str(model), target=target.name,
            constraint={"kind": constraint.kind, "value": constraint.value, "description": constraint.describe()},
            baseline={"quant": BASELINE_TYPE, "file_bytes": baseline.file_bytes, "token_bytes": baseline.token_bytes,
                      **_limit(constraint, baseline)},
            calibration=provider.calibration.to_dict(),
            grid={"block_drop": list(options.block_drop), "layer_drop": list(options.layer_drop),
                  "expert_keep": list(options.expert_keep), "expert_scope": options.expert_scope,
                  "quant_types": list(types), "trimmings": len(trimmings) + len(skipped),
                  "candidates": len(candidates), "kl_tokens": {"trimmings": int(tokens[:, 1:].numel()),
                                                               "files": int(file_windows[:, 1:].numel())}},
            types=type_results, trimmings=trimmings, candidates=candidates, chosen=None, skipped=skipped,
            notes=list(NOTES),
        )
        with _timed(timings, "verify"):
            report.chosen = _choose(report, original, provider, reference, file_windows, constraint, options,
                                    scratch, events)
    report.timings = timings
    return report


def _record(model, tokens, batch_size: int):
    """The model's float32 logits on the calibration windows, a batch at a time (a RecordedReference)."""
    import numpy as np
    import torch

    from moeexport.validate import RecordedReference

    with torch.no_grad():
        logits = np.concatenate([model(input_ids=batch, use_cache=False).logits.float().numpy()
                                 for batch in tokens.split(batch_size)])
    return RecordedReference(tokens.numpy(), logits, "the calibration set")


class _timed:
    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.started = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - self.started


def _limit(constraint: Constraint, baseline: TypeResult) -> dict:
    if constraint.kind == "max_size":
        return {"limit_bytes": int(constraint.value * baseline.file_bytes)}
    if constraint.kind == "max_bytes":
        return {"limit_bytes": int(constraint.value)}
    return {"limit_token_bytes": int(baseline.token_bytes / constraint.value)}


# --- weight types: the untrimmed model in each ---------------------------------------------


def _export(target, model, quant: str, directory: Path) -> Path:
    """The target's file of `model` in weight type `quant`, written into the new `directory`."""
    from moeexport.backends.target import ExportInputs

    directory.mkdir()
    return target.export(model, directory, quant, target.options(), ExportInputs()).path


def _run_artifact(target, path: Path, tokens, reference):
    """KL(reference || the file run by the target) over the calibration windows: a validate.Fidelity."""
    from moeexport.validate import compare

    runner = target.runner(path, tokens.shape[1])
    try:
        return compare(reference, runner, tokens)
    finally:
        getattr(runner, "close", lambda: None)()  # a runner holding its runtime's memory frees it now


def _measure_types(original, target, types: tuple[str, ...], tokens, reference, scratch: Path,
                   events: EventStream) -> dict:
    """quant -> (TypeResult, the target's Sizer) of the untrimmed model's file in that type (F16 always: the
    baseline)."""
    wanted = types if BASELINE_TYPE in types else (BASELINE_TYPE, *types)
    task = events.add_task(f"exporting the untrimmed model in {len(wanted)} weight types and running each in "
                           "llama.cpp", total=len(wanted))
    measured = {}
    for quant in wanted:
        path = _export(target, original, quant, scratch / f"untrimmed-{quant}")
        fidelity = _run_artifact(target, path, tokens, reference)
        measured[quant] = (TypeResult(quant, path.stat().st_size, target.token_bytes(path).total, fidelity.kl,
                                      fidelity.top1_agreement, fidelity.tokens), target.sizer(path))
        shutil.rmtree(path.parent)
        events.advance(task)
    events.remove_task(task)
    return measured


# --- trimming candidates -----------------------------------------------------------------


class _Prefixed:
    """The one StatisticsProvider, for a model that a recipe prefix already compressed: statistics are keyed
    by the prefix's steps followed by the passes applied now, as one compress of the whole recipe keys them.

    It applies one recipe entry at a time, so a removal scorer (`score: perplexity`) always measures the model the
    prefix left: its damages are remembered under the prefix's key in `memo`, shared by every candidate. Greedy
    drops of n and n + 1 then share their first n steps' measurements instead of repeating them."""

    def __init__(self, provider, history: list[dict], memo: dict):
        self._provider, self._history, self._memo = provider, history, memo

    def statistics(self, model, history: list[dict]):
        return self._provider.statistics(model, self._history + history)

    def scorer(self, model):
        return _RememberingScorer(self._provider.scorer(model), self._memo, self._provider.key(self._history))

    def __getattr__(self, name):
        return getattr(self._provider, name)


class _RememberingScorer:
    """A RemovalScorer whose `damage` answers removals measured before (on the same model state) from `memo`."""

    def __init__(self, scorer, memo: dict, state: str):
        self._scorer, self._memo, self._state = scorer, memo, state

    def damage(self, removals, metric: str) -> list[float]:
        keys = [(self._state, metric, frozenset(removal)) for removal in removals]
        missing = [key for key in dict.fromkeys(keys) if key not in self._memo]
        if missing:
            for key, value in zip(missing, self._scorer.damage([key[2] for key in missing], metric)):
                self._memo[key] = value
        return [self._memo[key] for key in keys]

    def __getattr__(self, name):
        return getattr(self._scorer, name)


@dataclass
class _Applied:
    model: object
    history: list[dict]  # AppliedStep.to_dict() of every step so far
    passes: list[dict]  # the recipe entries so far
    plans: list[str]
    new_block_index: list[int | None]  # original block -> its index now


def _apply(state: _Applied, entry: dict | None, provider, memo: dict) -> _Applied:
    """`state` with one more recipe entry applied, to a copy (None: the state itself, shared)."""
    if entry is None:
        return state
    from moeexport.compress import compress
    from moeexport.recipe import parse_recipe

    model = copy.deepcopy(state.model)
    result = compress(model, parse_recipe({"passes": [entry]}), _Prefixed(provider, state.history, memo))
    index = [None if i is None else result.new_block_index[i] for i in state.new_block_index]
    steps = [step.to_dict() for step in result.steps]
    plans = [f"{step.name}: {line}" for step in result.steps for line in step.plan.describe()]
    return _Applied(model, state.history + steps, state.passes + [entry], state.plans + plans, index)


def _grid(original, options: SearchOptions):
    """(block_drop n, layer_drop n, expert keep) values that can apply to this model, and its E and top-k."""
    from moeexport.adapters import adapter_for
    from moeexport.adapters.base import structure

    adapter = adapter_for(original.config)
    layers = structure(adapter, original)
    moe = [spec for spec in layers if spec.kind == "moe"]
    experts = max(spec.num_experts for spec in moe)
    top_k = max(spec.top_k for spec in moe)
    keeps = sorted({max(1, round(share * experts)) for share in options.expert_keep}, reverse=True)
    blocks = sorted({n for n in options.block_drop if n < len(layers)})
    layer_drops = sorted({n for n in options.layer_drop if n < len(moe)})
    return blocks, layer_drops, keeps, experts, top_k


def _label(block: int, layer: int, keep: int, experts: int) -> str:
    parts = ([f"block_drop {block}"] if block else []) + ([f"layer_drop {layer}"] if layer else [])
    parts += [f"experts {keep}/{experts}"] if keep < experts else []
    return " + ".join(parts) or "untrimmed"


def _trimmings(original, provider, tokens, reference, options: SearchOptions, target, events: EventStream):
    """Every trimming recipe of the grid applied in torch: (trimmings, skipped, (the target's layout of each, its
    new block index))."""
    from moeexport.evaluate import evaluate

    blocks, layer_drops, keeps, experts, top_k = _grid(original, options)
    total = len(blocks) * len(layer_drops) * len(keeps)
    task = events.add_task(f"trimming candidates: {total} recipes applied and scored on the calibration set",
                           total=total)
    root = _Applied(original, [], [], [], list(range(len(_layers(original)))))
    trimmings, skipped, layouts = [], [], []
    memo = {}  # removal damages measured by `score: perplexity | kl` passes, by model state (_Prefixed)

    def skip(block: int, layer: int, keep_values, error: Exception) -> None:
        for keep in keep_values:
            skipped.append({"label": _label(block, layer, keep, experts), "reason": str(error)})
            events.advance(task)

    for block in blocks:
        try:
            blocked = _apply(root, {"block_drop": {"n": block}} if block else None, provider, memo)
        except MoeExportError as error:
            for layer in layer_drops:
                skip(block, layer, keeps, error)
            continue
        for layer in layer_drops:
            try:
                layered = _apply(blocked, {"layer_drop": {"n": layer}} if layer else None, provider, memo)
            except MoeExportError as error:
                skip(block, layer, keeps, error)
                continue
            for keep in keeps:
                entry = None
                if keep < experts:
                    entry = {"expert_drop": {"keep": keep, "scope": options.expert_scope}}
                    if options.expert_scope == "global":
                        entry["expert_drop"]["min_keep"] = min(top_k, keep)
                try:
                    leaf = _apply(layered, entry, provider, memo)
                    layout = target.layout(leaf.model)
                except MoeExportError as error:
                    skip(block, layer, [keep], error)
                    continue
                if leaf.model is original:
                    kl, top1 = 0.0, 1.0  # the original itself
                else:
                    scored = evaluate(leaf.model, tokens, reference=reference)
                    kl, top1 = scored.kl, scored.top1_agreement
                layers = _layers(leaf.model)
                trimmings.append(Trimming(
                    label=_label(block, layer, keep, experts), passes=_pinned(leaf), block_drop=block,
                    layer_drop=layer, expert_keep=keep, kl=kl, top1_agreement=top1,
                    experts=[spec.num_experts for spec in layers], file_experts=layout.num_experts,
                    plans=leaf.plans))
                layouts.append((layout, leaf.new_block_index))
                events.advance(task)
                del leaf
            del layered
        del blocked
    events.remove_task(task)
    if not trimmings:
        reasons = "; ".join(sorted({entry["reason"] for entry in skipped}))
        raise MoeExportError(f"the model takes none of the grid's trimming recipes ({reasons})")
    return trimmings, skipped, layouts


def _layers(model):
    from moeexport.adapters import adapter_for
    from moeexport.adapters.base import structure

    return structure(adapter_for(model.config), model)


def _pinned(applied: _Applied) -> list[dict]:
    """The recipe entries as applied, each pass's score written out: the default it ran with when searched, so
    that the recipe selects the same way if a default changes later."""
    pinned = []
    for entry, step in zip(applied.passes, applied.history):
        (name, given), = entry.items()
        options = dict(given)
        if "score" in step["options"]:
            options["score"] = step["options"]["score"]
        pinned.append({name: options})
    return pinned


def _candidates(trimmings: list[Trimming], layouts, sizers: dict, types: list[TypeResult], baseline: TypeResult,
                constraint: Constraint) -> list[Candidate]:
    candidates = []
    for index, (trimming, (layout, new_block_index)) in enumerate(zip(trimmings, layouts)):
        for result in types:
            estimate = sizers[result.quant].size(layout, new_block_index)  # exact for the untrimmed model
            size, read = estimate.file_bytes, estimate.token_bytes
            candidates.append(Candidate(
                trimming=index, quant=result.quant, file_bytes=size, token_bytes=read,
                kl=trimming.kl + result.kl, kl_trimming=trimming.kl, kl_type=result.kl,
                size_share=size / baseline.file_bytes, decode_speedup=baseline.token_bytes / read,
                meets=constraint.meets(size, read, baseline.file_bytes, baseline.token_bytes)))
    return candidates


def _mark_pareto(candidates: list[Candidate]) -> None:
    """Mark the candidates no other is at least as small and as close as, and strictly better in one."""
    ordered = sorted(range(len(candidates)), key=lambda i: (candidates[i].file_bytes, candidates[i].kl))
    best = math.inf
    for i in ordered:
        if candidates[i].kl < best:
            candidates[i].pareto = True
            best = candidates[i].kl


# --- choosing, for real --------------------------------------------------------------------


def _choose(report: SearchReport, original, provider, reference, tokens, constraint: Constraint,
            options: SearchOptions, scratch: Path, events: EventStream) -> int:
    """The lowest-KL candidate that meets the constraint: by estimate, then (up to `verify` of them, best first)
    exported and measured, the first whose real file meets it."""
    target = _target(report)
    feasible = sorted((i for i, c in enumerate(report.candidates) if c.meets),
                      key=lambda i: (report.candidates[i].kl, report.candidates[i].file_bytes))
    if not feasible:
        smallest = min(report.candidates, key=lambda c: c.file_bytes)
        fastest = max(report.candidates, key=lambda c: c.decode_speedup)
        best = (f"the fastest is x{fastest.decode_speedup:.2f} ({report.trimmings[fastest.trimming].label}, "
                f"{fastest.quant})" if constraint.kind == "min_decode_speedup" else
                f"the smallest is {smallest.file_bytes:,} bytes, {smallest.size_share:.1%} of the F16 GGUF "
                f"({report.trimmings[smallest.trimming].label}, {smallest.quant})")
        raise MoeExportError(f"no candidate meets {constraint.describe()}: {best}; relax the limit, or widen the "
                             "grid (--block-drop, --layer-drop, --expert-keep)")
    if options.verify == 0:
        return feasible[0]
    baseline = report.baseline
    task = events.add_task("exporting the best candidates to check their real size", total=min(options.verify,
                                                                                                 len(feasible)))
    try:
        for attempt, index in enumerate(feasible[:options.verify]):
            candidate = report.candidates[index]
            trimming = report.trimmings[candidate.trimming]
            model = _rebuild(original, trimming, provider)
            path = _export(target, model, candidate.quant, scratch / f"candidate-{index}")
            del model
            fidelity = _run_artifact(target, path, tokens, reference)
            size, read = path.stat().st_size, target.token_bytes(path).total
            shutil.rmtree(path.parent)
            meets = constraint.meets(size, read, baseline["file_bytes"], baseline["token_bytes"])
            candidate.verified = {"file_bytes": size, "token_bytes": read, "kl": fidelity.kl,
                                  "top1_agreement": fidelity.top1_agreement, "size_share": size / baseline["file_bytes"],
                                  "decode_speedup": baseline["token_bytes"] / read, "meets": meets,
                                  "estimate_error_bytes": candidate.file_bytes - size}
            events.advance(task)
            if meets:
                return index
            events.note(f"{trimming.label} {candidate.quant}: estimated {candidate.file_bytes:,} bytes, really "
                        f"{size:,}: misses {constraint.describe()}; trying the next best")
    finally:
        events.remove_task(task)
    raise MoeExportError(f"the {options.verify} best candidates by estimate miss {constraint.describe()} once "
                         "exported (see the estimates' error): raise --verify, or tighten the limit a little")


def _target(report: SearchReport):
    from moeexport.backends import target_for

    return target_for(report.target)


def _rebuild(original, trimming: Trimming, provider):
    """The trimming applied again to a copy of the original (statistics come from the provider's cache)."""
    from moeexport.compress import compress
    from moeexport.recipe import parse_recipe

    if not trimming.passes:
        return original
    model = copy.deepcopy(original)
    compress(model, parse_recipe({"passes": trimming.passes}), provider)
    return model


# --- building the chosen recipe -------------------------------------------------------------


def _build(model, report: SearchReport, constraint: Constraint, options: SearchOptions, on_event) -> dict:
    """`moeexport build` of the chosen recipe and type; its file against the constraint."""
    from moeexport.pipeline import build

    row = report.chosen_row()
    built = build(model, report.recipe(), report.target, BuildOptions(
        out=options.build, calibration=replace(options.calibration, source=report.calibration["source"]),
        eval_text=options.eval_text, overwrite=options.overwrite, dtype=options.dtype,
        trust_remote_code=options.trust_remote_code, allow_nonfinite=options.allow_nonfinite,
        max_memory=options.max_memory, quant=row["quant"]), on_event)
    artifact = Path(built.artifact["path"])
    size = artifact.stat().st_size
    read = _target(report).token_bytes(artifact).total
    baseline = report.baseline
    meets = constraint.meets(size, read, baseline["file_bytes"], baseline["token_bytes"])
    return {
        "out": built.out, "ok": built.ok, "failures": built.failures, "artifact": str(artifact), "quant": built.quant,
        "file_bytes": size, "size_share": size / baseline["file_bytes"], "token_bytes": read,
        "decode_speedup": baseline["token_bytes"] / read, "meets": meets,
        "estimated_file_bytes": row["file_bytes"], "verified_file_bytes": (row.get("verified") or {}).get("file_bytes"),
        "validation": {key: built.validation.get(key) for key in ("text", "tokens", "kl", "top1_agreement",
                                                                   "max_abs_logit", "perplexity",
                                                                   "reference_perplexity")},
        "quality_vs_source": built.compression.quality_vs_source,
    }
