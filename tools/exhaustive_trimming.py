"""The exhaustive optimum of Block Drop and Layer Drop on held-out text, and how far each score lands from it.

    python tools/exhaustive_trimming.py                      # fixture + corpus in ../shared
    python tools/exhaustive_trimming.py --model demo --calib model --text held_out.txt

For Block Drop of n blocks and Layer Drop of n MoE sublayers (--block-drop,
--layer-drop), tries every combination on the held-out text (--text) and
reports the best perplexity (relative to the original model's), then what each
selection score picks with the calibration set (--calib) and its perplexity
relative to that optimum, and the default score's pick with `repair: refit`. Small
models only: the combinations grow as C(layers, n).
Then global Expert Drop (min_keep 1) to each --expert-keep experts per layer
on average, with the pass's default score (no score named) and each of
--expert-scores, without and with `repair: refit`: its perplexity ratio (no
optimum: the combinations are too many). Writes every row as JSON.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import time
from pathlib import Path

import transformers

from moeexport.adapters import adapter_for
from moeexport.adapters.surgery import drop_blocks, drop_moe_sublayer, structure
from moeexport.compress import compress
from moeexport.evaluate import evaluate
from moeexport.recipe import parse_recipe
from fixture_data import add_data_arguments, model_and_held_out

PASSES = {"block_drop": "blocks", "layer_drop": "MoE sublayers"}


def _removed(model, name: str, chosen: tuple[int, ...]):
    """A copy of `model` without the blocks or MoE sublayers `chosen` (original indices)."""
    model = copy.deepcopy(model)
    adapter = adapter_for(model.config)
    if name == "block_drop":
        drop_blocks(adapter, model, list(chosen))
    else:
        for layer in chosen:
            drop_moe_sublayer(adapter, model, layer)
    return model


def _compressed(model, name: str, options: dict, provider):
    """A copy of `model` compressed by the one pass `name` with `options`, and that pass's plan."""
    model = copy.deepcopy(model)
    result = compress(model, parse_recipe({"passes": [{name: options}]}), provider)
    return model, result.steps[0].plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--windows", type=int, default=256, help="held-out windows of --length tokens (at most)")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--block-drop", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--layer-drop", type=int, nargs="*", default=[1, 2, 3])
    parser.add_argument("--scores", nargs="*", default=["similarity", "kl"], help="selection scores to place")
    parser.add_argument("--expert-keep", type=int, nargs="*", default=[4, 2])
    parser.add_argument("--expert-scores", nargs="*", default=[], help="expert_drop scores besides the default")
    parser.add_argument("--json", default="exhaustive_trimming.json")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()

    started = time.perf_counter()
    original, windows, provider, base = model_and_held_out(args)
    layers = structure(adapter_for(original.config), original)
    moe_layers = [i for i, spec in enumerate(layers) if spec.kind == "moe"]
    print("| pass | n | optimum (ratio) | score | picks | ratio | vs optimum |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for name, counts in (("block_drop", args.block_drop), ("layer_drop", args.layer_drop)):
        candidates = range(len(layers)) if name == "block_drop" else moe_layers
        for n in counts:
            tried = {chosen: evaluate(_removed(original, name, chosen), windows).perplexity
                     for chosen in itertools.combinations(candidates, n)}
            best = min(tried, key=tried.get)
            for score in args.scores:
                _, plan = _compressed(original, name, {"n": n, "score": score}, provider)
                picked = tuple(sorted(plan.drop))
                ratio = tried[picked] / base
                rows.append({"pass": name, "n": n, "optimum": list(best), "optimum_ratio": tried[best] / base,
                             "score": score, "picked": list(picked), "ratio": ratio,
                             "vs_optimum": tried[picked] / tried[best],
                             "all": {",".join(map(str, c)): p / base for c, p in tried.items()}})
                print(f"| {name} | {n} | {list(best)} ({tried[best] / base:.4f}x) | {score} | {list(picked)} | "
                      f"{ratio:.4f}x | {tried[picked] / tried[best] - 1:+.2%} |")
            # the default score's pick, repaired: against the unrepaired optimum
            model, plan = _compressed(original, name, {"n": n, "repair": "refit"}, provider)
            picked = tuple(sorted(plan.drop))
            repaired = evaluate(model, windows).perplexity
            rows.append({"pass": name, "n": n, "score": "default", "repair": "refit", "picked": list(picked),
                         "ratio": repaired / base, "unrepaired_ratio": tried[picked] / base,
                         "vs_optimum": repaired / tried[best]})
            print(f"| {name}, repair: refit | {n} | {list(best)} ({tried[best] / base:.4f}x) | default | "
                  f"{list(picked)} | {repaired / base:.4f}x (unrepaired {tried[picked] / base:.4f}x) | "
                  f"{repaired / tried[best] - 1:+.2%} |")
    for keep in args.expert_keep:
        for score, repair in itertools.product([None, *args.expert_scores], ["none", "refit"]):
            options = {"keep": keep, "scope": "global", "min_keep": 1, "repair": repair,
                       **({"score": score} if score else {})}
            model, plan = _compressed(original, "expert_drop", options, provider)
            ratio = evaluate(model, windows).perplexity / base
            counts = [len(kept) for kept in plan.keep.values()]
            rows.append({"pass": "expert_drop", "keep": keep, "score": score or "default", "repair": repair,
                         "counts": counts, "ratio": ratio})
            print(f"| expert_drop global, repair: {repair} | {keep}/E | - | {score or 'default'} | {counts} | "
                  f"{ratio:.4f}x | - |")
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.json} in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
