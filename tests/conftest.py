from __future__ import annotations

import os
from pathlib import Path

import pytest
import transformers

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# the fixture model and corpus: MOEEXPORT_SHARED=/path/to/shared, or ../shared beside the clone
SHARED = Path(os.environ.get("MOEEXPORT_SHARED") or Path(__file__).resolve().parents[2] / "shared")
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


@pytest.fixture
def expert_reads(monkeypatch) -> list:
    """(parameter name, expert) of every expert matrix a streamed model reads from now on, in order."""
    from moeexport.streaming import LayerStream

    reads, read = [], LayerStream.expert_matrix

    def counted(self, name, expert, *rest):
        reads.append((name, expert))
        return read(self, name, expert, *rest)

    monkeypatch.setattr(LayerStream, "expert_matrix", counted)
    return reads


@pytest.fixture(scope="session")
def demo_gguf_of(tmp_path_factory):
    """The demo model's GGUF in a weight type (`demo_gguf_of("q8_0")`), written once per session: the hostile-input
    tests and the fuzzers rewrite copies of it, never the file itself."""
    made = {}

    def of(quant: str):
        if quant not in made:
            import moeexport
            from moeexport.backends import gguf as gguf_backend

            path = tmp_path_factory.mktemp("demo-gguf") / f"demo-{quant}.gguf"
            gguf_backend.export(moeexport.load("demo"), path, quant=quant)
            made[quant] = path
        return made[quant]

    return of
