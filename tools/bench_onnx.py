"""ONNX target on the fixture: fidelity of every variant and weight type, and decode speed vs torch eager.

    python tools/bench_onnx.py                                   # fixture + corpus in ../shared
    python tools/bench_onnx.py --model demo --text held_out.txt --recipe recipes/trim.yaml

Builds the model with --recipe (none by default) as f32 (MoE op and plain), f16,
int8 and int4 (QMoE, --block-size) graphs, one `moeexport.build` each (the
statistics cache makes recompressing cheap), whose validation compares the graph
with the compressed torch model on --windows held-out windows of --text. The
quantized graphs are compared with the f32 graph too, then ONNX Runtime
and torch eager (transformers generate with its KV cache) are profiled on the
same prompt in this one process. Prints a markdown table and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import moeexport
from moeexport.backends import target_for
from moeexport.evaluate import eval_windows
from moeexport.validate import compare
from fixture_data import add_data_arguments

VARIANTS = [("f32", "contrib"), ("f32", "plain"), ("f16", "contrib"), ("int8", "contrib"), ("int4", "contrib")]


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


def graph_bytes(artifact: dict) -> int:
    """The graph and its external data, without the genai config and tokenizer files beside them."""
    stem = Path(artifact["path"]).name.split(".")[0]
    return sum(size for name, size in artifact["files"].items() if name.split(".")[0] == stem)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--recipe", help="a recipe file; default: the uncompressed model")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--windows", type=int, default=2, help="held-out windows of 256 tokens (default 2)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", default="onnx_bench.json")
    args = parser.parse_args()

    onnx = target_for("onnx")
    windows = eval_windows(moeexport.load_tokenizer(args.model), args.text, 256, args.windows)
    prompt = windows[0, :128].tolist()
    calibration = moeexport.CalibrationOptions(source=args.calib)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        f32_runner = None
        for quant, moe_ops in VARIANTS:
            report = moeexport.build(args.model, args.recipe or {"passes": []}, "onnx", moeexport.BuildOptions(
                out=str(Path(scratch) / f"{quant}-{moe_ops}"), quant=quant, calibration=calibration,
                target_options={"moe_ops": moe_ops, "block_size": args.block_size}, eval_text=args.text,
                measure_quality=False, validation_windows=(args.windows, 256), profile=False,  # profiled below
                save_checkpoint=True))  # the torch model, timed in eager below
            runner = onnx.runner(report.artifact["path"], 256)
            row = {"quant": quant, "moe_ops": moe_ops, "file_mib": graph_bytes(report.artifact) / 2**20,
                   **report.validation}
            if f32_runner and quant != "f32":
                row["kl_vs_f32_graph"] = compare(f32_runner, runner, windows).kl
            f32_runner = f32_runner or runner
            row.update(runner.profile(prompt, args.new_tokens))
            rows.append(row)
        compressed = moeexport.load(Path(report.out) / "compressed")  # the same torch model in every build
        eager = torch_decode_speed(compressed, prompt, args.new_tokens)

    print(f"\n{args.model} ({args.recipe or 'uncompressed'}), {rows[0]['tokens']} held-out tokens of {args.text}\n")
    print("| graph | MiB | max abs dlogit | KL vs torch | KL vs f32 graph | top-1 | ppl | prefill tok/s | decode tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['quant']} {row['moe_ops']}{' (FAILED validation)' if row['failures'] else ''} | "
              f"{row['file_mib']:.1f} | {row['max_abs_logit']:.2e} | {row['kl']:.2e} | "
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
