"""How the CLI shows what the pipeline reports: progress from events on stderr, reports as tables and lines.

Nothing here computes anything; every function takes a report the pipeline
returned (or an Event it emitted) and renders it with rich.
"""

from __future__ import annotations

import itertools
import re
import time
from dataclasses import asdict
from datetime import datetime

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from moeexport.events import Event
from moeexport.report import describe_imatrix, describe_layer

MIB = 2**20


class EventRenderer:
    """Turns pipeline events into progress and log lines on stderr; a context manager around a run.

    In a terminal: live bars (done/total and ETA where the total is known), with log lines printed above
    them. Otherwise (a log file, a pipe, CI): plain timestamped lines, since live bars write nothing there
    until the end; see LogLines.
    """

    def __init__(self, out: Console, quiet_steps: bool = False, err: Console | None = None):
        self.out, self.err = out, err or Console(stderr=True, highlight=False)
        self.quiet_steps = quiet_steps  # with --json, pass plans go to stderr like the rest of the log
        self.progress = (Progress(TextColumn("{task.description}"), BarColumn(), _CountColumn(), TimeElapsedColumn(),
                                  _RemainingColumn(), console=self.err, transient=True)
                         if self.err.is_terminal else LogLines(self.err))
        self._tasks: dict[int, int] = {}
        self._stage = None  # the task that shows the current stage, replaced by the next one

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._stage is not None and exc[0] is None:  # the last stage ends with the run
            self.progress.remove_task(self._stage)
        return self.progress.__exit__(*exc)

    def __call__(self, event: Event) -> None:
        if event.kind == "task":
            self._tasks[event.task] = self.progress.add_task(event.message, total=event.total)
        elif event.kind == "advance":
            self.progress.advance(self._tasks[event.task], event.amount)
        elif event.kind == "done":
            self.progress.remove_task(self._tasks.pop(event.task))
        elif event.kind == "stage":  # transient like the bars: stderr keeps only what matters
            if self._stage is not None:
                self.progress.remove_task(self._stage)
            self._stage = self.progress.add_task(f"[dim]{escape(event.message)}[/dim]", total=None)
        elif event.kind == "step":
            console = self.progress.console if self.quiet_steps else self.out
            console.print(f"[bold]{event.message}[/bold] {escape(str(event.data['options']))}")
            for line in event.data["summary"]:
                console.print(f"  {escape(line)}")
        else:
            self.progress.console.print(f"note: {escape(event.message)}")


class _CountColumn(MofNCompleteColumn):
    """done/total, and nothing for a task whose total is unknown (rather than `0/?`)."""

    def render(self, task):
        return super().render(task) if task.total is not None else Text("")


class _RemainingColumn(TimeRemainingColumn):
    """`eta 0:01:02` once the total is known; nothing otherwise (an elapsed time read as an ETA misleads)."""

    def render(self, task):
        return Text.assemble("eta ", super().render(task)) if task.total is not None else Text("")


PROGRESS_LINE = re.compile(r"\[\d\d:\d\d:\d\d\] ")  # how a LogLines line starts (stderr not a terminal)


class LogLines:
    """Progress as timestamped lines, for a stderr that is not a terminal: a line when a stage or task
    starts, then one per tenth of a task's total (at most one per LogLines.EVERY seconds) with done/total,
    elapsed time and ETA, and one when it ends. The same calls as rich's Progress."""

    EVERY = 10.0  # seconds between two lines of one task, however fast it advances

    def __init__(self, console: Console):
        self.console = console
        self._tasks: dict[int, dict] = {}
        self._ids = itertools.count()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def add_task(self, description: str, total: float | None = None) -> int:
        task = next(self._ids)
        now = time.monotonic()
        self._tasks[task] = {"description": description, "total": total, "done": 0.0, "start": now, "said": now,
                             "said_done": 0.0}
        self._line(description + (f": 0/{total:g}" if total else ""))
        return task

    def advance(self, task: int, advance: float = 1) -> None:
        state = self._tasks[task]
        state["done"] += advance
        total, now = state["total"], time.monotonic()
        if not total or now - state["said"] < self.EVERY and state["done"] - state["said_done"] < total / 10:
            return
        elapsed = now - state["start"]
        eta = elapsed / state["done"] * (total - state["done"]) if state["done"] else None
        self._line(f"{state['description']}: {state['done']:g}/{total:g}, {_clock(elapsed)} elapsed"
                   + (f", eta {_clock(eta)}" if eta is not None and state["done"] < total else ""))
        state["said"], state["said_done"] = now, state["done"]

    def remove_task(self, task: int) -> None:
        state = self._tasks.pop(task)
        self._line(f"{state['description']}: done in {_clock(time.monotonic() - state['start'])}")

    def _line(self, message: str) -> None:
        self.console.print(f"[{datetime.now():%H:%M:%S}] {message}", highlight=False, soft_wrap=True)


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


