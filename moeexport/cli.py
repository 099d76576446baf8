"""The `moeexport` command line: analyze, compress, eval, build, validate, chat.

Every user error ends as one line on stderr and exit status 2, with nothing
written. Progress goes to stderr; tables and --json output go to stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from rich.markup import escape

from moeexport.errors import MoeExportError

EXAMPLES = """\
examples:
  moeexport analyze demo --out out/analysis
  moeexport compress demo --recipe recipes/trim.yaml --out out/demo-trimmed
  moeexport compress path/to/Mixtral --recipe r.yaml --calib calib.txt --dry-run
  moeexport eval out/demo-trimmed --text held_out.txt --reference demo
  moeexport build demo --recipe recipes/demo-gguf.yaml --target gguf --out out/demo-gguf
  moeexport build demo --recipe recipes/trim.yaml --target onnx --quant int4 --out out/demo-onnx
  moeexport validate out/demo-onnx/model-int4.onnx --reference out/demo-onnx/compressed --text held_out.txt
  moeexport chat out/demo-gguf/model-f32.gguf --prompt "Once upon a time"
  moeexport build demo --recipe recipes/trim.yaml --target tensorrt --out out/demo-trt
  moeexport trt-build out/demo-trt/bundle --precision fp16        # on the Jetson / CUDA machine

MODEL is a Hugging Face checkpoint directory (safetensors), a directory written
by `moeexport compress`, or `demo` for the small model bundled with moeexport.
"""

RECIPE_HELP = """\
a YAML recipe: an ordered list of passes, e.g.
  passes:
    - block_drop: {n: 1}       # mode: discrete|consecutive; score: similarity|random
    - layer_drop: {n: 1}       # score: similarity|random
    - expert_drop: {keep: 6, scope: global, score: frequency}
                               # scope: layer|global; score: frequency|routing_mass|reap|random
    - merge: {keep: 4}         # M-SMoE; compress: {rank: 32, sparsity: 0.9} for MC-SMoE
    - prune: {method: wanda, sparsity: 0.5}   # or sparsegpt|magnitude; pattern: "2:4"
    - quantize: {method: gptq, bits: 4, group_size: 128}   # or rtn; bits: 8
