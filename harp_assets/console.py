"""What the console commands show while the graph runs: progress bars, not Dagster's raw event stream.

`RunConsole` is a context manager for `harp-dagster run` and `python -m harp_demo.run`. While it is open:

- Dagster's event records (every DEBUG line a run's console logger would print) and the INFO log of our own
  loggers go to a log file under the instance folder, `<home>/logs/harp-<time>-<pid>.log`;
- stderr shows one bar per run (its steps, the step running now) and one per long loop below it, fed by
  `harp.progress` (count, rate and the loop's own time left: leaf training weighs its examples), plus warnings,
  errors and one line per finished run. Where stderr is not a terminal (CI, a log), the bars become plain
  lines: each loop at most every 30 s and at its end.

The summary a command prints afterwards goes to stdout, untouched.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TextIO

from dagster import DagsterEventType

from harp import progress
from harp_assets.runner import RunEvents

LINE_EVERY_S = 30.0  # plain-line mode: at most one line per loop this often, besides its end
_FORMAT = "%(asctime)s %(levelname)-7s %(name)s - %(message)s"
# Short names for the jobs on the bars.
JOB_LABELS = {"harp_prepare_job": "prepare", "leaf_utilities_job": "leaves", "harp_select_job": "select",
              "harp_validation_job": "validation"}

RUN_END = {DagsterEventType.RUN_SUCCESS: "done", DagsterEventType.RUN_FAILURE: "FAILED",
           DagsterEventType.RUN_CANCELED: "canceled"}


def log_path(home: Path) -> Path:
    """A new log file's path for one command in the instance folder `home`."""
    return Path(home) / "logs" / f"harp-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


class _Echo(logging.Handler):
    """Warnings and errors of our Python loggers, written above the bars."""

    def __init__(self, console: RunConsole) -> None:
        super().__init__(logging.WARNING)
        self.console = console
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.console.write(self.format(record))


class ConsoleEvents(RunEvents):
    """Dagster's event records: every one to the log file; run and step events move the run's bar."""

    def __init__(self, console: RunConsole) -> None:
        super().__init__(logging.DEBUG)
        self.console = console
        self.setFormatter(logging.Formatter(_FORMAT))

    def start(self, job_name: str, run_id: str, steps: list[str]) -> None:
        self.console.run_started(job_name, run_id, steps)

    def emit(self, record: logging.LogRecord) -> None:
        self.console.file_line(self.format(record))
        meta = getattr(record, "dagster_meta", None) or {}
        event = meta.get("dagster_event")
        kind = getattr(event, "event_type", None)
        if kind == DagsterEventType.STEP_START:
            self.console.step_started(event.step_key)
        elif kind in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE, DagsterEventType.STEP_SKIPPED):
            self.console.step_finished(event.step_key)
        elif kind in RUN_END:
            self.console.run_finished(RUN_END[kind])
        if record.levelno >= logging.ERROR and kind != DagsterEventType.RUN_FAILURE:
            self.console.write(f"error: {record.getMessage()}")


