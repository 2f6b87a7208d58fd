"""The code location the browser test's Dagster UI serves: the project's assets, checks and jobs over the tiny
pipeline's resources, so that what the UI launches runs on the same data, settings and LoRA recipe that
materialised the copy it shows (the default resources would point at the demo instead).

`tests/test_browser_ui.py` loads it through a workspace file (`python_file`, working directory `tests/`) and
names the pipeline folder in HARP_UI_TEST_ROOT.
"""

from __future__ import annotations

import os
from pathlib import Path

from helpers import pipeline_defs, pipeline_resources
from ui_server import ROOT_VAR

_root = os.environ.get(ROOT_VAR)
if not _root:
    raise RuntimeError(f"{ROOT_VAR} is not set: it names the tiny pipeline folder this code location serves")
if not (Path(_root) / "demo").is_dir():
    raise RuntimeError(f"{ROOT_VAR}={_root!r} holds no demo/ folder: not a tiny pipeline copy")

defs = pipeline_defs(pipeline_resources(Path(_root)))