"""


def _calibration_arguments() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("calibration")
    group.add_argument(
        "--calib",
        default="model",
        metavar="SOURCE",
        help="calibration text: a .txt or .jsonl (field 'text') file, hf:NAME[:CONFIG][@SPLIT] from the local "
        "datasets cache, or 'model' to sample text from the model itself (default: model)",
    )
    group.add_argument("--calib-samples", type=int, default=32, metavar="N", help="sequences (default 32; papers: 128)")
    group.add_argument("--calib-length", type=int, default=256, metavar="L", help="tokens each (default 256; papers: 2048)")
    group.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    group.add_argument("--batch-size", type=int, default=8, help="calibration batch size (default 8)")
    group.add_argument(
        "--max-block-window", type=int, default=8, metavar="W",
        help="longest block window scored for consecutive Block Drop (default 8)",
    )
    group.add_argument("--no-cache", action="store_true", help="recompute statistics instead of reusing cached ones")
    return parent


def _model_arguments() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("model", metavar="MODEL", help="checkpoint directory, or 'demo'")
    parent.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parent.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint (off by default)")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeexport",
        description="Compress Mixture-of-Experts LLMs (Block / Layer / Expert Drop) and deploy them.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"moeexport {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model, calibration = _model_arguments(), _calibration_arguments()
    formatter = argparse.RawDescriptionHelpFormatter

    analyze = commands.add_parser(
        "analyze", parents=[model, calibration], formatter_class=formatter,
        help="collect routing and redundancy statistics, print a summary, write plots",
        description="Run the calibration set through MODEL layer by layer and report, per layer, expert usage "
        "(tokens per expert), routing mass, REAP saliency, MoE-sublayer and block similarity. Writes "
        "statistics.json, PNG plots and report.html to --out; later recipes on the same model and calibration "
        "set reuse the statistics.",
    )
    analyze.add_argument("--out", default="moeexport-analysis", help="output directory (default moeexport-analysis)")
    analyze.add_argument("--json", action="store_true", help="print the per-layer summary as JSON")
    analyze.set_defaults(run=run_analyze)

    compress = commands.add_parser(
        "compress", parents=[model, calibration], formatter_class=formatter,
        help="apply a recipe and save the compressed checkpoint",
        description="Apply a recipe to MODEL and save the result, which is itself a valid MODEL everywhere.\n\n"
        + RECIPE_HELP,
    )
    _recipe_and_output(compress)
    compress.add_argument("--dry-run", action="store_true", help="print the plan and sizes, write nothing")
    compress.set_defaults(run=run_compress)

    evaluate = commands.add_parser(
        "eval", parents=[model], formatter_class=formatter,
        help="perplexity, and KL / top-1 agreement against a reference",
        description="Perplexity of MODEL on a text; with --reference, also KL(reference || MODEL) and top-1 "
        "agreement per predicted token.",
    )
    evaluate.add_argument("--text", required=True, metavar="FILE", help="a .txt or .jsonl file, or hf:NAME")
    evaluate.add_argument("--reference", metavar="MODEL", help="the model to compare against (e.g. the original)")
    evaluate.add_argument("--length", type=int, default=256, help="tokens per window (default 256)")
    evaluate.add_argument("--max-sequences", type=int, default=32, help="windows scored (default 32)")
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")
    evaluate.set_defaults(run=run_eval)

    build = commands.add_parser(
        "build", parents=[model, calibration], formatter_class=formatter,
        help="compress, then export to a deployment target",
        description="Compress MODEL with a recipe, then export the result for a target, validate it against the "
        "compressed torch model and profile it on this machine. DIR receives the artifact, the compressed "
        "checkpoint (compressed/) and report.json. A build whose validation misses its tolerance exits 1 and "
        "its artifact is renamed *.failed.\n\n" + RECIPE_HELP,
    )
    _recipe_and_output(build)
    build.add_argument("--target", required=True, choices=["gguf", "onnx", "tensorrt"], help="deployment target")
    build.add_argument(
        "--quant", default="f32",
        help="weight type (gguf: f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k; onnx: f32, f16, and int8 / int4 "
        "experts in QMoE nodes; tensorrt: f32, f16 ONNX weights, the engine precision is trt-build's; default f32)",
    )
    build.add_argument(
        "--tensor-type", action="append", default=[], metavar="PATTERN=TYPE",
        help="per-tensor type override, a regex on GGUF tensor names, e.g. --tensor-type _exps=q4_k "
        "--tensor-type attn_=q8_0 (repeatable; the first match wins)",
    )
    build.add_argument(
        "--imatrix", action="store_true",
        help="weigh quantization by an importance matrix measured on the calibration set (per expert, from its "
        "routed tokens; experts without tokens use their layer's average and are reported)",
    )
    build.add_argument(
        "--moe-ops", choices=["contrib", "plain"],
        help="onnx: one com.microsoft MoE/QMoE node per MoE layer (contrib, the default; onnxruntime >= 1.23) or "
        "standard ops only (plain: for TensorRT and runtimes without the contrib ops; f32/f16)",
    )
    build.add_argument(
        "--block-size", type=int, metavar="N",
        help="onnx int8/int4: inputs sharing one scale (a power of two >= 16 dividing the expert widths; default 32)",
    )
    build.set_defaults(run=run_build, dry_run=False)

    validate = commands.add_parser(
        "validate", formatter_class=formatter,
        help="compare an artifact's logits with a torch model",
        description="Run ARTIFACT (a .gguf or .onnx file) and the torch REFERENCE on the same held-out windows and "
        "report max |delta logit|, KL(reference || artifact), top-1 agreement and both perplexities. Exact settings "
        "(F32 KV cache, flash attention off in llama.cpp) are used, so an F32 artifact should agree to ~1e-5.",
    )
    validate.add_argument("artifact", metavar="ARTIFACT", help="the exported file (.gguf or .onnx)")
    validate.add_argument("--reference", required=True, metavar="MODEL", help="the torch model it was exported from")
    validate.add_argument("--text", required=True, metavar="FILE", help="held-out text (.txt / .jsonl)")
    validate.add_argument("--length", type=int, default=256, help="tokens per window (default 256)")
    validate.add_argument("--windows", type=int, default=2, help="windows compared (default 2)")
    validate.add_argument("--json", action="store_true", help="print the result as JSON")
    validate.set_defaults(run=run_validate, trust_remote_code=False, dtype="float32")

    chat = commands.add_parser(
        "chat", formatter_class=formatter,
        help="chat with a GGUF model in llama.cpp",
        description="Interactive local chat with a GGUF file: tokens stream as they are generated, turns use the "
        "file's chat template (Llama-2 [INST] format when it has none). Ctrl-D or Ctrl-C ends the session.",
    )
    chat.add_argument("model_file", metavar="FILE.gguf")
    chat.add_argument("--prompt", help="answer one prompt and exit")
    chat.add_argument("--system", help="a system message for the conversation")
    chat.add_argument("--max-tokens", type=int, default=256, help="longest reply (default 256)")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--context", type=int, default=2048, help="context length in tokens (default 2048)")
    chat.set_defaults(run=run_chat)

    trt_build = commands.add_parser(
        "trt-build", formatter_class=formatter,
        help="on the device: build the TensorRT engine of a bundle, validate and profile it",
        description="Build a TensorRT engine from BUNDLE (written by `build --target tensorrt`) on this machine's "
        "GPU, compare its logits with the bundled torch reference, profile it and write BUNDLE/report.json. "
        "Needs tensorrt (JetPack 6.x: TensorRT 10.3) and torch with CUDA. An engine that misses its tolerance "
        "exits 1 and is renamed *.failed.",
    )
    trt_build.add_argument("bundle", metavar="BUNDLE", help="the bundle directory (or the build's --out directory)")
    trt_build.add_argument(
        "--precision", choices=["fp32", "fp16", "bf16", "int8", "fp8"],
        help="engine precision (default: fp16 on TensorRT 10 where the GPU has fast FP16, else fp32); int8/fp8 need a "
        "Q/DQ-quantized ONNX",
    )
    trt_build.add_argument("--workspace", type=float, metavar="GIB", help="builder workspace limit in GiB")
    trt_build.add_argument("--context", type=int, metavar="N", help="most tokens the engine holds (default: the bundle's)")
    trt_build.add_argument("--max-prompt", type=int, metavar="N", help="most new tokens per prefill call (default: the bundle's)")
    trt_build.add_argument("--verbose", action="store_true", help="show TensorRT's verbose build log")
    trt_build.add_argument("--json", action="store_true", help="print report.json")
    trt_build.set_defaults(run=run_trt_build)
    return parser


def _recipe_and_output(command: argparse.ArgumentParser) -> None:
    command.add_argument("--recipe", required=True, metavar="FILE", help="YAML recipe (see above)")
    command.add_argument("--out", metavar="DIR", help="output directory (required unless --dry-run)")
    command.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    command.add_argument(
        "--eval-text", metavar="FILE",
        help="held-out text for the quality and validation checks (default: text sampled from the model)",
    )
    command.add_argument("--no-eval", action="store_true", help="skip the quality check against the original")


def _version() -> str:
    from moeexport import __version__

    return __version__


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=_console(stderr=True), transient=True,
    )


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _load(args):
    from moeexport.modelio import load, load_tokenizer

    return load(args.model, args.dtype, args.trust_remote_code), load_tokenizer(args.model, args.trust_remote_code)


def _statistics_provider(args, tokenizer, progress):
    from moeexport.calibration.sources import CalibrationConfig
    from moeexport.compress import DEFAULT_CACHE, StatisticsProvider
    from moeexport.modelio import fingerprint, resolve_model_dir

    for name in ("calib_samples", "calib_length", "batch_size", "max_block_window"):
        if getattr(args, name) < 1:
            raise MoeExportError(f"--{name.replace('_', '-')} must be at least 1")
    calibration = CalibrationConfig(args.calib, args.calib_samples, args.calib_length, args.seed)
    if args.calib != "model":
        from moeexport.calibration.sources import read_documents

        read_documents(args.calib)  # a missing or malformed source fails now, before the model runs
    return StatisticsProvider(
        tokenizer,
        calibration,
        fingerprint(resolve_model_dir(args.model)),
        cache_dir=None if args.no_cache else DEFAULT_CACHE,
        batch_size=args.batch_size,
        max_block_window=args.max_block_window,
        progress=progress,
    )


# --- analyze ----------------------------------------------------------------------------


def run_analyze(args) -> int:
    from rich.table import Table

    from moeexport.analysis import layer_rows, write_html, write_plots

    out_dir = Path(args.out)
    model, tokenizer = _load(args)
    with _progress() as progress:
        provider = _statistics_provider(args, tokenizer, progress)
        statistics = provider.statistics(model, history=[])
    rows = layer_rows(statistics)
    out_dir.mkdir(parents=True, exist_ok=True)
    statistics.save(out_dir / "statistics.json")
    plots = write_plots(statistics, out_dir)
    report = write_html(statistics, rows, plots, out_dir / "report.html", f"moeexport analyze {args.model}")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    console = _console()
    table = Table(title=f"{args.model}: per-layer statistics on {statistics.layers[0].tokens} calibration tokens")
    for header in ("layer", "kind", "experts", "least / most used expert", "unused", "cos(h_in,h_out)", "cos(x,x+MoE)"):
        table.add_column(header, justify="right")
    for row in rows:
        spread = f"{row['least_used']:.1%} / {row['most_used']:.1%}" if row.get("experts") else ""
        moe = f"{row['moe_similarity']:.4f}" if row["moe_similarity"] is not None else ""
        table.add_row(
            str(row["layer"]), row["kind"], str(row.get("experts", "")), spread,
            str(row.get("unused_experts", "")), f"{row['block_similarity']:.4f}", moe,
        )
    console.print(table)
    ranked_blocks = sorted(rows, key=lambda row: -row["block_similarity"])[:3]
    console.print("most redundant blocks (Block Drop first):", ", ".join(str(r["layer"]) for r in ranked_blocks))
    moe_rows = [row for row in rows if row["moe_similarity"] is not None]
    ranked_moe = sorted(moe_rows, key=lambda row: -row["moe_similarity"])[:3]
    console.print("most redundant MoE sublayers (Layer Drop first):", ", ".join(str(r["layer"]) for r in ranked_moe))
    console.print(f"wrote {out_dir / 'statistics.json'}, {len(plots)} plots and {report}")
    return 0


# --- compress / build -------------------------------------------------------------------


def _compress(args):
    """Load, calibrate, apply. Returns (model, tokenizer, original or None, statistics provider, result)."""
    from moeexport.compress import compress
    from moeexport.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if not args.dry_run and not args.out:
        raise MoeExportError("--out is required (or use --dry-run to only print the plan)")
    if args.out and Path(args.out).exists() and not args.overwrite and not args.dry_run:
        raise MoeExportError(f"output {args.out} already exists; pass --overwrite or choose another --out")
    model, tokenizer = _load(args)
    keep_original = not (args.no_eval or args.dry_run)
    original = copy.deepcopy(model) if keep_original else None
    console = _console()
    with _progress() as progress:
        provider = _statistics_provider(args, tokenizer, progress)

        def report_step(step):
            console.print(f"[bold]{step.name}[/bold] {escape(str(step.options))}")
            for line in step.plan.describe():
                console.print(f"  {escape(line)}")

        result = compress(model, recipe, provider, on_step=report_step)
    _print_sizes(console, result)
    return model, tokenizer, original, provider, result


def _print_sizes(console, result) -> None:
    from rich.table import Table

    table = Table(title="structure before -> after")
    for header in ("layer", "before", "after", "new index"):
        table.add_column(header, justify="right")
    for index, (before, new_index) in enumerate(zip(result.layers_before, result.new_block_index)):
        after = "block dropped" if new_index is None else _describe_layer(result.layers_after[new_index])
        table.add_row(str(index), _describe_layer(before), after, "" if new_index is None else str(new_index))
    console.print(table)
    console.print(
        f"parameters {result.parameters_before:,} -> {result.parameters_after:,} "
        f"({result.parameters_after / result.parameters_before:.1%}); "
        f"size {result.bytes_before / 2**20:.1f} MiB -> {result.bytes_after / 2**20:.1f} MiB"
    )


def _describe_layer(spec) -> str:
    if spec.kind == "moe":
        return f"MoE {spec.num_experts} experts, top-{spec.top_k}" + (" + shared" if spec.shared_experts else "")
    return {"dense": "dense MLP", "dropped": "attention only"}[spec.kind]


def _held_out_windows(args, tokenizer, model, count: int, length: int):
    """(windows, description): --eval-text, or sequences sampled from `model` apart from calibration."""
    from moeexport.calibration.sources import sample_from_model
    from moeexport.evaluate import eval_windows

    if args.eval_text:
        return eval_windows(tokenizer, args.eval_text, length, count), args.eval_text
    windows = sample_from_model(model, tokenizer, count, length, args.seed + 1)
    return windows, f"{count} x {length} tokens sampled from the model"


def _quality_vs_original(args, model, tokenizer, original):
    from moeexport.evaluate import evaluate

    if original is None:
        return None
    windows, where = _held_out_windows(args, tokenizer, original, 16, 128)
    with _progress() as progress:
        quality = evaluate(model, windows, reference=original, progress=progress)
    _console().print(
        f"quality vs original on {where}: perplexity {quality.reference_perplexity:.2f} -> "
        f"{quality.perplexity:.2f}, KL {quality.kl:.4f}, top-1 agreement {quality.top1_agreement:.1%}"
    )
    return quality


def _manifest(args, provider, result, quality) -> dict:
    return {
        "source": {"model": str(args.model), "fingerprint": provider.source_key},
        "calibration": provider.calibration.to_dict(),
        **result.manifest(),
        "quality_vs_source": quality.to_dict() if quality else None,
    }


def run_compress(args) -> int:
    from moeexport.modelio import save

    started = time.perf_counter()
    model, tokenizer, original, provider, result = _compress(args)
    if args.dry_run:
        _console().print("dry run: nothing written")
        return 0
    quality = _quality_vs_original(args, model, tokenizer, original)
    out = save(model, args.out, _manifest(args, provider, result, quality), overwrite=args.overwrite)
    _console().print(f"wrote {out} in {time.perf_counter() - started:.1f}s")
    return 0


def _export_options(args) -> dict:
    """The chosen target's export options from its flags; a flag of another target is an error."""
    flags = {
        "gguf": {"--tensor-type": bool(args.tensor_type), "--imatrix": args.imatrix},
        "onnx": {"--moe-ops": args.moe_ops is not None, "--block-size": args.block_size is not None},
    }
    for target, given in flags.items():
        misplaced = [flag for flag, used in given.items() if used and target != args.target]
        if misplaced:
            raise MoeExportError(f"{misplaced[0]} is a {target} option; it does nothing for --target {args.target}")
    if args.target == "gguf":
        malformed = [item for item in args.tensor_type if "=" not in item]
        if malformed:
            raise MoeExportError(f"--tensor-type takes PATTERN=TYPE, got {malformed[0]!r}")
        return {"tensor_types": dict(item.rsplit("=", 1) for item in args.tensor_type)}
    if args.target == "onnx":
        from moeexport.backends.onnx import DEFAULT_BLOCK_SIZE

        return {"moe_ops": args.moe_ops or "contrib", "block_size": args.block_size or DEFAULT_BLOCK_SIZE}
    return {}


