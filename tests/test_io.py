"""File-system helpers: our temp files carry their writer's pid, and only a dead writer's are swept."""

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harp.io import atomic_write, remove_stale_temps, temp_prefix


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_temp_files_of_dead_writers_of_ours_are_removed(tmp_path: Path) -> None:
    dead = _dead_pid()
    (tmp_path / "sub").mkdir()
    ours_dead = tmp_path / f".leaf.parquet.harp-{dead}-abc123.tmp"
    ours_dead_dir = tmp_path / "sub" / f".base_model.harp-{dead}-x_9"
    ours_live = tmp_path / f"{temp_prefix(tmp_path / 'leaf.parquet')}zz.tmp"
    foreign = [tmp_path / ".notes.txt.tmp", tmp_path / ".cache.1234.tmp", tmp_path / "harp-1-a.tmp",
               tmp_path / "data.parquet"]
    ours_dead.write_bytes(b"")
    ours_dead_dir.mkdir()
    (ours_dead_dir / "weights.bin").write_bytes(b"x")
    ours_live.write_bytes(b"")
    for f in foreign:
        f.write_bytes(b"keep")
    removed = remove_stale_temps(tmp_path)
    assert sorted(removed) == sorted([ours_dead, ours_dead_dir])
    assert not ours_dead.exists() and not ours_dead_dir.exists()
    assert ours_live.exists() and all(f.exists() for f in foreign)
    # not recursive: a dead writer's temp in a sub-folder stays
    again = tmp_path / "sub" / f".x.harp-{dead}-q.tmp"
    again.write_bytes(b"")
    assert remove_stale_temps(tmp_path, recursive=False) == [] and again.exists()


def test_atomic_write_names_its_temp_after_this_process(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    with atomic_write(target, "w") as fh:
        names = os.listdir(tmp_path)
        fh.write("{}")
    assert len(names) == 1 and names[0].startswith(f".out.json.harp-{os.getpid()}-") and names[0].endswith(".tmp")
    assert os.listdir(tmp_path) == ["out.json"]


def test_every_file_gets_one_mode_whatever_the_umask(tmp_path: Path) -> None:
    import stat

    import polars as pl

    from harp.io import FILE_MODE, write_json, write_npz
    from harp.lineage import LineageStore

    lineage = LineageStore(root=str(tmp_path / "harp"))
    for umask in (0o000, 0o077):
        old = os.umask(umask)
        try:
            folder = tmp_path / f"u{umask:o}"
            write_json(folder / "a.json", {"x": 1})
            write_npz(folder / "b.npz", x=[1, 2])
            written = [folder / "a.json", folder / "b.npz"]
            frame = pl.DataFrame({"leaf_id": ["L1"], "example_id": ["e1"], "content_hash": ["h"],
                                  "data_version": [f"v{umask}"]})
            written.append(lineage.write_partition("measured_members", "L1", frame))
            lineage.refresh_catalog()
            written.append(lineage.catalog_path)
        finally:
            os.umask(old)
        for path in written:
            assert stat.S_IMODE(path.stat().st_mode) == FILE_MODE, (oct(umask), path)


# -- a full or read-only home ------------------------------------------------------------------------------


def test_a_failing_write_names_the_path_and_leaves_no_temp(tmp_path: Path, monkeypatch) -> None:
    import errno

    from harp import io
    from harp.io import WriteError, write_json

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", full)
    target = tmp_path / "artifacts" / "pool.json"
    try:
        write_json(target, {"x": 1})
    except WriteError as exc:
        assert str(target) in str(exc) and "no space left" in str(exc)
    else:
        raise AssertionError("the write did not fail")
    assert os.listdir(target.parent) == []


@contextlib.contextmanager
def _tmpfs(folder: Path, options: str):
    folder.mkdir(parents=True, exist_ok=True)
    got = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if got.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({got.stderr.decode().strip()}); the injected fault test covers it")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_file_system_names_the_file(tmp_path: Path) -> None:
    import numpy as np

    from harp.io import WriteError, write_npz

    with _tmpfs(tmp_path / "small", "size=64k") as home:
        target = home / "artifacts" / "embeddings.npz"
        with pytest.raises(WriteError, match=re.escape(str(target)) + ".*no space left"):
            write_npz(target, X=np.random.default_rng(0).standard_normal((200, 384)))
        assert not [p for p in (home / "artifacts").iterdir()]  # the partial temp file is gone


def test_a_read_only_dagster_home_fails_the_demo_command_naming_it(tmp_path: Path, monkeypatch, capsys) -> None:
    from harp_demo import run as demo_run

    with _tmpfs(tmp_path / "home", "size=64k,ro") as home:
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        assert demo_run.main(["--no-build"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: cannot write") and str(home) in last and "read-only" in last
