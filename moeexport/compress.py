"""Run a recipe on a model: observe when a pass needs statistics, plan, apply, record.

Passes that compute weights from calibration activations (prune, quantize) get
the calibration tokens in `apply` and return their plan with its outcome, which
is what the result and the manifest record.

Statistics always describe the model as it stands before the pass that uses
them (a pass after Block Drop scores the renumbered layers). They are cached on
disk by (source checkpoint, calibration set, passes applied so far), so a later
recipe on the same model and calibration set reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moeexport.adapters import LayerSpec, adapter_for
from moeexport.adapters.surgery import decoder_layers, structure
from moeexport.cache import ROOT, statistics_dir
from moeexport.calibration.observers import Statistics, observe
from moeexport.calibration.sources import CalibrationConfig, calibration_tokens, source_digest
from moeexport.errors import MoeExportError
from moeexport.modelio import parameter_bytes, parameter_count
from moeexport.outputs import replace_atomically
from moeexport.passes import PASSES
from moeexport.recipe import Recipe, RecipeStep

# the statistics cache keeps its newest entries within this size (MOEEXPORT_CACHE_LIMIT_MB to change it)
CACHE_LIMIT_BYTES = int(float(os.environ.get("MOEEXPORT_CACHE_LIMIT_MB", "1024")) * 2**20)
SCORING_TOKENS = 8192  # calibration tokens a `score: perplexity | kl` selection measures removals on


class StatisticsProvider:
    """Observes a model on one calibration set, with an on-disk cache keyed by content.

    The key is the source checkpoint's content fingerprint (`moeexport.fingerprint`, a
    hash of every weight byte), the calibration text's content (a hash of the file, or
    of the tokens when they are given), how the set is drawn, and the passes applied so
    far. An unreadable cache entry is reported and recomputed; entries are written
    under unique temporary names and renamed into place, so concurrent runs cannot race.
    """

    def __init__(
        self,
        tokenizer,
        calibration: CalibrationConfig,
        source_key: str,
        cache_dir: Path | None = statistics_dir(ROOT),
        batch_size: int = 8,
        max_block_window: int = 8,
        progress=None,
        tokens: torch.Tensor | None = None,
    ):
        """`tokens` [N, L] is a calibration set already drawn; otherwise it is drawn per `calibration`."""
        self.tokenizer = tokenizer
        self.calibration = calibration
        self.source_key = source_key
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self.max_block_window = max_block_window
        self.progress = progress
        self._tokens = tokens
        self._given_tokens = tokens is not None
        self._calibration_content: str | None = None
        self.observations = 0  # how many times a model was actually run (cache misses)

    def tokens(self, model) -> torch.Tensor:
        """The calibration set, drawn once (a model-sampled set comes from the model as first given)."""
        if self._tokens is None:
            c = self.calibration
            task = self.progress.add_task(f"drawing {c.num_sequences} x {c.sequence_length} calibration tokens "
                                          f"from {c.source}", total=None) if self.progress else None
            self._tokens = calibration_tokens(model, self.tokenizer, c)
            if self.progress:
                self.progress.remove_task(task)
        return self._tokens

    def scorer(self, model):
        """A RemovalScorer (calibration/damage.py) of `model` as it stands, on the first calibration sequences
        (at most SCORING_TOKENS tokens), holding at most a quarter of the memory available in hidden states."""
        from moeexport.adapters import adapter_for
        from moeexport.calibration.damage import RemovalScorer
        from moeexport.memory import available_memory

        tokens = self.tokens(model)
        tokens = tokens[: max(1, SCORING_TOKENS // tokens.shape[1])]
        state_bytes = tokens.numel() * adapter_for(model.config).model_config(model.config).hidden_size * 4
        max_states = max(2, available_memory() // 4 // state_bytes)
        return RemovalScorer(model, tokens, self.batch_size, max_states, self.progress)

    def calibration_content(self) -> str | None:
        """What the calibration set is drawn from, by content (None: sampled from the source model)."""
        if self._calibration_content is None:
            if self._given_tokens:
                tokens = self._tokens.to("cpu", torch.int64).contiguous()
                digest = hashlib.sha256(str(list(tokens.shape)).encode() + tokens.numpy().tobytes())
                self._calibration_content = "tokens:" + digest.hexdigest()
            else:
                self._calibration_content = source_digest(self.calibration.source)
        return self._calibration_content

    def key(self, history: list[dict]) -> str:
        calibration = self.calibration.to_dict()
        content = self.calibration_content()
        if content is not None:
            calibration["source"] = content  # the text itself, not where it lies
        identity = {"version": 2, "source": self.source_key, "calibration": calibration, "history": history}
        identity["max_block_window"] = self.max_block_window
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]

    def statistics(self, model, history: list[dict]) -> Statistics:
        key = self.key(history)
        cached = self.cache_dir / f"{key}.json" if self.cache_dir else None
        if cached and cached.is_file():
            try:
                return Statistics.load(cached)
            except (OSError, ValueError, KeyError, TypeError, AttributeError, MoeExportError) as error:
                self._warn(f"statistics cache file {cached} is unreadable ({type(error).__name__}); recomputing it")
        statistics = observe(
            model,
            self.tokens(model),
            key=key,
            calibration=self.calibration.to_dict(),
            batch_size=self.batch_size,
            max_block_window=self.max_block_window,
            progress=self.progress,
        )
        self.observations += 1
        if cached:
            try:
                replace_atomically(cached, statistics.save)
                prune_cache(self.cache_dir, CACHE_LIMIT_BYTES)
            except OSError as error:
                self._warn(f"cannot write the statistics cache file {cached} ({error.strerror or error}); not cached")
        return statistics

    def _warn(self, message: str) -> None:
        """A note through the progress events when there are any, else a Python warning."""
        if hasattr(self.progress, "note"):
            self.progress.note(message)
        else:
            warnings.warn(message, stacklevel=3)


def prune_cache(directory: Path, limit_bytes: int) -> list[Path]:
    """Delete the oldest cache entries until the rest fit in `limit_bytes`; returns what was removed."""
    entries = sorted(directory.glob("*.json"), key=lambda path: path.stat().st_mtime_ns, reverse=True)
    kept, removed = 0, []
    for entry in entries:
        kept += entry.stat().st_size
        if kept > limit_bytes and entry is not entries[0]:  # the entry just written always stays
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


@dataclass
class AppliedStep:
    name: str
    options: dict
    plan: object  # the pass's plan dataclass
    decided: str = ""  # how the pass's `auto` options were decided for this model (CompressionPass.resolve)

    def to_dict(self) -> dict:
        return {"name": self.name, "options": self.options, "plan": asdict(self.plan)}

    def summary(self) -> list[str]:
        """What the run says about the step: how `auto` was decided, then the plan."""
        return ([self.decided] if self.decided else []) + list(self.plan.describe())


@dataclass
class CompressionResult:
    layers_before: list[LayerSpec]
    layers_after: list[LayerSpec]
    parameters_before: int
    parameters_after: int
    bytes_before: int
    bytes_after: int
    steps: list[AppliedStep] = field(default_factory=list)
    new_block_index: list[int | None] = field(default_factory=list)  # per original block; None = dropped

    def manifest(self) -> dict:
        return {
            "passes": [step.to_dict() for step in self.steps],
            "new_block_index": self.new_block_index,
            "parameters": {"before": self.parameters_before, "after": self.parameters_after},
        }


def resolve_recipe(recipe: Recipe, config, calibrated: bool = True) -> tuple[Recipe, list[str]]:
    """`recipe` with every `auto` option decided for a model of this transformers `config` (`calibrated`: with
    calibration tokens to solve on; the pipeline always has them), and per step how ("" where nothing was)."""
    resolved = [PASSES[step.name].resolve(step.options, config, calibrated) for step in recipe.steps]
    steps = tuple(RecipeStep(step.name, options) for step, (options, _) in zip(recipe.steps, resolved))
    return Recipe(steps), [decided for _, decided in resolved]


def check_recipe(recipe: Recipe, model, layers: list[LayerSpec]) -> None:
    """Fail fast, before any calibration, on options the model cannot take."""
    for step in recipe.steps:
        PASSES[step.name].check(step.options, layers)
        PASSES[step.name].check_model(step.options, model)


def compress(model, recipe: Recipe, statistics: StatisticsProvider | None, on_step=None) -> CompressionResult:
    """Apply `recipe` to `model` in place. `on_step(AppliedStep)` is called after each pass."""
    adapter = adapter_for(model.config)
    recipe, decided = resolve_recipe(recipe, model.config, statistics is not None)
    check_recipe(recipe, model, structure(adapter, model))
    result = CompressionResult(
        layers_before=structure(adapter, model),
        layers_after=[],
        parameters_before=parameter_count(model),
        parameters_after=0,
        bytes_before=parameter_bytes(model),
        bytes_after=0,
    )
    original_blocks = list(decoder_layers(adapter, model))
    calibrated = (PASSES[s.name].needs_statistics(s.options) or PASSES[s.name].needs_activations(s.options)
                  or PASSES[s.name].needs_scorer(s.options) for s in recipe.steps)
    if statistics and any(calibrated):
        statistics.tokens(model)  # draw the calibration set from the model as given
    history: list[dict] = []
    for step, step_decided in zip(recipe.steps, decided):
        compression_pass = PASSES[step.name]
        layers = structure(adapter, model)
        compression_pass.check(step.options, layers)
        compression_pass.check_model(step.options, model)
        needs = compression_pass.needs_statistics(step.options)
        activations = compression_pass.needs_activations(step.options)
        scored = compression_pass.needs_scorer(step.options)
        if (needs or activations or scored) and statistics is None:
            raise ValueError(f"{step.name} needs calibration data but no StatisticsProvider was given")
        step_statistics = statistics.statistics(model, history) if needs else None
        measured = {"scorer": statistics.scorer(model)} if scored else {}
        context = compression_pass.plan_context(step.options, model)
        plan = compression_pass.plan(step_statistics, layers, step.options, **measured, **context)
        calibration = {"tokens": statistics.tokens(model), "progress": statistics.progress} if activations else {}
        plan = compression_pass.apply(model, plan, **calibration) or plan
        applied = AppliedStep(step.name, step.options.model_dump(), plan, step_decided)
        history.append(applied.to_dict())
        result.steps.append(applied)
        if on_step:
            on_step(applied)
    result.layers_after = structure(adapter, model)
    # surviving blocks are the same module objects, renumbered
    position = {id(block): index for index, block in enumerate(decoder_layers(adapter, model))}
    result.new_block_index = [position.get(id(block)) for block in original_blocks]
    result.parameters_after = parameter_count(model)
    result.bytes_after = parameter_bytes(model)
    return result