def console() -> Console:
    """Standard output; piped into a file or another program, lines are not wrapped at 80 columns (paths stay whole)."""
    out = Console(highlight=False)
    out.soft_wrap = not out.is_terminal
    return out


def render_compression(out: Console, report, quality: bool = True) -> None:
    """The structure table and sizes; with `quality`, the quality line too (a build prints it with its headline)."""
    table = Table(title="structure before -> after")
    for header in ("layer", "before", "after", "new index"):
        table.add_column(header, justify="right")
    for index, (before, new_index) in enumerate(zip(report.layers_before, report.new_block_index)):
        after = "block dropped" if new_index is None else describe_layer(report.layers_after[new_index])
        table.add_row(str(index), describe_layer(before), after, "" if new_index is None else str(new_index))
    out.print(table)
    parameters, size = report.parameters, report.bytes
    out.print(f"parameters {parameters['before']:,} -> {parameters['after']:,} "
              f"({parameters['after'] / parameters['before']:.1%}); torch weights in memory "
              f"{size['before'] / MIB:.1f} MiB -> {size['after'] / MIB:.1f} MiB")
    if quality:
        out.print(quality_line(report))


def quality_line(report) -> str:
    """What compression cost against the source (a CompressionReport), or why that is not measured."""
    quality = report.quality_vs_source
    if quality:
        return (f"quality vs the source on {escape(quality['text'])}: perplexity "
                f"{quality['reference_perplexity']:.2f} -> {quality['perplexity']:.2f}, KL {quality['kl']:.4f}, "
                f"top-1 agreement {quality['top1_agreement']:.1%}")
    if not report.passes:
        return "quality vs the source: no compression, so it is the export's fidelity below"
    return "quality vs the source: not measured (--no-eval)"


def _share(after: int, before: int, of: str) -> str:
    """`after` as a share of `before`, what `of` names, e.g. "12.5% of the input (8.00x smaller)"."""
    smaller = f", {before / after:.2f}x smaller" if 0 < after < before else ""
    return f"{after / before:.1%} of {of}{smaller}"


def fidelity_line(validation: dict) -> str:
    return (f"max |delta logit| {validation['max_abs_logit']:.2e}, KL {validation['kl']:.2e}, "
            f"top-1 {validation['top1_agreement']:.2%}, perplexity {validation['reference_perplexity']:.2f} -> "
            f"{validation['perplexity']:.2f}")


def profile_line(speed: dict) -> str:
    line = (f"profile: prefill {speed['prefill_tokens_per_s']:.0f} tok/s, decode {speed['decode_tokens_per_s']:.0f} "
            f"tok/s, time to first token {speed['time_to_first_token_s'] * 1000:.0f} ms")
    if "threads" in speed:
        line += f" on {_threads(speed['threads'])}"
    if "runtime_rss_bytes" in speed:
        line += (f", memory {speed['runtime_rss_bytes'] / MIB:.0f} MiB held by the runtime (process peak "
                 f"{speed['peak_rss_bytes'] / MIB:.0f} MiB, Python and torch included)")
    if "torch_peak_allocated_bytes" in speed:
        line += (f", GPU peak {speed['torch_peak_allocated_bytes'] / MIB:.0f} MiB + engine "
                 f"{(speed.get('engine_device_memory_bytes') or 0) / MIB:.0f} MiB")
    return line


