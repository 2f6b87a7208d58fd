"""LESS, the train-based baseline: the sketch, the Adam preconditioning and the scores derived by hand, then
the real gradients of a tiny LoRA model."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from helpers import TINY_WORDS

from harp import stages
from harp.method.less import CountSketch, adam_direction, less_scores, less_select
from harp.models.device import Device
from harp.models.finetuner import LoraFinetuner


def test_count_sketch_is_a_signed_bucket_sum():
    sk = CountSketch.make(7, 3, seed=4)
    dense = np.zeros((7, 3))
    dense[np.arange(7), sk.buckets] = sk.signs  # column h(k) of row k holds s(k)
    x = np.arange(14, dtype=np.float64).reshape(2, 7) - 5.0
    np.testing.assert_allclose(sk.apply(x), x @ dense)
    again = CountSketch.make(7, 3, seed=4)
    np.testing.assert_array_equal(again.buckets, sk.buckets)
    assert not np.array_equal(CountSketch.make(7, 3, seed=5).buckets, sk.buckets) or not np.array_equal(
        CountSketch.make(7, 3, seed=5).signs, sk.signs)
    with pytest.raises(ValueError, match=r"shape \(n, 7\)"):
        sk.apply(np.zeros((2, 6)))


def test_count_sketch_keeps_inner_products_on_average():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=500), rng.normal(size=500)
    b = 0.6 * a + 0.8 * b  # cosine about 0.6
    est = [float((lambda s: s[0] @ s[1])(CountSketch.make(500, 256, seed=k).apply(np.stack([a, b]))))
           for k in range(200)]
    assert abs(np.mean(est) - a @ b) < 0.05 * abs(a @ b)


def test_adam_direction_by_hand():
    g = np.array([[2.0, -1.0]])
    m, v = np.array([1.0, 0.0]), np.array([4.0, 1.0])
    got = adam_direction(g, m, v, beta1=0.5, beta2=0.75, eps=0.0)
    # m' = (0.5*1 + 0.5*2, 0.5*0 - 0.5*1) = (1.5, -0.5); v' = (0.75*4 + 0.25*4, 0.75*1 + 0.25*1) = (4, 1)
    np.testing.assert_allclose(got, [[1.5 / 2.0, -0.5 / 1.0]])


def test_scores_take_the_best_domains_mean_cosine():
    proxy = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    domains = ["b", "b", "a", "a"]
    train = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    s = less_scores(train, proxy, domains)
    assert s.domains == ("a", "b")
    # row 0 points at domain b (cos 1) and away from a (cos 0); row 2 sits between (cos 1/sqrt 2 to both);
    # row 3 points against b: its best is a with cosine 0.
    np.testing.assert_allclose(s.per_domain, [[0, 1], [1, 0], [2**-0.5, 2**-0.5], [0, -1]], atol=1e-12)
    np.testing.assert_allclose(s.score, [1, 1, 2**-0.5, 0], atol=1e-12)
    assert s.best_domain.tolist() == [1, 0, 0, 0]
    assert less_select(s.score, 3).tolist() == [0, 1, 2]  # ties by row
    assert less_select(s.score, 10).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="all zero"):
        less_scores(np.zeros((1, 2)), proxy, domains)


@pytest.fixture
def finetuner(tiny_model_dir, torch_one_thread):
    return LoraFinetuner(base_model=str(tiny_model_dir), device=Device(device="cpu"), r=4, epochs=2, batch_size=4,
                         max_length=32, learning_rate=1e-2)


def test_example_gradients_are_each_examples_own_and_leave_the_adapter(finetuner):
    prompts = [" ".join(TINY_WORDS[i:i + 3]) for i in range(5)]
    responses = ["cat", "dog", "cat", "dog", "cat"]
    before = {k: v.detach().clone() for k, v in finetuner.adapter_parameters().items()}
    finetuner.train(prompts, responses, seed=0)  # a non-zero LoRA B, so every LoRA tensor has a gradient
    trained = {k: v.detach().clone() for k, v in finetuner.adapter_parameters().items()}
    blocks = list(finetuner.example_gradients(prompts + prompts[:1], responses + responses[:1], chunk=4))
    assert [b.shape[0] for b in blocks] == [4, 2]
    g = np.vstack(blocks)
    assert g.shape == (6, sum(v.numel() for v in trained.values()))
    np.testing.assert_array_equal(g[5], g[0])  # the same example, the same gradient
    assert np.linalg.norm(g[0] - g[1]) > 0
    for k, v in finetuner.adapter_parameters().items():
        assert torch.equal(v, trained[k])  # no optimiser step
    assert any(not torch.equal(trained[k], before[k]) for k in trained)
    # The gradient is the loss's: a small step against it lowers that example's loss.
    with torch.no_grad():
        params = list(finetuner.adapter_parameters().values())
        sizes = [p.numel() for p in params]
        step = np.split(-1e-2 * g[0] / np.linalg.norm(g[0]), np.cumsum(sizes)[:-1])
        loss0 = _loss(finetuner, prompts[0], responses[0])
        for p, d in zip(params, step, strict=True):
            p.add_(torch.from_numpy(d.astype(np.float32)).reshape(p.shape))
        assert _loss(finetuner, prompts[0], responses[0]) < loss0


def _loss(ft: LoraFinetuner, prompt: str, response: str) -> float:
    seqs, plens, _ = ft.encode_examples([prompt], [response])
    with ft.model_for_eval() as (model, _tok):
        ids = torch.tensor(seqs)
        logits = model(input_ids=ids).logits[0, :-1]
        tgt = ids[0, 1:]
        keep = torch.arange(tgt.numel()) >= plens[0] - 1
        return float(torch.nn.functional.cross_entropy(logits[keep], tgt[keep]))


def test_train_keeps_adams_moments_when_asked(finetuner):
    stats = finetuner.train(["a b c", "b c d"], ["cat", "dog"], seed=0, keep_moments=True)
    m = stats.moments
    assert m is not None and m.steps == stats.steps
    n = sum(v.numel() for v in finetuner.adapter_parameters().values())
    assert m.exp_avg.shape == m.exp_avg_sq.shape == (n,)
    assert (m.exp_avg_sq >= 0).all() and m.exp_avg_sq.max() > 0
    assert (m.beta1, m.beta2) == (0.9, 0.999)
    assert finetuner.train(["a b c"], ["cat"], seed=0).moments is None


def test_less_ranks_copies_of_proxy_items_above_unrelated_examples(finetuner):
    # The proxy items ask for "cat" after colour words; the pool holds copies of such items and examples that
    # answer "dog" after number words. LESS must rank the aligned copies first.
    words_a, words_b = TINY_WORDS[:4], TINY_WORDS[10:14]
    rng = np.random.default_rng(0)
    eval_set = pl.DataFrame({
        "example_id": [f"q{i}" for i in range(6)], "domain": ["d0", "d1"] * 3,
        "prompt": [" ".join(rng.choice(words_a, 3)) for _ in range(6)], "answer_text": ["cat"] * 6})
    aligned = [(" ".join(rng.choice(words_a, 3)), "cat") for _ in range(10)]
    other = [(" ".join(rng.choice(words_b, 3)), "dog dog") for _ in range(10)]
    pool = [x for pair in zip(other, aligned, strict=True) for x in pair]  # interleaved
    feats = stages.less_features(finetuner, [p for p, _ in pool], [r for _, r in pool], eval_set, seed=0,
                                 warmup_fraction=0.2, dim=256)
    assert feats.warmup_rows.size == 4
    top = stages.select_less_rows(feats, 10)
    aligned_rows = set(range(1, 20, 2))
    assert len(aligned_rows & set(top.tolist())) >= 8
    assert feats.scores.score[sorted(aligned_rows)].mean() > feats.scores.score[sorted(set(range(20)) - aligned_rows)].mean()
    # Deterministic for a seed.
    again = stages.less_features(finetuner, [p for p, _ in pool], [r for _, r in pool], eval_set, seed=0,
                                 warmup_fraction=0.2, dim=256)
    np.testing.assert_array_equal(again.scores.score, feats.scores.score)
