"""Peak memory of `moeexport build` against the checkpoint's size: the streamed pipeline's bound.

    python tools/bench_memory.py /tmp/mixtral-4layer --recipe r.yaml --calib calib.txt --text held_out.txt \\
        --max-memory 4GB --build gguf:q8_0 --build gguf:q4_k_m --build onnx:int4

(`tools/make_synthetic_checkpoint.py mixtral-8x7b OUT --layers 4` writes such a checkpoint.) Each
build runs in a fresh subprocess, one after the other; its peak RSS is the largest process of its
tree (ru_maxrss from os.wait4, measured as tools/bench_convert.py does), and the build process's own
peak per stage comes from its report.json. Prints, per build: wall time, peak RSS, that peak over
the checkpoint's size, the validation verdict and its numbers; the same as JSON to WORK/bench_memory.json.
Given a GGUF as the model, a gguf:keep build also says how many of its tensors carry the input's bytes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GB = 1e9


def _bench_convert():
    """tools/bench_convert.py (tools/ is not a package, so load it by path) for its `measure`."""
    spec = importlib.util.spec_from_file_location("bench_convert", REPO / "tools" / "bench_convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checkpoint_bytes(model: str) -> int:
    from moeexport.checkpoint_files import is_gguf, read_manifest, resolve_model_dir, weight_files

    model_dir = resolve_model_dir(model)
    if is_gguf(model_dir):
        return model_dir.stat().st_size
    return sum(path.stat().st_size for path in weight_files(model_dir, read_manifest(model_dir)))


def codes_summary(model: str, artifact: str) -> str | None:
    """For a GGUF built from a GGUF: how many of its tensors carry the input's bytes (backends/gguf/reader.py)."""
    from moeexport.backends.gguf.reader import carried_codes

    if not (str(model).endswith(".gguf") and ".gguf" in Path(artifact).name):
        return None
    codes = list(carried_codes(model, artifact).values())
    return ", ".join(f"{codes.count(kind)} {kind}" for kind in ("carried", "zeros", "rewritten"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint directory, a MoE .gguf (build it with gguf:keep), or 'demo'")
    parser.add_argument("--recipe", required=True, help="the recipe every build applies")
    parser.add_argument("--build", action="append", required=True, metavar="TARGET:QUANT",
                        help="a build to measure, e.g. gguf:q8_0 or onnx:int4 (repeatable)")
    parser.add_argument("--calib", help="calibration text (--calib of moeexport build)")
    parser.add_argument("--text", required=True, help="held-out text (--eval-text of moeexport build)")
    parser.add_argument("--max-memory", help="--max-memory of moeexport build")
    parser.add_argument("--extra", default="", metavar="ARGS", help='more build flags, written --extra="..."')
    parser.add_argument("--work", help="directory for outputs and logs (default: a temporary one)")
    args = parser.parse_args()

    measure = _bench_convert().measure
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    size = checkpoint_bytes(args.model)
    rows = []
    for build in args.build:
        target, _, quant = build.partition(":")
        out = work / build.replace(":", "-")
        command = [sys.executable, "-m", "moeexport.cli", "build", args.model, "--recipe", args.recipe, "--target",
                   target, "--quant", quant, "--out", str(out), "--overwrite", "--eval-text", args.text, "--json"]
        command += (["--calib", args.calib] if args.calib else []) + (["--max-memory", args.max_memory]
                                                                      if args.max_memory else [])
        command += args.extra.split()
        print(f"{build}: {' '.join(command[2:])}", file=sys.stderr)
        run = measure(command, work / build.replace(":", "-"))
        report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else None
        if report is None:
            sys.exit(f"{build} exited {run['returncode']} without a report (logs in {work})")
        own = max(report["peak_rss_bytes"].values())
        peak = max(run["peak_rss_bytes"], own)  # the stage peaks are exact when wait4's counts another process
        rows.append({"build": build, "wall_s": run["wall_s"], "peak_rss_bytes": peak, "build_process_bytes": own,
                     "ratio": peak / size, "ok": report["ok"], "failures": report["failures"],
                     "validation": {key: report["validation"][key] for key in ("max_abs_logit", "kl", "top1_agreement")},
                     "file_bytes": report["artifact"]["file_bytes"],
                     "codes": codes_summary(args.model, report["artifact"]["path"]),
                     "quality_vs_input": report.get("quality_vs_input")})
        shutil.rmtree(out, ignore_errors=True)  # GBs at real widths
    print(f"checkpoint {args.model}: {size / GB:.2f} GB; a third is {size / 3 / GB:.2f} GB")
    print(f"{'build':<14}{'wall s':>9}{'peak GB':>9}{'/ ckpt':>8}{'own GB':>8}{'file GB':>9}  validation")
    for row in rows:
        verdict = "passed" if row["ok"] else "failed: " + "; ".join(row["failures"])
        print(f"{row['build']:<14}{row['wall_s']:>9.1f}{row['peak_rss_bytes'] / GB:>9.2f}{row['ratio']:>8.3f}"
              f"{row['build_process_bytes'] / GB:>8.2f}{row['file_bytes'] / GB:>9.2f}  {verdict} "
              f"(max |dlogit| {row['validation']['max_abs_logit']:.3g}, KL {row['validation']['kl']:.3g}, "
              f"top-1 {row['validation']['top1_agreement']:.1%})")
        if row["codes"]:
            print(f"{'':<14}tensors against the input GGUF: {row['codes']}")
    (work / "bench_memory.json").write_text(json.dumps({"checkpoint_bytes": size, "builds": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
