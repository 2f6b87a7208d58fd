"""The Dagster UI as a user starts it, for the browser test: `dagster-webserver` on a free loopback port over an
instance folder and a workspace file, stopped with its whole process group (code server and runs included)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ROOT_VAR = "HARP_UI_TEST_ROOT"  # names the tiny pipeline copy that tests/ui_location.py serves

# A run coordinator that launches at once, with no daemon: what the UI's Materialize button needs here.
IMMEDIATE_RUNS = "\nrun_coordinator:\n  module: dagster._core.run_coordinator\n  class: DefaultRunCoordinator\n"


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_instance_config(home: Path) -> Path:
    """`home/dagster.yaml`: the project's instance config (dagster_home/dagster.yaml) with immediate runs."""
    path = home / "dagster.yaml"
    path.write_text((REPO / "dagster_home" / "dagster.yaml").read_text() + IMMEDIATE_RUNS)
    return path


def write_workspace(path: Path, module_file: Path, location: str) -> Path:
    """A workspace file loading the `defs` of `module_file`, with its folder as working directory (on sys.path)."""
    path.write_text(
        "load_from:\n"
        "  - python_file:\n"
        f"      relative_path: {module_file}\n"
        f"      working_directory: {module_file.parent}\n"
        f"      location_name: {location}\n"
    )
    return path


@contextlib.contextmanager
def webserver(workspace: Path, env: dict[str, str], log_path: Path, *, timeout: float = 120) -> Iterator[str]:
    """Start `dagster-webserver` on a free loopback port and yield its base URL once `/server_info` answers.

    Fails with the log's tail when the server exits or does not answer within `timeout` seconds."""
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(BIN / "dagster-webserver"), "-w", str(workspace), "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"dagster-webserver exited ({proc.returncode}): "
                                         + log_path.read_text()[-3000:])
                try:
                    if requests.get(f"{url}/server_info", timeout=2).ok:
                        break
                except requests.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"dagster-webserver did not answer in {timeout:.0f} s: "
                                         + log_path.read_text()[-3000:])
                time.sleep(0.5)
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
