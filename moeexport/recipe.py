"""Recipes: an ordered list of passes, read from YAML.

    passes:
      - block_drop: {n: 1}
      - layer_drop: {n: 1}
      - expert_drop: {keep: 6, scope: global, score: frequency}

Each entry is a one-key mapping from a registered pass name to its options;
`passes: []` is a valid (empty) recipe. Every problem is one MoeExportError line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from moeexport.errors import MoeExportError
from moeexport.passes import PASSES, PassOptions


@dataclass(frozen=True)
class RecipeStep:
    name: str
    options: PassOptions

    def to_dict(self) -> dict:
        return {self.name: self.options.model_dump()}


@dataclass(frozen=True)
class Recipe:
    steps: tuple[RecipeStep, ...]

    def to_dict(self) -> dict:
        return {"passes": [step.to_dict() for step in self.steps]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def parse_recipe(document: object, where: str = "recipe") -> Recipe:
    if not isinstance(document, dict) or "passes" not in document:
        raise MoeExportError(f"{where} must be a mapping with a 'passes' list (e.g. passes: [{{block_drop: {{n: 1}}}}])")
    extra = sorted(set(document) - {"passes"})
    if extra:
        raise MoeExportError(f"{where} has unknown top-level keys {extra}; only 'passes' is allowed")
    entries = document["passes"] or []
    if not isinstance(entries, list):
        raise MoeExportError(f"{where}: 'passes' must be a list")
    return Recipe(tuple(_parse_step(entry, f"{where} pass {number}") for number, entry in enumerate(entries, 1)))


def _parse_step(entry: object, where: str) -> RecipeStep:
    if isinstance(entry, str):
        entry = {entry: {}}
    if not isinstance(entry, dict) or len(entry) != 1:
        raise MoeExportError(f"{where} must be a one-key mapping like 'block_drop: {{n: 1}}', got {entry!r}")
    (name, options), = entry.items()
    if name not in PASSES:
        raise MoeExportError(f"{where}: unknown pass {name!r}; known passes: {', '.join(PASSES)}")
    try:
        return RecipeStep(name, PASSES[name].Options.model_validate(options or {}))
    except ValidationError as error:
        problem = error.errors()[0]
        field = ".".join(str(part) for part in problem["loc"]) or "options"
        message = "unknown option" if problem["type"] == "extra_forbidden" else problem["msg"]
        raise MoeExportError(f"{where} ({name}): {field}: {message}") from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise MoeExportError(f"recipe file {path} does not exist")
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "cannot be parsed"
        raise MoeExportError(f"recipe {path} is not valid YAML{at}: {problem}") from None
    return parse_recipe(document, str(path))
