"""Device tests print what they measured (tokens/s, memory) in the terminal summary."""

from __future__ import annotations

import pytest
import transformers

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

MEASURED: list[str] = []


@pytest.fixture
def measured():
    """Append a line to the measurements shown at the end of the run."""
    return MEASURED.append


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("measured on this device")
        for line in MEASURED:
            terminalreporter.write_line(line)
