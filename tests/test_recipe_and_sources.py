"""Recipes parse strictly; text sources turn into deterministic token windows."""

from __future__ import annotations

import json

import pytest

from moeexport.calibration.sources import read_documents, token_windows
from moeexport.errors import MoeExportError
from moeexport.recipe import load_recipe, parse_recipe

ISSUE_RECIPE = """
passes:
  - block_drop: {n: 1}                # mode: discrete (default) | consecutive
  - layer_drop: {n: 1}
  - expert_drop: {keep: 6, scope: global, score: frequency}
"""


def test_the_documented_recipe_parses_and_round_trips(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(ISSUE_RECIPE)
    recipe = load_recipe(path)
    assert [step.name for step in recipe.steps] == ["block_drop", "layer_drop", "expert_drop"]
    assert recipe.steps[2].options.scope == "global" and recipe.steps[2].options.keep == 6
    assert recipe.steps[0].options.mode == "discrete"
    assert parse_recipe(__import__("yaml").safe_load(recipe.to_yaml())) == recipe


def test_empty_recipe_is_valid(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("passes: []\n")
    assert load_recipe(path).steps == ()


@pytest.mark.parametrize(
    "text, message",
    [
        ("passes: [block_drop: {n: 1}", "not valid YAML at line"),
        ("- block_drop: {n: 1}", "mapping with a 'passes' list"),
        ("passes:\n  - prune_everything: {}", "unknown pass 'prune_everything'"),
        ("passes:\n  - block_drop: {n: 1, nn: 2}", "nn: unknown option"),
        ("passes:\n  - expert_drop: {keep: -1}", "keep: Input should be greater than or equal to 0"),
        ("passes:\n  - expert_drop: {keep: 2, scope: everywhere}", "scope: Input should be 'layer' or 'global'"),
        ("passes:\n  - block_drop: {n: 1}\nextra: 1", "unknown top-level keys"),
    ],
)
def test_bad_recipes_get_one_line_errors(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(MoeExportError, match=message) as error:
        load_recipe(path)
    assert "\n" not in str(error.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(MoeExportError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_text_and_jsonl_sources(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert read_documents(str(tmp_path / "a.txt")) == ["hello world"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert read_documents(str(tmp_path / "b.jsonl")) == ["one", "two"]
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(MoeExportError, match="c.jsonl:1 has no string field 'text'"):
        read_documents(str(tmp_path / "c.jsonl"))
    (tmp_path / "d.jsonl").write_text("{not json\n")
    with pytest.raises(MoeExportError, match="d.jsonl:1 is not valid JSON"):
        read_documents(str(tmp_path / "d.jsonl"))
    with pytest.raises(MoeExportError, match="is not a file"):
        read_documents(str(tmp_path / "missing.txt"))


def test_hf_source_without_the_dataset_offline_is_a_clear_error():
    with pytest.raises(MoeExportError, match="hf: sources need the datasets package|not available offline"):
        read_documents("hf:surely/not-a-cached-dataset")


def test_token_windows_are_seeded_and_non_overlapping():
    stream = list(range(1000))
    a = token_windows(stream, 10, 5, seed=1, what="t")
    assert a.tolist() == token_windows(stream, 10, 5, seed=1, what="t").tolist()
    assert a.tolist() != token_windows(stream, 10, 5, seed=2, what="t").tolist()
    starts = sorted(row[0] for row in a.tolist())
    assert all(start % 10 == 0 for start in starts) and len(set(starts)) == 5
    assert token_windows(stream, 10, 3, seed=None, what="t")[:, 0].tolist() == [0, 10, 20]
    with pytest.raises(MoeExportError, match="enough for 100 windows of 10; 101 were asked for"):
        token_windows(stream, 10, 101, seed=0, what="t")
