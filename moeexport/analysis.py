"""Readable views of calibration statistics: summary rows, ranked drop candidates, plots (PNG) and an HTML page."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moeexport.calibration.observers import Statistics  # noqa: E402
from moeexport.errors import MoeExportError  # noqa: E402
from moeexport.report import embed_png, figure_png, html_page, html_table  # noqa: E402

EXPERTS_MEASURED = 2  # per MoE layer: the lowest-REAP experts whose removal analyze measures
SHOWN = 10  # candidates listed per kind of drop


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


def write_plots(statistics: Statistics, out_dir: Path, candidates: dict | None = None) -> list[Path]:
    """Expert usage, REAP and routing-mass heatmaps, per-layer similarities, block-window similarities, and
    with `candidates` (drop_candidates) the measured damage of dropping each block and MoE sublayer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_plot_expert_usage(statistics, out_dir / "expert_usage.png")]
    written.append(_plot_expert_scores(statistics, "reap", out_dir / "reap.png"))
    written.append(_plot_expert_scores(statistics, "routing_mass", out_dir / "routing_mass.png"))
    if candidates and candidates.get("measured"):
        written.append(_plot_drop_damage(statistics, candidates, out_dir / "drop_damage.png"))
    written.append(_plot_layer_similarity(statistics, out_dir / "layer_similarity.png"))
    written.append(_plot_block_windows(statistics, out_dir / "block_windows.png"))
    return written


def _moe_grid(statistics: Statistics, values) -> tuple[list[int], np.ndarray]:
    """(MoE layer indices, a layers x experts grid of `values(layer)`, NaN where a layer has fewer experts)."""
    moe = [(i, layer) for i, layer in enumerate(statistics.layers) if layer.kind == "moe"]
    width = max((len(layer.expert_tokens) for _, layer in moe), default=1)
    grid = np.full((max(len(moe), 1), width), np.nan)
    for row, (_, layer) in enumerate(moe):
        row_values = values(layer)
        grid[row, : len(row_values)] = row_values
    return [i for i, _ in moe], grid


SCORE_TITLES = {
    "reap": "REAP saliency per expert, as a share of its layer's total",
    "routing_mass": "routing mass per expert: mean router probability, share of its layer",
}


def _plot_expert_scores(statistics: Statistics, score: str, path: Path) -> Path:
    """A layers x experts heatmap of `score`, each layer normalized to a sum of 1 (scales differ between layers);
    x marks each layer's EXPERTS_MEASURED lowest: the experts Expert Drop by that score removes first."""

    def shares(layer) -> list[float]:
        values = np.asarray(getattr(layer, score) or [0.0] * len(layer.expert_tokens), dtype=float)
        return (values / values.sum()).tolist() if values.sum() > 0 else values.tolist()

    layers, grid = _moe_grid(statistics, shares)
    width = grid.shape[1]
    figure, axes = plt.subplots(figsize=(min(2.2 + 0.45 * width, 12), 1.4 + 0.4 * len(grid)))
    image = axes.imshow(grid, aspect="auto", cmap="viridis")
    for row in range(len(layers)):
        values = np.nan_to_num(grid[row], nan=np.inf)
        for expert in np.argsort(values, kind="stable")[:EXPERTS_MEASURED]:
            axes.plot(expert, row, marker="x", color="#ff4040", markersize=7, markeredgewidth=2)
    axes.set_xlabel("expert")
    axes.set_ylabel("layer")
    axes.set_yticks(range(len(layers)), [str(i) for i in layers])
    axes.set_title(SCORE_TITLES[score], fontsize=10)
    figure.colorbar(image, ax=axes)
    return _save(figure, path)


def _plot_drop_damage(statistics: Statistics, candidates: dict, path: Path) -> Path:
    """Per layer, KL of dropping the whole block and of dropping its MoE sublayer, one at a time."""
    count = len(statistics.layers)
    block = {row["layer"]: row["kl"] for row in candidates["block_drop"]}
    moe = {row["layer"]: row["kl"] for row in candidates["layer_drop"]}
    positions = np.arange(count)
    figure, axes = plt.subplots(figsize=(min(max(5.5, 0.5 * count + 2), 12), 3.4))
    axes.bar(positions - 0.2, [block.get(i, np.nan) for i in range(count)], 0.4, color="#4c72b0",
             label="drop the block (Block Drop)")
    axes.bar(positions + 0.2, [moe.get(i, np.nan) for i in range(count)], 0.4, color="#dd8452",
             label="drop its MoE sublayer (Layer Drop)")
    values = [v for v in list(block.values()) + list(moe.values()) if v is not None and v > 0]
    if values and max(values) > 30 * min(values):  # one costly layer would flatten the others
        axes.set_yscale("log")
    axes.set_xticks(positions, [str(i) for i in range(count)], fontsize=8)
    axes.set_xlabel("layer")
    axes.set_ylabel("KL if dropped, nats/token")
    axes.spines[["top", "right"]].set_visible(False)
    axes.legend(fontsize=8, frameon=False)
    return _save(figure, path)


