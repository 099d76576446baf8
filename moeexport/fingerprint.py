"""A checkpoint's identity by content: the key its calibration statistics are cached under.

It is the SHA-256 of every file loading reads: config.json, the manifest, the
tokenizer files and all weight bytes (so two swapped layers or one edited weight
give another fingerprint). Hashing runs at about 0.6 s per GiB; a file of
DIGEST_MEMO_BYTES or more has its digest remembered in a digests directory by
(device, inode, size, mtime, ctime), which any write to the file changes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from moeexport import reads
from moeexport.checkpoint_files import MANIFEST, SAFE_INDEX, TOKENIZER_FILES, is_gguf
from moeexport.outputs import replace_atomically, sha256_of_file

DIGEST_MEMO_BYTES = 256 * 2**20


def fingerprint(path: Path, weight_files: tuple[Path, ...], digests: Path | None) -> str:
    """The fingerprint of the checkpoint directory (or GGUF file) `path` whose weights are `weight_files`;
    large files' digests remembered under `digests` (None: every file is hashed)."""
    if is_gguf(path):
        return file_sha256(path, digests)[:16]
    files = [path / "config.json", path / MANIFEST, path / SAFE_INDEX]
    files += [path / name for name in TOKENIZER_FILES] + list(weight_files)
    digest = hashlib.sha256()
    for file in sorted(set(files)):
        if file.is_file():
            digest.update(f"{file.name}\0{file_sha256(file, digests)}\0".encode())
    return digest.hexdigest()[:16]


def file_sha256(path: Path, digests: Path | None) -> str:
    status = path.stat()
    if digests is None or status.st_size < DIGEST_MEMO_BYTES:
        return _hashed(path)
    memo = digests / f"{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]}.json"
    identity = [status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns]
    try:
        remembered = json.loads(memo.read_text())
        if remembered["stat"] == identity:
            return remembered["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no memo yet, or an unreadable one: hash again
    value = _hashed(path)
    try:
        entry = json.dumps({"stat": identity, "sha256": value})
        replace_atomically(memo, lambda temporary: temporary.write_text(entry))
    except OSError:
        pass  # a cache that cannot be written costs time, not correctness
    return value


def _hashed(path: Path) -> str:
    """The file's SHA-256, its bytes counted as read from the model (moeexport.reads)."""
    value = sha256_of_file(path)
    reads.count(path.stat().st_size)
    return value
