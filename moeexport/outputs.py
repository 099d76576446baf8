"""Where results are written: never into or over the source, only ever whole, by one run at a time.

Everything a command writes goes into a private staging directory beside
`--out` (`.NAME.partial-PID-XXXX`) and is renamed to `--out` when complete, so
an interrupted or failed run leaves nothing under the real name, and a
previous result is replaced only by a finished one. Staging directories of
processes that are gone (killed runs) are removed by the next run. A run holds
a lock on its output (`.NAME.lock`) from start to end, so a second run into the
same output stops at once instead of racing it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from moeexport.errors import MoeExportError


def check_output(out: str | Path, source: Path | None, overwrite: bool, flag: str = "--out") -> Path:
    """`out` as a path it is safe to write, or a one-line error saying why not and what to do."""
    out = Path(out)
    resolved = _apart_from_source(out, source, flag)
    if out.exists() and not out.is_dir():
        raise MoeExportError(f"{flag} {out} is an existing file, not a directory; choose another {flag}")
    if out.exists() and not overwrite:
        raise MoeExportError(f"output {out} already exists; pass --overwrite or choose another {flag}")
    parent = _existing_parent(resolved.parent)
    if not parent.is_dir():
        raise MoeExportError(f"{flag} {out}: {parent} is a file, so nothing can be written under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MoeExportError(f"{flag} {out}: {parent} is not writable; choose an output you can write to")
    return out


def check_output_file(out: str | Path, source: Path | None, overwrite: bool, flag: str = "--out") -> Path:
    """`out` as a file path it is safe to write (outside the model read, not an existing file unless
    `overwrite`), or a one-line error saying why not and what to do."""
    out = Path(out)
    _apart_from_source(out, source, flag)
    if out.is_dir():
        raise MoeExportError(f"{flag} {out} is a directory; give a file path")
    if out.exists() and not overwrite:
        raise MoeExportError(f"{out} exists; pass --overwrite or choose another {flag}")
    return out


def _apart_from_source(out: Path, source: Path | None, flag: str = "--out") -> Path:
    """`out` resolved, refused when it is, holds or lies inside the model being read."""
    try:
        resolved = out.resolve()
    except (RuntimeError, OSError) as error:  # Python raises RuntimeError for a symlink loop
        raise MoeExportError(f"{flag} {out} cannot be resolved ({error}): a symlink loop lies on its way; choose "
                             f"another {flag}") from None
    if source is not None:
        source = source.resolve()
        if resolved == source or source.is_relative_to(resolved):
            raise MoeExportError(f"{flag} {out} holds the model being read ({source}); choose an output elsewhere")
        if resolved.is_relative_to(source):
            raise MoeExportError(f"{flag} {out} is inside the model directory {source}; moeexport never writes into "
                                 "its source: choose an output elsewhere")
    return resolved


@contextmanager
def output_lock(out: str | Path):
    """Hold `out`'s lock for the block, or fail at once with one line if another run holds it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f".{out.name}.lock"
    while True:
        handle = open(path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise MoeExportError(f"another moeexport run is writing {out} (it holds {path}); wait for it to finish "
                                 "or choose another --out") from None
        if path.exists() and os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
            break  # locked the file that is still there (not one a finishing run just removed)
        handle.close()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        handle.close()


def replace_atomically(path: Path, write) -> None:
    """`write(temporary)` to a uniquely named file next to `path`, then rename it over `path`:
    readers see the old file or the whole new one, and concurrent writers cannot collide."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        write(Path(name))
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def sha256_of_file(path: Path) -> str:
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


@contextmanager
def staged(out: Path, overwrite: bool):
    """Yield a staging directory; on success it becomes `out` (replacing an old one), on any error it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        yield staging
        _apply_umask(staging)
        publish(staging, out, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish(staging: Path, out: Path, overwrite: bool) -> None:
    """Rename `staging` to `out`; an old `out` is moved aside first and deleted only after the rename."""
    old = None
    if out.exists():
        if not overwrite:
            raise MoeExportError(f"output {out} appeared while this run was writing (another run?); nothing replaced")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.rename(staging, out)
    except OSError as error:
        if old is not None and not out.exists():
            os.replace(old / out.name, out)  # put the previous result back
        raise MoeExportError(f"could not move the finished output to {out} ({error.strerror}); another run may "
                             "be writing there") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_abandoned_staging(out: Path) -> None:
    for entry in out.parent.glob(f".{out.name}.partial-*"):
        pid = entry.name[len(f".{out.name}.partial-"):].split("-")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
    for entry in out.parent.glob(f".{out.name}.old-*"):  # a run killed between publish's two renames
        if not out.exists() and (entry / out.name).exists():
            os.replace(entry / out.name, out)  # the previous result, which nothing replaced: back under its name
        shutil.rmtree(entry, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _apply_umask(directory: Path) -> None:
    """mkdtemp creates owner-only directories; give the result the user's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    for root, directories, files in os.walk(directory):
        Path(root).chmod(0o777 & ~umask)
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                path.chmod(0o666 & ~umask)
