"""GGUF sizes and llama.cpp speed per compressed structure, measured in one run.

    python tools/bench_gguf.py                       # fixture + corpus in ../shared
    python tools/bench_gguf.py --model demo --calib model --quant q8_0

For uncompressed, Block Drop 2, Layer Drop 2 and uniform Expert Drop 6: the file
size, how much of the dropped parameters' bytes the file actually saves, and
prefill / decode tokens per second (llama.cpp defaults, greedy, median of
--repeats), with decode speed relative to the uncompressed file.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from pathlib import Path

import transformers

from moeexport.backends import gguf as gguf_backend
from moeexport.calibration.sources import CalibrationConfig, sample_from_model
from moeexport.compress import DEFAULT_CACHE, StatisticsProvider, compress
from moeexport.modelio import fingerprint, load, load_tokenizer, parameter_count, resolve_model_dir
from moeexport.recipe import parse_recipe
from fixture_data import CALIBRATION_TEXT, FIXTURE_MODEL

STRUCTURES = {
    "uncompressed": [],
    "block_drop_2": [{"block_drop": {"n": 2}}],
    "layer_drop_2": [{"layer_drop": {"n": 2}}],
    "expert_drop_6_uniform": [{"expert_drop": {"keep": 6, "scope": "layer", "score": "reap"}}],
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

    original, tokenizer = load(args.model), load_tokenizer(args.model)
    provider = StatisticsProvider(
        tokenizer, CalibrationConfig(args.calib), fingerprint(resolve_model_dir(args.model)), DEFAULT_CACHE
    )
    prompt = sample_from_model(original, tokenizer, 1, args.prompt_tokens, seed=5)[0].tolist()
    work = Path(tempfile.mkdtemp(prefix="moeexport-bench-gguf-"))
    rows = []
    for name, passes in STRUCTURES.items():
        model = copy.deepcopy(original)
        compress(model, parse_recipe({"passes": passes}), provider)
        artifact = gguf_backend.export(model, work / f"{name}.gguf", quant=args.quant)
        runner = gguf_backend.Runner(artifact.path, context=1024, exact=False)
        runs = [runner.profile(prompt, args.new_tokens) for _ in range(args.repeats)]
        runner.close()
        rows.append({
            "name": name,
            "representation": artifact.representation,
            "dropped_parameters": parameter_count(original) - parameter_count(model),
            "file_bytes": artifact.path.stat().st_size,
            "prefill": statistics.median(r["prefill_tokens_per_s"] for r in runs),
            "decode": statistics.median(r["decode_tokens_per_s"] for r in runs),
        })
        artifact.path.unlink()

    base = rows[0]
    print(f"{args.model}, {args.quant}, prompt {args.prompt_tokens} + {args.new_tokens} new tokens, "
          f"median of {args.repeats}")
    print("| structure | representation | file MiB | dropped params | saved / dropped bytes | prefill tok/s | "
          "decode tok/s | decode vs uncompressed |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        dropped_bytes = row["dropped_parameters"] * BYTES_PER_WEIGHT[args.quant]
        saved = base["file_bytes"] - row["file_bytes"]
        share = f"{saved / dropped_bytes:.0%}" if dropped_bytes else "-"
        print(f"| {row['name']} | {row['representation']} | {row['file_bytes'] / 2**20:.1f} | "
              f"{row['dropped_parameters']:,} | {share} | {row['prefill']:.0f} | {row['decode']:.0f} | "
              f"{row['decode'] / base['decode']:.2f}x |")


if __name__ == "__main__":
    main()
