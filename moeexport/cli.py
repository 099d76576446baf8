"""The `moeexport` command line: it parses arguments into pipeline options and renders the reports.

Every user error ends as one line on stderr and exit status 2, with nothing
written. Progress and logs go to stderr; tables and --json output to stdout
(with --json, stdout is exactly one JSON document: the report).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from moeexport.arguments import build_parser, target_flags
from moeexport.errors import MoeExportError
from moeexport.recipe import load_recipe

def _calibration(args):
    from moeexport.pipeline import CalibrationOptions

    return CalibrationOptions(args.calib, args.calib_samples, args.calib_length, args.seed, args.batch_size,
                              args.max_block_window, cache=not args.no_cache)


def _compress_options(args, options_type=None, **extra):
    from moeexport.pipeline import CompressOptions

    return (options_type or CompressOptions)(
        out=args.out, calibration=_calibration(args), eval_text=args.eval_text, measure_quality=not args.no_eval,
        dry_run=args.dry_run, overwrite=args.overwrite, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
        allow_nonfinite=args.allow_nonfinite, max_memory=_max_memory(args), stream=args.stream,
        threads=_threads(args), **extra,
    )


def _threads(args) -> int | None:
    if args.threads is not None and args.threads < 1:
        raise MoeExportError(f"--threads must be at least 1, got {args.threads}")
    return args.threads


def _max_memory(args) -> int | None:
    from moeexport.memory import parse_size

    return parse_size(args.max_memory) if args.max_memory else None


def _run(args, call):
    """Run a pipeline call with progress rendered from its events; returns (report, stdout console)."""
    from moeexport.console import EventRenderer, console

    out = console()
    with EventRenderer(out, quiet_steps=getattr(args, "json", False)) as render:
        return call(render), out


def _print_json(data: dict) -> None:
    print(json.dumps(data, indent=2))


def run_analyze(args) -> int:
    from moeexport.console import render_analysis
    from moeexport.pipeline import analyze

    report, out = _run(args, lambda on_event: analyze(args.model, args.out, _calibration(args), args.dtype,
                                                      args.trust_remote_code, on_event, args.allow_nonfinite,
                                                      _max_memory(args), args.stream, args.measure_damage))
    _print_json(report.layers) if args.json else render_analysis(out, report)
    return 0


def run_compress(args) -> int:
    from moeexport.console import render_compression
    from moeexport.pipeline import compress

    recipe = load_recipe(args.recipe)  # a typo refused before torch is imported
    report, out = _run(args, lambda on_event: compress(args.model, recipe, _compress_options(args), on_event))
    if args.json:
        _print_json(report.to_dict())
        return 0
    render_compression(out, report)
    out.print("dry run: nothing written" if args.dry_run else f"wrote {report.out} in {report.timings['total']:.1f}s")
    return 0


def _target_options(args) -> dict:
    """The target flags the user gave (the target refuses those that are not its own)."""
    given = {flag.field: flag.value(getattr(args, flag.field)) for flag in target_flags()}
    return {name: value for name, value in given.items() if value is not None}


def _refuse_target_early(args) -> None:
    """What the target refuses, refused before torch is imported: seconds, not minutes, for a typo or a missing
    package (the pipeline checks the same again for callers of the library)."""
    from moeexport.backends import target_for

    chosen = target_for(args.target)
    chosen.check_installed()
    chosen.options(_target_options(args))
    if args.quant is not None:
        chosen.check_quant(args.quant)


def run_build(args) -> int:
    _refuse_target_early(args)
    recipe = load_recipe(args.recipe)  # a typo refused before torch is imported
    from moeexport.console import render_build
    from moeexport.pipeline import BuildOptions, build

    options = _compress_options(args, BuildOptions, quant=args.quant, target_options=_target_options(args),
                                save_checkpoint=args.save_checkpoint)
    report, out = _run(args, lambda on_event: build(args.model, recipe, args.target, options, on_event))
    _print_json(report.to_dict()) if args.json else render_build(out, report)
    if not report.ok:
        print(f"moeexport build: validation failed ({'; '.join(report.failures)}); artifact moved to "
              f"{report.artifact['path']}", file=sys.stderr)
        return 1
    return 0


def run_trt_build(args) -> int:
    from moeexport.backends import target_for
    from moeexport.console import render_device

    for name in ("context", "max_prompt"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise MoeExportError(f"--{name.replace('_', '-')} must be at least 1")
    workspace = int(args.workspace * 2**30) if args.workspace else None
    result, out = _run(args, lambda on_event: target_for("tensorrt").build_on_device(
        args.bundle, args.precision, workspace, args.context, args.max_prompt, on_event, args.verbose))
    _print_json(result.report) if args.json else render_device(out, result.report)
    if result.failures:
        print(f"moeexport trt-build: validation failed ({'; '.join(result.failures)}); engine moved to "
              f"{result.engine_path}", file=sys.stderr)
        return 1
    return 0


def run_validate(args) -> int:
    from moeexport.console import render_validation
    from moeexport.pipeline import validate
    from moeexport.validate import Tolerance

    limits = (args.max_abs_logit, args.max_kl, args.min_top1)
    tolerance = Tolerance(*limits) if any(limit is not None for limit in limits) else None
    validation, out = _run(args, lambda on_event: validate(args.artifact, args.reference, args.text, args.length,
                                                           args.windows, tolerance, on_event))
    _print_json(validation.to_dict()) if args.json else render_validation(out, args.reference, validation)
    if not validation.passed:
        print(f"moeexport validate: {args.artifact} misses its tolerance ({'; '.join(validation.failures)})",
              file=sys.stderr)
        return 1
    return 0


def run_eval(args) -> int:
    from moeexport.console import render_eval
    from moeexport.pipeline import evaluate

    result, out = _run(args, lambda on_event: evaluate(args.model, args.text, args.reference, args.length,
                                                       args.max_sequences, args.dtype, args.trust_remote_code, on_event,
                                                       args.allow_nonfinite))
    _print_json(result.to_dict()) if args.json else render_eval(out, args.model, args.text, result)
    return 0


def run_bench(args) -> int:
    from moeexport.bench import BenchOptions, bench
    from moeexport.console import render_bench
    from moeexport.memory import parse_size

    options = BenchOptions(repeats=args.repeats, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                           threads=args.threads, out=args.out,
                           bandwidth_buffer=parse_size(args.bandwidth_buffer) if args.bandwidth_buffer else None)
    report, out = _run(args, lambda on_event: bench(args.artifacts, args.baseline, options, on_event))
    _print_json(report.to_dict()) if args.json else render_bench(out, report)
    return 0


def _numbers(text: str, flag: str, kind=int) -> tuple:
    try:
        return tuple(kind(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise MoeExportError(f"--{flag} takes a comma-separated list, e.g. {'0,1,2' if kind is int else '1,0.75,0.5'}"
                             f"; got {text!r}") from None


def run_search(args) -> int:
    from moeexport.console import render_search
    from moeexport.search import Constraint, SearchOptions, search

    constraint = Constraint.parse(args.max_size, args.max_bytes, args.min_decode_speedup)
    types = tuple(item.strip() for item in args.quant_types.split(",") if item.strip()) if args.quant_types else None
    options = SearchOptions(
        calibration=_calibration(args), block_drop=_numbers(args.block_drop, "block-drop"),
        layer_drop=_numbers(args.layer_drop, "layer-drop"), expert_keep=_numbers(args.expert_keep, "expert-keep", float),
        quant_types=types, verify=args.verify, file_windows=args.file_windows, out=args.out, build=args.build,
        overwrite=args.overwrite, eval_text=args.eval_text, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
        allow_nonfinite=args.allow_nonfinite, max_memory=_max_memory(args))
    command = "moeexport " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["search"] else None
    report, out = _run(args, lambda on_event: search(args.model, args.target, constraint, options, on_event, command))
    _print_json(report.to_dict()) if args.json else render_search(out, report)
    if report.build is not None and not (report.build["ok"] and report.build["meets"]):
        why = report.build["failures"] + ([] if report.build["meets"] else
                                          [f"{report.build['file_bytes']:,} bytes miss {report.constraint['description']}"])
        print(f"moeexport search: the build of the chosen recipe failed ({'; '.join(why)})", file=sys.stderr)
        return 1
    return 0


def run_chat(args) -> int:
    from moeexport.backends import target_for, target_of_file
    from moeexport.cache import ROOT, chat_history_file
    from moeexport.chat import CONTEXT_CAP, chat_session, parse_temperature

    if not Path(args.model_file).exists():
        raise MoeExportError(f"{args.model_file}: no such file")
    if not args.model_file.endswith(".gguf") or not Path(args.model_file).is_file():
        raise MoeExportError(f"{args.model_file} is not a .gguf file")
    for name in ("max_tokens", "ctx_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise MoeExportError(f"--{name.replace('_', '-')} must be at least 1")
    temperature = parse_temperature(str(args.temperature), "--temperature")
    target = target_for(target_of_file(args.model_file))
    context = args.ctx_size or min(target.context_of(Path(args.model_file)) or CONTEXT_CAP, CONTEXT_CAP)
    runner = target.chat_runner(args.model_file, context, _threads(args))
    chat_session(runner, args.prompt, args.system, args.max_tokens, temperature, args.model_file,
                 history=chat_history_file(ROOT))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = {"analyze": run_analyze, "compress": run_compress, "eval": run_eval, "build": run_build,
           "validate": run_validate, "chat": run_chat, "trt-build": run_trt_build, "bench": run_bench,
           "search": run_search}[args.command]
    try:
        if hasattr(args, "max_memory"):  # a wrong path or a model that cannot fit: refused before torch is imported
            from moeexport.checkpoint_files import resolve_model_dir
            from moeexport.memory import default_budget, refuse_early

            resolve_model_dir(args.model)
            refuse_early(args.model, _max_memory(args) or default_budget())
        return run(args)
    except MoeExportError as error:
        print(f"moeexport {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a file that vanished: say which, without a traceback
        where = f" ({error.filename})" if error.filename else ""
        print(f"moeexport {args.command}: error: {error.strerror or error}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
