#!/usr/bin/env python3
"""Write the text the demo model ships for calibration and for the quality and validation checks.

    python tools/sample_demo_text.py                  # moeexport/demo/calibration.txt and held_out.txt

Both are sampled from the demo model itself (moeexport.calibration.sources.sample_from_model: from BOS, full
distribution, temperature 1), as `--calib model` would sample them at every build, but once: sampling is most of
what a demo build costs on a CPU. Calibration text and held-out text come from different seeds, so the quality
check never scores text the calibration saw. No corpus text is written; sequences are decoded without special
tokens and separated by blank lines. Rerun it after retraining the demo model (tools/train_demo_model.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import moeexport
from moeexport.calibration.sources import sample_from_model
from moeexport.modelio import load_tokenizer
from moeexport.source import open_source

DEMO = Path(moeexport.__file__).with_name("demo")
# (file, sequences, tokens each, seed): a margin over what a build reads (32 x 256 for calibration; 16 x 128 for
# quality and 2 x 256 for validation), since decoded text tokenizes back to about as many tokens, not exactly
SAMPLES = (("calibration.txt", 40, 256, 0), ("held_out.txt", 12, 256, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEMO, help="directory to write into (default: the demo model's)")
    args = parser.parse_args()
    model, tokenizer = moeexport.load("demo"), load_tokenizer(open_source("demo"))
    for name, count, length, seed in SAMPLES:
        tokens = sample_from_model(model, tokenizer, count, length, seed)
        text = "\n\n".join(tokenizer.decode(row, skip_special_tokens=True).strip() for row in tokens.tolist())
        (args.out / name).write_text(text + "\n")
        print(f"{args.out / name}: {count} x {length} tokens sampled (seed {seed}), "
              f"{len(tokenizer(text, add_special_tokens=False)['input_ids'])} tokens as text")


if __name__ == "__main__":
    main()
