"""Progress as plain events: the library reports what it is doing, the caller decides how to show it.

Library code that runs long takes a `progress` object with the three calls
rich's Progress has (`add_task`, `advance`, `remove_task`), so any rich
Progress works as one. The pipeline hands it an `EventStream` instead, which
turns every call, and every stage and note of a build, into an `Event` passed
to the caller's callback. Nothing in the library prints.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

EventKind = Literal["stage", "task", "advance", "done", "note", "step"]


@dataclass(frozen=True)
class Event:
    kind: EventKind
    message: str = ""  # the stage, task description or note
    task: int | None = None  # which task a task/advance/done event belongs to
    total: float | None = None  # a task's size, None when unknown
    amount: float = 0  # how far an advance event moves its task
    data: dict = field(default_factory=dict)  # e.g. a pass's options and plan lines for a step event
    time: float = field(default_factory=time.monotonic)


class EventStream:
    """The progress object the pipeline passes down; every call becomes an Event for `on_event`."""

    def __init__(self, on_event: Callable[[Event], None] | None = None):
        self._on_event = on_event or (lambda event: None)
        self._ids = itertools.count()

    def stage(self, message: str) -> None:
        self._on_event(Event("stage", message))

    def note(self, message: str) -> None:
        self._on_event(Event("note", message))

    def step(self, name: str, data: dict) -> None:
        self._on_event(Event("step", name, data=data))

    def add_task(self, description: str, total: float | None = None) -> int:
        task = next(self._ids)
        self._on_event(Event("task", description, task=task, total=total))
        return task

    def advance(self, task: int, advance: float = 1) -> None:
        self._on_event(Event("advance", task=task, amount=advance))

    def remove_task(self, task: int) -> None:
        self._on_event(Event("done", task=task))
