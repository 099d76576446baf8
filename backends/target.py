"""The one contract every deployment target implements, and what passes between a target and the pipeline.

A target knows its format and nothing else: the pipeline (moeexport.pipeline)
compresses, records the torch reference, calls `check` and `export`, judges the
artifact with `validate_artifact` through the target's `runner` and
`tolerance`, profiles it and lets the target `finish` (TensorRT writes its
device bundle there). Options are a strict pydantic model per target, so a
flag that belongs to another target is refused here, once, for every caller;
the command line offers each field of each registered target's Options as a
build flag (a field's `json_schema_extra` may spell its flag and metavar).

What other rooms would otherwise compute on a target's behalf is a hook here,
so that one copy of each format rule lives in its backend: the weight bytes a
decoded token reads (`token_bytes`: search, bench), the layout and sizes of the
files a trimmed model would give (`layout`, `sizer`: search), and the step that
measures an artifact built from an artifact of the same format against it
(`input_comparison`, `quality_vs_input`: the pipeline).
"""

from __future__ import annotations

import importlib.util

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from moeexport.errors import MoeExportError
from moeexport.validate import RecordedReference, Tolerance, Validation


class TargetOptions(BaseModel):
    """A target's export options; unknown names are errors, values are checked once."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class ExportInputs:
    """What the pipeline hands an exporter besides the model."""

    tokenizer: object = None  # written beside artifacts that carry one (ONNX for onnxruntime-genai)
    weight_grid: object = None  # moeexport.quantization.WeightGrid of a quantize pass, carried exactly where possible
    imatrix: object = None  # calibration.moments.InputMoments, for targets that weigh their rounding by it
    reference: RecordedReference | None = None  # the compressed torch model's logits on the validation windows
    manifest: dict = field(default_factory=dict)  # the compression record (moeexport.json)
    source: object = None  # moeexport.source.Source: the model the build read (a GGUF input, which file)


@dataclass
class Artifact:
    path: Path  # the file a runner loads
    representation: str  # how the model is written, in words
    fallbacks: list[str] = field(default_factory=list)  # where the file is not what was asked, and why
    extra_files: list[Path] = field(default_factory=list)  # written beside it (external data, configs, tokenizer)
    # the importance matrix its rounding was weighed by: {"source": "measured" or the file given, "file": the
    # measured one as written beside the artifact (not part of it)}; None: none
    imatrix: dict | None = None

    def files(self) -> dict[str, int]:
        """Every file of the artifact with its size in bytes."""
        paths = [self.path, *self.extra_files]
        return {path.name: path.stat().st_size for path in paths if path.is_file()}


@dataclass(frozen=True)
class Finished:
    """What a target's `finish` adds to the build report."""

    engine: dict | None = None  # a device step's result
    files: dict[str, int] | None = None  # every file of the artifact with its bytes, where Artifact.files misses some
    failures: tuple[str, ...] = ()  # the device step's


@dataclass(frozen=True)
class FileSize:
    """What a file a target would write weighs: its bytes, and the weight bytes one decoded token reads."""

    file_bytes: int
    token_bytes: int


class Sizer(Protocol):
    """Sizes the files a target would write for trimmed copies of one model (`Target.sizer`)."""

    def size(self, layout, kept: list[int | None]) -> FileSize:
        """The file of the trimmed copy whose `Target.layout` is `layout`; `kept` maps each decoder block of the
        untrimmed model to its index in the trimmed one (None: dropped)."""