def _plot_expert_usage(statistics: Statistics, path: Path) -> Path:
    layers, usage = _moe_grid(statistics, lambda layer: layer.expert_frequency())
    width = usage.shape[1]
    figure, axes = plt.subplots(figsize=(1.2 + 0.45 * width, 1.2 + 0.4 * max(len(layers), 1)))
    image = axes.imshow(usage, aspect="auto", cmap="viridis")
    axes.set_xlabel("expert")
    axes.set_ylabel("layer")
    axes.set_yticks(range(len(layers)), [str(i) for i in layers])
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


def drop_candidates(statistics: Statistics, scorer=None) -> dict:
    """Ranked Block Drop, Layer Drop and Expert Drop candidates, cheapest first.

    With a `scorer` (calibration.damage.RemovalScorer) each candidate's damage is measured: the KL of the model
    without it, alone, against the model as given; blocks and MoE sublayers are all measured, experts the
    EXPERTS_MEASURED lowest-REAP of each MoE layer. Without one, or where the routing cannot be masked, the
    candidates are ranked by the statistics alone (similarity; REAP)."""
    from moeexport.calibration.damage import BLOCK, EXPERT, MOE, Removed

    layers = statistics.layers
    blocks = [{"layer": i, "similarity": layer.block_similarity} for i, layer in enumerate(layers)]
    sublayers = [{"layer": i, "similarity": layer.moe_similarity} for i, layer in enumerate(layers)
                 if layer.moe_similarity is not None]
    experts = []
    for index, layer in enumerate(layers):
        if layer.kind != "moe":
            continue
        frequency, reap = layer.expert_frequency(), layer.reap or [0.0] * len(layer.expert_tokens)
        for expert in sorted(range(len(reap)), key=lambda e: reap[e])[:EXPERTS_MEASURED]:
            experts.append({"layer": index, "expert": expert, "reap": reap[expert], "share": frequency[expert],
                            "routing_mass": (layer.routing_mass or [None] * len(reap))[expert]})
    measured, notes = scorer is not None, []
    if measured:
        whole = blocks + sublayers
        removals = ([frozenset({Removed(row["layer"], BLOCK)}) for row in blocks]
                    + [frozenset({Removed(row["layer"], MOE)}) for row in sublayers])
        expert_removals = [frozenset({Removed(row["layer"], EXPERT, row["expert"])}) for row in experts]
        try:  # one pass for all three kinds where the routing can be masked
            damage = scorer.kl(removals + expert_removals)
            whole += experts
        except MoeExportError as error:  # e.g. group-limited routing: experts ranked by REAP alone
            notes.append(f"expert removals are not measured: {error}")
            damage = scorer.kl(removals)
        for row, value in zip(whole, damage):
            row["kl"] = value
    blocks.sort(key=lambda row: (row.get("kl", 0.0), -row["similarity"]))
    sublayers.sort(key=lambda row: (row.get("kl", 0.0), -row["similarity"]))
    experts.sort(key=lambda row: (row.get("kl", 0.0), row["reap"]))
    tokens = int(scorer.tokens.numel()) if measured else None
    return {"measured": measured, "scoring_tokens": tokens, "notes": notes,
            "block_drop": blocks, "layer_drop": sublayers, "expert_drop": experts}


PLOT_CAPTIONS = {
    "expert_usage": "Share of each layer's routing decisions per expert. A dark cell is an expert the router "
                    "seldom picks: Expert Drop by frequency removes it first; a flat row means every expert works.",
    "reap": "REAP saliency (gate weight x size of the expert's output, over the tokens routed to it), as a share "
            "of the layer's total; x marks each layer's lowest two. Expert Drop's default score removes the "
            "lowest first: an expert that is chosen but adds little is cheap to lose.",
    "routing_mass": "Routing mass: the router's mean probability per expert, as a share of the layer. Low mass "
                    "means the router seldom prefers the expert even outside the top-k; where REAP and routing "
                    "mass agree on an expert (x in both), dropping it is the safest choice.",
    "drop_damage": "Measured damage of dropping each block (Block Drop) or only its MoE sublayer (Layer Drop), "
                   "one at a time: the lowest bars are the cheapest to drop. Dropping several costs roughly, "
                   "not exactly, the sum.",
    "layer_similarity": "Cosine of each block's input and output (blue) and of x and x + MoE(x) (orange): near 1, "
                        "the layer changes the hidden state little, so dropping it should cost little; the "
                        "measured damage above is the direct test.",
    "block_windows": "Cosine of the input of a window of consecutive blocks and its output, by first block and "
                     "width: a bright cell far right is a run of blocks that can go together (consecutive Block "
                     "Drop).",
}

