"""Where moeexport keeps what it computed before: observed statistics and the digests of large weight files.

The root is MOEEXPORT_CACHE, else ~/.cache/moeexport. A command reads `ROOT` when it
starts and passes it on (so tests move it by setting this one attribute).
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(os.environ.get("MOEEXPORT_CACHE", Path.home() / ".cache" / "moeexport"))


def statistics_dir(root: Path) -> Path:
    """Calibration statistics, by model, calibration set and passes applied (moeexport.compress)."""
    return root / "statistics"


def digests_dir(root: Path) -> Path:
    """The SHA-256 of each large weight file, by its identity on disk (moeexport.fingerprint)."""
    return root / "digests"


def chat_history_file(root: Path) -> Path:
    """The lines typed in `moeexport chat`, recalled with Up in the next session (moeexport.chat)."""
    return root / "chat_history"
