"""Wall time and peak RSS of `moeexport build` (empty recipe, GGUF f16) beside llama.cpp's own converter.

    python tools/bench_convert.py /tmp/mixtral-1layer --work /tmp/bench \\
        --text held_out.txt --moeexport-args="--no-eval --dtype bfloat16"
    python tools/bench_convert.py demo --repeat 3

Both tools convert the same checkpoint to an f16 GGUF, each in a fresh
subprocess, one after the other (never concurrently, so neither slows the
other):

  moeexport   python -m moeexport.cli build MODEL --recipe EMPTY --target gguf
              --quant f16 --out WORK/moeexport-out --overwrite --json [ARGS]
              (EMPTY is `passes: []`; the build also validates and profiles:
              its report.json's "timings" give the export-only seconds,
              printed beside the total; no compressed/ unless
              --moeexport-args=--save-checkpoint)
  converter   python convert_hf_to_gguf.py MODEL --outtype f16 --outfile ...
              from the llama-cpp-python sdist of the installed version
              (fetched with pip, as tools/compare_with_converter.py does)

Measurements, the same for both tools:
  wall s       time.perf_counter() around the subprocess, start to reaped.
  peak RSS GB  ru_maxrss of the rusage os.wait4() returns for the child. On
               Linux that is the largest resident set of any single process in
               the child's tree (the child, or a descendant it reaped, such as
               the build's profiling process), not a sum of processes alive at
               once. It is not a RUSAGE_CHILDREN delta of this process, which
               is a running maximum and would hide the second tool's peak
               behind a larger first one.
  export RSS GB  the build process's own peak during its export stage
               (report.json "peak_rss_bytes", VmHWM reset when the stage
               starts): the number to hold against the converter, which only
               converts; the build's whole-tree peak also counts its
               validation, where llama.cpp holds the whole artifact.
  output GB    size of the GGUF written (1 GB = 1e9 bytes).
With --repeat N each tool runs N times, alternating; wall is the median and
peak RSS the maximum over the runs. The checkpoint is read once before timing
so that neither tool pays for a cold page cache the other does not.

The table goes to stdout and the same numbers, with the commands and the
per-stage timings, to WORK/bench_convert.json. The GGUFs (GBs at real widths)
and the converter's sources are deleted unless --keep; the logs of each run
stay in WORK.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GB = 1e9


def _fetch_converter():
    """tools/compare_with_converter.py's fetch_converter (tools/ is not a package, so load it by path)."""
    spec = importlib.util.spec_from_file_location("compare_with_converter", REPO / "tools" / "compare_with_converter.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fetch_converter


def measure(command: list[str], log: Path, env: dict | None = None) -> dict:
    """Run `command` to completion; its wall seconds, peak RSS bytes (ru_maxrss via os.wait4) and exit code."""
    with open(log.with_suffix(".out"), "wb") as stdout, open(log.with_suffix(".err"), "wb") as stderr:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait for it again
    return {"wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "returncode": child.returncode}  # KiB on Linux


def failed(name: str, run: dict, log: Path) -> None:
    tail = log.with_suffix(".err").read_text(errors="replace")[-3000:]
    sys.exit(f"{name} exited {run['returncode']} (logs: {log}.out/.err):\n{tail}")


def warm_page_cache(model_dir: Path) -> None:
    for path in sorted(model_dir.iterdir()):
        if path.is_file():
            with open(path, "rb") as handle:
                while handle.read(64 << 20):
                    pass


def run_moeexport(model: str, recipe: Path, out: Path, extra: list[str], log: Path) -> dict:
    command = [sys.executable, "-m", "moeexport.cli", "build", model, "--recipe", str(recipe), "--target", "gguf",
               "--quant", "f16", "--out", str(out), "--overwrite", "--json", *extra]
    run = measure(command, log)
    # exit 1 is a build that landed with its validation missed (artifact renamed *.failed): still a timed export
    if run["returncode"] not in (0, 1) or not (out / "report.json").is_file():
        failed("moeexport build", run, log)
    report = json.loads((out / "report.json").read_text())
    artifact = Path(report["artifact"]["path"])
    return run | {"command": command, "timings": report["timings"], "validation_passed": run["returncode"] == 0,
                  "stage_peak_rss_bytes": report.get("peak_rss_bytes", {}),
                  "output": str(artifact), "output_bytes": artifact.stat().st_size}


def run_converter(tree: Path, model_dir: Path, out: Path, log: Path) -> dict:
    command = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "f16",
               "--outfile", str(out)]
    # the converter's own gguf-py, not the gguf package installed here (as compare_with_converter.py runs it)
    run = measure(command, log, env=os.environ | {"PYTHONPATH": str(tree / "gguf-py")})
    if run["returncode"] or not out.is_file():
        failed("convert_hf_to_gguf.py", run, log)
    return run | {"command": command, "output": str(out), "output_bytes": out.stat().st_size}


def summary(runs: list[dict]) -> dict:
    last = runs[-1]
    return {key: last[key] for key in last if key not in ("wall_s", "peak_rss_bytes", "returncode")} | {
        "wall_s": statistics.median(run["wall_s"] for run in runs),
        "peak_rss_bytes": max(run["peak_rss_bytes"] for run in runs),
        "runs": [{key: run[key] for key in ("wall_s", "peak_rss_bytes")} for run in runs],
    }


def table(ours: dict, theirs: dict) -> str:
    export_s = ours["timings"].get("export")
    export_peak = ours.get("stage_peak_rss_bytes", {}).get("export")
    rows = [
        ("tool", "wall s", "export s", "peak RSS GB", "export RSS GB", "output GB"),
        ("moeexport build", f"{ours['wall_s']:.2f}", f"{export_s:.2f}" if export_s else "-",
         f"{ours['peak_rss_bytes'] / GB:.2f}", f"{export_peak / GB:.2f}" if export_peak else "-",
         f"{ours['output_bytes'] / GB:.2f}"),
        ("convert_hf_to_gguf", f"{theirs['wall_s']:.2f}", "-", f"{theirs['peak_rss_bytes'] / GB:.2f}", "-",
         f"{theirs['output_bytes'] / GB:.2f}"),
        # the export stage alone (its seconds and its peak, from report.json) against the converter's whole run
        ("moeexport/converter", f"{ours['wall_s'] / theirs['wall_s']:.2f}x",
         f"{export_s / theirs['wall_s']:.2f}x" if export_s else "-",
         f"{ours['peak_rss_bytes'] / theirs['peak_rss_bytes']:.2f}x",
         f"{export_peak / theirs['peak_rss_bytes']:.2f}x" if export_peak else "-",
         f"{ours['output_bytes'] / theirs['output_bytes']:.2f}x"),
    ]
    lines = [f"{row[0]:<20}" + "".join(f"{cell:>13}" for cell in row[1:]) for row in rows]
    stages = ", ".join(f"{name} {seconds:.2f}" for name, seconds in ours["timings"].items() if seconds is not None)
    lines.append(f"moeexport stages (s): {stages}")
    if not ours["validation_passed"]:
        lines.append("note: the moeexport build missed its validation tolerance (artifact renamed *.failed)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL_DIR", help="HF checkpoint directory, or 'demo' (the bundled model)")
    parser.add_argument("--work", type=Path, help="where outputs, logs and bench_convert.json go "
                                                  "(default: a new temporary directory, printed)")
    parser.add_argument("--text", help="held-out text for the build's quality and validation windows "
                                       "(passed as --eval-text; without it they are sampled from the model, "
                                       "which costs time the converter does not spend)")
    parser.add_argument("--calib", help="calibration text passed to the build as --calib (an empty recipe uses none)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each tool, alternating (default 1)")
    parser.add_argument("--moeexport-args", default="", metavar="ARGS",
                        help='more `moeexport build` flags as one string; write it with "=" '
                             '(--moeexport-args="--no-eval"), else argparse takes a lone flag for its own')
    parser.add_argument("--keep", action="store_true", help="keep the GGUFs, moeexport's output and the converter")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    from moeexport.modelio import resolve_model_dir  # 'demo' -> moeexport/demo; the converter needs a directory

    model_dir = Path(resolve_model_dir(args.model))
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work directory: {work}", file=sys.stderr)
    tree = _fetch_converter()(work / "llama.cpp-converter")  # before timing: a download is no part of converting
    recipe = work / "empty-recipe.yaml"
    recipe.write_text("passes: []\n")
    extra = shlex.split(args.moeexport_args)
    extra += ["--eval-text", args.text] if args.text else []
    extra += ["--calib", args.calib] if args.calib else []
    warm_page_cache(model_dir)

    ours, theirs = [], []
    for number in range(1, args.repeat + 1):
        last = number == args.repeat
        print(f"run {number}/{args.repeat}: moeexport build", file=sys.stderr)
        ours.append(run_moeexport(args.model, recipe, work / "moeexport-out", extra, work / f"moeexport-{number}"))
        if not (args.keep and last):  # delete as we go: two GB-sized outputs at once may not fit
            shutil.rmtree(work / "moeexport-out")
        print(f"run {number}/{args.repeat}: convert_hf_to_gguf.py", file=sys.stderr)
        theirs.append(run_converter(tree, model_dir, work / "converter-f16.gguf", work / f"converter-{number}"))
        if not (args.keep and last):
            (work / "converter-f16.gguf").unlink()
    if not args.keep:
        shutil.rmtree(work / "llama.cpp-converter")

    ours, theirs = summary(ours), summary(theirs)
    result = {
        "model": args.model, "repeat": args.repeat, "kept": args.keep,
        "peak_rss": "ru_maxrss from os.wait4 on each tool's process: its tree's largest single process",
        "moeexport": ours, "converter": theirs,
        "ratios": {"wall": ours["wall_s"] / theirs["wall_s"],
                   "export_vs_converter_wall": ours["timings"]["export"] / theirs["wall_s"]
                   if ours["timings"].get("export") else None,
                   "peak_rss": ours["peak_rss_bytes"] / theirs["peak_rss_bytes"],
                   "export_peak_rss_vs_converter": ours["stage_peak_rss_bytes"].get("export", 0)
                   / theirs["peak_rss_bytes"],
                   "output_bytes": ours["output_bytes"] / theirs["output_bytes"]},
    }
    (work / "bench_convert.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(ours, theirs))
    print(f"wrote {work / 'bench_convert.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
