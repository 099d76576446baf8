"""`moeexport search`'s recipe against every recipe shipped in recipes/, at the GGUF types that fit the same budget.

    python tools/compare_search.py --search-recipe /tmp/search/recipe.yaml     # fixture + corpus in ../shared
    python tools/compare_search.py --search-recipe r.yaml --search-build /tmp/search/build --max-size 30%

Each recipe (recipes/*.yaml, and the search's, at the --quant its header names) is
applied to MODEL once (one StatisticsProvider on --calib, as `build` does) and the
result is exported as `build` exports it (quantize passes' grids carried) in every
GGUF type; the files at or under --max-size of the untrimmed model's F16 GGUF are
run in llama.cpp on the held-out --text, for their perplexity and KL(original ||
file). With --search-build, the GGUF that `search --build` wrote is measured the
same way. Prints one table (recipe, quant, file bytes, % of F16, dev perplexity,
KL) and writes it as JSON beside the search recipe (--json to choose).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from moeexport import CalibrationOptions, MoeExportError, load, load_tokenizer
from moeexport.backends.gguf import TARGET, GGUFRunner
from moeexport.backends.target import ExportInputs
from moeexport.compress import compress
from moeexport.evaluate import eval_windows
from moeexport.pipeline import statistics_provider
from moeexport.quantization import weight_grid
from moeexport.recipe import load_recipe
from moeexport.search import Constraint
from moeexport.validate import RecordedReference, TorchRunner, compare
from fixture_data import add_data_arguments

REPOSITORY = Path(__file__).resolve().parents[1]
TYPES = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")


def searched_quant(path: Path) -> str:
    """The --quant a search recipe's header names."""
    match = re.search(r"--quant (\S+)", path.read_text())
    if not match:
        sys.exit(f"{path} names no --quant in its header: is it a recipe written by moeexport search?")
    return match.group(1)


def measure(path: Path, reference: RecordedReference, windows) -> dict:
    runner = GGUFRunner(path, context=windows.shape[1])
    try:
        fidelity = compare(reference, runner, windows)
    finally:
        runner.close()
    return {"perplexity": fidelity.perplexity, "kl": fidelity.kl, "top1_agreement": fidelity.top1_agreement,
            "reference_perplexity": fidelity.reference_perplexity}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--search-recipe", required=True, help="the recipe `moeexport search --out` wrote")
    parser.add_argument("--search-build", help="the directory `moeexport search --build` wrote (its GGUF is measured)")
    parser.add_argument("--recipes", default=str(REPOSITORY / "recipes"), help="directory of shipped recipes")
    parser.add_argument("--max-size", default="30%", help="share of the untrimmed F16 GGUF (default 30%%)")
    parser.add_argument("--windows", type=int, default=32, help="held-out windows of --length tokens")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--json", help="write the rows here (default: beside --search-recipe)")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()

    limit = Constraint.parse(max_size=args.max_size)
    search_recipe = Path(args.search_recipe)
    recipes = [(path.stem, load_recipe(path), TYPES) for path in sorted(Path(args.recipes).glob("*.yaml"))]
    recipes.append((f"search ({search_recipe.name})", load_recipe(search_recipe), (searched_quant(search_recipe),)))

    original = load(args.model)
    tokenizer = load_tokenizer(args.model)
    windows = eval_windows(tokenizer, args.text, args.length, args.windows)
    with torch.no_grad():
        reference = RecordedReference.record(TorchRunner(original), windows, args.text)
    provider = statistics_provider(args.model, tokenizer, CalibrationOptions(args.calib))
    provider.tokens(original)

    rows = []
    with tempfile.TemporaryDirectory(prefix="compare-search-") as scratch:
        scratch = Path(scratch)
        options = TARGET.options({})
        f16 = TARGET.export(original, scratch, "f16", options, ExportInputs()).path
        baseline = f16.stat().st_size
        f16.unlink()
        print(f"untrimmed F16 GGUF: {baseline:,} bytes; limit {limit.describe()} = {int(limit.value * baseline):,} "
              f"bytes", file=sys.stderr)
        for name, recipe, types in recipes:
            model = copy.deepcopy(original)
            compress(model, recipe, provider)
            grid = weight_grid(model)
            for quant in types:
                directory = scratch / f"{name}-{quant}"
                directory.mkdir()
                try:
                    artifact = TARGET.export(model, directory, quant, options, ExportInputs(weight_grid=grid))
                except MoeExportError as error:
                    print(f"{name} {quant}: not exportable: {error}", file=sys.stderr)
                    rows.append({"recipe": name, "quant": quant, "error": str(error), "share_of_f16": None})
                    continue
                size = artifact.path.stat().st_size
                row = {"recipe": name, "quant": quant, "file_bytes": size, "share_of_f16": size / baseline}
                if size <= limit.value * baseline:
                    row |= measure(artifact.path, reference, windows)
                    print(f"{name} {quant}: {size:,} bytes, perplexity {row['perplexity']:.3f}", file=sys.stderr)
                rows.append(row)
                artifact.path.unlink()
            del model
    if args.search_build:
        report = json.loads((Path(args.search_build) / "report.json").read_text())
        path = Path(report["artifact"]["path"])
        size = path.stat().st_size
        rows.append({"recipe": f"search --build ({path.name})", "quant": report["quant"], "file_bytes": size,
                     "share_of_f16": size / baseline, **measure(path, reference, windows)})

    fitting = [row for row in rows if row["share_of_f16"] is not None and row["share_of_f16"] <= limit.value]
    fitting.sort(key=lambda row: row["perplexity"])
    print(f"\nrecipes at or under {limit.describe()} ({int(limit.value * baseline):,} bytes), "
          f"perplexity on {windows.shape[0]} x {windows.shape[1]} tokens of {args.text} in llama.cpp "
          f"(original model in torch: {fitting[0]['reference_perplexity']:.3f})")
    print(f"{'recipe':34} {'quant':7} {'file bytes':>12} {'of F16':>7} {'dev ppl':>9} {'KL':>9} {'top-1':>7}")
    for row in fitting:
        print(f"{row['recipe']:34} {row['quant']:7} {row['file_bytes']:>12,} {row['share_of_f16']:>7.1%} "
              f"{row['perplexity']:>9.3f} {row['kl']:>9.4f} {row['top1_agreement']:>7.1%}")
    over = sorted({(row["recipe"], row["quant"]) for row in rows
                   if row["share_of_f16"] is not None and row["share_of_f16"] > limit.value})
    refused = sorted({row["recipe"] for row in rows if row["share_of_f16"] is None})
    if refused:
        print(f"not exportable to GGUF: {', '.join(refused)} (see the log above)")
    print(f"over the limit (not measured): {len(over)} recipe x type pairs, e.g. "
          + ", ".join(f"{recipe} {quant}" for recipe, quant in over[:6]))
    searched = [row for row in fitting if row["recipe"].startswith("search")]
    shipped = [row for row in fitting if not row["recipe"].startswith("search")]
    if searched and shipped:
        best = min(shipped, key=lambda row: row["perplexity"])
        verdict = "lower" if all(row["perplexity"] < best["perplexity"] for row in searched) else "NOT lower"
        print(f"search's perplexity is {verdict} than every shipped recipe's at or under the limit (best shipped: "
              f"{best['recipe']} {best['quant']} {best['perplexity']:.3f})")
    out = Path(args.json) if args.json else search_recipe.with_name("compare_search.json")
    out.write_text(json.dumps({"baseline_f16_bytes": baseline, "limit": limit.describe(), "text": args.text,
                               "windows": list(windows.shape), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out} in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
