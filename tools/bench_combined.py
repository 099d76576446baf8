"""A combined recipe, exported to GGUF and ONNX, against the uncompressed model in F16, in one run.

    python tools/bench_combined.py                       # fixture + corpus in ../shared
    python tools/bench_combined.py --model demo --calib model --text held_out.txt

Runs `moeexport build` four times (the F16 baselines with an empty recipe, then
recipes/combined.yaml as q4_0 GGUF and int4 QMoE ONNX), each of which validates
its artifact against its torch model and profiles it in a fresh process, and
prints one table from the four report.json files: file size, fidelity, quality
against the original, and prefill / decode tokens/s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from moeexport.cli import main as moeexport
from fixture_data import add_data_arguments

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "combined.yaml"))
    parser.add_argument("--json", default="combined_bench.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        empty = Path(scratch) / "none.yaml"
        empty.write_text("passes: []\n")
        builds = {
            "uncompressed gguf f16": (empty, ["--target", "gguf", "--quant", "f16"]),
            "uncompressed onnx f16": (empty, ["--target", "onnx", "--quant", "f16"]),
            "combined gguf q4_0": (args.recipe, ["--target", "gguf", "--quant", "q4_0"]),
            "combined onnx int4 b128": (args.recipe, ["--target", "onnx", "--quant", "int4", "--block-size", "128"]),
        }
        reports = {}
        for name, (recipe, target) in builds.items():
            out = Path(scratch) / name.replace(" ", "-")
            status = moeexport(["build", args.model, "--recipe", str(recipe), "--out", str(out), "--calib", args.calib,
                                "--eval-text", args.text, *target])
            reports[name] = json.loads((out / "report.json").read_text()) | {"exit_status": status}

    print("\n| build | MiB | fidelity KL | top-1 | ppl (artifact) | KL vs original | prefill tok/s | decode tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, report in reports.items():
        validation, profile = report["validation"], report["profile"]
        quality = report["quality_vs_source"] or {}
        print(f"| {name} | {report['file_bytes'] / 2**20:.1f} | {validation['kl']:.2e} | {validation['top1_agreement']:.2%} | "
              f"{validation['perplexity']:.2f} | {quality.get('kl', 0):.4f} | {profile['prefill_tokens_per_s']:.0f} | "
              f"{profile['decode_tokens_per_s']:.0f} |")
    for target in ("gguf", "onnx"):
        base = next(r for n, r in reports.items() if n.startswith(f"uncompressed {target}"))
        small = next(r for n, r in reports.items() if n.startswith(f"combined {target}"))
        print(f"{target}: file {small['file_bytes'] / base['file_bytes']:.2%} of F16, decode "
              f"{small['profile']['decode_tokens_per_s'] / base['profile']['decode_tokens_per_s']:.2f}x")
    Path(args.json).write_text(json.dumps(reports, indent=2) + "\n")


if __name__ == "__main__":
    main()