class RunConsole:
    """Progress bars on `stream` (stderr) and the full log in `path`; see the module's docstring."""

    def __init__(self, home: Path, *, stream: TextIO | None = None, bars: bool | None = None) -> None:
        self.path = log_path(home)
        self.stream = stream if stream is not None else sys.stderr
        self.bars = bool(getattr(self.stream, "isatty", lambda: False)()) if bars is None else bars
        self.events = ConsoleEvents(self)
        self._stack = ExitStack()
        self._file: TextIO | None = None
        self._run: dict[str, Any] | None = None
        self._loops: dict[int, Any] = {}
        self._printed: dict[int, float] = {}
        self.runs: list[str] = []  # one line per finished run, as written

    # -- set-up ---------------------------------------------------------------------------------------------
    def __enter__(self) -> RunConsole:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self._stack.enter_context(open(self.path, "a", encoding="utf-8", buffering=1))
        root = logging.getLogger()
        saved = (root.level, list(root.handlers))
        to_file = logging.StreamHandler(self._file)
        to_file.setLevel(logging.INFO)
        to_file.setFormatter(logging.Formatter(_FORMAT))
        for h in saved[1]:
            root.removeHandler(h)
        root.addHandler(to_file)
        root.addHandler(_Echo(self))
        root.setLevel(logging.INFO)

        def restore() -> None:
            for h in list(root.handlers):
                root.removeHandler(h)
            for h in saved[1]:
                root.addHandler(h)
            root.setLevel(saved[0])

        self._stack.callback(restore)
        self._stack.callback(self._close_all)
        self._stack.enter_context(progress.listen(self.on_progress))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._file = None

    # -- output ---------------------------------------------------------------------------------------------
    def file_line(self, line: str) -> None:
        if self._file is not None:
            self._file.write(line + "\n")

    def write(self, line: str) -> None:
        """A line on the console above the bars (and in the log file)."""
        self.file_line(line)
        if self.bars:
            from tqdm import tqdm

            tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def _bar(self, **kw: Any) -> Any:
        from tqdm import tqdm

        return tqdm(file=self.stream, dynamic_ncols=True, leave=False, mininterval=0.2, **kw)

    # -- runs -----------------------------------------------------------------------------------------------
    def run_started(self, job_name: str, run_id: str, steps: list[str]) -> None:
        self._end_run()
        label = JOB_LABELS.get(job_name, job_name)
        self._run = {"label": label, "run_id": run_id, "t0": time.perf_counter(), "total": len(steps), "done": 0,
                     "bar": None}
        if self.bars:
            self._run["bar"] = self._bar(total=len(steps), desc=label, unit="step", position=0,
                                         bar_format="{desc}: {n_fmt}/{total_fmt} steps |{bar}| [{elapsed}{postfix}]")

    def step_started(self, step_key: str) -> None:
        if self._run and self._run["bar"] is not None:
            self._run["bar"].set_postfix_str(step_key)

    def step_finished(self, step_key: str) -> None:
        if self._run:
            self._run["done"] += 1
            if self._run["bar"] is not None:
                self._run["bar"].update(1)

    def run_finished(self, status: str) -> None:
        if not self._run:
            return
        run = self._run
        self._end_run()
        line = (f"{run['label']:<10} {status:<6} {run['done']}/{run['total']} steps in "
                f"{time.perf_counter() - run['t0']:.1f} s  (run {run['run_id'][:8]})")
        self.runs.append(line)
        self.write(line)

    def _end_run(self) -> None:
        for key in list(self._loops):
            self._close_loop(key)
        if self._run and self._run["bar"] is not None:
            self._run["bar"].close()
        self._run = None

    # -- loops (harp.progress) ------------------------------------------------------------------------------
    def on_progress(self, u: progress.ProgressUpdate) -> None:
        """One loop's update: its bar moves, or (plain lines) a line at most every 30 s and at the end."""
        done = u.total > 0 and u.count >= u.total
        if self.bars:
            bar = self._loops.get(u.key)
            if bar is None:
                bar = self._loops[u.key] = self._bar(
                    total=u.total, desc=u.what, position=1,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
            bar.n = u.count
            bar.set_postfix_str(u.text if u.count else "starting", refresh=True)
            if done:
                self._close_loop(u.key)
            return
        now = time.perf_counter()
        if u.count and (done or now - self._printed.get(u.key, -LINE_EVERY_S) >= LINE_EVERY_S):
            self._printed[u.key] = now
            self.write(f"  {u.what} {u.count}/{u.total}; {u.text}")
        if done:
            self._printed.pop(u.key, None)

    def _close_loop(self, key: int) -> None:
        bar = self._loops.pop(key, None)
        if bar is not None:
            bar.close()

    def _close_all(self) -> None:
        self._end_run()