def render_build(out: Console, report) -> None:
    """The structure, then what was lost (against the source, and a GGUF input), then the export's fidelity."""
    render_compression(out, report.compression, quality=False)
    artifact, validation = report.artifact, report.validation
    out.print(f"[bold]{quality_line(report.compression)}[/bold]")
    if report.quality_vs_input:
        out.print(f"[bold]quality vs the input GGUF, both in llama.cpp: {fidelity_line(report.quality_vs_input)}[/bold]")
    verdict = "[green]passed[/green]" if report.ok else "[red]FAILED[/red]"
    out.print(f"export fidelity {verdict} ({escape(validation['runtime'])} vs the compressed torch model on "
              f"{escape(validation['text'])}, {validation['tokens']} tokens): {fidelity_line(validation)}")
    given = report.compression.input_file_bytes
    on_disk = (f"; {_share(artifact['file_bytes'], given, f'the input files on disk ({given / MIB:.1f} MiB)')}"
               if given else "")
    out.print(f"exported {artifact['path']} ({artifact['file_bytes'] / MIB:.1f} MiB, "
              f"{escape(artifact['representation'])}){on_disk}")
    if artifact.get("imatrix"):
        out.print(f"  {escape(describe_imatrix(artifact['imatrix']))}")
    for fallback in artifact["fallbacks"]:
        out.print(f"  note: {escape(fallback)}")
    if report.profile:
        busy = (report.profile.get("machine_load") or {}).get("warning")
        if busy:
            out.print(f"[bold yellow]{escape(busy)}[/bold yellow]")
        out.print(profile_line(report.profile))
    engine = report.engine
    if engine is not None and not engine.get("built"):
        out.print(f"engine not built: {escape(engine['reason'])}.\nTo finish on the device (JetPack 6.x: TensorRT "
                  f"10.3): copy the bundle directory {report.out}/bundle there and run `moeexport trt-build bundle` "
                  "(steps in bundle/README.txt)")
    elif engine is not None:
        render_device(out, engine)
    out.print(read_line(report))
    out.print(f"wrote {report.out} in {report.timings['total']:.1f}s (report.json, report.html)")


def read_line(report) -> str:
    """The pipeline's profile in one line (a BuildReport): what each stage read of the model's files and how fast,
    against the disk."""
    from moeexport.report import gigabytes_per_s, read_profile, size

    disk = report.disk_read or {}
    rows = read_profile(report.timings, report.read_bytes, disk)
    total = next((row for row in rows if row["stage"] == "total"), None)
    stages = ", ".join(f"{row['stage']} {size(row['read_bytes'])} at {gigabytes_per_s(row['read_bytes_per_s'])}"
                       + (f" ({row['share_of_disk']:.0%} of the disk)" if row["share_of_disk"] is not None else "")
                       for row in rows if row["stage"] != "total" and row["read_bytes"])
    cached = ", cached: the page cache's speed" if disk.get("cache") == "cached" else ""
    return (f"read {size(total['read_bytes'] if total else None)} of the model's files (the disk reads "
            f"{gigabytes_per_s(disk.get('bytes_per_s'))}{cached}): {stages or 'nothing'}")


def render_device(out: Console, report: dict) -> None:
    engine, device = report["engine"], report["device"]
    out.print(f"built {engine['engine']} ({engine['engine_bytes'] / MIB:.1f} MiB, {engine['precision']}, TensorRT "
              f"{engine['tensorrt_version']} on {device['gpu']}) in {engine['build_seconds']:.0f}s")
    out.print(f"fidelity vs bundled torch logits ({report['validation']['tokens']} tokens): "
              f"{fidelity_line(report['validation'])}")
    out.print(profile_line(report["profile"]))


def render_analysis(out: Console, report) -> None:
    rows = report.layers
    table = Table(title=f"{report.model}: per-layer statistics on {report.calibration_tokens} calibration tokens")
    for header in ("layer", "kind", "experts", "least / most used expert", "unused", "cos(h_in,h_out)", "cos(x,x+MoE)"):
        table.add_column(header, justify="right")
    for row in rows:
        spread = f"{row['least_used']:.1%} / {row['most_used']:.1%}" if row.get("experts") else ""
        moe = f"{row['moe_similarity']:.4f}" if row["moe_similarity"] is not None else ""
        table.add_row(str(row["layer"]), row["kind"], str(row.get("experts", "")), spread,
                      str(row.get("unused_experts", "")), f"{row['block_similarity']:.4f}", moe)
    out.print(table)
    candidates = report.candidates
    how = "KL if dropped alone" if candidates["measured"] else "by similarity, not measured"

    def listed(rows: list[dict], name) -> str:
        return ", ".join(name(row) + (f" (KL {row['kl']:.3g})" if "kl" in row else "") for row in rows[:3]) or "none"

    out.print(f"Block Drop candidates, cheapest first ({how}): "
              + listed(candidates["block_drop"], lambda row: f"block {row['layer']}"))
    out.print(f"Layer Drop candidates (MoE sublayers), cheapest first ({how}): "
              + listed(candidates["layer_drop"], lambda row: f"layer {row['layer']}"))
    out.print("Expert Drop candidates, cheapest first (lowest REAP of each layer"
              + (", KL if dropped alone): " if any("kl" in row for row in candidates["expert_drop"]) else "): ")
              + listed(candidates["expert_drop"], lambda row: f"layer {row['layer']} expert {row['expert']}"))
    for note in candidates["notes"]:
        out.print(f"note: {escape(note)}")
    out.print(f"wrote {', '.join(report.files)}")


