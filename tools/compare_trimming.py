"""Quality of every trimming method against a random-selection control, on real text.

    python tools/compare_trimming.py                      # fixture + corpus in ../shared
    python tools/compare_trimming.py --model demo --calib model --text held_out.txt

For each budget (Block Drop 1/2, Layer Drop 1/2, Expert Drop to 6/8 and 4/8,
layer-wise and global, scored by frequency, routing mass and REAP), prints
perplexity, KL(original || compressed) and top-1 agreement on held-out text,
next to random selection at the same budget (mean of --random-seeds seeds), and
says per budget whether the scored method beat random. Writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics as stats
import time
from pathlib import Path

import transformers

from moeexport import CalibrationOptions, load, load_tokenizer
from moeexport.compress import compress
from moeexport.evaluate import eval_windows, evaluate
from moeexport.pipeline import statistics_provider
from moeexport.recipe import parse_recipe
from fixture_data import add_data_arguments



def budgets() -> list[tuple[str, dict, list[dict]]]:
    """(budget name, random control pass, scored passes) for every row group of the table."""
    groups = []
    for n in (1, 2):
        groups.append((f"Block Drop {n}", {"block_drop": {"n": n, "score": "random"}}, [{"block_drop": {"n": n}}]))
    for n in (1, 2):
        groups.append((f"Layer Drop {n}", {"layer_drop": {"n": n, "score": "random"}}, [{"layer_drop": {"n": n}}]))
    for keep in (6, 4):
        for scope in ("layer", "global"):
            unconstrained = {"allow_empty_layers": True} if scope == "global" else {}  # a layer may lose all
            scored = [
                {"expert_drop": {"keep": keep, "scope": scope, "score": score, **unconstrained}}
                for score in ("frequency", "routing_mass", "reap")
            ]
            control = {"expert_drop": {"keep": keep, "scope": scope, "score": "random", **unconstrained}}
            groups.append((f"Expert Drop {keep}/E {scope}", control, scored))
    return groups


def describe(step: dict) -> str:
    (name, options), = step.items()
    return f"{name} " + " ".join(f"{k}={v}" for k, v in options.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--windows", type=int, default=32, help="held-out windows of --length tokens")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--json", default="trimming_comparison.json")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    started = time.perf_counter()
    original, tokenizer = load(args.model), load_tokenizer(args.model)
    provider = statistics_provider(args.model, tokenizer, CalibrationOptions(source=args.calib))
    windows = eval_windows(tokenizer, args.text, args.length, args.windows)

    def measure(step: dict) -> dict:
        model = copy.deepcopy(original)
        compress(model, parse_recipe({"passes": [step]}), provider)
        return evaluate(model, windows, reference=original).to_dict()

    rows, verdicts = [], []
    print(f"{args.model} on {windows.numel() - len(windows)} predicted tokens of {args.text}")
    print("| budget | method | perplexity | KL | top-1 |")
    print("|---|---|---|---|---|")
    for budget, control, scored in budgets():
        (name, options), = control.items()
        random_results = [measure({name: options | {"seed": seed}}) for seed in range(args.random_seeds)]
        random_mean = {k: stats.mean(r[k] for r in random_results) for k in ("perplexity", "kl", "top1_agreement")}
        for step in scored:
            result = measure(step)
            rows.append({"budget": budget, "method": describe(step), **result})
            beats = result["kl"] < random_mean["kl"]
            verdicts.append((budget, describe(step), beats))
            print(f"| {budget} | {describe(step)} | {result['perplexity']:.2f} | {result['kl']:.4f} | "
                  f"{result['top1_agreement']:.1%} |")
        rows.append({"budget": budget, "method": f"random (mean of {args.random_seeds} seeds)", **random_mean})
        print(f"| {budget} | random (mean of {args.random_seeds}) | {random_mean['perplexity']:.2f} | "
              f"{random_mean['kl']:.4f} | {random_mean['top1_agreement']:.1%} |")

    wins = sum(beats for _, _, beats in verdicts)
    print(f"\nscored methods beat random on KL in {wins} of {len(verdicts)} cases")
    scored_kl = [row["kl"] for row in rows if not row["method"].startswith("random")]
    control_kl = [stats.mean(r["kl"] for r in rows if r["budget"] == row["budget"] and r["method"].startswith("random"))
                  for row in rows if not row["method"].startswith("random")]
    print(f"mean KL over all scored methods {stats.mean(scored_kl):.4f} vs random at the same budgets "
          f"{stats.mean(control_kl):.4f}")
    for budget, method, beats in verdicts:
        if not beats:
            print(f"  does NOT beat random: {budget}: {method}")
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.json}; {provider.observations} calibration passes; {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
