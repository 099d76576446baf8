"""Readable views of calibration statistics: summary rows, plots (PNG) and an HTML page."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moeexport.calibration.observers import Statistics  # noqa: E402


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
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_html(statistics: Statistics, rows: list[dict], plots: list[Path], path: Path, title: str) -> Path:
    headers = list(dict.fromkeys(key for row in rows for key in row))
    cells = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_format(row.get(key)))}</td>" for key in headers) + "</tr>" for row in rows
    )
    images = "".join(f'<figure><img src="{p.name}"><figcaption>{p.stem}</figcaption></figure>' for p in plots)
    calibration = html.escape(", ".join(f"{k}={v}" for k, v in statistics.calibration.items()))
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:right}"
        "table{border-collapse:collapse}tr:nth-child(even){background:#f3f3f3}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>calibration: {calibration}</p>"
        f"<table><tr>{''.join(f'<th>{h}</th>' for h in headers)}</tr>{cells}</table>{images}</body></html>\n"
    )
    return path


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
