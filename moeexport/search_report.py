"""What `search` takes and gives, as plain data: the constraint, the search's options, and its report (the
untrimmed model in each weight type, every trimming of the grid, every candidate, the choice), which prints, writes
the chosen recipe as YAML and goes to JSON."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from moeexport.errors import MoeExportError
from moeexport.pipeline import CalibrationOptions


# --- the constraint -----------------------------------------------------------------------


@dataclass(frozen=True)
class Constraint:
    """What the artifact must meet: one of a size relative to the untrimmed F16 file, a size in bytes, or a
    decode speedup (bandwidth-bound, from bytes read per token) over the untrimmed F16 file."""

    kind: str  # max_size (fraction of the F16 file) | max_bytes | min_decode_speedup
    value: float

    KINDS = ("max_size", "max_bytes", "min_decode_speedup")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise MoeExportError(f"unknown constraint {self.kind!r}; one of {', '.join(self.KINDS)}")
        if not (self.value > 0 and math.isfinite(self.value)):
            raise MoeExportError(f"--{self.kind.replace('_', '-')} must be a positive number")

    @classmethod
    def parse(cls, max_size: str | None = None, max_bytes: str | None = None,
              min_decode_speedup: str | None = None) -> "Constraint":
        """From the command line's forms: '30%' (or 0.3), '16GB' / '3.5GiB', '3x' (or 3)."""
        given = [(kind, text) for kind, text in zip(cls.KINDS, (max_size, max_bytes, min_decode_speedup))
                 if text is not None]
        if len(given) != 1:
            raise MoeExportError("give exactly one of --max-size P%, --max-bytes SIZE, --min-decode-speedup Nx")
        kind, text = given[0]
        text = str(text).strip()
        if kind == "max_bytes":
            from moeexport.memory import parse_size

            try:
                return cls(kind, float(parse_size(text)))
            except MoeExportError:
                raise MoeExportError(f"--max-bytes {text!r} is not a size: write it like 16GB, 3.5GiB or 800MB") from None
        if kind == "max_size":
            match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(%?)", text)
            if not match:
                raise MoeExportError(f"--max-size {text!r} is not a share of the F16 GGUF: write it like 30%")
            value = float(match.group(1)) / (100 if match.group(2) else 1)
            if not 0 < value <= 1 and not match.group(2):
                raise MoeExportError(f"--max-size {text!r}: write a percentage like 30% (or a fraction like 0.3)")
            if value > 1:  # every candidate is smaller than the untrimmed file: nothing to search for
                raise MoeExportError(f"--max-size {text!r} is more than the untrimmed F16 GGUF itself: give at most "
                                     "100%")
            return cls(kind, value)
        match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*[xX]?", text)
        if not match:
            raise MoeExportError(f"--min-decode-speedup {text!r} is not a factor: write it like 3x")
        return cls(kind, float(match.group(1)))

    def describe(self) -> str:
        if self.kind == "max_size":
            return f"--max-size {self.value * 100:g}% of the untrimmed F16 GGUF"
        if self.kind == "max_bytes":
            return f"--max-bytes {self.value / 1e9:.4g} GB"
        return f"--min-decode-speedup {self.value:g}x over the untrimmed F16 GGUF (bytes read per token)"

    def meets(self, file_bytes: float, token_bytes: float, baseline_bytes: float, baseline_token_bytes: float) -> bool:
        if self.kind == "max_size":
            return file_bytes <= self.value * baseline_bytes
        if self.kind == "max_bytes":
            return file_bytes <= self.value
        return baseline_token_bytes / token_bytes >= self.value


# --- options and report -------------------------------------------------------------------


@dataclass(frozen=True)
class SearchOptions:
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    block_drop: tuple[int, ...] = (0, 1, 2)  # blocks dropped (0: no block_drop pass)
    layer_drop: tuple[int, ...] = (0, 1, 2, 3)  # MoE sublayers dropped
    expert_keep: tuple[float, ...] = (1.0, 0.75, 0.5)  # experts kept per layer on average, as a share of E
    expert_scope: str = "global"  # expert_drop scope; global gets min_keep = top-k (llama.cpp's one top-k)
    quant_types: tuple[str, ...] | None = None  # the target's weight types searched (None: its search_types)
    verify: int = 3  # candidates exported for real, best first, until one meets the constraint (0: trust estimates)
    file_windows: int = 8  # calibration sequences each GGUF is run on in llama.cpp (its KL)
    out: str | None = None  # write the chosen recipe here (YAML)
    build: str | None = None  # then build it into this directory
    overwrite: bool = False  # replace `out` / `build` if they exist
    eval_text: str | None = None  # held-out text for the build's validation (never for choosing)
    dtype: str = "auto"
    trust_remote_code: bool = False
    allow_nonfinite: bool = False
    max_memory: int | None = None

    def __post_init__(self):
        for name, values in (("block-drop", self.block_drop), ("layer-drop", self.layer_drop)):
            if not values or any(value < 0 for value in values):
                raise MoeExportError(f"--{name} takes counts >= 0, e.g. 0,1,2")
        if not self.expert_keep or any(not 0 < share <= 1 for share in self.expert_keep):
            raise MoeExportError("--expert-keep takes shares of the experts in (0, 1], e.g. 1,0.75,0.5")
        if self.expert_scope not in ("global", "layer"):
            raise MoeExportError("--expert-scope is global or layer")
        if self.verify < 0:
            raise MoeExportError("--verify must be at least 0")
        if self.file_windows < 1:
            raise MoeExportError("--file-windows must be at least 1")


@dataclass
class TypeResult:
    """The untrimmed model in one weight type: its real file and what the type alone costs."""

    quant: str
    file_bytes: int
    token_bytes: int  # weight bytes read per decoded token
    kl: float  # KL(original torch || this file in llama.cpp) on the calibration windows
    top1_agreement: float
    tokens: int


