"""Shared fixtures: a tiny causal LM trained once per session, and the tiny pipeline materialised once.

Helpers the tests share live in `tests/helpers.py`; this file only declares fixtures.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import TINY_CONFIG, TinyPipeline, materialise_tiny_pipeline, tiny_corpus

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
