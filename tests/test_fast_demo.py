"""A fast demo: the demo model ships text sampled from it once (calibration.txt, held_out.txt), which builds use
instead of sampling at every run; an empty recipe skips the quality check (the model is unchanged)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import moeexport
from moeexport.calibration.sources import read_documents, token_stream
from moeexport.modelio import load_tokenizer
from moeexport.pipeline import (QUALITY_WINDOWS, SHIPPED_CALIBRATION, SHIPPED_HELD_OUT, VALIDATION_WINDOWS,
                                CalibrationOptions, CompressOptions, _with_shipped_text, compress)
from moeexport.source import open_source

DEMO = Path(moeexport.__file__).with_name("demo")


def _resolved(model, options: CompressOptions):
    return _with_shipped_text(open_source(model), options, calibrates=True)


@pytest.mark.parametrize("given", [None, "model"])
def test_the_demo_calibrates_and_checks_on_the_text_it_ships(given):
    options = _resolved("demo", CompressOptions(calibration=CalibrationOptions(source=given)))
    assert options.calibration.source == str(DEMO / SHIPPED_CALIBRATION)
    assert options.eval_text == str(DEMO / SHIPPED_HELD_OUT)


def test_text_the_user_gives_wins_over_the_shipped_text(tmp_path):
    text = tmp_path / "mine.txt"
    options = _resolved("demo", CompressOptions(calibration=CalibrationOptions(source=str(text)),
                                                      eval_text=str(text)))
    assert options.calibration.source == options.eval_text == str(text)


def test_a_model_that_ships_no_text_is_sampled_as_before(tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(DEMO, bare, ignore=shutil.ignore_patterns("*.txt"))
    options = _resolved(bare, CompressOptions())
    assert options.calibration.source is None and options.eval_text is None


def test_the_shipped_text_holds_the_windows_a_default_build_reads():
    tokenizer = load_tokenizer("demo")
    calibration = CalibrationOptions()
    for name, needed in ((SHIPPED_CALIBRATION, calibration.samples * calibration.length),
                         (SHIPPED_HELD_OUT, max(QUALITY_WINDOWS[0] * QUALITY_WINDOWS[1],
                                                VALIDATION_WINDOWS[0] * VALIDATION_WINDOWS[1]))):
        tokens = len(token_stream(tokenizer, read_documents(str(DEMO / name))))
        assert tokens >= needed, (name, tokens, needed)


def test_an_empty_recipe_skips_the_quality_check_and_says_why(tmp_path):
    events = []
    report = compress("demo", {"passes": []}, CompressOptions(out=str(tmp_path / "out")), events.append)
    assert report.quality_vs_source is None
    assert any(event.kind == "note" and "the recipe is empty" in event.message for event in events)


def test_the_build_page_says_why_an_empty_recipe_has_no_quality(tmp_path):
    from moeexport.report import write_build_html

    empty = (write_build_html({"compression": {"passes": []}}, tmp_path / "empty.html")).read_text()
    trimmed = (write_build_html({"compression": {"passes": [{"name": "block_drop"}]}}, tmp_path / "t.html")).read_text()
    assert "no compression: the model was exported as it is" in empty and "--no-eval" not in empty
    assert "not measured (--no-eval)" in trimmed and "no compression" not in trimmed
