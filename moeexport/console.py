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
from moeexport.report import describe_layer

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
