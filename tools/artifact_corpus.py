"""Every kind of file moeexport writes, hashed: a change that claims to change no output proves it here.

Builds, with `moeexport.build`, each family's tiny random model (the tests' configs, the demo
model's tokenizer) through every structure (full, Block / Layer / Expert Drop, global Expert
Drop, merging, quantization) into every target and type, plus GGUF -> GGUF builds and streamed
builds, and records the sha256 of every file a build writes except its reports (which hold
timings). A build that is refused records its one-line error instead: refusals are outputs too.

    python tools/artifact_corpus.py --out before.json           # on the old tree
    python tools/artifact_corpus.py --out after.json --compare before.json

Cases run at one fixed path (--work), so that paths written into manifests agree between trees.
Every streamed case must also hash like its in-memory twin (its artifact files: a streamed save shards
the compressed checkpoint by layer); the tool checks that itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.tiny_models: the suite's family configs

REPORTS = {"report.json", "report.html"}
VOLATILE_KEYS = {"created"}  # a JSON file's top-level keys that hold the time of the build (bundle.json)
HELD_OUT = Path(__file__).resolve().parents[1] / "tests" / "held_out_text.txt"  # the same windows for every case
STRUCTURES = {
    "full": [],
    "block_drop": [{"block_drop": {"n": 1, "score": "random"}}],
    "layer_drop": [{"layer_drop": {"n": 1, "score": "random"}}],
    "expert_drop": [{"expert_drop": {"keep": 3, "score": "random"}}],
    "expert_drop_reap_global": [{"expert_drop": {"keep": 3, "scope": "global", "min_keep": 2}}],
    "merge": [{"merge": {"keep": 2}}],
    "rtn_int4": [{"quantize": {"method": "rtn", "bits": 4, "group_size": 16}}],
}
# (target, quant, target options) built for every structure, and those built for the full model only
EVERY_STRUCTURE = [("gguf", "f32", {}), ("onnx", "f32", {})]
FULL_ONLY = [("gguf", quant, {}) for quant in ("f16", "bf16", "q8_0", "q4_0", "q4_k_m")] + [
    ("onnx", "f16", {})] + [("onnx", quant, {"block_size": 16}) for quant in ("int8", "int4")] + [
    ("onnx", "f32", {"moe_ops": "plain"}), ("onnx", "f32", {"moe_ops": "plain-routed"}), ("tensorrt", "f16", {})]
QUANTIZED_PASS = [("gguf", "q4_0", {}), ("onnx", "int4", {"block_size": 16})]  # the pass's codes carried exactly


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # a family (its tiny checkpoint) or another case's artifact
    passes: list = field(default_factory=list)
    target: str = "gguf"
    quant: str = "f32"
    target_options: dict = field(default_factory=dict)
    stream: bool | None = None  # None: as the build decides (a GGUF input always streams)


def cases(families: list[str]) -> list[Case]:
    built = []
    for family in families:
        for structure, passes in STRUCTURES.items():
            exports = EVERY_STRUCTURE + (FULL_ONLY if structure == "full" else [])
            exports += QUANTIZED_PASS if structure == "rtn_int4" else []
            for target, quant, options in exports:
                suffix = "".join(f"-{value}" for value in options.values())
                built.append(Case(f"{family}/{structure}/{target}-{quant}{suffix}", family, passes, target, quant,
                                  options))
        for structure in ("full", "expert_drop"):
            built.append(Case(f"{family}/{structure}/gguf-f32-streamed", family, STRUCTURES[structure],
                              stream=True))
        built.append(Case(f"{family}/full/onnx-f32-streamed", family, [], "onnx", stream=True))
        source = f"{family}/full/gguf-f16"
        built.append(Case(f"{family}/gguf-input/keep", source, [], quant="keep"))
        built.append(Case(f"{family}/gguf-input/expert_drop-q8_0", source, STRUCTURES["expert_drop"], quant="q8_0"))
    return built


def tiny_checkpoint(family: str, directory: Path) -> Path:
    """The suite's tiny `family` model with the demo model's 2048-piece tokenizer, saved as a checkpoint."""
    from moeexport.checkpoint_files import DEMO_MODEL
    from tests.tiny_models import TINY_CONFIGS, tiny_model

    overrides = {"mlp_only_layers": []} if family == "qwen2_moe" else {}  # GGUF hosts need MoE in every layer
    if "moe_intermediate_size" in TINY_CONFIGS[family]:
        overrides["moe_intermediate_size"] = 32  # a multiple of the 16-wide blocks and groups quantized here
    model = tiny_model(family, vocab_size=2048, **overrides)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(DEMO_MODEL / name, directory / name)
    return directory


def file_hashes(directory: Path) -> dict[str, str]:
    return {str(path.relative_to(directory)): hashlib.sha256(_stable_bytes(path)).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file() and path.name not in REPORTS}


def _stable_bytes(path: Path) -> bytes:
    """The file's bytes; a JSON object's without the keys that hold the time it was written."""
    data = path.read_bytes()
    if path.suffix != ".json" or not VOLATILE_KEYS & set(loaded := json.loads(data)):
        return data
    return json.dumps({key: value for key, value in loaded.items() if key not in VOLATILE_KEYS}).encode()


def run_case(case: Case, model: Path, out: Path, held_out: Path) -> dict[str, str] | str:
    import moeexport
    from moeexport.errors import MoeExportError

    calibration = moeexport.CalibrationOptions(samples=4, length=32, cache=False)
    # the compressed checkpoint's bytes are outputs too: saved from every checkpoint input (a GGUF input's, in
    # float32, is not one the corpus records)
    options = moeexport.BuildOptions(out=str(out), calibration=calibration, eval_text=str(held_out),
                                     measure_quality=False, quant=case.quant,
                                     target_options=case.target_options, validation_windows=(2, 32), profile=False,
                                     stream=case.stream, save_checkpoint=model.suffix != ".gguf")
    try:
        report = moeexport.build(str(model), {"passes": case.passes}, case.target, options)
    except MoeExportError as error:
        return f"refused: {error}"
    hashes = file_hashes(out)
    return hashes if report.ok else {"validation": "failed", **hashes}


def model_path(case: Case, work: Path) -> Path:
    if "/" not in case.model:
        checkpoint = work / "checkpoints" / case.model
        return checkpoint if checkpoint.exists() else tiny_checkpoint(case.model, checkpoint)
    return next((work / "builds" / case.model).glob("*.gguf"))


def artifact_files(result: dict | str) -> dict | str:
    """A result without its compressed/ checkpoint (a streamed save shards it by layer, an in-memory one not)."""
    if isinstance(result, str):
        return result
    return {name: digest for name, digest in result.items() if not name.startswith("compressed/")}


def streamed_twin_mismatches(results: dict) -> list[str]:
    twins = {name: name.removesuffix("-streamed") for name in results if name.endswith("-streamed")}
    return [name for name, twin in twins.items() if artifact_files(results[name]) != artifact_files(results.get(twin))]


def compare(results: dict, baseline: dict) -> list[str]:
    names = sorted(set(results) | set(baseline))
    return [name for name in names if results.get(name) != baseline.get(name)]


def main() -> int:
    from moeexport.adapters import supported_families

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file for {case: {file: sha256} | 'refused: ...'}")
    parser.add_argument("--compare", help="a JSON file written before: list every case whose files differ")
    parser.add_argument("--work", default="/tmp/moeexport-artifact-corpus", help="scratch folder, emptied first")
    parser.add_argument("--families", nargs="*", default=None, help="default: every registered family")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    selected = cases(args.families or sorted(supported_families()))
    held_out = work / "held_out.txt"  # at the one fixed path: manifests name the text they were validated on
    shutil.copy(HELD_OUT, held_out)
    results, start = {}, time.monotonic()
    for number, case in enumerate(selected, 1):
        out = work / "builds" / case.name
        out.parent.mkdir(parents=True, exist_ok=True)
        results[case.name] = run_case(case, model_path(case, work), out, held_out)
        state = results[case.name] if isinstance(results[case.name], str) else f"{len(results[case.name])} files"
        print(f"[{number}/{len(selected)} {time.monotonic() - start:.0f}s] {case.name}: {state}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    problems = [f"streamed differs from in-memory: {name}" for name in streamed_twin_mismatches(results)]
    if args.compare:
        problems += [f"differs from {args.compare}: {name}" for name in compare(results, json.loads(
            Path(args.compare).read_text()))]
    print("\n".join(problems) or f"{len(results)} cases, no difference")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
