"""Reports lead with what was lost: quality against the source (and a GGUF input) before the export's fidelity,
sizes against the user's files on disk, and `analyze` pages that rank what to drop (issue 30, items 4 and 7)."""

from __future__ import annotations

import copy
import html
import re
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console

import moeexport
from moeexport.console import render_analysis, render_build
from moeexport.report import size, write_build_html
from tests.test_report_html import PNG_SIGNATURE, _images, realistic_report

HELD_OUT = Path(__file__).with_name("held_out_text.txt")
FAST = dict(eval_text=str(HELD_OUT), measure_quality=False, profile=False, validation_windows=(1, 64), overwrite=True,
            calibration=moeexport.CalibrationOptions(source=str(HELD_OUT), samples=2, length=32))


def _headline(page: str) -> str:
    """The page above its first section: the title, the headline cards and the verdict."""
    return page[:page.index("<section>")]


def test_the_headline_is_quality_against_the_source_then_the_export_fidelity(tmp_path):
    page = write_build_html(realistic_report(), tmp_path / "report.html").read_text()
    top = _headline(page)
    quality, fidelity = top.index("Quality against the source model"), top.index("export fidelity passed")
    assert quality < fidelity
    assert "61.2 → 71.8 (+17.3%)" in top[quality:fidelity]  # perplexity source -> compressed
    assert "0.0913" in top[quality:fidelity] and "84.4%" in top[quality:fidelity]
    assert "Quality against the input file" not in page  # a checkpoint input has no such comparison

    failing = write_build_html(realistic_report(failing=True), tmp_path / "failing.html").read_text()
    top = _headline(failing)
    assert top.index("Quality against the source model") < top.index("export fidelity FAILED")


def test_no_quality_check_says_why_instead_of_leaving_a_hole(tmp_path):
    report = realistic_report() | {"quality_vs_source": None}
    page = write_build_html(report, tmp_path / "no-eval.html").read_text()
    assert "not measured (--no-eval)" in _headline(page)
    empty = copy.deepcopy(report)
    empty["compression"]["passes"] = []
    page = write_build_html(empty, tmp_path / "empty.html").read_text()
    assert "no compression" in _headline(page) and "quality against the source is the export&#x27;s fidelity" in page


def _shares(page: str) -> list[str]:
    """The "after / before" cell of the files-on-disk row of the sizes table."""
    row = re.search(r"<tr><td>files on disk: input → artifact</td>(.*?)</tr>", page)
    assert row, "no files-on-disk row"
    return re.findall(r"<td[^>]*>([^<]*)</td>", row.group(1))


def test_a_bf16_checkpoint_is_sized_by_its_files_on_disk(tmp_path):
    checkpoint = tmp_path / "demo-bf16"
    moeexport.load("demo").to(torch.bfloat16).save_pretrained(checkpoint)
    for tokenizer_file in Path(moeexport.__file__).with_name("demo").glob("tokenizer*"):
        shutil.copy(tokenizer_file, checkpoint / tokenizer_file.name)
    on_disk = sum(path.stat().st_size for path in checkpoint.glob("*.safetensors"))
    report = moeexport.build(str(checkpoint), {"passes": []}, "gguf", moeexport.BuildOptions(
        out=str(tmp_path / "out"), quant="q8_0", **FAST))
    assert report.ok, report.failures
    assert report.compression.input_file_bytes == on_disk
    assert report.compression.bytes["before"] > 1.9 * on_disk  # computed in float32: not the user's size
    artifact = report.artifact["file_bytes"]
    page = (tmp_path / "out" / "report.html").read_text()
    before, after, share = _shares(page)
    assert (before, after) == (size(on_disk), size(artifact))
    assert share == f"{artifact / on_disk:.1%} ({on_disk / artifact:.2f}x smaller)"
    assert "torch weights in memory (float32)" in page


def test_gguf_to_gguf_leads_with_quality_against_the_input_file(tmp_path, demo_gguf_of):
    given = demo_gguf_of("q8_0")
    report = moeexport.build(str(given), {"passes": [{"expert_drop": {"keep": 6, "score": "frequency"}}]}, "gguf",
                             moeexport.BuildOptions(out=str(tmp_path / "out"), **FAST))
    against_input = report.quality_vs_input
    assert report.ok and against_input and 0 < against_input["kl"] and against_input["top1_agreement"] < 1
    assert report.to_dict()["quality_vs_input"] == against_input  # report.json holds it
    page = (tmp_path / "out" / "report.html").read_text()
    top = _headline(page)
    assert top.index("not measured (--no-eval)") < top.index("Quality against the input file") \
        < top.index("export fidelity passed")
    section = top[top.index("Quality against the input file"):top.index("export fidelity")]
    assert f"{against_input['kl']:.3g}" in section and f"{against_input['top1_agreement']:.1%}" in section
    on_disk = given.stat().st_size
    assert report.compression.input_file_bytes == on_disk
    assert _shares(page)[:2] == [size(on_disk), size(report.artifact["file_bytes"])]

    console = Console(record=True, width=400)
    render_build(console, report)
    text = console.export_text()
    lines = [text.index(words) for words in ("quality vs the source", "quality vs the input GGUF", "export fidelity")]
    assert lines == sorted(lines)
    assert f"of the input files on disk ({on_disk / 2**20:.1f} MiB)" in text


