"""The trained fixture model (../shared): the whole CLI path on real weights and real text."""

from __future__ import annotations

import json

from moeexport.cli import main
from tests.conftest import CORPUS, FIXTURE, needs_shared

# the command line's flow; the refit `repair: auto` adds is tested in tests/test_repair.py
RECIPE = ("passes:\n  - block_drop: {n: 1, repair: none}\n  - layer_drop: {n: 1, repair: none}\n"
          "  - expert_drop: {keep: 6, scope: global, score: frequency, repair: none}\n")


@needs_shared
def test_analyze_compress_eval_on_the_fixture(tmp_path, capsys):
    recipe = tmp_path / "trim.yaml"
    recipe.write_text(RECIPE)
    calib = ["--calib", str(CORPUS / "calib.txt"), "--calib-samples", "16"]
    assert main(["analyze", str(FIXTURE), "--out", str(tmp_path / "analysis"), "--json", *calib]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 6 and all(row["unused_experts"] == [] for row in rows)

    out = tmp_path / "trimmed"
    assert main(["compress", str(FIXTURE), "--recipe", str(recipe), "--out", str(out), "--no-eval", *calib]) == 0
    assert "structure before -> after" in capsys.readouterr().out
    manifest = json.loads((out / "moeexport.json").read_text())
    kept = [layer["num_experts"] for layer in manifest["layers"] if layer["kind"] == "moe"]
    assert len(manifest["layers"]) == 5 and len(kept) == 4 and sum(kept) == 6 * 4

    assert main(["eval", str(out), "--text", str(CORPUS / "dev.txt"), "--reference", str(FIXTURE), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    # the original's dev perplexity is ~52-58; trimming a third of the model costs quality but keeps it a model
    assert 40 < result["reference_perplexity"] < 70
    assert result["reference_perplexity"] < result["perplexity"] < 4 * result["reference_perplexity"]
    assert 0.3 < result["top1_agreement"] < 1


@needs_shared
def test_the_global_drops_a_user_writes_first_build_on_the_fixture(tmp_path, capsys):
    """Default score (REAP), no min_keep: a layer whose experts all score below the others' keeps its best one."""
    calib = ["--calib", str(CORPUS / "calib.txt"), "--calib-samples", "8"]
    for keep, before in ((6, "  - block_drop: {n: 1}\n  - layer_drop: {n: 1}\n"), (4, ""), (1, "")):
        recipe = tmp_path / f"global-{keep}.yaml"
        recipe.write_text(f"passes:\n{before}  - expert_drop: {{keep: {keep}, scope: global}}\n")
        out = tmp_path / f"global-{keep}"
        assert main(["compress", str(FIXTURE), "--recipe", str(recipe), "--out", str(out), "--no-eval", *calib]) == 0
        manifest = json.loads((out / "moeexport.json").read_text())
        kept = [layer["num_experts"] for layer in manifest["layers"] if layer["kind"] == "moe"]
        assert min(kept) >= 1 and sum(kept) == keep * len(kept), (keep, kept)
    capsys.readouterr()
