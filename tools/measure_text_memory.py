"""Peak memory and time of turning a large one-line text file into calibration and held-out windows.

    python tools/measure_text_memory.py [--megabytes 64] [--samples 32] [--length 256]

Writes a one-line file of the given size (the held-out test text's words, shuffled, without a single
newline) and, in a fresh process each, draws the calibration set (a seeded sample over the whole text) and
the held-out windows (the first ones) from it with the demo model's tokenizer; prints each one's wall
time and peak resident memory (VmHWM), which includes the Python and transformers import.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HELD_OUT = Path(__file__).resolve().parents[1] / "tests" / "held_out_text.txt"

MEASURE = """
import json, sys, time
from pathlib import Path
from moeexport.calibration.sources import CalibrationConfig, calibration_tokens
from moeexport.evaluate import eval_windows
from moeexport.modelio import load_tokenizer
path, what, samples, length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tokenizer = load_tokenizer("demo")
started = time.perf_counter()
if what == "calibration":
    windows = calibration_tokens(None, tokenizer, CalibrationConfig(path, samples, length, 0))
else:
    windows = eval_windows(tokenizer, path, length, samples)
seconds = time.perf_counter() - started
peak = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
            if line.startswith("VmHWM:"))
print(json.dumps({"what": what, "windows": list(windows.shape), "seconds": round(seconds, 1), "peak_rss_bytes": peak}))
"""


def one_line_file(path: Path, megabytes: int) -> None:
    words = HELD_OUT.read_text().split()
    rng = random.Random(0)
    with path.open("w") as handle:
        written = 0
        while written < megabytes * 10**6:
            chunk = " ".join(rng.choices(words, k=100_000)) + " "
            handle.write(chunk)
            written += len(chunk)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=64)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="moeexport-text-") as scratch:
        path = Path(scratch) / "one-line.txt"
        one_line_file(path, args.megabytes)
        print(f"{path.stat().st_size / 1e6:.1f} MB in one line")
        for what in ("calibration", "held-out"):
            started = time.perf_counter()
            result = subprocess.run([sys.executable, "-c", MEASURE, str(path), what, str(args.samples),
                                     str(args.length)], capture_output=True, text=True, check=True)
            report = json.loads(result.stdout.strip().splitlines()[-1])
            print(f"{what}: {report['windows']} windows in {report['seconds']} s "
                  f"({time.perf_counter() - started:.1f} s with imports), peak RSS "
                  f"{report['peak_rss_bytes'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
