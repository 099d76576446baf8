"""Errors in a second: the CLI, run as a fresh process, refuses a recipe typo, a missing model, a bad --quant and
a missing extra before torch or transformers are imported, with one line on stderr.

The bound is generous (this suite runs on shared, loaded machines); the measured times print with `pytest -s`.
Importing torch alone takes several seconds, so a refusal that reached it would still show in `heavy` below.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from moeexport.pass_options import OPTIONS
from moeexport.passes import PASSES

BOUND_SECONDS = 10  # the target is 2 s on a quiet machine
TRIM = "passes:\n  - block_drop: {n: 1}\n  - expert_drop: {keep: 6, scope: global, score: frequency}\n"
TYPO = "passes:\n  - block_drop: {n: 1}\n  - expert_drop: {kep: 6, scope: global}\n"

CASES = {  # name: (recipe text, model, extra arguments, modules made absent, what stderr says)
    "recipe typo": (TYPO, "demo", [], [], "kep: unknown option (did you mean 'keep'?)"),
    "missing recipe file": (None, "demo", [], [], "does not exist"),
    "missing model": (TRIM, "no-such-model-dir", [], [], "model directory"),
    "bad --quant": (TRIM, "demo", ["--quant", "q3_x"], [], "--quant q3_x is not a gguf type"),
    "missing extra": (TRIM, "demo", [], ["llama_cpp"], "pip install 'moeexport[gguf]'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_refuses_in_a_second_without_torch(case, tmp_path):
    text, model, extra, absent, message = CASES[case]
    recipe = tmp_path / "recipe.yaml"
    if text is not None:
        recipe.write_text(text)
    model = model if model == "demo" else str(tmp_path / model)
    argv = ["build", model, "--recipe", str(recipe), "--target", "gguf", "--out", str(tmp_path / "out"), *extra]
    script = (f"import sys\nfor name in {absent!r}: sys.modules[name] = None  # as if not installed\n"
              "from moeexport.cli import main\ncode = main(" + repr(argv) + ")\n"
              "print(code, [name for name in ('torch', 'transformers') if name in sys.modules])")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - started
    print(f"\n{case}: refused in {seconds:.2f} s: {done.stderr.strip()}")
    code, heavy = done.stdout.split(" ", 1)
    assert (code, heavy.strip()) == ("2", "[]"), (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert seconds < BOUND_SECONDS


def test_every_pass_validates_against_the_torch_free_options():
    assert list(PASSES) == list(OPTIONS)
    assert all(PASSES[name].Options is OPTIONS[name] for name in PASSES)
