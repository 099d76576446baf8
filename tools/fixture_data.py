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