def run_build(args) -> int:
    import shutil

    from moeexport.backends import backend_for

    backend = backend_for(args.target)  # before any work: nothing is compressed for a target we cannot export
    args.export_options = _export_options(args)
    if args.quant not in backend.QUANT_TYPES:
        raise MoeExportError(f"--quant {args.quant} is not a {args.target} type; choose one of {', '.join(backend.QUANT_TYPES)}")
    model, tokenizer, original, provider, result = _compress(args)
    backend.check(model, args.quant, **args.export_options)
    quality = _quality_vs_original(args, model, tokenizer, original)
    options = dict(args.export_options)
    if args.imatrix:
        from moeexport.calibration.moments import input_moments

        options["imatrix"] = input_moments(model, provider.tokens(model), batch_size=args.batch_size)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)  # _compress already refused an existing --out without --overwrite
    out.mkdir(parents=True)
    try:
        manifest = _manifest(args, provider, result, quality)
        if args.target == "tensorrt":
            return _build_tensorrt_bundle(args, backend, model, tokenizer, out, manifest)
        return _export_validate_profile(args, backend, model, tokenizer, out, manifest, options)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # an error leaves nothing that looks like a build
        raise


def _export_validate_profile(args, backend, model, tokenizer, out: Path, manifest: dict, options: dict) -> int:
    from moeexport.modelio import save
    from moeexport.validate import TorchRunner, compare

    started = time.perf_counter()
    save(model, out / "compressed", manifest)
    artifact = backend.export(model, out / f"model-{args.quant}.{backend.EXTENSION}", quant=args.quant, **options)
    console = _console()
    console.print(f"exported {artifact.path} ({artifact.path.stat().st_size / 2**20:.1f} MiB, {artifact.representation})")
    for fallback in artifact.fallbacks:
        console.print(f"  note: {escape(fallback)}")

    windows, where = _held_out_windows(args, tokenizer, model, 2, 256)  # >= 512 predicted-token positions
    with _progress() as progress:
        fidelity = compare(TorchRunner(model), backend.Runner(artifact.path, context=windows.shape[1]), windows, progress)
    tolerance = backend.TOLERANCES[args.quant]
    failures = fidelity.failures(tolerance)
    speed = backend.profile(artifact.path, windows[0, :128].tolist(), new_tokens=64)
    report = {
        "target": args.target,
        "artifact": str(artifact.path),
        "file_bytes": artifact.path.stat().st_size,
        "quant": args.quant,
        "options": {name: value for name, value in options.items() if name != "imatrix"},
        "imatrix": args.imatrix,
        "representation": artifact.representation,
        "fallbacks": artifact.fallbacks,
        "validation": {"text": where, **fidelity.to_dict(), "tolerance": tolerance.__dict__, "failures": failures},
        "profile": speed,
        "quality_vs_source": manifest["quality_vs_source"],
        "seconds": time.perf_counter() - started,
    }
    console.print(
        f"fidelity vs compressed torch model on {where} ({fidelity.tokens} tokens): max |delta logit| "
        f"{fidelity.max_abs_logit:.2e}, KL {fidelity.kl:.2e}, top-1 {fidelity.top1_agreement:.2%}, "
        f"perplexity {fidelity.reference_perplexity:.2f} -> {fidelity.perplexity:.2f}"
    )
    console.print(
        f"profile: prefill {speed['prefill_tokens_per_s']:.0f} tok/s, decode {speed['decode_tokens_per_s']:.0f} tok/s, "
        f"time to first token {speed['time_to_first_token_s'] * 1000:.0f} ms, "
        f"memory {speed['runtime_rss_bytes'] / 2**20:.0f} MiB held by the runtime "
        f"(process peak {speed['peak_rss_bytes'] / 2**20:.0f} MiB, Python and torch included)"
    )
    if failures:
        failed = artifact.path.with_name(artifact.path.name + ".failed")
        artifact.path.rename(failed)
        report["artifact"] = str(failed)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if failures:
        print(f"moeexport build: validation failed ({'; '.join(failures)}); artifact moved to {failed}", file=sys.stderr)
        return 1
    console.print(f"wrote {out} (export, validation and profile took {report['seconds']:.1f}s)")
    return 0


