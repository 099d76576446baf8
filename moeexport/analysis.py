"""Readable views of calibration statistics: summary rows, plots (PNG) and an HTML page."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moeexport.calibration.observers import Statistics  # noqa: E402
from moeexport.report import embed_png, figure_png, html_page, html_table  # noqa: E402


def layer_rows(statistics: Statistics) -> list[dict]:
    """One row per layer: kind, experts, usage spread, similarities (the analyze table)."""
    rows = []
    for index, layer in enumerate(statistics.layers):
        row = {
            "layer": index,
            "kind": layer.kind,
            "block_similarity": layer.block_similarity,
            "moe_similarity": layer.moe_similarity,
        }
        if layer.kind == "moe":
            frequency = layer.expert_frequency()
            row |= {
                "experts": len(layer.expert_tokens),
                "top_k": layer.top_k,
                "least_used": min(frequency) if frequency else None,
                "most_used": max(frequency) if frequency else None,
                "unused_experts": [e for e, count in enumerate(layer.expert_tokens) if count == 0],
            }
        rows.append(row)
    return rows


def write_plots(statistics: Statistics, out_dir: Path) -> list[Path]:
    """Expert usage heatmap, per-layer similarities, block-window similarities."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_plot_expert_usage(statistics, out_dir / "expert_usage.png")]
    written.append(_plot_layer_similarity(statistics, out_dir / "layer_similarity.png"))
    written.append(_plot_block_windows(statistics, out_dir / "block_windows.png"))
    return written


def _plot_expert_usage(statistics: Statistics, path: Path) -> Path:
    moe = [(i, layer) for i, layer in enumerate(statistics.layers) if layer.kind == "moe"]
    width = max((len(layer.expert_tokens) for _, layer in moe), default=1)
    usage = np.full((len(moe), width), np.nan)
    for row, (_, layer) in enumerate(moe):
        usage[row, : len(layer.expert_tokens)] = layer.expert_frequency()
    figure, axes = plt.subplots(figsize=(1.2 + 0.45 * width, 1.2 + 0.4 * max(len(moe), 1)))
    image = axes.imshow(usage, aspect="auto", cmap="viridis")
    axes.set_xlabel("expert")
    axes.set_ylabel("layer")
    axes.set_yticks(range(len(moe)), [str(i) for i, _ in moe])
    axes.set_title("share of routing decisions per expert")
    figure.colorbar(image, ax=axes)
    return _save(figure, path)


def _plot_layer_similarity(statistics: Statistics, path: Path) -> Path:
    layers = range(len(statistics.layers))
    figure, axes = plt.subplots(figsize=(7, 3.5))
    axes.plot(layers, [layer.block_similarity for layer in statistics.layers], "o-", label="block: cos(h_in, h_out)")
    moe_similarity = [np.nan if layer.moe_similarity is None else layer.moe_similarity for layer in statistics.layers]
    axes.plot(layers, moe_similarity, "s-", label="MoE sublayer: cos(x, x + MoE(norm x))")
    axes.set_xlabel("layer")
    axes.set_ylabel("cosine similarity (higher = more redundant)")
    axes.legend()
    return _save(figure, path)


def _plot_block_windows(statistics: Statistics, path: Path) -> Path:
    width = max((len(row) for row in statistics.block_pair_similarity), default=1)
    grid = np.full((len(statistics.block_pair_similarity), width), np.nan)
    for start, row in enumerate(statistics.block_pair_similarity):
        grid[start, : len(row)] = row
    figure, axes = plt.subplots(figsize=(1.5 + 0.5 * width, 1.2 + 0.35 * len(grid)))
    image = axes.imshow(grid, aspect="auto", cmap="magma")
    axes.set_xticks(range(width), [str(w + 1) for w in range(width)])
    axes.set_xlabel("window (blocks dropped)")
    axes.set_ylabel("first block")
    axes.set_title("cos(input of window, output of window)")
    figure.colorbar(image, ax=axes)
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    path.write_bytes(figure_png(figure))
    return path


def write_html(statistics: Statistics, rows: list[dict], plots: list[Path], path: Path, title: str) -> Path:
    """One self-contained page: the per-layer table and every plot embedded (the PNG files stay beside it)."""
    headers = list(dict.fromkeys(key for row in rows for key in row))
    table = html_table(headers, [[_format(row.get(key)) for key in headers] for row in rows])
    images = "".join(embed_png(plot.read_bytes(), plot.stem.replace("_", " ")) for plot in plots)
    calibration = html.escape(", ".join(f"{k}={v}" for k, v in statistics.calibration.items()))
    body = (f"<h1>{html.escape(title)}</h1><p class='meta'>calibration: {calibration}</p>"
            f"<section>{table}</section><section>{images}</section>")
    path.write_text(html_page(title, body))
    return path


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
