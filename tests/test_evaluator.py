from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from harp.models.evaluator import Evaluator, encode_continuation, encode_prompt, parse_eval_set
from harp.models.vllm_backend import INSTALL_HINT, vllm_available

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def direct_choice_logprob(model, tok, prompt: str, choice: str) -> tuple[float, int]:
    """Reference: one unpadded forward pass over prompt+choice, summing log p of each choice token."""
    p_ids = encode_prompt(tok, prompt)
    c_ids = encode_continuation(tok, choice)
    ids = torch.tensor([p_ids + c_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    total = sum(float(logp[len(p_ids) + k - 1, t]) for k, t in enumerate(c_ids))
    return total, len(c_ids)


MC_ROWS = [
    {"example_id": "a", "domain": "colors", "prompt": "red green blue one", "choices": ["red", "cat dog", "sun"], "answer": 0},
    {"example_id": "b", "domain": "colors", "prompt": "blue", "choices": ["two three", "moon"], "answer": 1},
    {"example_id": "c", "domain": "animals", "prompt": "cat dog sun moon apple river", "choices": ["dog", "stone cloud fast", "alpha", "slow"], "answer": 2},
    {"example_id": "d", "domain": "animals", "prompt": "", "choices": ["cat", "beta gamma"], "answer": 0},
]


def test_choice_scores_match_direct_forward_passes(lm):
    model, tok = lm
    # batch_size 3 mixes sequences of different lengths in one right-padded batch and spans several batches
    res = Evaluator(batch_size=3).evaluate(model, tok, MC_ROWS)
    assert res.example_ids == ["a", "b", "c", "d"]
    for row, scores, pred in zip(MC_ROWS, res.choice_scores, res.predictions, strict=True):
        ref = [direct_choice_logprob(model, tok, row["prompt"], c)[0] for c in row["choices"]]
        np.testing.assert_allclose(scores, ref, rtol=1e-4, atol=1e-4)
        assert pred == int(np.argmax(ref))
    expected = np.array([float(p == r["answer"]) for p, r in zip(res.predictions, MC_ROWS, strict=True)])
    np.testing.assert_array_equal(res.correct, expected.astype(np.float32))
    assert res.correct.dtype == np.float32
    assert res.per_domain == {
        "animals": float(expected[2:].mean()),
        "colors": float(expected[:2].mean()),
    }
    # one sequence per batch (no padding at all) gives the same scores
    single = Evaluator(batch_size=1).evaluate(model, tok, MC_ROWS)
    for s1, s2 in zip(single.choice_scores, res.choice_scores, strict=True):
        np.testing.assert_allclose(s1, s2, rtol=1e-4, atol=1e-4)


def test_length_normalisation_flips_a_constructed_choice(lm):
    model, tok = lm
    prompt = "red green blue one"
    cands = ["red", "cat", "sun", "moon", "dog", "red green", "cat dog sun", "one two three", "apple river", "slow fast"]
    ref = {c: direct_choice_logprob(model, tok, prompt, c) for c in cands}
    pair = next(
        (
            (a, b)
            for a, b in itertools.permutations(cands, 2)
            if ref[a][0] > ref[b][0] and ref[a][0] / ref[a][1] < ref[b][0] / ref[b][1]
        ),
        None,
    )
    assert pair is not None, "no pair where the sum and the per-token mean disagree"
    a, b = pair
    rows = [{"example_id": "x", "domain": "d", "prompt": prompt, "choices": [a, b], "answer": 0}]
    summed = Evaluator().evaluate(model, tok, rows)
    mean = Evaluator(length_normalize=True).evaluate(model, tok, rows)
    assert summed.predictions == [0] and summed.correct.tolist() == [1.0]
    assert mean.predictions == [1] and mean.correct.tolist() == [0.0]
    np.testing.assert_allclose(mean.choice_scores[0], [ref[a][0] / ref[a][1], ref[b][0] / ref[b][1]], rtol=1e-4)


def test_exact_match_left_padded_batches_equal_unbatched(lm):
    model, tok = lm
    prompts = ["red", "cat dog sun moon apple river stone", "one two", "blue blue blue blue blue", "alpha"]
    batched = Evaluator(batch_size=8, max_new_tokens=6).generate(model, tok, prompts)
    unbatched = []
    for p in prompts:
        ids = torch.tensor([encode_prompt(tok, p)])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = out[0, ids.shape[1] :].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        unbatched.append(tok.decode(new, skip_special_tokens=True).strip())
    assert batched == unbatched
    assert any(batched)
    # correctness is the stripped comparison with the expected string
    rows = [
        {"example_id": f"e{i}", "domain": "gen", "prompt": p, "answer": (f"  {g} " if i % 2 == 0 else g + "x")}
        for i, (p, g) in enumerate(zip(prompts, unbatched, strict=True))
    ]
    res = Evaluator(batch_size=2, max_new_tokens=6).evaluate(model, tok, rows)
    assert res.predictions == unbatched
    assert res.correct.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]


def test_polars_input_and_mixed_kinds(lm):
    model, tok = lm
    rows = [dict(r) for r in MC_ROWS[:2]] + [{"example_id": "g", "domain": "gen", "prompt": "red", "choices": None, "answer": "zzz"}]
    as_list = Evaluator().evaluate(model, tok, rows)
    frame = pl.DataFrame(
        {
            "example_id": [r["example_id"] for r in rows],
            "domain": [r["domain"] for r in rows],
            "prompt": [r["prompt"] for r in rows],
            "choices": [r["choices"] for r in rows],
            "answer": [str(r["answer"]) for r in rows],  # one column must hold both kinds of answer
        }
    )
    as_frame = Evaluator().evaluate(model, tok, frame)
    assert as_frame.choice_scores == as_list.choice_scores
    assert as_frame.correct.tolist() == as_list.correct.tolist()
    assert as_list.choice_scores[2] is None and as_list.correct[2] == 0.0
    table = as_list.to_frame()
    assert table.columns == ["example_id", "domain", "correct", "prediction"] and table.height == 3


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"domain": "d", "prompt": "p", "answer": "x"}, "missing field"),
        ({"example_id": "q", "domain": "d", "prompt": "p", "choices": ["a", "b"], "answer": 2}, "example_id='q'.*not an index"),
        ({"example_id": "q", "domain": "d", "prompt": "p", "choices": ["a"], "answer": 0}, "at least 2"),
        ({"example_id": "q", "domain": "d", "prompt": "p", "choices": ["a", ""], "answer": 0}, "choice 1"),
        ({"example_id": "q", "domain": "", "prompt": "p", "answer": "x"}, "domain"),
        ({"example_id": "q", "domain": "d", "prompt": "p", "answer": 3}, "expected string"),
    ],
)
def test_bad_rows_are_named(row, message):
    with pytest.raises(ValueError, match=message):
        parse_eval_set([row])