# --- tensorrt: bundle here, engine on the device ---------------------------------------


def _build_tensorrt_bundle(args, backend, model, tokenizer, out: Path, manifest: dict) -> int:
    """Write out/bundle (checked, ONNX Runtime-validated ONNX + reference logits); finish it here if TensorRT is."""
    from moeexport.modelio import save

    started = time.perf_counter()
    save(model, out / "compressed", manifest)
    windows, where = _held_out_windows(args, tokenizer, model, 2, 256)
    with _progress() as progress:
        bundle = backend.write_bundle(model, out / "bundle", windows, where, quant=args.quant,
                                      source_manifest=manifest, progress=progress)
    console, here = _console(), bundle.manifest["validation_here"]
    onnx_bytes = sum(f["bytes"] for name, f in bundle.manifest["files"].items() if name.startswith("model.onnx"))
    console.print(
        f"wrote the TensorRT bundle {bundle.path}: model.onnx ({onnx_bytes / 2**20:.1f} MiB, standard ops only, passes "
        f"the {bundle.manifest['tensorrt_support']['checked_against'].split(',')[0]} check), reference logits of "
        f"{' x '.join(map(str, bundle.manifest['reference']['windows']))} tokens, bundle.json, README.txt"
    )
    console.print(
        f"ONNX Runtime vs compressed torch model on {where} ({here['tokens']} tokens): max |delta logit| "
        f"{here['max_abs_logit']:.2e}, KL {here['kl']:.2e}, top-1 {here['top1_agreement']:.2%}"
    )
    report = {"target": "tensorrt", "bundle": str(bundle.path), "quant": args.quant,
              "validation_here": here, "quality_vs_source": manifest["quality_vs_source"], "engine": None}
    if bundle.failures:
        report["seconds"] = time.perf_counter() - started
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"moeexport build: the TensorRT ONNX failed validation in ONNX Runtime ({'; '.join(bundle.failures)}); "
              f"kept as {bundle.path / 'model.onnx.failed'}", file=sys.stderr)
        return 1
    found = backend.status()
    if not found.available:
        report["engine"] = {"built": False, "reason": found.reason}
        report["seconds"] = time.perf_counter() - started
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        console.print(
            f"engine not built: {escape(found.reason)}.\nTo finish on the device (JetPack 6.x: TensorRT 10.3): copy "
            f"{bundle.path} there and run `moeexport trt-build {bundle.path.name}` (steps in {bundle.path / 'README.txt'})"
        )
        return 0
    code = _finish_tensorrt(backend.Bundle(bundle.path), None, None, None, None, False)
    report["engine"] = json.loads((bundle.path / "report.json").read_text())
    report["seconds"] = time.perf_counter() - started
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return code


