"""The command line's arguments: every command, option, default and help text (moeexport/cli.py runs them).

The targets (`--target`) and their option flags come from the backend registry: each field of each target's
Options model is a `build` flag (`target_flags`), its help the field's description.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import dataclass

from moeexport import __version__
from moeexport.backends import target_for, target_names
from moeexport.chat import CONTEXT_CAP
from moeexport.errors import MoeExportError

EXAMPLES = """\
examples:
  moeexport analyze demo --out out/analysis
  moeexport compress demo --recipe recipes/trim.yaml --out out/demo-trimmed
  moeexport compress path/to/model --recipe r.yaml --calib calib.txt --dry-run
  moeexport eval out/demo-trimmed --text held_out.txt --reference demo
  moeexport build demo --recipe recipes/demo-gguf.yaml --target gguf --out out/demo-gguf
  moeexport build demo --recipe recipes/trim.yaml --target onnx --quant int4 --out out/demo-onnx --save-checkpoint
  moeexport validate out/demo-onnx/model-int4.onnx --reference out/demo-onnx/compressed --text held_out.txt
  moeexport chat out/demo-gguf/model-f32.gguf --prompt "Once upon a time"
  moeexport bench out/demo-gguf/model-f32.gguf out/demo-onnx/model-f32.onnx --baseline demo --out out/bench
  moeexport search MODEL --target gguf --max-size 30% --calib calib.txt --out recipe.yaml [--build out/fit]
  moeexport build demo --recipe recipes/trim.yaml --target tensorrt --out out/demo-trt
  moeexport trt-build out/demo-trt/bundle --precision fp16        # on the Jetson / CUDA machine

MODEL is a Hugging Face checkpoint directory (safetensors), a directory written
by `moeexport compress`, or `demo` for the small model bundled with moeexport.
"""

RECIPE_HELP = """\
a YAML recipe: an ordered list of passes, e.g.
  passes:
    - block_drop: {n: 1}       # score: perplexity (measured)|kl|similarity|random
    - layer_drop: {n: 1}       # score: perplexity|kl|similarity|random
    - expert_drop: {keep: 6, scope: global, min_keep: 2}
                               # scope: layer|global; score: reap|perplexity|kl|frequency|routing_mass|random
                               # repair: auto (refit where the model takes it)|refit|none
    - merge: {keep: 4}         # M-SMoE; compress: {rank: 32, sparsity: 0.9} for MC-SMoE
    - prune: {method: wanda, sparsity: 0.5}   # or sparsegpt|magnitude; pattern: "2:4"
    - quantize: {method: gptq, bits: 4, group_size: 128}   # or rtn; bits: 8
