"""Shared test fixtures: a tiny causal LM trained here once per session (no model hub)."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The fixture corpus: "<four words>\n<word>" lines over a small vocabulary, so the tiny model learns the
# format and every word is a known token (LoRA cannot raise the logits of tokens the base never saw).
TINY_WORDS = (
    "alpha beta gamma delta red green blue one two three cat dog sun moon apple river stone cloud fast slow"
).split()
TINY_CONFIG = dict(
    vocab_size=400, n_layer=2, n_head=2, n_embd=64, n_positions=64, steps=100, batch_size=16, lr=1e-2
)


def tiny_corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{' '.join(rng.choices(TINY_WORDS, k=4))}\n{rng.choice(TINY_WORDS)}" for _ in range(n)]


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


@contextlib.contextmanager
def tiny_dagster_env(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[tuple[Path, Any]]:
    """(root folder, test instance) with `DAGSTER_HOME` set to `<root>/dagster_home` and torch on one thread,
    all undone on exit: the frame of every tiny-demo Dagster fixture."""
    import dagster as dg

    root = tmp_path_factory.mktemp(name)
    home = root / "dagster_home"
    home.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DAGSTER_HOME", str(home))
            with dg.instance_for_test() as instance:
                yield root, instance
    finally:
        torch.set_num_threads(threads)


def tiny_pipeline_setup(
    root: Path,
    *,
    pool: int,
    growth: int,
    base: Any,
    settings: dict[str, Any],
    lora: dict[str, Any],
) -> tuple[Path, Any, dict[str, Any]]:
    """A tiny demo under `root`: the first `pool` rows as one pool file, the next `growth` rows kept for a growth
    step, and the pipeline's resources on one CPU thread. DAGSTER_HOME must already point at a temporary folder."""
    import polars as pl

    from harp.config import HarpSettings
    from harp.lineage import LineageStore
    from harp.models.device import DeviceResource
    from harp.models.embedder import EmbedderResource
    from harp.models.evaluator import Evaluator
    from harp.models.finetuner import LoraFinetuner
    from harp.sources import PoolSource
    from harp_demo.build import build_demo

    demo = build_demo(root / "demo", pool_size=pool + growth, seed=0, model=base)
    full = pl.read_parquet(demo.pool)
    pool_dir = root / "pool"
    pool_dir.mkdir()
    full.head(pool).write_parquet(pool_dir / "part-000.parquet")
    resources = {
        "pool_source": PoolSource(pool_path=str(pool_dir), eval_path=str(demo.eval_set)),
        "lineage": LineageStore(),
        "settings": HarpSettings(**settings),
        "embedder": EmbedderResource(device="cpu", max_length=32),
        "finetuner": LoraFinetuner(
            base_model=str(demo.base_model), device=DeviceResource(device="cpu", cpu_threads=1), **lora
        ),
        "evaluator": Evaluator(batch_size=64),
    }
    return pool_dir, full, resources