def _finish_tensorrt(bundle, precision, workspace, context, max_prompt, verbose) -> int:
    from moeexport.backends.tensorrt import finish_on_device

    with _progress() as progress:
        result = finish_on_device(bundle, precision, workspace, context, max_prompt, progress, verbose)
    report, console = result.report, _console()
    engine, fidelity, speed = report["engine"], report["validation"], report["profile"]
    console.print(
        f"built {result.engine_path} ({engine['engine_bytes'] / 2**20:.1f} MiB, {engine['precision']}, TensorRT "
        f"{engine['tensorrt_version']} on {report['device']['gpu']}) in {engine['build_seconds']:.0f}s"
    )
    console.print(
        f"fidelity vs bundled torch logits ({fidelity['tokens']} tokens): max |delta logit| "
        f"{fidelity['max_abs_logit']:.2e}, KL {fidelity['kl']:.2e}, top-1 {fidelity['top1_agreement']:.2%}"
    )
    console.print(
        f"profile: prefill {speed['prefill_tokens_per_s']:.0f} tok/s, decode {speed['decode_tokens_per_s']:.0f} tok/s, "
        f"time to first token {speed['time_to_first_token_s'] * 1000:.0f} ms, GPU peak "
        f"{speed['torch_peak_allocated_bytes'] / 2**20:.0f} MiB + engine {(speed['engine_device_memory_bytes'] or 0) / 2**20:.0f} MiB"
    )
    if result.failures:
        print(f"moeexport trt-build: validation failed ({'; '.join(result.failures)}); engine moved to {result.engine_path}",
              file=sys.stderr)
        return 1
    console.print(f"wrote {bundle.path / 'report.json'}")
    return 0


