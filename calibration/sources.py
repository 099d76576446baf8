"""Where calibration and evaluation text comes from, and how it becomes token windows.

A source is one of:
- a text file (.txt or anything not .jsonl): the whole file is one document;
- a JSONL file: one JSON object per line, its `text` field a document;
- `hf:NAME[:CONFIG][@SPLIT]`: a Hugging Face `datasets` dataset already in the
  local cache (this tool never downloads);
- `model`: text sampled from the model itself (data-free calibration), for when
  no real text is at hand.
Token windows are deterministic for a given seed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from moeexport.errors import MoeExportError, read_user_text

MODEL_SAMPLED = "model"


@dataclass(frozen=True)
class CalibrationConfig:
    """How the calibration set is drawn. Defaults fit a CPU; the papers used 128 x 2048 of C4."""

    source: str = MODEL_SAMPLED
    num_sequences: int = 32
    sequence_length: int = 256
    seed: int = 0

    def to_dict(self) -> dict:
        source = self.source
        if source not in (MODEL_SAMPLED,) and not source.startswith("hf:"):
            source = str(Path(source).resolve())
        return asdict(self) | {"source": source}


def read_documents(source: str, text_field: str = "text") -> list[str]:
    """The documents of a text, JSONL or cached `datasets` source."""
    if source.startswith("hf:"):
        return _read_hf_dataset(source[3:], text_field)
    path = Path(source)
    if not path.is_file():
        raise MoeExportError(f"text source {source!r} is not a file (give a .txt or .jsonl path, or hf:NAME)")
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    text = read_user_text(path, "text source")
    if not text.strip():
        raise MoeExportError(f"text source {source} is empty")
    return [text]


def source_digest(source: str) -> str | None:
    """SHA-256 of what a text source holds (a file's bytes, a cached dataset's documents), so
    that an edit in place is seen; None for text sampled from the model."""
    if source == MODEL_SAMPLED:
        return None
    if source.startswith("hf:"):
        digest = hashlib.sha256()
        for document in read_documents(source):
            encoded = document.encode()
            digest.update(len(encoded).to_bytes(8, "little") + encoded)
        return digest.hexdigest()
    path = Path(source)
    if not path.is_file():
        raise MoeExportError(f"text source {source!r} is not a file (give a .txt or .jsonl path, or hf:NAME)")
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    documents = []
    for number, line in enumerate(read_user_text(path, "text source").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise MoeExportError(f"{path}:{number} is not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise MoeExportError(f"{path}:{number} has no string field {text_field!r}")
        documents.append(record[text_field])
    if not documents:
        raise MoeExportError(f"{path} holds no documents")
    return documents


def _read_hf_dataset(spec: str, text_field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise MoeExportError("hf: sources need the datasets package: pip install 'moeexport[datasets]'") from None
    name, _, split = spec.partition("@")
    name, _, config_name = name.partition(":")
    datasets.config.HF_HUB_OFFLINE = True  # moeexport never downloads
    try:
        dataset = datasets.load_dataset(name, config_name or None, split=split or "train")
    except Exception as error:  # datasets raises many types for "not in the cache"
        raise MoeExportError(
            f"dataset {spec!r} is not available offline ({type(error).__name__}); "
            "download it once with datasets on a connected machine, or pass a text/JSONL file"
        ) from None
    if text_field not in dataset.column_names:
        raise MoeExportError(f"dataset {spec!r} has no column {text_field!r} (columns: {dataset.column_names})")
    return [row for row in dataset[text_field] if row]


def token_stream(tokenizer, documents: list[str], limit: int | None = None) -> np.ndarray:
    """All documents tokenized without special tokens, each ended by EOS, concatenated (int32); only until it
    holds `limit` tokens when given (what the first windows need).

    A document longer than PIECE_CHARS is tokenized a piece at a time, cut at whitespace: a tokenizer holds
    about a hundred bytes per character it is given (offsets, token strings), and a one-line file is one
    document. Shorter documents are tokenized whole, as they always were.
    """
    pieces: list[np.ndarray] = []
    held = 0
    for document in documents:
        for piece in _pieces(document):
            pieces.append(np.asarray(tokenizer(piece, add_special_tokens=False)["input_ids"], dtype=np.int32))
            held += len(pieces[-1])
            if limit is not None and held >= limit:
                return np.concatenate(pieces)
        if tokenizer.eos_token_id is not None:
            pieces.append(np.array([tokenizer.eos_token_id], dtype=np.int32))
            held += 1
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int32)


PIECE_CHARS = 1 << 20  # characters tokenized at once


def _pieces(document: str):
    """`document` in pieces of at most PIECE_CHARS characters, each cut before a whitespace where one is near."""
    start = 0
    while len(document) - start > PIECE_CHARS:
        end = start + PIECE_CHARS
        cut = max(document.rfind(" ", end - PIECE_CHARS // 2, end), document.rfind("\n", end - PIECE_CHARS // 2, end))
        end = cut if cut > start else end
        yield document[start:end]
        start = end
    yield document[start:]


def token_windows(stream, length: int, count: int, seed: int | None, what: str) -> torch.Tensor:
    """`count` non-overlapping windows of `length` tokens: the first ones (seed None) or a seeded sample."""
    available = len(stream) // length
    if available < count:
        raise MoeExportError(
            f"{what} has {len(stream)} tokens, enough for {available} windows of {length}; "
            f"{count} were asked for (lower the count or the length, or give more text)"
        )
    starts = np.arange(available) * length
    if seed is not None:
        starts = np.sort(np.random.default_rng(seed).choice(starts, size=count, replace=False))
    return torch.from_numpy(np.stack([np.asarray(stream[s : s + length], dtype=np.int64) for s in starts[:count]]))


def sample_from_model(model, tokenizer, count: int, length: int, seed: int) -> torch.Tensor:
    """Data-free calibration: `count` sequences sampled from the model, starting at BOS."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        prompt = torch.full((count, 1), start, dtype=torch.long)
        with torch.no_grad():
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=length - 1,
                min_new_tokens=length - 1,
                pad_token_id=start,
            )
    finally:
        torch.random.set_rng_state(generator_state)
    return out[:, :length]


def calibration_tokens(model, tokenizer, config: CalibrationConfig) -> torch.Tensor:
    """The calibration set: [num_sequences, sequence_length] token ids."""
    if config.source == MODEL_SAMPLED:
        return sample_from_model(model, tokenizer, config.num_sequences, config.sequence_length, config.seed)
    stream = token_stream(tokenizer, read_documents(config.source))
    return token_windows(stream, config.sequence_length, config.num_sequences, config.seed, config.source)
