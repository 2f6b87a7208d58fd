"""Shared fixtures: a tiny causal LM trained once per session, and the tiny pipeline materialised once.

Helpers the tests share live in `tests/helpers.py`; this file only declares fixtures.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import TINY_CONFIG, TinyPipeline, materialise_tiny_pipeline, tiny_corpus

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before each test and its fixtures, put SIGTERM, SIGHUP and SIGQUIT back at the OS level to the handlers
    Python has on record. Native code run in this process (seen after the Ray tests) can set them to SIG_IGN
    behind Python's back; every child started afterwards would inherit that and ignore SIGTERM, and a
    multiprocessing pool's workers would then outlive `terminate()`, hanging its join."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        handler = signal.getsignal(sig)
        if handler is not None:
            signal.signal(sig, handler)


@pytest.fixture
def torch_one_thread() -> Iterator[None]:
    """Run a test on one torch thread: tiny models are far faster so on a shared, loaded CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~120k-parameter GPT-2 style model with its tokenizer, trained once per session (a few seconds)."""
    from harp_demo.base_model import train_small_causal_lm

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("tiny_lm") / "model"
        return train_small_causal_lm(tiny_corpus(), out, seed=0, **TINY_CONFIG)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> TinyPipeline:
    """The tiny demo with the whole graph materialised once (`run_harp`); modules work on copies of it."""
    return materialise_tiny_pipeline(tmp_path_factory.mktemp("tiny_pipeline"))
