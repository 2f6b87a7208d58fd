"""File-system helpers every layer shares: atomic writes, one cross-process lock, artifact reads.

A reader sees the old file or the new one, never half of either: every write goes to a hidden temporary
file in the target's folder (same file system), is flushed to disk, then `os.replace`d over the target.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # polars loads on first use, so the method core (numpy, faiss) stays light
    import polars as pl

TEMP_SUFFIX = ".tmp"
# Our temp names: `.<target>.harp-<writer pid>-<random>.tmp`. The pid lets the next start delete the temp
# files of writers that died (kill -9 leaves them behind), and the marker keeps anyone else's files safe.
_TEMP_RE = re.compile(r"^\..+\.harp-(?P<pid>\d+)-[A-Za-z0-9_]+(\.tmp)?$")
# Every file harp writes gets this mode, whatever the process umask: the owner reads and writes, the group
# (a team sharing DAGSTER_HOME) reads, others get nothing (pools and eval sets may be private data).
FILE_MODE = 0o640


def temp_prefix(target: Path) -> str:
    """The prefix of a temp file (or folder) written by this process on its way to `target`."""
    return f".{target.name}.harp-{os.getpid()}-"


def remove_stale_temps(folder: str | os.PathLike, *, recursive: bool = True) -> list[Path]:
    """Delete the temp files and folders under `folder` that a writer of ours left when it died (its pid is no
    longer running); anything not named by `temp_prefix`, and the temps of live writers, stay."""
    import psutil

    removed: list[Path] = []
    root = Path(folder)
    if not root.is_dir():
        return removed
    todo = [root]
    while todo:
        current = todo.pop()
        with contextlib.suppress(FileNotFoundError, PermissionError):
            for entry in os.scandir(current):
                m = _TEMP_RE.match(entry.name)
                if m is not None and not psutil.pid_exists(int(m.group("pid"))):
                    path = Path(entry.path)
                    with contextlib.suppress(FileNotFoundError):
                        if entry.is_dir(follow_symlinks=False):
                            shutil.rmtree(path)
                        else:
                            path.unlink()
                        removed.append(path)
                elif recursive and entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                    todo.append(Path(entry.path))
    return removed


# Write failures that are about the place, not the data: the message then names the path and the cause.
_PLACE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


class WriteError(OSError):
    """A file could not be written because of where it goes (full disk, read-only folder, permissions)."""

    def __str__(self) -> str:
        return str(self.strerror)  # the message names the path; no "[Errno 28]" prefix


def _place_error(exc: OSError, target: Path) -> OSError:
    if exc.errno not in _PLACE_ERRORS or isinstance(exc, WriteError):
        return exc
    return WriteError(exc.errno, f"cannot write {target}: {_PLACE_ERRORS[exc.errno]} (in {target.parent})")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on a clean exit it replaces `path`, on an error it is removed.

    A full disk, a read-only folder or missing permissions raise `WriteError` naming `path`."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target), suffix=TEMP_SUFFIX, dir=target.parent)
    except OSError as exc:
        raise _place_error(exc, target) from exc
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _place_error(exc, target) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(folder: str | os.PathLike) -> None:
    """Raise `WriteError` naming `folder` when a file cannot be written there (before a run starts)."""
    probe = Path(folder) / ".harp-write-check"
    with atomic_write(probe) as fh:
        fh.write(b"ok")
    probe.unlink(missing_ok=True)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (the directory entry, not only the file's bytes)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)


def write_parquet(df: pl.DataFrame, path: str | os.PathLike) -> None:
    with atomic_write(path) as fh:
        df.write_parquet(fh)


def write_npz(path: str | os.PathLike, **arrays: Any) -> None:
    with atomic_write(path) as fh:
        np.savez(fh, **arrays)


def read_json(path: Path, what: str) -> Any:
    """A JSON artifact an upstream step wrote; a missing one names the step (`what`) to run first."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: materialise the {what} asset first") from None


def read_parquet(path: Path, what: str) -> pl.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: materialise the {what} asset first")
    import polars as pl

    with open(path, "rb") as fh:  # one handle, so a concurrent os.replace cannot mix two versions
        return pl.read_parquet(fh)


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move a finished directory into place; an existing `dest` is swapped out first, then removed.

    A directory cannot be replaced by `os.replace` when the target exists and is not empty, so the old one is
    renamed aside first; the gap between the two renames is the only moment `dest` is missing.
    """
    old = None
    if dest.exists():
        old = dest.with_name(f"{temp_prefix(dest)}old{time.monotonic_ns()}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def file_lock(
    path: str | os.PathLike, *, timeout_s: float | None = None, holder: str = "another process holds it"
) -> Iterator[None]:
    """An exclusive advisory lock (`flock`) on `path`, held across processes until the block ends.

    `timeout_s=None` waits as long as it takes; otherwise a `TimeoutError` names the lock file and what the
    other holder is doing (`holder`).
    """
    lock = Path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as fh:
        if timeout_s is None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"could not lock {lock} within {timeout_s} s: {holder}") from None
                    time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
