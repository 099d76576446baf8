"""The GGUF target: files that stock llama.cpp runs. Installed as moeexport.backends.gguf."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from moeexport.backends.gguf.architectures import ARCHITECTURES
from moeexport.backends.decoding import TokenBytes
from moeexport.backends.gguf.runner import GGUFRunner, bytes_per_token
from moeexport.backends.gguf.types import KEEP, LLAMA_FTYPES, QUANT_TYPES, TOLERANCES
from moeexport.backends.target import Artifact, ExportInputs, Target, TargetOptions
from moeexport.validate import Tolerance

EXTENSION = "gguf"
Runner = GGUFRunner


class GGUFOptions(TargetOptions):
    tensor_types: dict[str, str] = Field(  # regex on GGUF tensor names -> ggml type; the first match wins
        {}, json_schema_extra={"flag": "--tensor-type", "metavar": "PATTERN=TYPE"},
        description="per-tensor type override, a regex on GGUF tensor names, e.g. --tensor-type _exps=q4_k "
        "--tensor-type attn_=q8_0 (repeatable; the first match wins)")
    imatrix: bool | str = Field(  # weigh llama.cpp's rounding by the calibration set's input moments, or a file's
        False, json_schema_extra={"metavar": "FILE"},
        description="weigh quantization by an importance matrix measured on the calibration set (per expert, "
        "from its routed tokens; experts without tokens use their layer's average and are reported), written "
        "beside the artifact as imatrix.gguf for llama-quantize; --imatrix FILE uses llama.cpp's imatrix file "
        "(llama-imatrix's .gguf or legacy .dat) instead of measuring")

    @field_validator("imatrix")
    @classmethod
    def _readable_imatrix_file(cls, value: bool | str) -> bool | str:
        if isinstance(value, str):  # read now, before the model is: a wrong file fails in a second
            from moeexport.backends.gguf.imatrix_file import read

            read(value)
        return value


class GGUFTarget(Target):
    name = "gguf"
    extension = EXTENSION
    requires = (("gguf", "gguf"), ("llama_cpp", "llama-cpp-python"))
    quant_types = QUANT_TYPES
    tolerances = TOLERANCES
    Options = GGUFOptions
    search_types = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")

    def wants_imatrix(self, options: GGUFOptions) -> bool:
        return options.imatrix is True  # measured; a file's is read at export

    def default_quant(self, model) -> str:
        return KEEP if str(model).endswith(f".{EXTENSION}") else "f32"  # a GGUF input keeps its types (and codes)

    def tolerance(self, quant: str, source=None) -> Tolerance:
        if quant == KEEP:  # carried codes are judged by the tolerance of the input's own type
            quant = self.quant_of(source.path) if source is not None else None
            quant = quant if quant in self.tolerances else "q4_0"  # (a type we do not write)
        host = ARCHITECTURES.get(getattr(getattr(source, "config", None), "model_type", None))
        if quant == "f32" and host is not None and host.fp16_activation:  # llama.cpp's fp16 GELU table
            quant = "f16"
        return self.tolerances[quant]

    def check(self, model, quant: str, options: GGUFOptions) -> None:
        check(model, quant, options.tensor_types)
        if options.imatrix:
            from moeexport.adapters import adapter_for
            from moeexport.errors import MoeExportError

            adapter = adapter_for(model.config)
            mixers = sorted(set(adapter.model_config(model.config).layer_mixers) - {"attention"})
            if mixers:
                raise MoeExportError(f"--imatrix measures attention projections' inputs, which {adapter.family}'s "
                                     f"{' and '.join(mixers)} layers do not have yet: build without --imatrix")
            if isinstance(options.imatrix, str):  # the model's tensors against the file, before the build's work
                from moeexport.backends.gguf.imatrix_file import read
                from moeexport.backends.gguf.writer import check_imatrix_file

                check_imatrix_file(model, read(options.imatrix), quant, options.tensor_types)

    def export(self, model, directory: Path, quant: str, options: GGUFOptions, inputs: ExportInputs) -> Artifact:
        from moeexport.backends.gguf import imatrix_file
        from moeexport.backends.gguf.writer import export

        imatrix = imatrix_file.read(options.imatrix) if isinstance(options.imatrix, str) else inputs.imatrix
        written = export(model, directory / f"model-{quant}.gguf", quant=quant, tensor_types=options.tensor_types,
                         imatrix=imatrix, weight_grid=inputs.weight_grid)
        artifact = Artifact(written.path, written.representation, written.fallbacks)
        if written.imatrix is not None:  # measured here: llama.cpp's file of it, for llama-quantize --imatrix
            imatrix_file.write(directory / imatrix_file.FILE_NAME, written.imatrix)
            artifact.imatrix = {"source": "measured", "file": directory / imatrix_file.FILE_NAME}
        elif imatrix is not None:
            artifact.imatrix = {"source": str(imatrix.path)}
        return artifact

    def context_of(self, path: Path) -> int | None:
        from moeexport.backends.gguf.reader import GGUFFile  # its header checked before anything is read

        context = GGUFFile(path).value("context_length")
        return context if isinstance(context, int) else None

    def quant_of(self, path: Path) -> str | None:
        import gguf

        from moeexport.backends.gguf.checks import prescan

        try:
            prescan(Path(path))  # bounded, before gguf-py expands the metadata arrays of a file from anyone
            file_type = gguf.GGUFReader(path).get_field("general.file_type").contents()
        except Exception:  # an unreadable file has no type to tell; its runner says what is wrong with it
            return None
        return {number: name for name, number in LLAMA_FTYPES.items()}.get(file_type)

    def runner(self, path: Path, context: int) -> GGUFRunner:
        return GGUFRunner(path, context=context)  # exact: F32 KV cache, flash attention off

    def serving_runner(self, path: Path, context: int, threads: int | None = None) -> GGUFRunner:
        # the KV cache and attention llama.cpp serves with
        return GGUFRunner(path, context=context, exact=False, threads=threads)

    def chat_runner(self, path: Path, context: int, threads: int | None = None) -> GGUFRunner:
        # served as llama.cpp serves it
        return GGUFRunner(path, context=context, exact=False, threads=threads, logits=False)

    def model_reader(self):
        from moeexport.backends.gguf import reader  # imports torch: only when a GGUF is read as a model

        return reader

    def runtime(self) -> str:
        import llama_cpp

        return f"llama.cpp (llama-cpp-python {llama_cpp.__version__}), CPU"

    def token_bytes(self, path: Path) -> TokenBytes:
        return bytes_per_token(path)

    def layout(self, model):
        return check(model, "f32")  # the writer's plan: its host, padded expert count and MoE-less layers

    def sizer(self, untrimmed: Path):
        from moeexport.backends.gguf.sizes import TrimmedSizes

        return TrimmedSizes(untrimmed)

    def input_comparison(self, model) -> str | None:
        if str(model).endswith(f".{EXTENSION}"):
            return "measuring quality against the input GGUF, both in llama.cpp"
        return None


TARGET = GGUFTarget()


def check(model, quant: str = "f32", tensor_types: dict[str, str] | None = None):
    """backends/gguf/writer.py's check (the writer, and torch with it, is imported when first needed)."""
    from moeexport.backends.gguf import writer

    return writer.check(model, quant, tensor_types)


def __getattr__(name: str):
    if name in ("export", "GGUFExport"):  # the writer's, imported on first use
        from moeexport.backends.gguf import writer

        return getattr(writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["ARCHITECTURES", "EXTENSION", "GGUFExport", "GGUFOptions", "GGUFRunner", "QUANT_TYPES", "Runner", "TARGET",
           "TOLERANCES", "check", "export"]
