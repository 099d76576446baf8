"""`moeexport search` on the demo model with a small grid and calibration set: the untrimmed rows are the real
files, estimates of trimmed ones are close to them, the choice meets its constraint, the front is non-dominated,
the recipe written loads and names its build flags, and what cannot be met or searched is one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeexport.cli import main
from moeexport.errors import MoeExportError
from moeexport.pipeline import CalibrationOptions
from moeexport.search import Constraint, SearchOptions, search
from tests.cli_output import without_progress

TEXT = str(Path(__file__).parent / "held_out_text.txt")
CALIBRATION = CalibrationOptions(TEXT, samples=4, length=64, cache=False)
GRID = dict(block_drop=(0, 1), layer_drop=(0, 1), expert_keep=(1.0, 0.5), quant_types=("f16", "q8_0", "q4_0"))
SMALL_FLAGS = ["--calib", TEXT, "--calib-samples", "4", "--calib-length", "64", "--no-cache"]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "recipe.yaml"
    options = SearchOptions(calibration=CALIBRATION, out=str(out), **GRID)
    return search("demo", "gguf", Constraint.parse(max_size="30%"), options), out


def _export(model, quant, path):
    from moeexport.backends.gguf.writer import export

    return export(model, path, quant=quant).path


def test_the_untrimmed_rows_are_the_real_files(searched, tmp_path):
    from moeexport.backends.gguf.runner import bytes_per_token
    from moeexport.modelio import load

    report, _ = searched
    demo = load("demo")
    untrimmed = next(i for i, trimming in enumerate(report.trimmings) if trimming.label == "untrimmed")
    rows = [c for c in report.candidates if c.trimming == untrimmed]
    assert sorted(c.quant for c in rows) == sorted(GRID["quant_types"])
    for candidate in rows:
        path = _export(demo, candidate.quant, tmp_path / f"demo-{candidate.quant}.gguf")
        assert candidate.file_bytes == path.stat().st_size  # the estimate of the untrimmed file is exact
        assert candidate.token_bytes == bytes_per_token(path).total
        assert candidate.kl_trimming == 0.0
    assert report.baseline["file_bytes"] == (tmp_path / "demo-f16.gguf").stat().st_size
    assert report.skipped == [] and len(report.trimmings) == 8 and len(report.candidates) == 24


def test_estimates_of_trimmed_candidates_are_close_to_their_files(searched, tmp_path):
    """Block Drop, Layer Drop (stand-in FFNs on the padded host) and global Expert Drop (padding) at once."""
    from moeexport.adapters import adapter_for
    from moeexport.adapters.surgery import structure
    from moeexport.modelio import load, load_tokenizer
    from moeexport.pipeline import statistics_provider
    from moeexport.search import _rebuild

    report, _ = searched
    demo = load("demo")
    provider = statistics_provider("demo", load_tokenizer("demo"), CALIBRATION)
    provider.tokens(demo)
    index = next(i for i, t in enumerate(report.trimmings) if t.block_drop and t.layer_drop and t.expert_keep < 8)
    trimming = report.trimmings[index]
    model = _rebuild(demo, trimming, provider)
    assert [spec.num_experts for spec in structure(adapter_for(model.config), model)] == trimming.experts
    for candidate in (c for c in report.candidates if c.trimming == index):
        path = _export(model, candidate.quant, tmp_path / f"{candidate.quant}.gguf")
        assert abs(candidate.file_bytes - path.stat().st_size) <= 0.005 * path.stat().st_size


def test_the_choice_meets_the_constraint_and_is_the_best_that_does(searched):
    report, _ = searched
    chosen = report.candidates[report.chosen]
    limit = 0.30 * report.baseline["file_bytes"]
    assert chosen.meets and chosen.file_bytes <= limit
    assert chosen.verified["meets"] and chosen.verified["file_bytes"] <= limit
    assert chosen.kl == min(c.kl for c in report.candidates if c.meets)
    assert chosen.kl == pytest.approx(chosen.kl_trimming + chosen.kl_type)
    assert chosen.verified["kl"] > 0 and chosen.pareto


def test_the_pareto_front_is_non_dominated(searched):
    report, _ = searched
    candidates = report.candidates

    def dominates(a, b) -> bool:
        return a.file_bytes <= b.file_bytes and a.kl <= b.kl and (a.file_bytes < b.file_bytes or a.kl < b.kl)

    front = [c for c in candidates if c.pareto]
    assert front
    for candidate in candidates:
        dominated = any(dominates(other, candidate) for other in candidates)
        assert candidate.pareto != dominated or (not candidate.pareto and any(
            o.file_bytes == candidate.file_bytes and o.kl == candidate.kl and o.pareto for o in candidates))
    rows = report.pareto_rows()
    assert [row["file_bytes"] for row in rows] == sorted(row["file_bytes"] for row in rows)
    assert all(a["kl"] > b["kl"] for a, b in zip(rows, rows[1:]))  # smaller files cost KL along the front


def test_the_recipe_written_loads_and_names_its_build_flags(searched):
    from moeexport.recipe import load_recipe

    report, out = searched
    text = out.read_text()
    row = report.chosen_row()
    assert f"--target gguf --quant {row['quant']}" in text.splitlines()[1]
    assert f"--calib {TEXT}" in text and "--calib-samples 4 --calib-length 64" in text
    assert "additive estimate" in text and "measured" in text
    recipe = load_recipe(out)
    assert recipe.to_dict()["passes"] == [{name: dict(options) for name, options in entry.items()}
                                          for entry in _loaded(row["passes"])]
    assert report.to_dict()["chosen_row"]["quant"] == row["quant"]
    json.dumps(report.to_dict())  # --json prints it


def _loaded(passes):
    """Recipe entries with every option filled in, as load_recipe returns them."""
    from moeexport.recipe import parse_recipe

    return parse_recipe({"passes": passes}).to_dict()["passes"]


def test_trimmed_recipes_are_written_with_the_score_they_ran_with(searched):
    report, _ = searched
    trimmed = [t for t in report.trimmings if t.passes]
    assert trimmed and all("score" in options for t in trimmed for entry in t.passes for options in entry.values())
    expert_steps = [entry["expert_drop"] for t in trimmed for entry in t.passes if "expert_drop" in entry]
    assert expert_steps and all(step["scope"] == "global" and step["min_keep"] == 2 for step in expert_steps)


def test_a_prefix_applied_once_scores_as_the_whole_recipe_does(searched):
    """Candidates share their applied prefixes; each still equals its recipe compressed from scratch."""
    import copy

    from moeexport.compress import compress
    from moeexport.evaluate import evaluate
    from moeexport.modelio import load, load_tokenizer
    from moeexport.pipeline import statistics_provider
    from moeexport.recipe import parse_recipe

    report, _ = searched
    trimming = next(t for t in report.trimmings if t.layer_drop and t.expert_keep < 8 and not t.block_drop)
    demo = load("demo")
    provider = statistics_provider("demo", load_tokenizer("demo"), CALIBRATION)
    tokens = provider.tokens(demo)
    model = copy.deepcopy(demo)
    compress(model, parse_recipe({"passes": trimming.passes}), provider)
    assert evaluate(model, tokens, reference=demo).kl == pytest.approx(trimming.kl, rel=1e-4)


def test_a_constraint_nothing_meets_is_one_clear_line(tmp_path, capsys):
    code = main(["search", "demo", "--target", "gguf", "--max-size", "1%", "--block-drop", "0", "--layer-drop", "0",
                 "--expert-keep", "1", "--quant-types", "f16,q4_0", *SMALL_FLAGS, "--out", str(tmp_path / "r.yaml")])
    err = without_progress(capsys.readouterr().err).splitlines()
    assert code == 2 and "no candidate meets --max-size 1% of the untrimmed F16 GGUF" in err[-1]
    assert "the smallest is" in err[-1] and "q4_0" in err[-1]
    assert not (tmp_path / "r.yaml").exists()


def test_a_decode_speedup_constraint_from_the_command_line_prints_one_json_document(tmp_path, capsys):
    code = main(["search", "demo", "--target", "gguf", "--min-decode-speedup", "3x", "--block-drop", "0",
                 "--layer-drop", "0", "--expert-keep", "1", "--quant-types", "f16,q8_0,q4_0", "--verify", "1",
                 *SMALL_FLAGS, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    chosen = report["chosen_row"]
    assert chosen["decode_speedup"] >= 3 and chosen["verified"]["decode_speedup"] >= 3
    assert report["constraint"]["kind"] == "min_decode_speedup"
    assert report["baseline"]["limit_token_bytes"] == int(report["baseline"]["token_bytes"] / 3)
    assert chosen["quant"] == "q4_0" and chosen["passes"] == []  # q8_0 reads too much per token, f16 all of it


def test_onnx_and_unknown_types_are_refused_before_any_work(capsys):
    assert main(["search", "demo", "--target", "onnx", "--max-size", "30%"]) == 2
    err = without_progress(capsys.readouterr().err)
    assert err.count("\n") == 0 and "--target gguf (f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0)" in err
    assert main(["search", "demo", "--target", "gguf", "--max-size", "30%", "--quant-types", "f32"]) == 2
    assert "search measures gguf types" in capsys.readouterr().err


def test_an_out_or_build_in_the_model_or_already_there_is_refused_before_any_work(tmp_path, capsys):
    from moeexport.checkpoint_files import resolve_model_dir

    inside = resolve_model_dir("demo") / "recipe.yaml"
    assert main(["search", "demo", "--target", "gguf", "--max-size", "30%", "--out", str(inside)]) == 2
    assert "is inside the model directory" in capsys.readouterr().err and not inside.exists()
    taken = tmp_path / "recipe.yaml"
    taken.write_text("mine")
    assert main(["search", "demo", "--target", "gguf", "--max-size", "30%", "--out", str(taken)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and taken.read_text() == "mine"
    # the build directory's errors name the flag that gave it
    assert main(["search", "demo", "--target", "gguf", "--max-size", "30%", "--build", str(taken)]) == 2
    assert "--build " in capsys.readouterr().err and taken.read_text() == "mine"


@pytest.mark.parametrize("given, kind, value", [
    ({"max_size": "30%"}, "max_size", 0.3), ({"max_size": "0.25"}, "max_size", 0.25),
    ({"max_bytes": "16GB"}, "max_bytes", 16e9), ({"max_bytes": "1GiB"}, "max_bytes", 2**30),
    ({"min_decode_speedup": "3x"}, "min_decode_speedup", 3.0), ({"min_decode_speedup": "2.5"}, "min_decode_speedup", 2.5),
])
def test_constraints_parse_the_command_line_forms(given, kind, value):
    constraint = Constraint.parse(**given)
    assert (constraint.kind, constraint.value) == (kind, pytest.approx(value))


@pytest.mark.parametrize("given, message", [
    ({"max_size": "30"}, "write a percentage like 30%"), ({"max_size": "big"}, "is not a share"),
    ({"max_bytes": "lots"}, "--max-bytes 'lots' is not a size"), ({"min_decode_speedup": "fast"}, "is not a factor"),
    ({}, "give exactly one of"), ({"max_size": "30%", "max_bytes": "1GB"}, "give exactly one of"),
    ({"min_decode_speedup": "0x"}, "must be a positive number"),
])
def test_malformed_constraints_are_one_line_errors(given, message):
    with pytest.raises(MoeExportError, match=message):
        Constraint.parse(**given)
