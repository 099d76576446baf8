"""Recipes: an ordered list of passes, read from YAML.

    passes:
      - block_drop: {n: 1}
      - layer_drop: {n: 1}
      - expert_drop: {keep: 6, scope: global, score: frequency}

Each entry is a one-key mapping from a registered pass name to its options;
`passes: []` is a valid (empty) recipe. Every problem is one MoeExportError line.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from moeexport.errors import MoeExportError, read_user_text
from moeexport.pass_options import OPTIONS, PassOptions


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
    extra = sorted(map(str, set(document) - {"passes"}))
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
        raise MoeExportError(f"{where} must be a one-key mapping like 'block_drop: {{n: 1}}', got {_short(entry)}")
    (name, options), = entry.items()
    if name not in OPTIONS:
        raise MoeExportError(f"{where}: unknown pass {name!r}{_did_you_mean(name, OPTIONS)}; known passes: "
                             f"{', '.join(OPTIONS)}")
    try:
        return RecipeStep(name, OPTIONS[name].model_validate(options or {}))
    except ValidationError as error:
        # an unknown key first: a misspelt option also reads as the real one missing, which misleads
        problem = min(error.errors(), key=lambda each: each["type"] != "extra_forbidden")
        field = ".".join(str(part) for part in problem["loc"]) or "options"
        if problem["type"] == "extra_forbidden":
            known = _option_names(OPTIONS[name], problem["loc"][:-1])
            message = f"unknown option{_did_you_mean(str(problem['loc'][-1]), known)}; its options: {', '.join(known)}"
        elif problem["type"] == "value_error":  # a validator's own sentence, without pydantic's "Value error, "
            message = str(problem["ctx"]["error"])
        elif problem["type"].endswith("_type") or problem["type"] == "literal_error":
            message = f"{problem['msg']}, got {_yaml_value(problem['input'])}"
        else:
            message = problem["msg"]
        raise MoeExportError(f"{where} ({name}): {field}: {message}") from None


def _did_you_mean(given: str, known) -> str:
    close = difflib.get_close_matches(given, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _option_names(options: type[BaseModel], path: tuple) -> list[str]:
    """The option names of `options`, or of the nested options model at `path` (merge's `compress`)."""
    for part in path:
        annotation = options.model_fields[part].annotation if part in options.model_fields else None
        nested = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
        options = next((kind for kind in nested if isinstance(kind, type) and issubclass(kind, BaseModel)), options)
    return list(options.model_fields)


def _yaml_value(value: object) -> str:
    """A wrongly typed option as the recipe wrote it: `true` is a boolean, `"6"` a string."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return f"{_short(value)} (a string)"
    return _short(value)


MAX_DEPTH = 50  # nesting a recipe could need is 4 (passes, list, step, options); deeper is not a recipe


class _RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load without aliases (a recipe never needs them, and nested aliases, a
    "billion laughs" document, expand exponentially), without duplicate keys (the last
    value would silently win), and without nesting deep enough to exhaust the stack."""

    depth = 0

    def compose_node(self, parent, index):
        mark = self.peek_event().start_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        if self.check_event(yaml.AliasEvent):
            raise MoeExportError(
                f"recipe {self.name} uses an alias (*name) at {where}; "
                "recipes cannot use YAML anchors and aliases: write the options out"
            )
        if self.depth >= MAX_DEPTH:
            raise MoeExportError(
                f"recipe {self.name} nests more than {MAX_DEPTH} levels deep at {where}: it is not a recipe"
            )
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, AttributeError, OverflowError) as error:  # `2001-13-45`, `!!int x`, ...
            mark = node.start_mark
            why = f" ({_short(str(error))})" if isinstance(error, ValueError) else ""  # not PyYAML's internals
            raise MoeExportError(
                f"recipe {self.name} has a value at line {mark.line + 1}, column {mark.column + 1} that YAML cannot "
                f"read as {node.tag.rsplit(':', 1)[-1]}{why}: quote it, or write a plain number"
            ) from None

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first
                except TypeError:  # an unhashable key: the constructor names it as a YAML error
                    continue
                mark = key_node.start_mark
                if seen:
                    raise MoeExportError(
                        f"recipe {self.name} repeats the key {_short(key)} at line {mark.line + 1}, "
                        f"column {mark.column + 1} (first at line {first[key].line + 1}): "
                        "YAML would silently keep only the last value; write each key once"
                    )
                first[key] = mark
        return super().construct_mapping(node, deep)


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO would block the read; a directory cannot be read
        raise MoeExportError(f"recipe file {path} is not a regular file (a directory, FIFO or device): give a "
                             ".yaml file")
    if not path.is_file():
        raise MoeExportError(f"recipe file {path} does not exist")
    text = read_user_text(path, "recipe")
    loader = None
    try:
        loader = _RecipeLoader(text)  # the reader refuses control characters here, before parsing
        loader.name = str(path)
        document = loader.get_single_data()
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        if isinstance(error, yaml.reader.ReaderError):  # a control character: where it is, which one
            line = text.count("\n", 0, error.position) + 1
            code = error.character if isinstance(error.character, int) else ord(error.character)
            at, problem = f" at line {line}", f"it holds the control character U+{code:04X}"
        else:
            problem = getattr(error, "problem", None) or "cannot be parsed"
        raise MoeExportError(f"recipe {path} is not valid YAML{at}: {problem}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return parse_recipe(document, str(path))