def render_eval(out: Console, model: str, text: str, result) -> None:
    line = f"{model} on {text} ({result.tokens} tokens): perplexity {result.perplexity:.3f}"
    if result.kl is not None:
        line += (f"; reference perplexity {result.reference_perplexity:.3f}, KL(reference || model) {result.kl:.5f}, "
                 f"top-1 agreement {result.top1_agreement:.2%}")
    out.print(line)


def render_validation(out: Console, reference: str, validation) -> None:
    out.print(f"{validation.artifact} ({escape(validation.runtime)}) vs {reference} on {validation.fidelity.tokens} "
              f"tokens of {validation.text}: {fidelity_line(validation.fidelity.to_dict())}")
    limits = ", ".join(f"{name} {value:g}" for name, value in asdict(validation.tolerance).items() if value is not None)
    verdict = "[green]within[/green]" if validation.passed else "[red]MISSES[/red]"
    out.print(f"verdict: {verdict} its tolerance ({limits})")


def render_bench(out: Console, report) -> None:
    """Speeds and memory side by side, then each decode speed against its memory-bandwidth bound; on a busy
    machine, a warning first that the numbers are not reliable."""
    if report.machine_load and report.machine_load["warning"]:
        out.print(f"[bold yellow]{escape(report.machine_load['warning'])}[/bold yellow]")
    table = Table(title=f"{report.repeats} runs each: median, min-max, and x the baseline's median; "
                        f"{report.prompt_tokens}-token prompt, {report.new_tokens} tokens decoded, {_threads(report.threads)}")
    for header in ("artifact", "prefill tok/s", "decode tok/s", "runtime MiB", "process peak MiB"):
        table.add_column(header, justify="left" if header == "artifact" else "right", overflow="fold")
    for result in report.artifacts:
        table.add_row(escape(result.label) + ("\n(baseline)" if result.baseline else ""),
                      _spread(result.prefill_tokens_per_s) + f"\nx{result.prefill_ratio:.2f}",
                      _spread(result.decode_tokens_per_s) + f"\nx{result.decode_ratio:.2f}",
                      _spread(result.runtime_rss_bytes, MIB, 0), _spread(result.peak_rss_bytes, MIB, 0))
    out.print(table)
    runtimes = {result.format: result.runtime for result in report.artifacts}
    out.print("runtimes: " + "; ".join(f"{name} {escape(runtime)}" for name, runtime in runtimes.items()))
    bandwidth = report.bandwidth
    table = Table(title=f"decode against the memory-bandwidth bound ({bandwidth.bytes_per_s / 1e9:.1f} GB/s)")
    for header in ("artifact", "weight MiB/token", "experts read", "bound tok/s", "decode tok/s", "of bound"):
        table.add_column(header, justify="left" if header in ("artifact", "experts read") else "right", overflow="fold")
    for result in report.artifacts:
        table.add_row(escape(result.label), f"{result.token_bytes['total'] / MIB:.2f}",
                      escape(result.token_bytes["experts_read"]), _rate(result.bound_tokens_per_s),
                      _rate(result.decode_tokens_per_s.median), f"{result.bound_fraction:.1%}")
    out.print(table)
    out.print(f"bandwidth {bandwidth.bytes_per_s / 1e9:.1f} GB/s: {bandwidth.method}; {bandwidth.buffer_bytes / MIB:.0f} "
              f"MiB, {_threads(bandwidth.threads)}, median of {bandwidth.runs} runs ({bandwidth.min_bytes_per_s / 1e9:.1f}"
              f"-{bandwidth.max_bytes_per_s / 1e9:.1f} GB/s)")
    out.print("bound = bandwidth / the weight bytes one decoded token reads, at the types the runtime holds them "
              "(attention, top-k experts, head, one embedding row); KV-cache reads left out")
    for note in report.notes:
        out.print(f"note: {escape(note)}")
    if report.files:
        out.print(f"wrote {', '.join(report.files)} in {report.seconds:.0f}s")


def _threads(count: int) -> str:
    return f"{count} thread{'' if count == 1 else 's'}"


def _rate(value: float, digits: int | None = None) -> str:
    digits = digits if digits is not None else 0 if abs(value) >= 100 else 1
    return f"{value:,.{digits}f}"


