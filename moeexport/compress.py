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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moeexport.adapters import LayerSpec, adapter_for
from moeexport.adapters.base import decoder_layers, structure
from moeexport.calibration.observers import Statistics, observe
from moeexport.calibration.sources import CalibrationConfig, calibration_tokens
from moeexport.modelio import parameter_bytes, parameter_count
from moeexport.passes import PASSES
from moeexport.recipe import Recipe

DEFAULT_CACHE = Path(os.environ.get("MOEEXPORT_CACHE", Path.home() / ".cache" / "moeexport")) / "statistics"


class StatisticsProvider:
    """Observes a model on one calibration set, with an on-disk cache keyed by model state."""

    def __init__(
        self,
        tokenizer,
        calibration: CalibrationConfig,
        source_key: str,
        cache_dir: Path | None = DEFAULT_CACHE,
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

    def key(self, history: list[dict]) -> str:
        identity = {"source": self.source_key, "calibration": self.calibration.to_dict(), "history": history}
        identity["max_block_window"] = self.max_block_window
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]

    def statistics(self, model, history: list[dict]) -> Statistics:
        key = self.key(history)
        cached = self.cache_dir / f"{key}.json" if self.cache_dir else None
        if cached and cached.is_file():
            return Statistics.load(cached)
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
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(".partial")
            statistics.save(partial)
            partial.replace(cached)
        return statistics


@dataclass
class AppliedStep:
    name: str
    options: dict
    plan: object  # the pass's plan dataclass

    def to_dict(self) -> dict:
        return {"name": self.name, "options": self.options, "plan": asdict(self.plan)}


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


def check_recipe(recipe: Recipe, model, layers: list[LayerSpec]) -> None:
    """Fail fast, before any calibration, on options the model cannot take."""
    for step in recipe.steps:
        PASSES[step.name].check(step.options, layers)
        PASSES[step.name].check_model(step.options, model)


def compress(model, recipe: Recipe, statistics: StatisticsProvider | None, on_step=None) -> CompressionResult:
    """Apply `recipe` to `model` in place. `on_step(AppliedStep)` is called after each pass."""
    adapter = adapter_for(model.config)
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
    calibrated = (PASSES[s.name].needs_statistics(s.options) or PASSES[s.name].needs_activations(s.options) for s in recipe.steps)
    if statistics and any(calibrated):
        statistics.tokens(model)  # draw the calibration set from the model as given
    history: list[dict] = []
    for step in recipe.steps:
        compression_pass = PASSES[step.name]
        layers = structure(adapter, model)
        compression_pass.check(step.options, layers)
        compression_pass.check_model(step.options, model)
        needs = compression_pass.needs_statistics(step.options)
        activations = compression_pass.needs_activations(step.options)
        if (needs or activations) and statistics is None:
            raise ValueError(f"{step.name} needs calibration data but no StatisticsProvider was given")
        step_statistics = statistics.statistics(model, history) if needs else None
        plan = compression_pass.plan(step_statistics, layers, step.options)
        calibration = {"tokens": statistics.tokens(model), "progress": statistics.progress} if activations else {}
        plan = compression_pass.apply(model, plan, **calibration) or plan
        applied = AppliedStep(step.name, step.options.model_dump(), plan)
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