def run_trt_build(args) -> int:
    from moeexport.backends.tensorrt import Bundle, status

    for name in ("context", "max_prompt"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise MoeExportError(f"--{name.replace('_', '-')} must be at least 1")
    bundle = Bundle(args.bundle)  # a wrong path or a partial copy is reported before TensorRT is looked for
    found = status()
    if not found.available:
        raise MoeExportError(found.reason)
    workspace = int(args.workspace * 2**30) if args.workspace else None
    code = _finish_tensorrt(bundle, args.precision, workspace, args.context, args.max_prompt, args.verbose)
    if args.json:
        print((bundle.path / "report.json").read_text(), end="")
    return code


# --- validate / chat --------------------------------------------------------------------


RUNNABLE = {".gguf": "gguf", ".onnx": "onnx"}  # artifact suffix -> the target that runs it


def _artifact(path: str, suffixes=tuple(RUNNABLE)) -> tuple[Path, str]:
    """(path, target) of an artifact file this command can run."""
    artifact = Path(path)
    if not artifact.is_file():
        raise MoeExportError(f"{path} is not a file")
    if artifact.suffix not in suffixes:
        raise MoeExportError(f"{path}: this command runs {' and '.join(suffixes)} artifacts")
    return artifact, RUNNABLE[artifact.suffix]


def run_validate(args) -> int:
    from moeexport.backends import backend_for
    from moeexport.evaluate import eval_windows
    from moeexport.modelio import load, load_tokenizer
    from moeexport.validate import TorchRunner, compare

    artifact, target = _artifact(args.artifact)
    backend = backend_for(target)
    reference, tokenizer = load(args.reference), load_tokenizer(args.reference)
    windows = eval_windows(tokenizer, args.text, args.length, args.windows)
    with _progress() as progress:
        fidelity = compare(TorchRunner(reference), backend.Runner(artifact, context=args.length), windows, progress)
    if args.json:
        print(json.dumps(fidelity.to_dict(), indent=2))
        return 0
    _console().print(
        f"{artifact} vs {args.reference} on {fidelity.tokens} tokens of {args.text}: max |delta logit| "
        f"{fidelity.max_abs_logit:.2e}, KL {fidelity.kl:.2e}, top-1 agreement {fidelity.top1_agreement:.2%}, "
        f"perplexity {fidelity.reference_perplexity:.3f} (reference) vs {fidelity.perplexity:.3f}"
    )
    return 0


def run_chat(args) -> int:
    from moeexport.backends import backend_for

    runner = backend_for("gguf").Runner(_artifact(args.model_file, (".gguf",))[0], context=args.context, exact=False,
                                        logits=False)
    messages = [{"role": "system", "content": args.system}] if args.system else []

    def reply(prompt: str) -> None:
        messages.append({"role": "user", "content": prompt})
        pieces = []
        for piece in runner.chat(messages, max_tokens=args.max_tokens, temperature=args.temperature):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(pieces)})

    if args.prompt is not None:
        reply(args.prompt)
        return 0
    print(f"chatting with {args.model_file}; Ctrl-D or Ctrl-C to leave", file=sys.stderr)
    try:
        while True:
            prompt = input("> ")
            if prompt.strip():
                reply(prompt)
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr)
    return 0


# --- eval -------------------------------------------------------------------------------


def run_eval(args) -> int:
    from moeexport.evaluate import eval_windows, evaluate
    from moeexport.modelio import load

    if args.length < 2 or args.max_sequences < 1:
        raise MoeExportError("--length must be at least 2 and --max-sequences at least 1")
    model, tokenizer = _load(args)
    reference = load(args.reference, args.dtype, args.trust_remote_code) if args.reference else None
    if reference is not None and reference.config.vocab_size != model.config.vocab_size:
        raise MoeExportError("--reference has a different vocabulary than MODEL; compare models that share a tokenizer")
    windows = eval_windows(tokenizer, args.text, args.length, args.max_sequences)
    with _progress() as progress:
        result = evaluate(model, windows, reference=reference, progress=progress)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    line = f"{args.model} on {args.text} ({result.tokens} tokens): perplexity {result.perplexity:.3f}"
    if reference is not None:
        line += (
            f"; reference perplexity {result.reference_perplexity:.3f}, KL(reference || model) {result.kl:.5f}, "
            f"top-1 agreement {result.top1_agreement:.2%}"
        )
    _console().print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _quiet_transformers()
        return args.run(args)
    except MoeExportError as error:
        print(f"moeexport {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