def _spread(spread, unit: float = 1, digits: int | None = None) -> str:
    """The median over its range, in `unit`s."""
    low, high = _rate(spread.min / unit, digits), _rate(spread.max / unit, digits)
    return f"{_rate(spread.median / unit, digits)}\n[dim]{low}-{high}[/dim]"


def render_search(out: Console, report) -> None:
    """The Pareto front of the candidates (estimated size against estimated KL), the choice, and its build."""
    baseline = report.baseline
    shown = {row["index"]: row for row in report.pareto_rows()}
    for index, candidate in enumerate(report.candidates):
        if candidate.verified is not None or index == report.chosen:
            shown.setdefault(index, report.row(index))
    rows = sorted(shown.values(), key=lambda row: (row["file_bytes"], row["kl"]))
    grid = report.grid
    table = Table(title=f"Pareto front of {grid['candidates']} candidates ({len(report.trimmings)} trimmings x "
                        f"{len(report.types)} types), estimated; {escape(report.constraint['description'])}",
                  caption="drop: blocks / MoE sublayers dropped; experts: kept per MoE layer on average / in the "
                          "file (padded); KL = trim + the type's own (below): an additive estimate; * chosen; dim: "
                          "off the front",
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0, 0, 1))
    for header in ("", "drop", "experts", "quant", "MiB", "of F16", "decode", "KL", "trim", "fit"):
        table.add_column(header, justify="left" if header in ("", "quant", "fit") else "right", no_wrap=True)
    for row in rows:
        chosen = row["index"] == report.chosen
        trimming = report.trimmings[report.candidates[row["index"]].trimming]
        style = "bold green" if chosen else (None if row["pareto"] else "dim")
        table.add_row("*" if chosen else "", f"{row['block_drop']}/{row['layer_drop']}",
                      f"{row['expert_keep']}/{trimming.file_experts}", row["quant"], f"{row['file_bytes'] / MIB:.2f}",
                      f"{row['size_share']:.1%}", f"x{row['decode_speedup']:.2f}", f"{row['kl']:.3g}",
                      f"{row['kl_trimming']:.3g}", "yes" if row["meets"] else "no",
                      style=style)
    out.print(table)
    out.print(f"untrimmed F16 GGUF: {baseline['file_bytes']:,} bytes, {baseline['token_bytes'] / MIB:.2f} MiB read per "
              "decoded token; each type alone (untrimmed, run in llama.cpp): "
              + ", ".join(f"{t.quant} {t.file_bytes / MIB:.2f} MiB KL {t.kl:.3g}" for t in report.types))
    if report.skipped:
        out.print(f"skipped {len(report.skipped)} trimming recipes the model cannot take, e.g. "
                  f"{escape(report.skipped[0]['label'])}: {escape(report.skipped[0]['reason'])}")
    for note in report.notes:
        out.print(f"[dim]note: {escape(note)}[/dim]")
    for index, candidate in enumerate(report.candidates):
        verified = candidate.verified
        if verified is None:
            continue
        label = report.trimmings[candidate.trimming].label
        out.print(f"exported {escape(label)} {candidate.quant}: {verified['file_bytes']:,} bytes "
                  f"({verified['size_share']:.1%} of F16; estimated {verified['estimate_error_bytes']:+,}), decode "
                  f"x{verified['decode_speedup']:.2f}, KL {verified['kl']:.4g} measured in llama.cpp, top-1 "
                  f"{verified['top1_agreement']:.1%}: " + ("meets the limit" if verified["meets"] else "[red]misses the limit[/red]"))
    row = report.chosen_row()
    out.print(f"chosen: [bold]{escape(row['label'])}[/bold], build with --target {report.target} --quant {row['quant']}")
    for line in report.trimmings[report.candidates[report.chosen].trimming].plans:
        out.print(f"  {escape(line)}")
    if report.recipe_path:
        out.print(f"wrote {report.recipe_path}")
    build = report.build
    if build is not None:
        verdict = "[green]within[/green]" if build["meets"] else "[red]OVER[/red]"
        validation = build["validation"]
        out.print(f"built {build['artifact']}: {build['file_bytes']:,} bytes ({build['size_share']:.1%} of F16), "
                  f"{verdict} {escape(report.constraint['description'])}; validation "
                  f"{'passed' if build['ok'] else '[red]failed[/red]'} (KL {validation['kl']:.3g} against the "
                  f"compressed torch model on {escape(str(validation['text']))}, perplexity "
                  f"{validation['perplexity']:.2f})")
    out.print(f"searched in {report.timings.get('search', 0):.0f}s")
