"""Expert Drop's two rebuilds (`repair: refit`) side by side on held-out text: the joint one and the one a kept
expert at a time that layers too wide for the joint system get (moeexport/passes/repair.py).

    python tools/compare_rebuild.py                      # fixture + corpus in ../shared
    python tools/compare_rebuild.py --model demo --calib model --text held_out.txt

For global Expert Drop (min_keep 1) and per-layer Expert Drop to each --keep, prints the perplexity ratio to
the original model's on --text without repair, with the joint rebuild and with the per-expert rebuild (forced
on every layer by a joint-system bound of 0 bytes). Writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import transformers

from moeexport.compress import compress
from moeexport.evaluate import evaluate
from moeexport.passes import repair
from moeexport.recipe import parse_recipe
from fixture_data import add_data_arguments, model_and_held_out

REBUILDS = {"none": None, "joint": repair.MAX_GRAM_BYTES, "per expert": 0}  # repair -> the joint-system bound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--windows", type=int, default=256, help="held-out windows of --length tokens (at most)")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--keep", type=int, nargs="*", default=[6, 4, 2])
    parser.add_argument("--rebuilds", nargs="*", choices=list(REBUILDS), default=list(REBUILDS))
    parser.add_argument("--json", default="compare_rebuild.json")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()

    started = time.perf_counter()
    original, windows, provider, base = model_and_held_out(args)
    rebuilds = {name: REBUILDS[name] for name in args.rebuilds}
    print("| Expert Drop | keep | " + " | ".join(rebuilds) + " |")
    print("|---|---|" + "---|" * len(rebuilds))
    rows = []
    for scope in ("global", "layer"):
        for keep in args.keep:
            ratios = {}
            for name, bound in rebuilds.items():
                options = {"keep": keep, "scope": scope, "repair": "none" if bound is None else "refit",
                           **({"min_keep": 1} if scope == "global" else {})}
                repair.MAX_GRAM_BYTES = bound if bound is not None else repair.MAX_GRAM_BYTES
                model = copy.deepcopy(original)
                compress(model, parse_recipe({"passes": [{"expert_drop": options}]}), provider)
                ratios[name] = evaluate(model, windows).perplexity / base
            repair.MAX_GRAM_BYTES = REBUILDS["joint"]
            rows.append({"scope": scope, "keep": keep, "ratios": ratios})
            print(f"| {scope} | {keep} | " + " | ".join(f"{ratio:.4f}x" for ratio in ratios.values()) + " |")
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.json} in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
