"""Expert merging (M-SMoE, MC-SMoE) against Expert Drop at the same budget, on real text.

    python tools/compare_merging.py                       # fixture + corpus in ../shared
    python tools/compare_merging.py --model demo --calib model --text held_out.txt

For 8 -> 6 and 8 -> 4 experts per layer: the merge pass (router frequency
weighted, router dominant, layout alias = the paper code's "keep the router,
alias the modules") next to Expert Drop (layer-wise by frequency, routing mass
and REAP; global REAP). Each row gives perplexity, KL(original || compressed)
and top-1 agreement on held-out text, the expert counts of the saved
checkpoint's config and manifest, and the saved weights' bytes. Then MC-SMoE's
low-rank + sparse compression of the 8 -> 4 merge at a few settings (effective
parameters vs dense), and torch prefill/decode speed of the original, the
8 -> 4 merge and the 8 -> 4 alias layout. Prints markdown, writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics as stats
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig

from moeexport import CalibrationOptions, load, load_tokenizer, save
from moeexport.adapters import adapter_for
from moeexport.compress import compress
from moeexport.evaluate import eval_windows, evaluate
from moeexport.pipeline import statistics_provider
from moeexport.recipe import parse_recipe
from fixture_data import add_data_arguments

COMPRESS_SETTINGS = ({"rank": 32, "sparsity": 0.9}, {"rank": 64, "sparsity": 0.9}, {"rank": 32, "sparsity": 0.5})


def budget_steps(keep: int) -> list[dict]:
    """The passes compared at one budget of `keep` experts per layer."""
    return [
        {"merge": {"keep": keep}},
        {"merge": {"keep": keep, "router": "dominant"}},
        {"merge": {"keep": keep, "layout": "alias"}},
        *({"expert_drop": {"keep": keep, "score": score}} for score in ("frequency", "routing_mass", "reap")),
        {"expert_drop": {"keep": keep, "scope": "global", "score": "reap", "allow_empty_layers": True}},
    ]


def describe(step: dict) -> str:
    (name, options), = step.items()
    return f"{name} " + " ".join(f"{k}={v}" for k, v in options.items())


def saved_size(model, result) -> dict:
    """Expert counts per MoE layer in a saved checkpoint's config and manifest, and its weights' bytes."""
    with tempfile.TemporaryDirectory() as scratch:
        saved = save(model, Path(scratch) / "checkpoint", result.manifest())
        manifest = json.loads((saved / "moeexport.json").read_text())
        config = AutoConfig.from_pretrained(saved)
        return {
            "config_experts": getattr(config, adapter_for(config).num_experts_key),
            "manifest_experts": [spec["num_experts"] for spec in manifest["layers"] if spec["kind"] == "moe"],
            "weights_bytes": sum(f.stat().st_size for f in saved.glob("*.safetensors")),
        }


@torch.no_grad()
def time_generation(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Seconds for the prefill of `prompt` [1, L] and for `new_tokens` greedy decode steps after it."""
    started = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    prefill = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
    return prefill, time.perf_counter() - started


def quality_rows(original, compressed, quality, dense_experts: int) -> list[dict]:
    """The original, then every method at 6 and 4 experts per layer."""
    reference = {"perplexity": quality(original)["perplexity"], "kl": 0.0, "top1_agreement": 1.0}
    unchanged = compress(copy.deepcopy(original), parse_recipe({"passes": []}), None)
    rows = [{"budget": f"{dense_experts}/E", "method": "original", **reference, **saved_size(original, unchanged)}]
    for keep in (6, 4):
        for step in budget_steps(keep):
            model, result = compressed(step)
            rows.append({"budget": f"{keep}/E", "method": describe(step), **quality(model), **saved_size(model, result)})
    print("| budget | method | perplexity | KL | top-1 | experts/layer (config; manifest) | weights bytes |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['budget']} | {row['method']} | {row['perplexity']:.2f} | {row['kl']:.4f} | "
              f"{row['top1_agreement']:.1%} | {row['config_experts']}; {row['manifest_experts']} | "
              f"{row['weights_bytes']:,} |")
    return rows