COLUMN_LABELS = {
    "layer": "layer", "kind": "kind", "experts": "experts", "top_k": "top-k",
    "least_used": "least-used expert's share", "most_used": "most-used expert's share",
    "unused_experts": "unused experts", "block_similarity": "cos(block in, out)",
    "moe_similarity": "cos(x, x + MoE(x))",
}


def write_html(statistics: Statistics, rows: list[dict], plots: list[Path], path: Path, title: str,
               candidates: dict | None = None) -> Path:
    """One self-contained page: what to drop (ranked, with the damage measured), the plots with what each means
    for the choice, and the per-layer table (the PNG files stay beside it)."""
    headers = [key for key in dict.fromkeys(key for row in rows for key in row)]
    table = html_table([COLUMN_LABELS.get(key, key.replace("_", " ")) for key in headers],
                       [[_format(row.get(key), key) for key in headers] for row in rows])
    images = "".join(embed_png(plot.read_bytes(), PLOT_CAPTIONS.get(plot.stem, plot.stem.replace("_", " ")))
                     for plot in plots)
    calibration = html.escape(", ".join(f"{k}={v}" for k, v in statistics.calibration.items()))
    body = (f"<h1>{html.escape(title)}</h1><p class='meta'>calibration: {calibration}</p>"
            f"{_candidates_section(candidates) if candidates else ''}"
            f"<section><h2>Plots: what each says about the choice</h2>{images}</section>"
            f"<section><h2>Per-layer statistics</h2>{table}</section>")
    path.write_text(html_page(title, body))
    return path


def _candidates_section(candidates: dict) -> str:
    measured = candidates.get("measured")
    damage = "KL if dropped" if measured else None
    how = (f"Each candidate's damage is measured alone: KL(model || model without it), nats/token, on "
           f"{candidates.get('scoring_tokens'):,} calibration tokens. Cheapest first; the recipe line under each "
           "table drops the first rows." if measured else
           "Ranked by the statistics alone (no damage measured): the most similar first, the lowest REAP first.")

    def kl(row) -> str:
        return f"{row['kl']:.4g}" if "kl" in row else ""

    blocks = candidates["block_drop"][:SHOWN]
    block_table = html_table(["rank", "block", *([damage] if damage else []), "cos(in, out)"],
                             [[rank, row["layer"], *([kl(row)] if damage else []), f"{row['similarity']:.4f}"]
                              for rank, row in enumerate(blocks, 1)])
    sublayers = candidates["layer_drop"][:SHOWN]
    layer_table = html_table(["rank", "layer", *([damage] if damage else []), "cos(x, x + MoE(x))"],
                             [[rank, row["layer"], *([kl(row)] if damage else []), f"{row['similarity']:.4f}"]
                              for rank, row in enumerate(sublayers, 1)])
    experts = candidates["expert_drop"][:SHOWN]
    expert_table = html_table(
        ["rank", "layer", "expert", *([damage] if damage and any("kl" in r for r in experts) else []), "REAP",
         "share of routing", "routing mass"],
        [[rank, row["layer"], row["expert"], *([kl(row)] if damage and any("kl" in r for r in experts) else []),
          f"{row['reap']:.4g}", f"{row['share']:.1%}",
          "" if row["routing_mass"] is None else f"{row['routing_mass']:.1%}"] for rank, row in enumerate(experts, 1)])

    def recipe(line: str) -> str:
        return f"<p class='meta'>recipe: <code>{html.escape(line)}</code></p>"

    parts = [f"<p>{html.escape(how)}</p>", "<div class='row'>",
             f"<div><h3>Block Drop: whole decoder blocks</h3>{block_table}"
             f"{recipe('block_drop: {n: 1}') if blocks else ''}</div>",
             f"<div><h3>Layer Drop: MoE sublayers (attention stays)</h3>"
             + (f"{layer_table}{recipe('layer_drop: {n: 1}')}" if sublayers else "<p class='meta'>no MoE layer</p>")
             + "</div></div>",
             f"<h3>Expert Drop: the {EXPERTS_MEASURED} lowest-REAP experts of each MoE layer</h3>"
             + (f"{expert_table}{recipe('expert_drop: {keep: N, score: reap}')}" if experts
                else "<p class='meta'>no MoE layer</p>")]
    parts += [f"<p class='meta'>{html.escape(note)}</p>" for note in candidates.get("notes") or []]
    return "<section><h2>What to drop: ranked candidates</h2>" + "".join(parts) + "</section>"


def _format(value, key: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.1%}" if key in ("least_used", "most_used") else f"{value:.4f}"
    if isinstance(value, list):
        return ", ".join(map(str, value)) if value else "none"
    return str(value)
