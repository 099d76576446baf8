from __future__ import annotations

from pathlib import Path

import pytest
import transformers

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURE = SHARED / "fixtures" / "tiny-mixtral-books"
CORPUS = SHARED / "corpus"

needs_shared = pytest.mark.skipif(
    not (FIXTURE / "config.json").is_file() or not (CORPUS / "dev.txt").is_file(),
    reason=f"needs the fixture model and corpus in {SHARED} (not present on this machine)",
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Statistics caches never leak between tests or into the user's home."""
    import moeexport.cache

    monkeypatch.setattr(moeexport.cache, "ROOT", tmp_path / "statistics-cache")
