"""Atomic file-system writes shared by the resources and the demo: readers see the old or the new, never half."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move a finished directory into place; an existing `dest` is swapped out first, then removed.

    A directory cannot be replaced by `os.replace` when the target exists and is not empty, so the old one is
    renamed aside first; the gap between the two renames is the only moment `dest` is missing.
    """
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
