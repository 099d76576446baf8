"""A command's stderr apart from its progress log: what the one-line-error promise is about."""

from __future__ import annotations

from moeexport.console import PROGRESS_LINE


def without_progress(stderr: str) -> str:
    """`stderr` (stripped) without the timestamped progress lines a run writes when stderr is not a terminal."""
    return "\n".join(line for line in stderr.strip().splitlines() if not PROGRESS_LINE.match(line))