@dataclass
class Trimming:
    """One trimming recipe applied to the original in torch, and its calibration KL."""

    label: str
    passes: list[dict]  # recipe entries, as a recipe YAML holds them
    block_drop: int
    layer_drop: int
    expert_keep: int  # requested average per MoE layer (E: no expert_drop)
    kl: float
    top1_agreement: float
    experts: list[int]  # routed experts per remaining layer (0: no MoE sublayer)
    file_experts: int  # the expert count of its GGUF (every layer padded to it)
    plans: list[str] = field(default_factory=list)  # the passes' plan summaries


@dataclass
class Candidate:
    """A trimming x a weight type: estimated size, decode bytes and KL; verified ones also measured."""

    trimming: int  # index into SearchReport.trimmings
    quant: str
    file_bytes: int  # estimate (exact for the untrimmed rows)
    token_bytes: int
    kl: float  # KL(trimming) + KL(type): an additive estimate
    kl_trimming: float
    kl_type: float
    size_share: float  # of the untrimmed F16 file
    decode_speedup: float  # bandwidth-bound, over the untrimmed F16 file
    meets: bool  # the constraint, by estimate
    pareto: bool = False  # on the (file_bytes, kl) front of all candidates
    verified: dict | None = None  # the real export: file_bytes, token_bytes, kl, top1_agreement, meets


@dataclass
class SearchReport:
    model: str
    target: str
    constraint: dict  # kind, value, description
    baseline: dict  # the untrimmed F16 file: file_bytes, token_bytes (and the limit in bytes, for sizes)
    calibration: dict
    grid: dict
    types: list[TypeResult]
    trimmings: list[Trimming]
    candidates: list[Candidate]
    chosen: int | None  # index into candidates
    skipped: list[dict]  # trimming recipes the model cannot take: label, reason
    notes: list[str]
    recipe_path: str | None = None
    build: dict | None = None  # the build of the chosen recipe: artifact, size against the limit, validation
    timings: dict = field(default_factory=dict)

    def chosen_row(self) -> dict | None:
        return None if self.chosen is None else self.row(self.chosen)

    def row(self, index: int) -> dict:
        """A candidate with its trimming spelled out."""
        candidate = self.candidates[index]
        trimming = self.trimmings[candidate.trimming]
        return asdict(candidate) | {"index": index, "label": trimming.label, "passes": trimming.passes,
                                    "block_drop": trimming.block_drop, "layer_drop": trimming.layer_drop,
                                    "expert_keep": trimming.expert_keep, "experts": trimming.experts}

    def pareto_rows(self) -> list[dict]:
        """The non-dominated candidates, smallest first."""
        rows = [self.row(i) for i, c in enumerate(self.candidates) if c.pareto]
        return sorted(rows, key=lambda row: (row["file_bytes"], row["kl"]))

    def recipe(self) -> dict:
        """The chosen recipe as moeexport.recipe.parse_recipe takes it."""
        row = self.chosen_row()
        if row is None:
            raise MoeExportError("no candidate was chosen")
        return {"passes": row["passes"]}

    def recipe_yaml(self, command: str | None = None) -> str:
        """The chosen recipe as YAML, under a comment header with the build flags it assumes and its numbers."""
        import yaml

        row = self.chosen_row()
        baseline = self.baseline["file_bytes"]
        flags = f"--target {self.target} --quant {row['quant']}"
        calibration = _calibration_flags(self.calibration)
        lines = [
            f"# Chosen by moeexport search ({self.constraint['description']}): the lowest calibration KL within it.",
            f"# Build flags it assumes: {flags}",
            f"#   moeexport build {self.model} --recipe THIS.yaml {flags}{calibration} --out DIR",
            *(["# (the passes choose what to drop from calibration statistics: build with the same calibration set)"]
              if row["passes"] else []),
            f"# estimated: {row['file_bytes']:,} bytes ({row['size_share']:.1%} of the untrimmed F16 GGUF's "
            f"{baseline:,}), decode x{row['decode_speedup']:.2f}, KL {row['kl']:.4g} "
            f"(trimming {row['kl_trimming']:.4g} + {row['quant']} {row['kl_type']:.4g}: an additive estimate)",
        ]
        verified = row.get("verified")
        if verified:
            lines.append(f"# measured (exported, run in llama.cpp on {self.grid['kl_tokens']['files']:,} calibration "
                         f"tokens): {verified['file_bytes']:,} "
                         f"bytes ({verified['file_bytes'] / baseline:.1%}), KL {verified['kl']:.4g}, "
                         f"top-1 agreement {verified['top1_agreement']:.1%}")
        if command:
            lines.append(f"# search: {command}")
        body = yaml.safe_dump({"passes": row["passes"]}, sort_keys=False, default_flow_style=None)
        return "\n".join(lines) + "\n" + body

    def to_dict(self) -> dict:
        from moeexport import __version__

        data = asdict(self)
        data["moeexport_version"] = __version__
        data["chosen_row"] = self.chosen_row()
        data["pareto"] = [row["index"] for row in self.pareto_rows()]
        return data


def _calibration_flags(calibration: dict) -> str:
    """The command-line flags that draw the same calibration set."""
    defaults = CalibrationOptions()
    flags = []
    source = calibration.get("source")
    if source and source != "model":
        flags.append(f" --calib {source}")
    for key, flag, default in (("num_sequences", "--calib-samples", defaults.samples),
                               ("sequence_length", "--calib-length", defaults.length), ("seed", "--seed", defaults.seed)):
        if calibration.get(key, default) != default:
            flags.append(f" {flag} {calibration[key]}")
    return "".join(flags)