"""


def _calibration_arguments() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("calibration")
    group.add_argument(
        "--calib",
        metavar="SOURCE",
        help="calibration text: a .txt or .jsonl (field 'text') file, hf:NAME[:CONFIG][@SPLIT] from the local "
        "datasets cache, or 'model' to sample text from the model itself (default: model, for models up to 1 B "
        "parameters; larger ones need a file)",
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
    parent.add_argument("model", metavar="MODEL", help="checkpoint directory, a MoE .gguf file, or 'demo'")
    parent.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="compute dtype (default auto: float32, or the checkpoint's bf16/f16 when a streamed "
                        "run only fits --max-memory that way)")
    parent.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint (off by default)")
    parent.add_argument("--allow-nonfinite", action="store_true",
                        help="load weights that hold NaN or Inf values (refused by default, naming the tensor)")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeexport",
        description="Compress Mixture-of-Experts LLMs (Block / Layer / Expert Drop) and deploy them.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"moeexport {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model, calibration = _model_arguments(), _calibration_arguments()

    def command(name: str, help: str, description: str, parents=()) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=list(parents), formatter_class=argparse.RawDescriptionHelpFormatter,
                                   help=help, description=description)

    analyze = command(
        "analyze", "collect routing and redundancy statistics, print a summary, write plots",
        "Run the calibration set through MODEL layer by layer and report, per layer, expert usage "
        "(tokens per expert), routing mass, REAP saliency, MoE-sublayer and block similarity, and rank the Block "
        "Drop, Layer Drop and Expert Drop candidates by the KL each removal causes alone (measured on the first "
        "calibration tokens; see --measure-damage). Writes statistics.json, PNG plots and report.html to --out; "
        "later recipes on the same model and calibration set reuse the statistics.", [model, calibration])
    analyze.add_argument("--out", default="moeexport-analysis", help="output directory (default moeexport-analysis)")
    analyze.add_argument("--json", action="store_true", help="print the per-layer summary as JSON")
    analyze.add_argument("--measure-damage", action=argparse.BooleanOptionalAction, default=None,
                         help="measure the KL each drop candidate causes (default: for models up to 1 B parameters; "
                              "above, candidates are ranked by similarity and REAP, since measuring takes many passes "
                              "over the model)")
    _memory_arguments(analyze)

    compress = command("compress", "apply a recipe and save the compressed checkpoint",
                       "Apply a recipe to MODEL and save the result, which is itself a valid MODEL everywhere.\n\n"
                       + RECIPE_HELP, [model, calibration])
    _recipe_and_output(compress)
    compress.add_argument("--dry-run", action="store_true", help="print the plan and sizes, write nothing")

    evaluate = command("eval", "perplexity, and KL / top-1 agreement against a reference",
                       "Perplexity of MODEL on a text; with --reference, also KL(reference || MODEL) and top-1 "
                       "agreement per predicted token.", [model])
    evaluate.add_argument("--text", required=True, metavar="FILE", help="a .txt or .jsonl file, or hf:NAME")
    evaluate.add_argument("--reference", metavar="MODEL", help="the model to compare against (e.g. the original)")
    evaluate.add_argument("--length", type=int, default=256, help="tokens per window (default 256)")
    evaluate.add_argument("--max-sequences", type=int, default=32, help="windows scored (default 32)")
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")

    build = command(
        "build", "compress, then export to a deployment target",
        "Compress MODEL with a recipe, then export the result for a target, validate it against the "
        "compressed torch model and profile it on this machine. DIR receives the artifact, report.json and "
        "report.html (plots; with each stage's time and bytes read of MODEL's files against the disk's read "
        "speed), and with --save-checkpoint the compressed checkpoint (compressed/), all at once when the build "
        "is done. A build whose validation misses its tolerance exits 1 and its artifact is renamed *.failed.\n\n"
        + RECIPE_HELP, [model, calibration])
    _recipe_and_output(build)
    build.add_argument("--save-checkpoint", action="store_true",
                       help="also write the compressed torch checkpoint to DIR/compressed/ (what `compress` writes; "
                       "a .gguf MODEL's in float32). No target needs it: the export reads the model in memory, or "
                       "streamed from MODEL's own files, so by default it is not written")
    build.add_argument("--target", required=True, choices=target_names(), help="deployment target")
    build.add_argument(
        "--quant", default=None,
        help="weight type (gguf: f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k, or keep: a .gguf MODEL's own "
        "tensors carried byte for byte; onnx: f32, f16, and int8 / int4 experts in QMoE nodes; tensorrt: f32, "
        "f16 ONNX weights, the engine precision is trt-build's; default f32, and keep for a .gguf MODEL built to "
        "gguf)",
    )
    for flag in target_flags():
        build.add_argument(flag.flag, dest=flag.field, help=flag.help, **flag.parsing())
    build.set_defaults(dry_run=False)

    validate = command(
        "validate", "compare an artifact's logits with a torch model",
        "Run ARTIFACT (a .gguf or .onnx file) and the torch REFERENCE on the same held-out windows and report max "
        "|delta logit|, KL(reference || artifact), top-1 agreement and both perplexities. Exact settings (F32 KV "
        "cache, flash attention off in llama.cpp) are used, so an F32 artifact should agree to ~1e-5. The verdict "
        "is against the --max-* / --min-top1 limits given, else the tolerance of the weight type the file records "
        "(as `build` uses); exit status 1 when it misses.")
    validate.add_argument("artifact", metavar="ARTIFACT", help="the exported file (.gguf or .onnx)")
    validate.add_argument("--reference", required=True, metavar="MODEL", help="the torch model it was exported from")
    validate.add_argument("--text", required=True, metavar="FILE", help="held-out text (.txt / .jsonl)")
    validate.add_argument("--length", type=int, default=256, help="tokens per window (default 256)")
    validate.add_argument("--windows", type=int, default=2, help="windows compared (default 2)")
    validate.add_argument("--max-kl", type=float, metavar="X", help="the verdict's largest KL (nats per token)")
    validate.add_argument("--min-top1", type=float, metavar="P", help="the verdict's smallest top-1 agreement (0-1)")
    validate.add_argument("--max-abs-logit", type=float, metavar="X", help="the verdict's largest |delta logit|")
    validate.add_argument("--json", action="store_true", help="print the result as JSON")

    bench = command(
        "bench", "prefill and decode speed and memory side by side, against the memory-bandwidth bound",
        "Run each ARTIFACT (a .gguf file in llama.cpp, a .onnx file in ONNX Runtime, a checkpoint directory or "
        "'demo' in torch eager) in a fresh process, --repeats times, interleaved across the artifacts so that drift "
        "on the machine reaches all of them alike, and report the median and the range (min - max) of prefill and "
        "decode tokens/s and of resident memory, with each artifact's speeds as ratios to the baseline's.\n\n"
        "Beside each decode speed stands its bound: decoding one token reads every weight it touches once, so it "
        "cannot run faster than memory bandwidth / weight bytes per token. The bytes are counted from the "
        "artifact's own tensors at their stored types (an ONNX graph's f16 weights at float32: ONNX Runtime widens "
        "them when it loads the graph): attention, norms, routers, shared experts and dense FFNs "
        "whole; k of the E experts of each routed expert stack (k/E of its bytes; all of them in an ONNX graph "
        "with --moe-ops plain, which computes every expert); the output head whole; one row of the token "
        "embedding. KV-cache reads are left out (they grow with the context): the bound is the weights' alone. "
        "The bandwidth is measured here first: torch.sum over a float32 buffer of max(1 GiB, 4x the last-level "
        "cache), with the runtimes' thread count, median of 5 runs. The fraction printed is the median decode "
        "speed over the bound.")
    bench.add_argument("artifacts", nargs="+", metavar="ARTIFACT",
                       help="a .gguf or .onnx file, a checkpoint directory, or 'demo'")
    bench.add_argument("--baseline", metavar="ARTIFACT",
                       help="the artifact the ratios are to (default: the first; benchmarked too when not listed)")
    bench.add_argument("--repeats", type=int, default=3, metavar="N", help="runs of each artifact (default 3)")
    bench.add_argument("--prompt-tokens", type=int, default=128, metavar="N", help="prompt length (default 128)")
    bench.add_argument("--new-tokens", type=int, default=32, metavar="N",
                       help="greedy decode steps timed per run (default 32)")
    bench.add_argument("--threads", type=int, metavar="N",
                       help="CPU threads of every runtime and of the bandwidth probe (default: every core)")
    bench.add_argument("--bandwidth-buffer", metavar="SIZE",
                       help="bytes summed to measure bandwidth, e.g. 4GiB (default: max(1 GiB, 4x the last-level "
                       "cache), at most a quarter of the available memory)")
    bench.add_argument("--out", metavar="DIR", help="write report.json and report.html (with the plot) there")
    bench.add_argument("--json", action="store_true",
                       help="print the report as one JSON document (progress goes to stderr)")

    search = command(
        "search", "find the recipe and weight type with the lowest KL that fits a size or speed budget",
        "From one set of calibration statistics, apply every trimming recipe of a small grid (block_drop n, "
        "layer_drop n, global expert_drop keep; each pass with its default score) to MODEL in memory, export the "
        "untrimmed model once per weight type and run it in llama.cpp, and score every trimming x type by "
        "KL(original || candidate) on the calibration tokens: KL(trimming) + KL(type), an additive estimate. "
        "Sizes are the untrimmed files' exact tensor bytes less what the trimming removes (expert stacks at the "
        "largest count of any layer: the GGUF pads every layer to it); decode speedups are bytes read per "
        "decoded token against the untrimmed F16 GGUF (the memory-bandwidth bound). The candidates that meet "
        "the constraint by estimate are then exported for real, best first (--verify), and the first whose file "
        "meets it is chosen. Prints the Pareto front (size vs KL) and the choice; --out writes the recipe, with "
        "the build flags it assumes in its header; --build DIR builds it.",
        [model, calibration])
    searched = _searched_types()
    search.add_argument("--target", required=True, choices=target_names(),
                        help=f"deployment target ({', '.join(searched)}; the others are not searched yet)")
    limit = search.add_mutually_exclusive_group(required=True)
    limit.add_argument("--max-size", metavar="P%", help="at most this share of the untrimmed model's F16 GGUF, e.g. 30%%")
    limit.add_argument("--max-bytes", metavar="SIZE", help="at most this many bytes, e.g. 16GB or 3.5GiB")
    limit.add_argument("--min-decode-speedup", metavar="Nx",
                       help="at least this decode speedup over the untrimmed F16 GGUF, bandwidth-bound (bytes read "
                       "per decoded token), e.g. 3x")
    search.add_argument("--out", metavar="FILE.yaml", help="write the chosen recipe here (its build flags in a comment)")
    search.add_argument("--build", metavar="DIR", help="then build the chosen recipe and type into DIR (moeexport build)")
    search.add_argument("--overwrite", action="store_true", help="replace --out and --build if they exist")
    search.add_argument("--eval-text", metavar="FILE",
                        help="held-out text for --build's validation and quality check (never used for choosing)")
    search.add_argument("--block-drop", default="0,1,2", metavar="N,...", help="blocks dropped (default 0,1,2)")
    search.add_argument("--layer-drop", default="0,1,2,3", metavar="N,...",
                        help="MoE sublayers dropped (default 0,1,2,3; counts the model cannot take are skipped)")
    search.add_argument("--expert-keep", default="1,0.75,0.5", metavar="SHARE,...",
                        help="experts kept per MoE layer on average, as shares of E (default 1,0.75,0.5; global "
                        "expert_drop with min_keep = top-k)")
    defaults = "; ".join(f"{name}: {','.join(types)}" for name, types in searched.items())
    search.add_argument("--quant-types", metavar="TYPE,...", help=f"weight types searched (default {defaults})")
    search.add_argument("--verify", type=int, default=3, metavar="N",
                        help="candidates exported for real, best first, until one meets the limit (default 3; 0: "
                        "trust the estimates)")
    search.add_argument("--file-windows", type=int, default=8, metavar="N",
                        help="calibration sequences each GGUF is run on in llama.cpp for its KL (default 8)")
    search.add_argument("--max-memory", metavar="SIZE",
                        help="most memory the run may hold (default: 75%% of the memory available at start); "
                        "search holds the model in memory")
    search.add_argument("--json", action="store_true", help="print the report as one JSON document (logs go to stderr)")

    chat = command("chat", "chat with a GGUF model in llama.cpp",
                   "Interactive local chat with a GGUF file, as llama-cli or `ollama run`: tokens stream as they are "
                   "generated; turns use the file's chat template, or ChatML turns when it has none. Ctrl-C stops a "
                   "reply; Up and Down recall earlier lines (kept in the cache directory); /help lists the commands "
                   "(/set temperature X, /clear, /bye). Ctrl-D, /bye or Ctrl-C twice at the prompt leave.")
    chat.add_argument("model_file", metavar="FILE.gguf")
    chat.add_argument("--prompt", help="answer one prompt and exit")
    chat.add_argument("--system", help="a system message for the conversation")
    chat.add_argument("--max-tokens", type=int, default=256, help="longest reply (default 256)")
    chat.add_argument("--temperature", type=float, default=0.7, help="sampling temperature, 0: greedy (default 0.7)")
    chat.add_argument("-c", "--ctx-size", "--context", dest="ctx_size", type=int, metavar="N",
                      help=f"context length in tokens, the conversation and the reply (default: the model's, at most "
                           f"{CONTEXT_CAP})")
    chat.add_argument("--threads", type=int, metavar="N", help="CPU threads llama.cpp computes with (default: the "
                      "physical cores; fewer when other work shares the machine)")

    trt_build = command(
        "trt-build", "on the device: build the TensorRT engine of a bundle, validate and profile it",
        "Build a TensorRT engine from BUNDLE (written by `build --target tensorrt`) on this machine's "
        "GPU, compare its logits with the bundled torch reference, profile it and write BUNDLE/report.json. "
        "Needs tensorrt (JetPack 6.x: TensorRT 10.3) and torch with CUDA. An engine that misses its tolerance "
        "exits 1 and is renamed *.failed.")
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
    return parser


THREADS_HELP = ("CPU threads torch computes with and the profiled runtime runs on (default: torch's own, and the "
                "physical cores for the runtime; fewer when other work shares the machine)")


def _recipe_and_output(command: argparse.ArgumentParser) -> None:
    command.add_argument("--recipe", required=True, metavar="FILE", help="YAML recipe (see above)")
    command.add_argument("--out", metavar="DIR", help="output directory (required unless --dry-run)")
    command.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _memory_arguments(command)
    command.add_argument(
        "--eval-text", metavar="FILE",
        help="held-out text for the quality and validation checks (default: text sampled from the model; "
        "required above 1 B parameters and when streamed)",
    )
    command.add_argument("--no-eval", action="store_true", help="skip the quality check against the original")
    command.add_argument("--threads", type=int, metavar="N", help=THREADS_HELP)
    command.add_argument("--json", action="store_true", help="print the report as one JSON document (logs go to stderr)")


def _memory_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--max-memory", metavar="SIZE",
                         help="most memory the run may hold, e.g. 16GB or 3.5GiB (default: 75%% of the memory "
                         "available at start). A model that does not fit whole is streamed one decoder layer (and "
                         "one expert) at a time; one that cannot fit even so is refused before any work")
    command.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                         help="force (--stream) or forbid (--no-stream) reading one decoder layer at a time "
                         "(default: stream when the whole model does not fit --max-memory)")


def _searched_types() -> dict[str, tuple[str, ...]]:
    """Target -> the weight types `search` measures by default, for the targets it searches."""
    searched = {name: target_for(name).search_types for name in target_names()}
    return {name: types for name, types in searched.items() if types}


@dataclass(frozen=True)
class TargetFlag:
    """One field of a target's Options as a `build` flag."""

    field: str  # the Options field, and the parsed arguments' attribute
    flag: str  # "--" + the field in kebab case, unless the field's json_schema_extra names another
    help: str  # the field's description
    kind: type  # of the field's value (a Literal's choices: `choices`)
    metavar: str | None = None
    choices: tuple | None = None
    switch_or_value: bool = False  # a `bool | str` field: the flag alone is True, the flag with a value that value

    def parsing(self) -> dict:
        """How argparse reads the flag: a switch (bool), repeated KEY=VALUE items (dict), or one value; None when
        not given, so that a given 0 or empty value reaches the target's own check."""
        if self.switch_or_value:
            return {"nargs": "?", "const": True, "default": None, "metavar": self.metavar}
        if self.kind is bool:
            return {"action": "store_true", "default": None}
        if self.kind is dict:
            return {"action": "append", "metavar": self.metavar}
        return {"type": self.kind, "metavar": self.metavar, "choices": self.choices}

    def value(self, given):
        """The option's value from the parsed argument (a dict's KEY=VALUE items made a dict)."""
        if self.kind is not dict or given is None:
            return given
        malformed = [item for item in given if "=" not in item]
        if malformed:
            raise MoeExportError(f"{self.flag} takes {self.metavar}, got {malformed[0]!r}")
        return dict(item.rsplit("=", 1) for item in given)


def target_flags() -> list[TargetFlag]:
    """Every registered target's option fields as flags, in registry order; a field several targets share is one
    flag (each target validates its own options)."""
    flags = {}
    for name in target_names():
        for field, info in target_for(name).Options.model_fields.items():
            flags.setdefault(field, _target_flag(field, info))
    return list(flags.values())


def _target_flag(field: str, info) -> TargetFlag:
    extra = info.json_schema_extra or {}
    kind = info.annotation
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # an optional value: X | None
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
    kind = type(choices[0]) if choices else typing.get_origin(kind) or kind
    return TargetFlag(field, extra.get("flag", "--" + field.replace("_", "-")), info.description or "", kind,
                      extra.get("metavar"), choices, typing.get_args(info.annotation) == (bool, str))
