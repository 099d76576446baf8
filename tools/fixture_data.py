"""Where the developer tools find the fixture model and corpus: $MOEEXPORT_SHARED, or ../shared beside the
repository (as the tests' conftest)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

SHARED = Path(os.environ.get("MOEEXPORT_SHARED") or Path(__file__).resolve().parents[2] / "shared")
FIXTURE_MODEL = SHARED / "fixtures" / "tiny-mixtral-books"
CALIBRATION_TEXT = SHARED / "corpus" / "calib.txt"
HELD_OUT_TEXT = SHARED / "corpus" / "dev.txt"


def add_data_arguments(parser: argparse.ArgumentParser, calibration: bool = True) -> None:
    """--model, --calib (unless the tool calibrates nothing) and --text, defaulting to the fixture and corpus."""
    parser.add_argument("--model", default=str(FIXTURE_MODEL))
    if calibration:
        parser.add_argument("--calib", default=str(CALIBRATION_TEXT))
    parser.add_argument("--text", default=str(HELD_OUT_TEXT))


def model_and_held_out(args: argparse.Namespace):
    """(the model --model, its --windows held-out windows of --length tokens from --text, a statistics provider
    on --calib, the model's perplexity on those windows), after printing that perplexity."""
    from moeexport import CalibrationOptions, load, load_tokenizer
    from moeexport.evaluate import eval_windows, evaluate
    from moeexport.pipeline import statistics_provider

    original, tokenizer = load(args.model), load_tokenizer(args.model)
    windows = eval_windows(tokenizer, args.text, args.length, args.windows)
    provider = statistics_provider(args.model, tokenizer, CalibrationOptions(source=args.calib))
    base = evaluate(original, windows).perplexity
    print(f"{args.model}: perplexity {base:.3f} on {windows.numel() - len(windows)} predicted tokens of {args.text}")
    return original, windows, provider, base
