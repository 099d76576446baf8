"""A combined recipe, exported to GGUF and ONNX, against the uncompressed model in F16, in one run.

    python tools/bench_combined.py                       # fixture + corpus in ../shared
    python tools/bench_combined.py --model demo --calib model --text held_out.txt

Calls `moeexport.build` four times (the F16 baselines with an empty recipe, then
recipes/combined.yaml as q4_0 GGUF and int4 QMoE ONNX), each of which validates
its artifact against its torch model and profiles it in a fresh process, and
prints one table from the four BuildReports: file size, fidelity, quality
against the original, and prefill / decode tokens/s. Writes the reports as JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import moeexport
from fixture_data import add_data_arguments

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "combined.yaml"))
    parser.add_argument("--json", default="combined_bench.json")
    args = parser.parse_args()

    uncompressed = {"passes": []}
    builds = {
        "uncompressed gguf f16": (uncompressed, "gguf", "f16", {}),
        "uncompressed onnx f16": (uncompressed, "onnx", "f16", {}),
        "combined gguf q4_0": (args.recipe, "gguf", "q4_0", {}),
        "combined onnx int4 b128": (args.recipe, "onnx", "int4", {"block_size": 128}),
    }
    reports = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, (recipe, target, quant, target_options) in builds.items():
            options = moeexport.BuildOptions(out=str(Path(scratch) / name.replace(" ", "-")), quant=quant,
                                             target_options=target_options, eval_text=args.text,
                                             calibration=moeexport.CalibrationOptions(source=args.calib))
            reports[name] = moeexport.build(args.model, recipe, target, options)

    print("\n| build | MiB | fidelity KL | top-1 | ppl (artifact) | KL vs original | prefill tok/s | decode tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, report in reports.items():
        validation, profile = report.validation, report.profile or {}
        quality = report.compression.quality_vs_source or {}
        print(f"| {name}{'' if report.ok else ' (FAILED validation)'} | {report.artifact['file_bytes'] / 2**20:.1f} | "
              f"{validation['kl']:.2e} | {validation['top1_agreement']:.2%} | {validation['perplexity']:.2f} | "
              f"{quality.get('kl', 0):.4f} | {profile.get('prefill_tokens_per_s', 0):.0f} | "
              f"{profile.get('decode_tokens_per_s', 0):.0f} |")
    for target in ("gguf", "onnx"):
        base = next(r for n, r in reports.items() if n.startswith(f"uncompressed {target}"))
        small = next(r for n, r in reports.items() if n.startswith(f"combined {target}"))
        speedup = (f"{small.profile['decode_tokens_per_s'] / base.profile['decode_tokens_per_s']:.2f}x"
                   if small.profile and base.profile else "- (not profiled: validation failed)")
        print(f"{target}: file {small.artifact['file_bytes'] / base.artifact['file_bytes']:.2%} of F16, decode {speedup}")
    Path(args.json).write_text(json.dumps({name: r.to_dict() for name, r in reports.items()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
