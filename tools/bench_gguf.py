"""GGUF sizes and llama.cpp speed per compressed structure, measured in one run.

    python tools/bench_gguf.py                       # fixture + corpus in ../shared
    python tools/bench_gguf.py --model demo --calib model --quant q8_0

For uncompressed, Block Drop 2, Layer Drop 2, uniform Expert Drop 6 and global
Expert Drop 6/8 with min_keep 2 (each one `moeexport.build`, which validates the
file against its torch model: max |delta logit| and top-1 agreement are
printed): the file size, how much of the dropped parameters' bytes the file
actually saves, and
prefill / decode tokens per second (llama.cpp defaults, greedy, median of
--repeats), with decode speed relative to the uncompressed file.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import transformers

import moeexport
from moeexport.backends import gguf as gguf_backend
from moeexport.backends import target_for
from moeexport.calibration.sources import sample_from_model
from fixture_data import CALIBRATION_TEXT, FIXTURE_MODEL

STRUCTURES = {
    "uncompressed": [],
    "block_drop_2": [{"block_drop": {"n": 2}}],
    "layer_drop_2": [{"layer_drop": {"n": 2}}],
    "expert_drop_6_uniform": [{"expert_drop": {"keep": 6, "scope": "layer", "score": "reap"}}],
    "expert_drop_6_global": [{"expert_drop": {"keep": 6, "scope": "global", "score": "reap", "min_keep": 2}}],
}
BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(FIXTURE_MODEL))
    parser.add_argument("--calib", default=str(CALIBRATION_TEXT))
    parser.add_argument("--quant", default="f32", choices=gguf_backend.QUANT_TYPES)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    prompt = sample_from_model(moeexport.load(args.model), moeexport.load_tokenizer(args.model), 1, args.prompt_tokens,
                               seed=5)[0].tolist()
    calibration = moeexport.CalibrationOptions(source=args.calib)
    rows = []
    with tempfile.TemporaryDirectory(prefix="moeexport-bench-gguf-") as scratch:
        for name, passes in STRUCTURES.items():
            report = moeexport.build(args.model, {"passes": passes}, "gguf", moeexport.BuildOptions(
                out=str(Path(scratch) / name), quant=args.quant, calibration=calibration, measure_quality=False,
                profile=False))  # timed below, median of --repeats
            runner = target_for("gguf").serving_runner(report.artifact["path"], 1024)
            runs = [runner.profile(prompt, args.new_tokens) for _ in range(args.repeats)]
            runner.close()
            parameters = report.compression.parameters
            rows.append({
                "name": name if report.ok else f"{name} (FAILED validation)",
                "representation": report.artifact["representation"],
                "dropped_parameters": parameters["before"] - parameters["after"],
                "file_bytes": report.artifact["file_bytes"],
                "prefill": statistics.median(r["prefill_tokens_per_s"] for r in runs),
                "decode": statistics.median(r["decode_tokens_per_s"] for r in runs),
                "max_abs_logit": report.validation["max_abs_logit"],
                "top1": report.validation["top1_agreement"],
            })

    base = rows[0]
    print(f"{args.model}, {args.quant}, prompt {args.prompt_tokens} + {args.new_tokens} new tokens, "
          f"median of {args.repeats}")
    print("| structure | representation | file MiB | dropped params | saved / dropped bytes | prefill tok/s | "
          "decode tok/s | decode vs uncompressed | max abs dlogit | top-1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        dropped_bytes = row["dropped_parameters"] * BYTES_PER_WEIGHT[args.quant]
        saved = base["file_bytes"] - row["file_bytes"]
        share = f"{saved / dropped_bytes:.0%}" if dropped_bytes else "-"
        print(f"| {row['name']} | {row['representation']} | {row['file_bytes'] / 2**20:.1f} | "
              f"{row['dropped_parameters']:,} | {share} | {row['prefill']:.0f} | {row['decode']:.0f} | "
              f"{row['decode'] / base['decode']:.2f}x | {row['max_abs_logit']:.2g} | {row['top1']:.1%} |")


if __name__ == "__main__":
    main()
