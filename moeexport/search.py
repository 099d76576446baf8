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
  applied in memory, sharing one StatisticsProvider (trimming_grid.py). Its KL is
  one forward of the calibration tokens against the original's recorded logits.
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
it to validate). The constraint, options and report are plain data in
search_report.py.
"""

from __future__ import annotations

import copy
import math
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from moeexport.errors import MoeExportError
from moeexport.events import EventStream
from moeexport.pipeline import BuildOptions, CompressOptions
from moeexport.search_report import Candidate, Constraint, SearchOptions, SearchReport, Trimming, TypeResult
from moeexport.trimming_grid import apply_grid

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
    _check_before_work(model, constraint, options)
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


SMALLEST_WEIGHT_BYTES = 0.5  # every weight type a target writes stores at least 4 bits per weight


def _check_before_work(model, constraint: Constraint, options: SearchOptions) -> None:
    """Drop counts the model has the layers for, and a constraint some candidate could meet, checked from the
    model's config and weight headers before any work. The bounds are loose but sure: every file stores the token
    embeddings and every token reads the LM head, each at SMALLEST_WEIGHT_BYTES per weight or more, while the
    untrimmed F16 file reads at most every parameter, at 4 bytes, per token."""
    from moeexport.source import open_source

    source = open_source(model, options.trust_remote_code)
    config = source.config
    head = config.vocab_size * config.hidden_size * SMALLEST_WEIGHT_BYTES
    if constraint.kind == "max_bytes" and constraint.value < head:
        raise MoeExportError(f"--max-bytes {constraint.value:,.0f} bytes is less than any file of {model} can be: its "
                             f"token embeddings alone take {head:,.0f} bytes at 4 bits per weight; give more")
    if constraint.kind == "min_decode_speedup":
        bound = 4 * sum(math.prod(shape) for shape, _, _ in source.headers.values()) / head
        if constraint.value > bound:
            raise MoeExportError(f"--min-decode-speedup {constraint.value:g}x is more than any trimming of {model} "
                                 f"reaches: every token reads its LM head, so at most {bound:.0f}x; ask for less")
    layers = config.num_hidden_layers
    for flag, counts, most in (("--block-drop", options.block_drop, layers - 1), ("--layer-drop", options.layer_drop,
                                                                                 layers)):
        too_many = [count for count in counts if count > most]
        if too_many:
            raise MoeExportError(f"{flag} {','.join(map(str, too_many))}: {model} has {layers} decoder layers, so "
                                 f"at most {most} can be dropped")


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
            trimmings, skipped, layouts = apply_grid(original, provider, tokens, reference, options, target, events)
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


# --- candidates: every trimming x weight type, sized by the target ------------------------


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
