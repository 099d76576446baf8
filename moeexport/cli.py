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
  moeexport chat out/demo-gguf/model-f32.gguf --prompt "Once upon a time"

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
    build.add_argument("--quant", default="f32", help="weight type (gguf: f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k; default f32)")
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
    build.set_defaults(run=run_build, dry_run=False)

    validate = commands.add_parser(
        "validate", formatter_class=formatter,
        help="compare an artifact's logits with a torch model",
        description="Run ARTIFACT (a .gguf file) and the torch REFERENCE on the same held-out windows and report "
        "max |delta logit|, KL(reference || artifact), top-1 agreement and both perplexities. Exact settings "
        "(F32 KV cache, flash attention off) are used, so an F32 artifact should agree to ~1e-5.",
    )
    validate.add_argument("artifact", metavar="ARTIFACT", help="the exported file (.gguf)")
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


def run_build(args) -> int:
    import shutil

    from moeexport.backends import backend_for

    backend = backend_for(args.target)  # before any work: nothing is compressed for a target we cannot export
    malformed = [item for item in args.tensor_type if "=" not in item]
    if malformed:
        raise MoeExportError(f"--tensor-type takes PATTERN=TYPE, got {malformed[0]!r}")
    args.tensor_types = dict(item.rsplit("=", 1) for item in args.tensor_type)
    if args.quant not in backend.QUANT_TYPES:
        raise MoeExportError(f"--quant {args.quant} is not a {args.target} type; choose one of {', '.join(backend.QUANT_TYPES)}")
    model, tokenizer, original, provider, result = _compress(args)
    backend.check(model, args.quant)
    quality = _quality_vs_original(args, model, tokenizer, original)
    imatrix = None
    if args.imatrix:
        from moeexport.calibration.moments import input_moments

        imatrix = input_moments(model, provider.tokens(model), batch_size=args.batch_size)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)  # _compress already refused an existing --out without --overwrite
    out.mkdir(parents=True)
    try:
        manifest = _manifest(args, provider, result, quality)
        return _export_validate_profile(args, backend, model, tokenizer, out, manifest, imatrix)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # an error leaves nothing that looks like a build
        raise


def _export_validate_profile(args, backend, model, tokenizer, out: Path, manifest: dict, imatrix) -> int:
    from moeexport.modelio import save
    from moeexport.validate import TorchRunner, compare

    started = time.perf_counter()
    save(model, out / "compressed", manifest)
    artifact = backend.export(
        model,
        out / f"model-{args.quant}.{backend.EXTENSION}",
        quant=args.quant,
        tensor_types=args.tensor_types,
        imatrix=imatrix,
    )
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
        "tensor_types": args.tensor_types,
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
        f"peak memory {speed['peak_rss_bytes'] / 2**20:.0f} MiB"
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


# --- validate / chat --------------------------------------------------------------------


def _gguf_file(path: str) -> Path:
    artifact = Path(path)
    if not artifact.is_file():
        raise MoeExportError(f"{path} is not a file")
    if artifact.suffix != ".gguf":
        raise MoeExportError(f"{path}: only .gguf artifacts can be run in this release")
    return artifact


def run_validate(args) -> int:
    from moeexport.backends import backend_for
    from moeexport.evaluate import eval_windows
    from moeexport.modelio import load, load_tokenizer
    from moeexport.validate import TorchRunner, compare

    artifact = _gguf_file(args.artifact)
    backend = backend_for("gguf")
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

    runner = backend_for("gguf").Runner(_gguf_file(args.model_file), context=args.context, exact=False, logits=False)
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
