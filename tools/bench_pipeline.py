"""Wall time of analyze + compress + eval on one model, as a user runs them (one process each).

    python tools/bench_pipeline.py            # the fixture and corpus in ../shared
    python tools/bench_pipeline.py --model demo --calib model --text my_text.txt
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from fixture_data import add_data_arguments

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "trim.yaml"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="moeexport-bench-"))
    env_cache = {"MOEEXPORT_CACHE": str(work / "cache")}  # a cold cache: nothing computed before
    commands = {
        "analyze": ["analyze", args.model, "--calib", args.calib, "--out", str(work / "analysis")],
        "compress": ["compress", args.model, "--recipe", args.recipe, "--calib", args.calib,
                     "--out", str(work / "compressed"), "--eval-text", args.text],
        "eval": ["eval", str(work / "compressed"), "--text", args.text, "--reference", args.model],
    }
    total = 0.0
    for name, command in commands.items():
        started = time.perf_counter()
        subprocess.run(["moeexport", *command], check=True, env=os.environ | env_cache, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        total += seconds
        print(f"{name:9s} {seconds:6.1f} s")
    print(f"{'total':9s} {total:6.1f} s")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