class Target(ABC):
    name: ClassVar[str]
    extension: ClassVar[str]
    quant_types: ClassVar[tuple[str, ...]]
    tolerances: ClassVar[dict[str, Tolerance]]
    Options: ClassVar[type[TargetOptions]] = TargetOptions
    runs_files: ClassVar[bool] = True  # whether its runner loads a file of `extension` alone (validate, bench)
    # weight types `search` sizes and measures, largest first; none (the default): search refuses the target, which
    # then need not give `layout` and `sizer`
    search_types: ClassVar[tuple[str, ...]] = ()
    # (import name, pip distribution) of what exporting and validating here need, and the extra that installs them
    requires: ClassVar[tuple[tuple[str, str], ...]] = ()
    extra: ClassVar[str | None] = None  # None: the target's name

    def check_installed(self) -> None:
        """Refuse a build whose export or validation would fail for a missing package, before any work: found
        without importing anything (import torch takes seconds; the build would take minutes)."""
        missing = [distribution for module, distribution in self.requires if importlib.util.find_spec(module) is None]
        if missing:
            extra = self.extra or self.name
            raise MoeExportError(f"the {self.name} target needs {' and '.join(missing)}, which this Python lacks: pip "
                                 f"install 'moeexport[{extra}]' (in a clone of moeexport: pip install -e '.[{extra}]')")

    def options(self, given: dict | TargetOptions | None = None) -> TargetOptions:
        """`given` validated into this target's options (a one-line error names the offending option)."""
        if isinstance(given, self.Options):
            return given
        try:
            return self.Options(**(given or {}))
        except ValidationError as error:
            problem = error.errors()[0]
            option = "--" + str(problem["loc"][0]).replace("_", "-") if problem["loc"] else "options"
            if problem["type"] == "extra_forbidden":
                own = ", ".join("--" + name.replace("_", "-") for name in self.Options.model_fields) or "none"
                raise MoeExportError(f"{option} is not an option of the {self.name} target (its options: {own})") from None
            raise MoeExportError(f"{option}: {problem['msg'].removeprefix('Value error, ')}") from None

    def default_quant(self, model) -> str:
        """The weight type a build of MODEL gets without --quant."""
        return "f32"

    def check_quant(self, quant: str) -> None:
        if quant not in self.quant_types:
            raise MoeExportError(f"--quant {quant} is not a {self.name} type; choose one of {', '.join(self.quant_types)}")

    def tolerance(self, quant: str, source=None) -> Tolerance:
        """What an artifact of weight type `quant` (built from `source`, a moeexport.source.Source) must reach
        against the torch model."""
        return self.tolerances[quant]

    def context_of(self, path: Path) -> int | None:
        """The context an artifact file's model was trained for, where the file says (None: it does not)."""
        return None

    def quant_of(self, path: Path) -> str | None:
        """The weight type an artifact file was written with, where the file says (None: unknown)."""
        return None

    def wants_imatrix(self, options: TargetOptions) -> bool:
        """Whether export needs the calibration set's input moments (ExportInputs.imatrix)."""
        return False

    @abstractmethod
    def check(self, model, quant: str, options: TargetOptions) -> None:
        """Raise MoeExportError before anything is written if the model cannot be exported this way."""

    @abstractmethod
    def export(self, model, directory: Path, quant: str, options: TargetOptions, inputs: ExportInputs) -> Artifact:
        """Write the artifact into `directory` (a staging directory the pipeline renames when the build is done)."""

    @abstractmethod
    def runner(self, path: Path, context: int):
        """A runner with `logits(token_ids)`, `generate(...)` and `profile(...)` on the artifact at `path`."""

    def serving_runner(self, path: Path, context: int, threads: int | None = None):
        """The runner as a deployment would configure it, for profiling (default: the validation runner).
        `threads`: CPU threads the runtime computes with (None: the physical cores); a GPU runtime ignores it."""
        return self.runner(path, context)

    def chat_runner(self, path: Path, context: int, threads: int | None = None):
        """A runner whose `generate` serves `moeexport chat` on the artifact at `path`, computing with `threads`
        CPU threads (None: the physical cores) (default: the target has none)."""
        raise MoeExportError(f"moeexport chat does not run {self.name} artifacts")

    def model_reader(self):
        """The module that reads this target's files back as a model: `GGUFFile`-like `read_config`, `layer_specs`,
        a streamed checkpoint and `load_tokenizer` (default: the target's files cannot be read back)."""
        raise MoeExportError(f"a {self.name} artifact cannot be read back as a model")

    def runtime(self) -> str:
        """What runs the artifact here, for the report."""
        return self.name

    def profile(self, artifact: Artifact, prompt: list[int], new_tokens: int = 64,
                threads: int | None = None) -> dict | None:
        """Speed and memory on this machine with `threads` CPU threads (None: the physical cores), in a fresh
        process so the numbers are the runtime's alone."""
        from moeexport.backends.profile import profile_in_subprocess

        return profile_in_subprocess(self.name, artifact.path, prompt, new_tokens, threads=threads)

    def finish(self, artifact: Artifact, validation: Validation, inputs: ExportInputs, progress=None) -> Finished:
        """Work after validation (e.g. a device bundle's manifest), and what the report should add (default:
        nothing)."""
        return Finished()

    def stored_files(self, path: Path) -> list[Path]:
        """The files the artifact at `path` may be stored in, `path` first (default: that file alone)."""
        return [path]

    def token_bytes(self, path: Path):
        """The weight bytes one decoded token of the artifact at `path` reads (a backends.decoding.TokenBytes).
        Default: the target does not count them, and says so."""
        raise MoeExportError(f"the {self.name} target does not count the bytes a decoded token reads")

    def layout(self, model):
        """How this target would lay MODEL out in a file, whatever its weight type, as `sizer` reads it: plain data
        whose `num_experts` is the routed experts every MoE layer of the file holds. Raises MoeExportError where
        MODEL cannot be written. Default: the target cannot size its files (`search_types` is empty)."""
        raise MoeExportError(f"the {self.name} target cannot size the files it would write")

    def sizer(self, untrimmed: Path) -> Sizer:
        """Sizes this target's files of trimmed copies of the model in `untrimmed` (this target's file of that model
        before trimming, in the weight type to size): exact for the untrimmed model itself. Default: as `layout`."""
        raise MoeExportError(f"the {self.name} target cannot size the files it would write")

    def input_comparison(self, model) -> str | None:
        """When MODEL is itself an artifact of this target (a GGUF built from a GGUF), the build also measures its
        artifact against MODEL, both run by this target (`quality_vs_input`): the words that announce that step.
        None, the default: MODEL is not one, and there is no such step."""
        return None

    def quality_vs_input(self, model, artifact_runner, windows, where: str) -> dict:
        """The artifact (its `artifact_runner`) against the input artifact MODEL, run by this target in a fresh
        process, on the token `windows` of the text `where`: validate.compare's numbers."""
        from moeexport.backends.profile import logits_in_subprocess
        from moeexport.validate import compare

        reference, _ = logits_in_subprocess(self.name, model, windows, windows.shape[1])
        fidelity = compare(reference, artifact_runner, windows)
        return {"text": where, **asdict(fidelity)}
