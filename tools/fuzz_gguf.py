"""The CI's GGUF fuzzer (tests/test_fuzz.py) run longer, with weight bytes damaged too.

    python tools/fuzz_gguf.py [--inputs 2000] [--seed 1]

Writes the demo model's q8_0 GGUF once, then reads that many seeded mutations of it as a model (a
tenth or so with weight bytes damaged, each read whole through the streamed model); prints how the inputs
ended, or the first input that ended in anything but a one-line MoeExportError.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import moeexport
    from moeexport.backends import gguf as gguf_backend
    from tests.test_fuzz import _gguf_fuzz

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="moeexport-fuzz-") as scratch:
        path = Path(scratch) / "demo-q8_0.gguf"
        gguf_backend.export(moeexport.load("demo"), path, quant="q8_0")
        started = time.perf_counter()
        outcomes = _gguf_fuzz(path, Path(scratch), args.inputs, args.seed, data_moves=True)
    print(f"{args.inputs} inputs in {time.perf_counter() - started:.0f} s: "
          + ", ".join(f"{n} {k}" for k, n in outcomes.most_common()))


if __name__ == "__main__":
    main()
