"""Self-contained HTML pages: the build and bench reports (report.json rendered) and the shared page scaffolding.

Every page is one file: inline CSS, plots embedded as base64 PNG data URIs, no script and no
external URL, so it opens offline, from an e-mail attachment or a CI artifact alike.
`html_page`, `html_table`, `figure_png` and `embed_png` are what the analyze page uses too.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import textwrap
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

# --- shared scaffolding -----------------------------------------------------------------

PAGE_CSS = """
:root{--ink:#1f2328;--muted:#59636e;--line:#d1d9e0;--soft:#f6f8fa;--ok:#1a7f37;--bad:#cf222e}
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--ink);
 margin:0;background:#eef1f4}
main{max-width:1140px;margin:0 auto;padding:24px 28px 40px}
h1{font-size:1.6em;margin:0 0 4px}
h2{font-size:1.2em;margin:0 0 12px;padding-bottom:6px;border-bottom:1px solid var(--line)}
h3{font-size:1em;margin:14px 0 6px}
p{margin:6px 0}
.meta{color:var(--muted);font-size:.9em}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:16px 20px;margin:16px 0}
.verdict{border-radius:8px;padding:12px 18px;margin:16px 0;font-size:1.15em;font-weight:600;color:#fff}
.verdict.ok{background:var(--ok)}
.verdict.bad{background:var(--bad)}
.verdict ul{margin:6px 0 0;padding-left:22px;font-weight:400;font-size:.9em}
.headline{background:#fff;border:1px solid var(--line);border-left:6px solid #4c72b0;border-radius:8px;
 padding:12px 18px;margin:16px 0}
.headline h2{border:0;margin:0 0 8px;padding:0}
.headline.lost{border-left-color:#bf8700}
.tiles{display:flex;flex-wrap:wrap;gap:12px;margin:0 0 4px}
.tile{flex:1 1 160px;background:var(--soft);border:1px solid var(--line);border-radius:6px;padding:8px 12px}
.tile b{display:block;font-size:1.25em}
.tile span{color:var(--muted);font-size:.85em}
.row{display:flex;flex-wrap:wrap;gap:20px;align-items:flex-start}
.row>*{flex:1 1 420px;min-width:0;overflow-x:auto}
.row th,.row td{padding:4px 6px}
.row td{overflow-wrap:anywhere}
table{border-collapse:collapse;margin:6px 0 10px;font-size:.92em}
th,td{padding:4px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:var(--soft);font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.changed td{background:#fff8c5}
tr.gone td{background:#ffebe9;color:var(--bad)}
.pass{color:var(--ok);font-weight:600}
.fail{color:var(--bad);font-weight:600}
figure{margin:8px 0;text-align:center}
figure img{max-width:100%;height:auto}
figcaption{color:var(--muted);font-size:.85em}
code{background:var(--soft);padding:1px 4px;border-radius:4px;font-size:.88em}
ul.lines{margin:4px 0 10px;padding-left:20px}
ul.lines li{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:.85em;margin:2px 0}
details{margin:4px 0 8px}
details pre{background:var(--soft);padding:8px;overflow:auto;max-height:320px;font-size:.8em}
"""


class Raw(str):
    """Text that is already HTML: html_table puts it in as it is."""


def html_page(title: str, body: str) -> str:
    """A whole document: head with the inline stylesheet, then `body` (HTML) inside <main>."""
    return (
        f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width,initial-scale=1'><title>{html.escape(title)}</title>"
        f"<style>{PAGE_CSS}</style></head>\n<body><main>\n{body}\n</main></body></html>\n"
    )


_NUMERIC = re.compile(r"^[-+]?[\d.,]+(e[-+]?\d+)?( ?(%|B|KiB|MiB|GiB|s|ms|tok/s|x))?$")


def html_table(headers: list[str], rows: list[list], row_classes: list[str] | None = None) -> str:
    """A table of already formatted cells (escaped unless Raw); numeric-looking cells align right."""

    def cell(value) -> str:
        text = "" if value is None else str(value)
        css = " class='n'" if _NUMERIC.match(text) else ""
        return f"<td{css}>{text if isinstance(value, Raw) else html.escape(text)}</td>"

    classes = row_classes or [""] * len(rows)
    body = "".join(
        (f"<tr class='{css}'>" if css else "<tr>") + "".join(cell(value) for value in row) + "</tr>"
        for row, css in zip(rows, classes)
    )
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    return f"<table><tr>{head}</tr>{body}</table>"


def figure_png(figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (and closed)."""
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    return buffer.getvalue()


def embed_png(png: bytes, caption: str) -> str:
    """A <figure> whose image is the PNG itself, as a data URI."""
    data = base64.b64encode(png).decode("ascii")
    alt = html.escape(caption)
    return f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{alt}\"><figcaption>{alt}</figcaption></figure>"


# --- number formatting ------------------------------------------------------------------

NA = "–"


def size(count) -> str:
    if count is None:
        return NA
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= scale:
            return f"{count / scale:.1f} {unit}" if unit != "GiB" else f"{count / scale:.2f} {unit}"
    return f"{count} B"


def number(value) -> str:
    """3 significant digits for small floats, thousands separators for large numbers."""
    if value is None:
        return NA
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def percent(value, digits: int = 2) -> str:
    return NA if value is None else f"{value:.{digits}%}"


def seconds(value) -> str:
    if value is None:
        return NA
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def formatted(key: str, value) -> str:
    """A value of a report dict, formatted by what its key says it is."""
    if isinstance(value, (list, dict)):
        return f"{len(value)} {'entry' if len(value) == 1 else 'entries'}"
    if value is None or isinstance(value, (str, bool)):
        return number(value) if not isinstance(value, str) else value
    if key.endswith("bytes"):
        return size(value)
    if key.endswith("tokens_per_s"):
        return f"{value:,.1f} tok/s"
    if key.endswith(("_s", "seconds")):
        return seconds(value)
    if key in ("top1_agreement",):
        return percent(value)
    return number(value)


def _ratio(before, after) -> str:
    if not before or after is None:
        return NA
    smaller = f" ({before / after:.2f}x smaller)" if 0 < after < before else ""
    return f"{after / before:.1%}{smaller}"


# --- the build page ---------------------------------------------------------------------

BEFORE, AFTER = "#4c72b0", "#dd8452"


def write_build_html(report: dict, path: Path) -> Path:
    """Render a build report (what report.json holds) as one self-contained HTML page at `path`."""
    path = Path(path)
    sections = [
        _header(report),
        _structure(report.get("compression") or {}),
        _passes((report.get("compression") or {}).get("passes")),
        _sizes(report),
        _fidelity(report.get("validation")),
        _speed(report),
        _files(report.get("artifact"), report.get("timings")),
        _reads(report),
    ]
    title = f"moeexport build: {report.get('model', '?')} -> {report.get('target', '?')} {report.get('quant', '')}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html_page(title, "\n".join(sections)))
    return path


def _section(title: str, *parts: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{''.join(parts)}</section>"


def _sentence(text: str) -> str:
    return f"<p class='meta'>{html.escape(text)}</p>"


def _header(report: dict) -> str:
    model, target, quant = (html.escape(str(report.get(k, "?"))) for k in ("model", "target", "quant"))
    options = report.get("options") or {}
    meta = [f"moeexport {html.escape(str(report.get('moeexport_version', '?')))}",
            f"output <code>{html.escape(str(report.get('out', '?')))}</code>"]
    if options:
        meta.append("options " + ", ".join(f"<code>{html.escape(f'{k}={v}')}</code>" for k, v in options.items()))
    validation = report.get("validation") or {}
    failures = report.get("failures") or validation.get("failures") or []
    if report.get("ok"):
        verdict = ("<div class='verdict ok'>&#10004; export fidelity passed: the artifact computes what the "
                   "compressed torch model computes, within its tolerance</div>")
    else:
        reasons = failures or ["no validation failure recorded (the build did not finish or was not validated)"]
        items = "".join(f"<li>{html.escape(str(r))}</li>" for r in reasons)
        verdict = f"<div class='verdict bad'>&#10008; export fidelity FAILED<ul>{items}</ul></div>"
    return (f"<h1>{model} &rarr; {target} <code>{quant}</code></h1><p class='meta'>{' &middot; '.join(meta)}</p>"
            f"{_quality_headline(report)}{_input_headline(report.get('quality_vs_input'), validation.get('runtime'))}"
            f"{verdict}{_tiles(report)}")


def _cards(tiles: list[tuple[str, str]]) -> str:
    cells = "".join(f"<div class='tile'><b>{html.escape(v)}</b><span>{html.escape(k)}</span></div>" for v, k in tiles)
    return f"<div class='tiles'>{cells}</div>" if tiles else ""


def _loss_tiles(quality: dict, before: str, after: str) -> list[tuple[str, str]]:
    """Perplexity before -> after (and its change), KL and top-1 agreement of one comparison."""
    reference, perplexity = quality.get("reference_perplexity"), quality.get("perplexity")
    change = f" ({perplexity / reference - 1:+.1%})" if reference and perplexity is not None else ""
    return [(f"{number(reference)} → {number(perplexity)}{change}", f"perplexity, {before} → {after}"),
            (number(quality.get("kl")), f"KL({before} || {after}), nats/token"),
            (percent(quality.get("top1_agreement"), 1), f"top-1 agreement with the {before}")]


def _quality_headline(report: dict) -> str:
    """What compression cost against the source model: the first thing the page says."""
    quality = report.get("quality_vs_source")
    passes = (report.get("compression") or {}).get("passes")
    title = "<h2>Quality against the source model</h2>"
    if quality:
        where = (f"the compressed torch model against the source on {quality.get('text', '?')}, "
                 f"{number(quality.get('tokens'))} predicted tokens; the export adds its own fidelity loss below")
        cards = _cards(_loss_tiles(quality, "source", "compressed"))
        return f"<div class='headline lost'>{title}{cards}{_sentence(where)}</div>"
    if not passes:
        text = ("no compression: the model was exported as it is, so its quality against the source is the "
                "export's fidelity below")
    else:
        text = "not measured (--no-eval): what compression cost is unknown; the fidelity below is the export's alone"
    return f"<div class='headline lost'>{title}<p>{html.escape(text)}</p></div>"


def _input_headline(quality, runtime) -> str:
    """An artifact built from an artifact of its own format (a GGUF from a GGUF): the output against the input
    file, both run by the target's runtime."""
    if not quality:
        return ""
    where = (f"both files run in {runtime or 'the target runtime'} on {quality.get('text', '?')}, "
             f"{number(quality.get('tokens'))} predicted tokens")
    return (f"<div class='headline lost'><h2>Quality against the input file</h2>"
            f"{_cards(_loss_tiles(quality, 'input file', 'artifact'))}{_sentence(where)}</div>")


def _tiles(report: dict) -> str:
    compression = report.get("compression") or {}
    parameters = compression.get("parameters") or {}
    artifact, validation, profile = (report.get(k) or {} for k in ("artifact", "validation", "profile"))
    tiles = []
    if validation:
        tiles.append((number(validation.get("kl")), "export fidelity: KL vs the compressed torch model"))
        tiles.append((percent(validation.get("top1_agreement")), "export fidelity: top-1 agreement"))
    given = compression.get("input_file_bytes")
    if artifact.get("file_bytes") is not None:
        tiles.append((size(artifact["file_bytes"]), "artifact file"))
        if given:
            tiles.append((_ratio(given, artifact["file_bytes"]), f"of the input files on disk ({size(given)})"))
    if parameters.get("before") and parameters.get("after") is not None:
        tiles.append((percent(parameters["after"] / parameters["before"], 1), "parameters kept"))
    if profile.get("decode_tokens_per_s") is not None:
        tiles.append((formatted("decode_tokens_per_s", profile["decode_tokens_per_s"]), "decode speed"))
    return _cards(tiles)


def describe_imatrix(imatrix: dict) -> str:
    """Which importance matrix weighed a build's rounding (report.json's artifact.imatrix), in one sentence."""
    if imatrix["source"] == "measured":
        return (f"importance matrix measured on the calibration set, written to {imatrix['file']} "
                "(llama-quantize --imatrix reads it)")
    return f"importance matrix from {imatrix['source']}"


def describe_layer(spec: dict) -> str:
    if spec.get("kind") == "moe":
        shared = " + shared" if spec.get("shared_experts") else ""
        return f"MoE {spec.get('num_experts')} experts, top-{spec.get('top_k')}{shared}"
    return {"dense": "dense MLP", "dropped": "attention only"}.get(spec.get("kind"), str(spec.get("kind")))


def _structure(compression: dict) -> str:
    before = compression.get("layers_before") or []
    after = compression.get("layers_after") or []
    index = list(compression.get("new_block_index") or range(len(before)))
    index += [None] * (len(before) - len(index))  # a short list: the blocks it does not name are gone
    if not before:
        return _section("Structure before → after", _sentence("no layer structure recorded"))
    rows, classes = [], []
    for layer, (spec, new) in enumerate(zip(before, index)):
        kept = after[new] if new is not None and new < len(after) else None
        rows.append([layer, describe_layer(spec), "block dropped" if kept is None else describe_layer(kept),
                     NA if new is None else new])
        classes.append("gone" if kept is None else ("changed" if kept != spec else ""))
    calibration = compression.get("calibration")
    source = compression.get("source") or {}
    notes = [f"source {source.get('model', '?')} (fingerprint {str(source.get('fingerprint', '?'))[:12]})"]
    if calibration:
        notes.append("calibration " + ", ".join(f"{k}={v}" for k, v in calibration.items()))
    table = html_table(["layer", "before", "after", "new index"], rows, classes)
    plot = embed_png(_structure_plot(before, after, index), "routed experts per layer, before and after")
    return _section("Structure before → after", f"<div class='row'><div>{plot}</div><div>{table}</div></div>",
                    "".join(_sentence(n) for n in notes))


def _structure_plot(before: list[dict], after: list[dict], index: list) -> bytes:
    count = len(before)
    figure, axes = plt.subplots(figsize=(min(max(5.5, 0.8 * count + 2), 11), 3.6))
    top = max([s.get("num_experts") or 0 for s in before + after] + [1])
    mark_height = top * 0.06
    legend = [Patch(color=BEFORE, label="before"), Patch(color=AFTER, label="after")]
    seen = set()
    styles = {
        "dense": dict(marker="s", color="#6e7781", label="dense MLP (no experts)"),
        "dropped": dict(marker="^", color="#8250df", label="attention only (MoE sublayer dropped)"),
        "block": dict(marker="X", color="#cf222e", label="block dropped"),
    }

    def draw(x: float, spec: dict | None, color: str) -> None:
        kind = "block" if spec is None else spec.get("kind")
        if kind == "moe":
            bar = axes.bar(x, spec.get("num_experts") or 0, 0.38, color=color,
                           hatch="//" if spec.get("shared_experts") else None, edgecolor="white")
            axes.bar_label(bar, fontsize=8, padding=1)
            if spec.get("shared_experts"):
                seen.add("shared")
            return
        style = styles.get(kind, styles["dense"])
        axes.plot(x, mark_height, linestyle="none", markersize=10, marker=style["marker"], color=style["color"])
        seen.add(kind if kind in styles else "dense")

    for layer, (spec, new) in enumerate(zip(before, index)):
        draw(layer - 0.2, spec, BEFORE)
        draw(layer + 0.2, after[new] if new is not None and new < len(after) else None, AFTER)
    for kind, style in styles.items():
        if kind in seen:
            legend.append(Line2D([], [], linestyle="none", markersize=9, marker=style["marker"], color=style["color"],
                                 label=style["label"]))
    if "shared" in seen:
        legend.append(Patch(facecolor="#bbbbbb", hatch="//", edgecolor="white", label="+ shared experts"))
    labels = [f"{layer}\n→ {NA if new is None else new}" for layer, new in enumerate(index[:count])]
    axes.set_xticks(range(count), labels, fontsize=9)
    axes.set_xlabel("layer (→ new index)")
    axes.set_ylabel("routed experts")
    axes.set_ylim(0, top * 1.45)
    axes.spines[["top", "right"]].set_visible(False)
    axes.legend(handles=legend, loc="upper center", ncol=3, fontsize=8, frameon=False)
    return figure_png(figure)


def _passes(passes) -> str:
    if not passes:
        return _section("What each pass removed", _sentence("no compression passes (the model was exported as it is)"))
    parts = []
    for position, step in enumerate(passes, 1):
        options = ", ".join(f"{k}={v}" for k, v in (step.get("options") or {}).items())
        lines = step.get("summary") or ["(no summary)"]
        items = "".join(f"<li>{html.escape(str(line))}</li>" for line in lines)
        name = html.escape(str(step.get("name", "?")))
        plan = f"<details><summary class='meta'>plan</summary><pre>{_plan_text(step.get('plan'))}</pre></details>"
        heading = f"<h3>{position}. {name} <code>{html.escape(options)}</code></h3>"
        parts.append(f"{heading}<ul class='lines'>{items}</ul>{plan}")
    return _section("What each pass removed", *parts)


def _plan_text(plan, limit: int = 20000) -> str:
    try:
        text = json.dumps(plan, indent=1, default=str)
    except (TypeError, ValueError):  # keys JSON cannot take (a plan straight from asdict, not from report.json)
        text = repr(plan)
    return html.escape(text[:limit] + ("\n..." if len(text) > limit else ""))


def _sizes(report: dict) -> str:
    compression = report.get("compression") or {}
    parameters, stored = compression.get("parameters") or {}, compression.get("bytes") or {}
    given = compression.get("input_file_bytes")
    artifact = report.get("artifact") or {}
    if not parameters and not stored:
        return _section("Parameters and bytes", _sentence("no sizes recorded"))
    dtype = (compression.get("memory") or {}).get("dtype")
    rows = []
    if given and artifact.get("file_bytes") is not None:
        rows.append(["files on disk: input → artifact", size(given), size(artifact["file_bytes"]),
                     _ratio(given, artifact["file_bytes"])])
    rows += [["parameters", number(parameters.get("before")), number(parameters.get("after")),
              _ratio(parameters.get("before"), parameters.get("after"))],
             [f"torch weights in memory{f' ({dtype})' if dtype else ''}", size(stored.get("before")),
              size(stored.get("after")), _ratio(stored.get("before"), stored.get("after"))]]
    if artifact.get("file_bytes") is not None:
        rows.append([f"artifact ({report.get('quant', '?')}) vs the source's torch weights", size(stored.get("before")),
                     size(artifact["file_bytes"]), _ratio(stored.get("before"), artifact["file_bytes"])])
    table = html_table(["", "before", "after", "after / before"], rows)
    plot = embed_png(_sizes_plot(parameters, stored, artifact.get("file_bytes"), report.get("quant"), given),
                     "parameters, and bytes: the input files as stored, the torch weights, the artifact")
    note = _sentence("the first row is what a user sees on disk; the torch rows count the weights at the dtype "
                     "compression computed in") if given else ""
    return _section("Parameters and bytes", f"<div class='row'><div>{plot}</div><div>{table}{note}</div></div>")


def _sizes_plot(parameters: dict, stored: dict, artifact_bytes, quant, input_bytes=None) -> bytes:
    figure, (left, right) = plt.subplots(1, 2, figsize=(6.4, 2.7), width_ratios=(2, 3 if input_bytes else 2))
    million = [(parameters.get(k) or 0) / 1e6 for k in ("before", "after")]
    bars = left.bar(["before", "after"], million, color=[BEFORE, AFTER])
    left.bar_label(bars, [f"{v:.3g}M" for v in million], fontsize=8)
    left.set_title("parameters (millions)", fontsize=10)
    names, colors = ["source\n(torch)", "compressed\n(torch)"], [BEFORE, AFTER]
    values = [stored.get("before") or 0, stored.get("after") or 0]
    if input_bytes:
        names.insert(0, "input\non disk")
        values.insert(0, input_bytes)
        colors.insert(0, "#8172b3")
    if artifact_bytes is not None:
        names.append(f"artifact\n{quant}")
        values.append(artifact_bytes)
        colors.append("#55a868")
    mib = [v / 2**20 for v in values]
    bars = right.bar(names, mib, color=colors)
    right.bar_label(bars, [f"{v:.3g}" for v in mib], fontsize=8)
    right.set_title("bytes (MiB)", fontsize=10)
    for axes in (left, right):
        axes.spines[["top", "right"]].set_visible(False)
        axes.set_ylim(0, max(axes.get_ylim()[1] * 1.15, 1e-9))
        axes.tick_params(labelsize=8)
    return figure_png(figure)


def _fidelity(validation) -> str:
    title = "Fidelity of the artifact vs the compressed torch model"
    if not validation:
        return _section(title, _sentence("not validated: no fidelity numbers recorded"))
    tolerance = validation.get("tolerance") or {}
    failures = validation.get("failures") or []

    def judged(key: str, show, lower_is_better: bool = True) -> list:
        value, bound = validation.get(key), tolerance.get(key)
        if bound is None or value is None:
            return [show(value), "not checked", ""]
        ok = value <= bound if lower_is_better else value >= bound
        status = Raw("<span class='pass'>pass</span>" if ok else "<span class='fail'>FAIL</span>")
        return [show(value), ("≤ " if lower_is_better else "≥ ") + show(bound), status]

    rows = [["max |Δ logit|", *judged("max_abs_logit", number)],
            ["KL(torch || artifact), nats/token", *judged("kl", number)],
            ["top-1 agreement", *judged("top1_agreement", percent, lower_is_better=False)],
            ["perplexity: torch → artifact",
             f"{number(validation.get('reference_perplexity'))} → {number(validation.get('perplexity'))}", "", ""]]
    where = (f"runtime {validation.get('runtime', '?')}, on {validation.get('text', '?')}, "
             f"{number(validation.get('tokens'))} predicted tokens")
    verdict = ("<p class='fail'>failures: " + html.escape("; ".join(map(str, failures))) + "</p>" if failures
               else "<p class='pass'>within tolerance</p>")
    return _section(title, html_table(["metric", "value", "tolerance", ""], rows), _sentence(where), verdict)


HEADLINE_SPEED = {
    "prefill_tokens_per_s": "prefill",
    "decode_tokens_per_s": "decode",
    "time_to_first_token_s": "time to first token",
    "runtime_rss_bytes": "memory held by the runtime (RSS)",
    "peak_rss_bytes": "process peak RSS (Python and torch included)",
}


def _speed(report: dict) -> str:
    title = "Speed and memory"
    profile, engine = report.get("profile"), report.get("engine")
    parts = []
    if profile:
        rows = [[label, formatted(key, profile.get(key))] for key, label in HEADLINE_SPEED.items()]
        rows += [[key.replace("_", " "), formatted(key, value)] for key, value in profile.items()
                 if key not in HEADLINE_SPEED and key != "machine_load"]
        parts.append(_busy(profile.get("machine_load")) + html_table(["", "measured"], rows))
    else:
        parts.append(_sentence("not profiled"))
    if report.get("target") == "tensorrt" or engine is not None:
        parts.append("<h3>TensorRT engine</h3>")
        if not engine:
            parts.append(_sentence("no engine information recorded"))
        elif engine.get("built") is False:
            parts.append(_sentence(f"not built: {engine.get('reason', 'no reason given')}"))
        else:
            rows = [[key.replace("_", " "), formatted(key, value)] for key, value in engine.items()]
            parts.append(html_table(["", ""], rows))
    return _section(title, *parts)


def _files(artifact, timings) -> str:
    parts = []
    if artifact:
        files = {name: count or 0 for name, count in (artifact.get("files") or {}).items()}
        total = sum(files.values()) or 1
        rows = [[name, size(count), percent(count / total, 1)] for name, count in files.items()]
        parts.append(f"<p>artifact <code>{html.escape(str(artifact.get('path', '?')))}</code>, "
                     f"{html.escape(size(artifact.get('file_bytes')))}, representation "
                     f"<code>{html.escape(str(artifact.get('representation', '?')))}</code></p>")
        parts.append(html_table(["file", "size", "share"], rows) if rows else _sentence("no file list recorded"))
        if artifact.get("imatrix"):
            parts.append(_sentence(describe_imatrix(artifact["imatrix"])))
        fallbacks = artifact.get("fallbacks") or []
        if fallbacks:
            items = "".join(f"<li>{html.escape(str(f))}</li>" for f in fallbacks)
            parts.append(f"<h3>fallbacks</h3><ul class='lines'>{items}</ul>")
    else:
        parts.append(_sentence("no artifact was written"))
    stages = {k: v for k, v in (timings or {}).items() if k != "total" and v is not None}
    if stages:
        total = (timings or {}).get("total")
        timing = embed_png(_timings_plot(stages), f"time per stage (total {seconds(total or sum(stages.values()))})")
    else:
        timing = _sentence("no timings recorded")
    return _section("Files and timings", f"<div class='row'><div>{''.join(parts)}</div><div>{timing}</div></div>")


def _timings_plot(stages: dict) -> bytes:
    names, values = list(stages), list(stages.values())
    figure, axes = plt.subplots(figsize=(5.2, 0.8 + 0.3 * len(names)))
    bars = axes.barh(names, values, color=BEFORE)
    axes.bar_label(bars, [seconds(v) for v in values], fontsize=8, padding=3)
    axes.invert_yaxis()
    axes.set_xlabel("seconds")
    axes.set_xlim(0, max(values + [1e-9]) * 1.18)
    axes.spines[["top", "right"]].set_visible(False)
    axes.tick_params(labelsize=8)
    return figure_png(figure)


def read_profile(timings: dict, read_bytes: dict, disk_read: dict | None) -> list[dict]:
    """The pipeline's profile as plain data (report.json's read_profile): per stage, its time, the bytes of the
    model's files it read, the read speed that makes, and that speed as a share of the disk's measured
    sequential speed; then what ran between the stages (the fingerprint reads there) and the whole build."""
    disk = (disk_read or {}).get("bytes_per_s")

    def row(stage: str, seconds_taken, read) -> dict:
        speed = read / seconds_taken if read is not None and seconds_taken else None
        return {"stage": stage, "seconds": seconds_taken, "read_bytes": read, "read_bytes_per_s": speed,
                "share_of_disk": speed / disk if speed is not None and disk else None}

    stages = {name: seconds_taken for name, seconds_taken in timings.items() if name != "total"}
    rows = [row(name, seconds_taken, read_bytes.get(name)) for name, seconds_taken in stages.items()]
    if "total" in timings and "total" in read_bytes:
        staged_read = sum(read_bytes.get(name) or 0 for name in stages)
        rows.append(row("between stages", max(0.0, timings["total"] - sum(stages.values())),
                        read_bytes["total"] - staged_read))
        rows.append(row("total", timings["total"], read_bytes["total"]))
    return rows


def gigabytes_per_s(value) -> str:
    return NA if value is None else f"{value / 1e9:.3g} GB/s"


def disk_sentence(disk_read: dict) -> str:
    """How the disk's speed was measured, and whether it is the disk's at all."""
    measured = (f"{size(disk_read.get('bytes'))} of {disk_read.get('file', '?')} read sequentially in "
                f"{seconds(disk_read.get('seconds'))}: {gigabytes_per_s(disk_read.get('bytes_per_s'))}")
    cache = disk_read.get("cache")
    if cache == "dropped":
        return f"{measured}, its pages dropped from the page cache first (the disk's speed)"
    if cache == "cached":
        return (f"{measured}, but {percent(disk_read.get('resident_share'), 0)} of its pages stayed in the page "
                "cache (mapped elsewhere, or a memory file system): cached, so this is the cache's speed, not the "
                "disk's")
    return f"{measured}; whether its pages were in the page cache is unknown here"


def _reads(report: dict) -> str:
    title = "Reading the model"
    rows = report.get("read_profile")
    if not rows:
        return _section(title, _sentence("no reads recorded"))
    table = html_table(["stage", "time", "read", "read speed", "% of the disk's"],
                       [[row["stage"], seconds(row["seconds"]), size(row["read_bytes"]),
                         gigabytes_per_s(row["read_bytes_per_s"]), percent(row["share_of_disk"], 0)] for row in rows])
    disk = report.get("disk_read")
    notes = [_sentence("bytes of the model's files read where moeexport's readers read them (the safetensors "
                       "loader and stream, the GGUF reader, the content fingerprint); a stage's speed is its bytes "
                       "over its whole time, computing included")]
    notes.append(_sentence("the disk: " + disk_sentence(disk)) if disk else _sentence("the disk was not measured"))
    return _section(title, table, *notes)


# --- the bench page ---------------------------------------------------------------------


def write_bench_html(report: dict, path: Path) -> Path:
    """Render a bench report (moeexport.bench.BenchReport.to_dict()) as one self-contained HTML page at `path`."""
    path = Path(path)
    artifacts, bandwidth = report.get("artifacts") or [], report.get("bandwidth") or {}
    runs = f"median of {report.get('repeats', '?')} runs (min – max)"
    speed_rows = [[a["label"], a["runtime"], _spread(a["prefill_tokens_per_s"]), _times(a["prefill_ratio"]),
                   _spread(a["decode_tokens_per_s"]), _times(a["decode_ratio"]), size(a["runtime_rss_bytes"]["median"]),
                   size(a["peak_rss_bytes"]["median"]), size(a.get("file_bytes"))] for a in artifacts]
    speed = html_table(["artifact", "runtime", "prefill tok/s", "× baseline", "decode tok/s", "× baseline",
                        "runtime memory", "process peak", "file"], speed_rows)
    bound_rows = [[a["label"], size(a["token_bytes"]["total"]), size(a["token_bytes"]["routed_experts"]),
                   a["token_bytes"]["experts_read"], number(a["bound_tokens_per_s"]),
                   number(a["decode_tokens_per_s"]["median"]), percent(a["bound_fraction"], 1)] for a in artifacts]
    bound = html_table(["artifact", "weight bytes / token", "of which routed experts", "experts read",
                        "bound tok/s", "decode tok/s", "of the bound"], bound_rows)
    rate = bandwidth.get("bytes_per_s") or 0
    measured = (f"memory read bandwidth {rate / 1e9:.1f} GB/s: {bandwidth.get('method', '?')}; buffer "
                f"{size(bandwidth.get('buffer_bytes'))} (last-level cache {size(bandwidth.get('last_level_cache_bytes'))}), "
                f"{_threads(bandwidth.get('threads'))}, median of {bandwidth.get('runs', '?')} runs "
                f"({(bandwidth.get('min_bytes_per_s') or 0) / 1e9:.1f} – {(bandwidth.get('max_bytes_per_s') or 0) / 1e9:.1f} GB/s)")
    how = ("The bound is the bandwidth divided by the weight bytes one decoded token reads, at the types the artifact "
           "stores: attention, norms, routers, shared experts and dense FFNs whole, k of the E experts of every "
           "routed expert stack (all of them in a graph that computes every expert), the output head whole and one "
           "row of the token embedding. KV-cache reads are left out, so the bound is the weights' alone.")
    plot = embed_png(_bench_plot(artifacts), "decode speed (median, min – max) against the memory-bandwidth bound")
    machine = report.get("machine") or {}
    meta = [f"moeexport {html.escape(str(report.get('moeexport_version', '?')))}",
            html.escape(f"{machine.get('cpu', '?')}, {machine.get('cpu_count', '?')} CPUs"),
            html.escape(f"prompt {report.get('prompt_tokens')} tokens, {report.get('new_tokens')} decoded, "
                        f"{_threads(report.get('threads'))}"),
            f"baseline <code>{html.escape(str(report.get('baseline', '?')))}</code>"]
    tiles = [(f"{rate / 1e9:.1f} GB/s", "memory read bandwidth")]
    tiles += [(percent(a["bound_fraction"], 1), f"{a['label']}: of its bound") for a in artifacts[:3]]
    cells = "".join(f"<div class='tile'><b>{html.escape(v)}</b><span>{html.escape(k)}</span></div>" for v, k in tiles)
    notes = report.get("notes") or []
    sections = [
        f"<h1>moeexport bench</h1><p class='meta'>{' &middot; '.join(meta)}</p>{_busy(report.get('machine_load'))}"
        f"<div class='tiles'>{cells}</div>",
        _section("Speed and memory", speed, _sentence(f"{runs}; ratios are to the baseline's medians; each run is a "
                                                      "fresh process, so memory is the runtime's alone")),
        _section("Decode against the memory-bandwidth bound", f"<div class='row'><div>{plot}</div><div>{bound}</div></div>",
                 _sentence(how), _sentence(measured)),
    ]
    if notes:
        sections.append(_section("Notes", "<ul class='lines'>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes)
                                 + "</ul>"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html_page("moeexport bench", "\n".join(sections)))
    return path


def _threads(count) -> str:
    return f"{count} thread{'' if count == 1 else 's'}"


def _busy(machine_load: dict | None) -> str:
    """The warning that the speeds were measured on a busy machine (moeexport.machine_load), or nothing."""
    warning = (machine_load or {}).get("warning")
    return f"<p class='fail'>{html.escape(warning)}</p>" if warning else ""


def _spread(spread: dict) -> str:
    return f"{number(spread['median'])} ({number(spread['min'])} – {number(spread['max'])})"


def _times(ratio) -> str:
    return NA if ratio is None else f"{ratio:.2f}x"


def _bench_plot(artifacts: list[dict]) -> bytes:
    """Per artifact: its median decode speed (min – max as an error bar) beside its bound, the fraction on it."""
    labels = [a["label"] for a in artifacts]
    decode = [a["decode_tokens_per_s"] for a in artifacts]
    bounds = [a["bound_tokens_per_s"] for a in artifacts]
    medians = [d["median"] for d in decode]
    figure, axes = plt.subplots(figsize=(min(max(4.8, 1.6 * len(artifacts) + 2), 11), 3.8))
    positions = np.arange(len(artifacts))
    errors = [[m - d["min"] for m, d in zip(medians, decode)], [d["max"] - m for m, d in zip(medians, decode)]]
    axes.bar(positions - 0.19, medians, 0.38, color=AFTER, yerr=errors, capsize=3, label="decode, measured")
    axes.bar(positions + 0.19, bounds, 0.38, color=BEFORE, alpha=0.45, label="bound: bandwidth / bytes per token")
    for x, artifact, spread in zip(positions, artifacts, decode):  # above the error bar, not on it
        axes.annotate(f"{percent(artifact['bound_fraction'], 1)} of bound", (x - 0.19, spread["max"]),
                      xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=8)
    logarithmic = max(bounds + medians) > 30 * max(min(medians), 1e-9)  # a far-off bound flattens the measured bars
    if logarithmic:
        axes.set_yscale("log")
    else:
        axes.set_ylim(0, max(bounds + medians) * 1.25)
    axes.set_xticks(positions, [textwrap.fill(label, 24) for label in labels], fontsize=8)  # paths side by side
    axes.set_ylabel("tokens / s (log scale)" if logarithmic else "tokens / s")
    axes.spines[["top", "right"]].set_visible(False)
    axes.legend(fontsize=8, frameon=False)
    return figure_png(figure)
