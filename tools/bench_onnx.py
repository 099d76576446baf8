"""ONNX target on the fixture: fidelity of every variant and weight type, and decode speed vs torch eager.

    python tools/bench_onnx.py                                   # fixture + corpus in ../shared
    python tools/bench_onnx.py --model demo --text held_out.txt --recipe recipes/trim.yaml

Compresses the model with --recipe (none by default), exports f32 (MoE op and
plain), f16, int8 and int4 (QMoE, --block-size), compares each graph with the
compressed torch model on held-out windows (and the quantized ones with the f32
graph too), then profiles ONNX Runtime and torch eager (transformers generate
with its KV cache) on the same prompt in this one process. Prints a markdown
table and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

from moeexport.backends import onnx as onnx_backend
from moeexport.calibration.sources import CalibrationConfig
from moeexport.compress import StatisticsProvider, compress
from moeexport.evaluate import eval_windows
from moeexport.modelio import fingerprint, load, load_tokenizer, resolve_model_dir
from moeexport.recipe import load_recipe, parse_recipe
from moeexport.validate import TorchRunner, compare
from fixture_data import add_data_arguments



def torch_decode_speed(model, prompt: list[int], new_tokens: int) -> dict:
    """Greedy decode through transformers' KV cache, timed the way OnnxRunner.profile times itself."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        model.generate(ids[:, :8], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        started = time.perf_counter()
        model(input_ids=ids, use_cache=True)
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        total = time.perf_counter() - started
    return {"prefill_tokens_per_s": len(prompt) / prefill, "decode_tokens_per_s": new_tokens / max(total - prefill, 1e-9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--recipe", help="a recipe file; default: the uncompressed model")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--windows", type=int, default=2, help="held-out windows of 256 tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", default="onnx_bench.json")
    args = parser.parse_args()

    model, tokenizer = load(args.model), load_tokenizer(args.model)
    recipe = load_recipe(args.recipe) if args.recipe else parse_recipe(yaml.safe_load("passes: []"))
    calibration = CalibrationConfig(source=args.calib, num_sequences=32, sequence_length=256)
    compress(model, recipe, StatisticsProvider(tokenizer, calibration, fingerprint(resolve_model_dir(args.model))))
    windows = eval_windows(tokenizer, args.text, 256, args.windows)
    prompt = windows[0, :128].tolist()
    reference = TorchRunner(model)

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        variants = [("f32", "contrib"), ("f32", "plain"), ("f16", "contrib"), ("int8", "contrib"), ("int4", "contrib")]
        f32_runner = None
        for quant, moe_ops in variants:
            path = Path(scratch) / f"{quant}-{moe_ops}.onnx"
            onnx_backend.export(model, path, quant=quant, moe_ops=moe_ops, block_size=args.block_size)
            runner = onnx_backend.Runner(path, context=256)
            fidelity = compare(reference, runner, windows)
            row = {"quant": quant, "moe_ops": moe_ops, "file_mib": path.stat().st_size / 2**20, **fidelity.to_dict()}
            if f32_runner and quant != "f32":
                row["kl_vs_f32_graph"] = compare(f32_runner, runner, windows).kl
            f32_runner = f32_runner or runner
            row.update(runner.profile(prompt, args.new_tokens))
            rows.append(row)
    eager = torch_decode_speed(model, prompt, args.new_tokens)

    print(f"\n{args.model} ({args.recipe or 'uncompressed'}), {rows[0]['tokens']} held-out tokens of {args.text}\n")
    print("| graph | MiB | max abs dlogit | KL vs torch | KL vs f32 graph | top-1 | ppl | prefill tok/s | decode tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['quant']} {row['moe_ops']} | {row['file_mib']:.1f} | {row['max_abs_logit']:.2e} | {row['kl']:.2e} | "
              f"{row.get('kl_vs_f32_graph', 0):.2e} | {row['top1_agreement']:.2%} | {row['perplexity']:.3f} | "
              f"{row['prefill_tokens_per_s']:.0f} | {row['decode_tokens_per_s']:.0f} |")
    print(f"| torch eager | | | | | | {rows[0]['reference_perplexity']:.3f} | {eager['prefill_tokens_per_s']:.0f} | "
          f"{eager['decode_tokens_per_s']:.0f} |")
    for row in rows:
        print(f"decode ONNX Runtime {row['quant']} {row['moe_ops']} / torch eager: "
              f"{row['decode_tokens_per_s'] / eager['decode_tokens_per_s']:.2f}x")
    Path(args.json).write_text(json.dumps({"rows": rows, "torch_eager": eager}, indent=2) + "\n")


if __name__ == "__main__":
    main()