def test_duplicate_ids_and_empty_sets_are_rejected():
    row = {"example_id": "q", "domain": "d", "prompt": "p", "answer": "x"}
    with pytest.raises(ValueError, match="duplicate"):
        parse_eval_set([row, dict(row)])
    with pytest.raises(ValueError, match="empty"):
        parse_eval_set([])


def test_vllm_backend_missing_gives_install_hint(lm):
    if vllm_available():
        pytest.skip("vLLM is installed here")
    model, tok = lm
    ev = Evaluator(backend="vllm")
    with pytest.raises(ImportError, match=r"pip install 'harp-dagster\[gpu\]'"):
        ev.evaluate(model, tok, MC_ROWS)
    assert INSTALL_HINT == "pip install 'harp-dagster[gpu]'"
    with pytest.raises(ValueError, match="backend"):
        Evaluator(backend="onnx").check_backend()


def test_importing_the_resources_does_not_import_vllm(tmp_path):
    """A stand-in `vllm` that fails on import proves our modules never import it at load time."""
    fake = tmp_path / "vllm"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise RuntimeError('vllm was imported')\n")
    code = textwrap.dedent(
        """
        import harp.models.evaluator, harp.models.finetuner, harp.models.vllm_backend as vb
        assert vb.vllm_available()  # found on the path, yet never imported
        print("ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parents[1])]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_eval_set_loaded_through_the_data_contract(lm, tmp_path):
    """`load_eval_set` returns answers split by kind; the evaluator reads that form as it is."""
    import json

    from harp.contracts import load_eval_set

    model, tok = lm
    rows = [dict(r) for r in MC_ROWS[:3]] + [{"example_id": "g", "domain": "gen", "prompt": "red", "answer": "zzz"}]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_eval_set(path)
    assert "answer" not in loaded.columns
    from_contract = Evaluator().evaluate(model, tok, loaded)
    from_rows = Evaluator().evaluate(model, tok, rows)
    assert from_contract.choice_scores == from_rows.choice_scores
    assert from_contract.correct.tolist() == from_rows.correct.tolist()