def _table_after(page: str, heading: str) -> list[list[str]]:
    """The rows (cells as text) of the first table after `heading`."""
    table = page[page.index(heading):].split("</table>")[0]
    return [[html.unescape(cell) for cell in re.findall(r"<td[^>]*>([^<]*)</td>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", table) if "<td" in row]


def test_analyze_ranks_what_to_drop_with_measured_damage_and_plots(tmp_path):
    from moeexport.pipeline import analyze

    out = tmp_path / "analysis"
    report = analyze("demo", out, moeexport.CalibrationOptions(samples=2, length=32))
    candidates = report.candidates
    assert candidates["measured"] and candidates["scoring_tokens"] == 64
    assert [row["layer"] for row in candidates["block_drop"]] != []
    for kind in ("block_drop", "layer_drop", "expert_drop"):
        damage = [row["kl"] for row in candidates[kind]]
        assert damage == sorted(damage) and all(value > 0 for value in damage), kind
    assert len(candidates["block_drop"]) == 4 and len(candidates["expert_drop"]) == 4 * 2
    page = (out / "report.html").read_text()
    assert page.index("What to drop: ranked candidates") < page.index("Per-layer statistics")
    blocks = _table_after(page, "Block Drop: whole decoder blocks")
    assert [row[1] for row in blocks] == [str(row["layer"]) for row in candidates["block_drop"]]
    assert [row[0] for row in blocks] == ["1", "2", "3", "4"]
    experts = _table_after(page, "Expert Drop: the 2 lowest-REAP")
    first = candidates["expert_drop"][0]
    assert experts[0][1:4] == [str(first["layer"]), str(first["expert"]), f"{first['kl']:.4g}"]
    for stem, caption in (("reap", "REAP saliency"), ("routing_mass", "Routing mass"),
                          ("drop_damage", "Measured damage of dropping each block")):
        assert (out / f"{stem}.png").read_bytes().startswith(PNG_SIGNATURE) and caption in page
    assert len(_images(page)) == 6
    assert "cos(block in, out)" in page and "block_similarity" not in page  # readable labels, not field names

    console = Console(record=True, width=400)
    render_analysis(console, report)
    first_three = ", ".join(f"block {row['layer']} (KL {row['kl']:.3g})" for row in candidates["block_drop"][:3])
    assert f"Block Drop candidates, cheapest first (KL if dropped alone): {first_three}" in console.export_text()


def test_analyze_without_measuring_ranks_by_the_statistics(tmp_path):
    from moeexport.analysis import drop_candidates, write_html, layer_rows
    from moeexport.calibration.observers import LayerStatistics, Statistics

    def moe(similarity: float, reap: list[float]) -> LayerStatistics:
        return LayerStatistics("moe", 64, similarity, similarity + 0.01, 2, [16] * len(reap), [0.25] * len(reap), reap)

    statistics = Statistics("key", {"source": "model"}, [moe(0.5, [3, 1, 2, 4]), moe(0.9, [2, 5, 0.5, 1])])
    candidates = drop_candidates(statistics)
    assert not candidates["measured"]
    assert [row["layer"] for row in candidates["block_drop"]] == [1, 0]  # the most similar block first
    assert [(row["layer"], row["expert"]) for row in candidates["expert_drop"]] == [(1, 2), (0, 1), (1, 3), (0, 2)]
    page = write_html(statistics, layer_rows(statistics), [], tmp_path / "report.html", "t", candidates).read_text()
    assert "no damage measured" in page and "KL if dropped" not in page


def test_group_limited_routing_measures_blocks_and_ranks_experts_by_reap():
    from moeexport.analysis import drop_candidates
    from moeexport.calibration.damage import RemovalScorer
    from moeexport.calibration.observers import observe
    from tests.tiny_models import random_tokens, tiny_model

    model, tokens = tiny_model("deepseek_v3"), random_tokens(2, 16)
    candidates = drop_candidates(observe(model, tokens, key="k", calibration={}), RemovalScorer(model, tokens))
    assert all(row["kl"] > 0 for row in candidates["block_drop"] + candidates["layer_drop"])
    assert candidates["expert_drop"] and not any("kl" in row for row in candidates["expert_drop"])
    assert [row["reap"] for row in candidates["expert_drop"]] == sorted(row["reap"] for row in candidates["expert_drop"])
    assert "expert removals are not measured" in candidates["notes"][0] and "n_group" in candidates["notes"][0]


def test_analyze_of_a_large_model_ranks_without_measuring_and_says_so(tmp_path, monkeypatch):
    from moeexport import pipeline

    monkeypatch.setattr(pipeline, "DAMAGE_LIMIT", 10**6)  # the demo's 3 M parameters count as large here
    events = []
    report = pipeline.analyze("demo", tmp_path / "analysis", moeexport.CalibrationOptions(samples=2, length=32),
                              on_event=events.append)
    assert not report.candidates["measured"] and not any("kl" in row for row in report.candidates["block_drop"])
    assert any("--measure-damage measures them" in event.message for event in events if event.kind == "note")
    page = (tmp_path / "analysis" / "report.html").read_text()
    assert "no damage measured" in page and not (tmp_path / "analysis" / "drop_damage.png").exists()
