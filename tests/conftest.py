"""Shared test fixtures: a tiny causal LM trained here once per session (no model hub)."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

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
    from harp_assets.demo.base_model import train_small_causal_lm

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("tiny_lm") / "model"
        return train_small_causal_lm(tiny_corpus(), out, seed=0, **TINY_CONFIG)
    finally:
        torch.set_num_threads(before)
