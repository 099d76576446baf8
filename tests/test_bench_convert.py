"""tools/bench_convert.py end to end on the bundled demo model: both tools run, are measured, and write a GGUF."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HELD_OUT = Path(__file__).with_name("held_out_text.txt")  # sampling validation windows from the model costs seconds


def _converter_available(directory: Path) -> bool:
    spec = importlib.util.spec_from_file_location("compare_with_converter", REPO / "tools" / "compare_with_converter.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    try:
        tool.fetch_converter(directory)
    except (subprocess.CalledProcessError, ValueError):  # pip offline and nothing cached; or no sdist came
        return False
    return True


def test_bench_convert_measures_both_tools_on_the_demo_model(tmp_path):
    if not _converter_available(tmp_path / "probe"):
        pytest.skip("the llama-cpp-python sdist (llama.cpp's convert_hf_to_gguf.py) cannot be fetched with pip here")
    work = tmp_path / "work"
    run = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_convert.py"), "demo", "--work", str(work), "--text",
         str(HELD_OUT), "--keep", "--moeexport-args=--no-eval"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "moeexport/converter" in run.stdout
    result = json.loads((work / "bench_convert.json").read_text())
    for tool in ("moeexport", "converter"):
        measured = result[tool]
        assert measured["wall_s"] > 0 and measured["peak_rss_bytes"] > 0 and measured["output_bytes"] > 0
        assert Path(measured["output"]).stat().st_size == measured["output_bytes"]  # --keep left it there
        assert Path(measured["output"]).read_bytes()[:4] == b"GGUF"
    assert result["moeexport"]["timings"]["export"] > 0
    assert all(ratio > 0 for ratio in result["ratios"].values())