def compression_rows(compressed, quality) -> list[dict]:
    """MC-SMoE's low-rank + sparse stage on the 8 -> 4 merge, at each of COMPRESS_SETTINGS."""
    print("\nMC-SMoE: merge keep=4, then every merged expert's gate, up and down -> rank r + sparse residual "
          "(magnitude), stored dense")
    print("| compress | effective expert params | dense expert params | share | perplexity | KL | top-1 |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for setting in COMPRESS_SETTINGS:
        model, result = compressed({"merge": {"keep": 4, "compress": setting}})
        parameters = result.steps[0].plan.compressed_parameters.values()
        effective, dense = sum(e for e, _ in parameters), sum(d for _, d in parameters)
        row = {"compress": setting, "effective_parameters": effective, "dense_parameters": dense, **quality(model)}
        rows.append(row)
        print(f"| rank {setting['rank']}, sparsity {setting['sparsity']} | {effective:,} | {dense:,} | "
              f"{effective / dense:.1%} | {row['perplexity']:.2f} | {row['kl']:.4f} | {row['top1_agreement']:.1%} |")
    return rows


def speed_rows(original, compressed, prompt: torch.Tensor, new_tokens: int, repeats: int) -> list[dict]:
    """Prefill and decode tokens/s of the original, the 8 -> 4 merge and its alias layout (interleaved runs)."""
    models = {
        "original": original,
        "merge keep=4": compressed({"merge": {"keep": 4}})[0],
        "merge keep=4 layout=alias": compressed({"merge": {"keep": 4, "layout": "alias"}})[0],
    }
    for model in models.values():
        time_generation(model, prompt[:, :16], 2)  # warm-up
    timings = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            timings[name].append(time_generation(model, prompt, new_tokens))
    print(f"\ntorch speed on CPU ({torch.get_num_threads()} threads, experts kernel "
          f"{original.config._experts_implementation}): prompt {prompt.shape[1]} tokens, {new_tokens} greedy decode "
          f"steps, median of {repeats} interleaved runs")
    print("| model | prefill tok/s | decode tok/s |")
    print("|---|---|---|")
    rows = []
    for name, runs in timings.items():
        prefill = prompt.shape[1] / stats.median(p for p, _ in runs)
        decode = new_tokens / stats.median(d for _, d in runs)
        rows.append({"model": name, "prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode})
        print(f"| {name} | {prefill:.0f} | {decode:.1f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--windows", type=int, default=32, help="held-out windows of --length tokens")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=256, help="speed: prompt tokens (prefill)")
    parser.add_argument("--new-tokens", type=int, default=64, help="speed: greedy decode steps")
    parser.add_argument("--repeats", type=int, default=5, help="speed: runs per model, interleaved; median")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--speed-only", action="store_true", help="skip the quality and compression tables")
    parser.add_argument("--json", default="merging_comparison.json")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    original, tokenizer = load(args.model), load_tokenizer(args.model)
    calibration = CalibrationOptions(source=args.calib)
    provider = statistics_provider(args.model, tokenizer, calibration)
    windows = eval_windows(tokenizer, args.text, args.length, args.windows)

    def compressed(step: dict):
        model = copy.deepcopy(original)
        result = compress(model, parse_recipe({"passes": [step]}), provider)
        return model, result

    def quality(model) -> dict:
        return evaluate(model, windows, reference=original).to_dict()

    print(f"{args.model}; calibration {calibration.samples} x {calibration.length} tokens of "
          f"{args.calib}; evaluation on {windows.numel() - len(windows)} predicted tokens "
          f"({len(windows)} windows of {windows.shape[1]}) of {args.text}\n")
    report = {}
    if not args.speed_only:
        dense_experts = getattr(original.config, adapter_for(original.config).num_experts_key)
        report["quality"] = quality_rows(original, compressed, quality, dense_experts)
        report["compression"] = compression_rows(compressed, quality)
    report["speed"] = speed_rows(original, compressed, windows[:1, : args.prompt], args.new_tokens, args.repeats)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}; {provider.observations} calibration passes; {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
