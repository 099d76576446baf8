"""Quality of Expert Slimming (pruning and quantization inside the experts) on real text.

    python tools/compare_slimming.py                      # fixture + corpus in ../shared
    python tools/compare_slimming.py --windows 16 --skip-int4-g32

Calibrates on --calib-samples x --calib-length tokens of calib.txt and scores
held-out text: perplexity (and its ratio to the dense model), KL(dense ||
slimmed) and top-1 agreement, for Wanda / SparseGPT at 50% and 2:4 (magnitude
as the data-free control) and for RTN / GPTQ at int4 and int8, group size 128
(and int4 group size 32). Says whether GPTQ int4 g128 beats RTN int4 g128 on
perplexity. Prints a markdown table and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import transformers

from moeexport import CalibrationOptions, load, load_tokenizer
from moeexport.compress import compress
from moeexport.evaluate import eval_windows, evaluate
from moeexport.pipeline import statistics_provider
from moeexport.recipe import parse_recipe
from fixture_data import add_data_arguments



def configurations(int4_g32: bool) -> list[tuple[str, dict]]:
    rows = []
    for pattern in (None, "2:4"):
        for method in ("magnitude", "wanda", "sparsegpt"):
            options = {"method": method, **({"pattern": pattern} if pattern else {"sparsity": 0.5})}
            rows.append((f"{method} {pattern or '50%'}", {"prune": options}))
    for bits, group_size in ((4, 128), (8, 128)) + (((4, 32),) if int4_g32 else ()):
        for method in ("rtn", "gptq"):
            rows.append((f"{method} int{bits} g{group_size}", {"quantize": {"method": method, "bits": bits, "group_size": group_size}}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-length", type=int, default=256)
    parser.add_argument("--windows", type=int, default=32, help="held-out windows of --length tokens")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--skip-int4-g32", action="store_true")
    parser.add_argument("--json", default="slimming_comparison.json")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    started = time.perf_counter()
    original, tokenizer = load(args.model), load_tokenizer(args.model)
    calibration = CalibrationOptions(args.calib, samples=args.calib_samples, length=args.calib_length, cache=False)
    provider = statistics_provider(args.model, tokenizer, calibration)
    windows = eval_windows(tokenizer, args.text, args.length, args.windows)
    dense = evaluate(original, windows).to_dict()
    rows = [{"method": "dense", **dense, "kl": 0.0, "top1_agreement": 1.0, "perplexity_ratio": 1.0}]
    print(f"{args.model}: calibration {args.calib_samples} x {args.calib_length} tokens of {args.calib}; "
          f"{dense['tokens']} predicted tokens of {args.text}")
    print("| method | perplexity | ratio vs dense | KL | top-1 | fallback experts | output error | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| dense | {dense['perplexity']:.3f} | 1.000 | 0 | 100% | | | |")
    for name, step in configurations(not args.skip_int4_g32):
        model = copy.deepcopy(original)
        began = time.perf_counter()
        plan = compress(model, parse_recipe({"passes": [step]}), provider).steps[0].plan
        seconds = time.perf_counter() - began
        result = evaluate(model, windows, reference=original).to_dict()
        row = {
            "method": name,
            "recipe": step,
            **result,
            "perplexity_ratio": result["perplexity"] / dense["perplexity"],
            "fallbacks": plan.outcome.fallbacks,
            "output_error": plan.outcome.output_error,
            "zero_share": plan.outcome.zeros / plan.outcome.weights,
            "slim_seconds": seconds,
        }
        rows.append(row)
        error = "" if row["output_error"] is None else f"{row['output_error']:.2e}"
        print(f"| {name} | {result['perplexity']:.3f} | {row['perplexity_ratio']:.3f} | {result['kl']:.4f} | "
              f"{result['top1_agreement']:.1%} | {len(plan.outcome.fallbacks)} | {error} | {seconds:.0f} |", flush=True)

    by_name = {row["method"]: row for row in rows}
    for bits, group_size in ((4, 128), (8, 128), (4, 32)):
        rtn, gptq = by_name.get(f"rtn int{bits} g{group_size}"), by_name.get(f"gptq int{bits} g{group_size}")
        if rtn and gptq:
            verdict = "beats" if gptq["perplexity"] < rtn["perplexity"] else "does NOT beat"
            print(f"GPTQ int{bits} g{group_size} {verdict} RTN on perplexity: {gptq['perplexity']:.3f} vs {rtn['perplexity']:.3f} "
                  f"(KL {gptq['kl']:.4f} vs {rtn['kl']:.4f})")
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.json}; {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
