from __future__ import annotations

import json
import random

import dagster as dg
import pytest
import torch
from helpers import TINY_WORDS, counting_base_loads
from transformers import AutoModelForCausalLM

from harp.models import finetuner as ftmod
from harp.models.device import Device
from harp.models.evaluator import Evaluator
from harp.models.finetuner import LoraFinetuner, default_target_modules, train_and_evaluate
from harp_resources import DeviceResource, FinetunerResource

pytestmark = pytest.mark.usefixtures("torch_one_thread")

CPU = Device(device="cpu")


def _task(n: int = 48, seed: int = 1) -> tuple[list[str], list[str]]:
    """Prompts of corpus words; the response is "cat" when the prompt starts with one of three words, else "dog"."""
    rng = random.Random(seed)
    prompts, responses = [], []
    for _ in range(n):
        words = rng.choices(TINY_WORDS[:6], k=4)
        prompts.append(" ".join(words))
        responses.append("cat" if words[0] in TINY_WORDS[:3] else "dog")
    return prompts, responses


def _eval_set(prompts, responses):
    rows = []
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        wrong = TINY_WORDS[(TINY_WORDS.index(r) + 5) % len(TINY_WORDS)]
        choices = [r, wrong] if i % 2 else [wrong, r]
        rows.append(
            {"example_id": f"q{i}", "domain": f"d{i % 2}", "prompt": p, "choices": choices, "answer": choices.index(r)}
        )
    return rows


def _finetuner(path, **kw) -> LoraFinetuner:
    settings = dict(device=CPU, learning_rate=1e-2, epochs=4, batch_size=8) | kw
    return LoraFinetuner(base_model=str(path), **settings)


def _snapshot(ft: LoraFinetuner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in ft.adapter_parameters().items()}


def _base_snapshot(ft: LoraFinetuner) -> dict[str, torch.Tensor]:
    base = ft._ensure()[0]
    return {k: v.detach().clone() for k, v in base.peft.named_parameters() if "lora_" not in k}


def test_default_target_modules_per_architecture():
    assert default_target_modules("gpt2") == ["c_attn", "c_proj", "c_fc"]
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= set(default_target_modules("llama"))
    assert default_target_modules("t5") == ["q", "v"]  # peft's own default
    assert default_target_modules("some_new_arch") == "all-linear"


def test_training_changes_adapter_lowers_loss_and_keeps_base(tiny_model_dir):
    ft = _finetuner(tiny_model_dir)
    prompts, responses = _task()
    ft.reset_adapter()
    init = _snapshot(ft)
    base_before = _base_snapshot(ft)
    assert init and all(("lora_A" in k) or torch.count_nonzero(v) == 0 for k, v in init.items())
    stats = ft.train(prompts, responses)
    after = _snapshot(ft)
    assert any(not torch.equal(init[k], after[k]) for k in init)
    assert stats.examples == len(prompts) and stats.steps == 4 * 6 and len(stats.epoch_losses) == 4
    assert stats.target_tokens > 0 and stats.tokens > stats.target_tokens
    assert stats.epoch_losses[-1] < 0.8 * stats.epoch_losses[0]
    assert all(b < a for a, b in zip(stats.epoch_losses, stats.epoch_losses[1:], strict=False))
    # base weights never move
    base_after = _base_snapshot(ft)
    assert base_before.keys() == base_after.keys()
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)
    # reset restores the initial adapter exactly
    ft.reset_adapter()
    again = _snapshot(ft)
    assert all(torch.equal(init[k], again[k]) for k in init)
    # and the adapted model then equals the base model again
    with ft.model_for_eval() as (m, tok):
        ids = tok("red cat sun moon\n", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            adapted = m(input_ids=ids).logits
    raw = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        ref = raw(input_ids=ids).logits
    torch.testing.assert_close(adapted, ref)


def test_training_is_deterministic_for_a_seed(tiny_model_dir):
    ft = _finetuner(tiny_model_dir, lora_dropout=0.1)
    prompts, responses = _task(24)
    s1 = ft.train(prompts, responses, seed=7)
    w1 = _snapshot(ft)
    s2 = ft.train(prompts, responses, seed=7)
    w2 = _snapshot(ft)
    assert s1.step_losses == s2.step_losses
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    s3 = ft.train(prompts, responses, seed=8)
    assert s3.step_losses != s1.step_losses


def test_adapter_enabled_vs_disabled_views(tiny_model_dir):
    ft = _finetuner(tiny_model_dir)
    prompts, responses = _task(24)
    ft.train(prompts, responses)
    raw = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = ft.tokenizer("red cat sun moon\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = raw(input_ids=ids).logits
        with ft.base_for_eval() as (m, _):
            base_logits = m(input_ids=ids).logits
        with ft.model_for_eval() as (m, _):
            adapted = m(input_ids=ids).logits
    torch.testing.assert_close(base_logits, ref)
    assert (adapted - ref).abs().max() > 1e-3
    # the base score b_d is measured through the disabled view and equals the raw model's
    eval_set = _eval_set(*_task(10, seed=3))
    ev = Evaluator(batch_size=8)
    with ft.base_for_eval() as (m, tok):
        via_view = ev.evaluate(m, tok, eval_set)
    direct = ev.evaluate(raw, ft.tokenizer, eval_set)
    for a, b in zip(via_view.choice_scores, direct.choice_scores, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def test_save_load_round_trip(tiny_model_dir, tmp_path):
    ft = _finetuner(tiny_model_dir)
    prompts, responses = _task(24)
    eval_set = _eval_set(*_task(12, seed=5))
    ev = Evaluator(batch_size=16)
    ft.train(prompts, responses)
    path = ft.save_adapter(tmp_path / "adapter")
    names = {p.name for p in path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert json.loads((path / "adapter_config.json").read_text())["r"] == 8
    with ft.model_for_eval() as (m, tok):
        trained = ev.evaluate(m, tok, eval_set)
    trained_w = _snapshot(ft)
    ft.reset_adapter()
    ft.load_adapter(path)
    with ft.model_for_eval() as (m, tok):
        reloaded = ev.evaluate(m, tok, eval_set)
    assert all(torch.equal(trained_w[k], v) for k, v in _snapshot(ft).items())
    assert reloaded.choice_scores == trained.choice_scores
    assert (reloaded.correct == trained.correct).all()
    # saving again over the same path replaces it atomically
    ft.save_adapter(path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # an adapter of another rank does not fit
    other = _finetuner(tiny_model_dir, r=4)
    with pytest.raises(ValueError, match="r=8"):
        other.load_adapter(path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        ft.load_adapter(tmp_path)


def test_base_model_loaded_once_across_leaves_and_instances(tiny_model_dir):
    ftmod.clear_base_cache()
    ev = Evaluator(batch_size=32)
    prompts, responses = _task(16)
    eval_set = _eval_set(*_task(8, seed=9))
    eval_set.append({"example_id": "gen", "domain": "d2", "prompt": "red cat", "answer": "cat"})  # generated
    a = _finetuner(tiny_model_dir, epochs=1)
    b = _finetuner(tiny_model_dir, epochs=1, r=4)  # another LoRA recipe: a second adapter on the same base
    with counting_base_loads() as loads:
        s1, r1 = train_and_evaluate(a, ev, prompts[:8], responses[:8], eval_set, seed=0)
        s2, r2 = train_and_evaluate(a, ev, prompts[8:], responses[8:], eval_set, seed=0)
        s3, r3 = train_and_evaluate(b, ev, prompts, responses, eval_set, seed=0)
    assert len(loads) == 1
    assert a._ensure()[0] is b._ensure()[0] and a.adapter_name != b.adapter_name
    # the same leaf measured twice gives the same result (the adapter is reset first)
    s1b, r1b = train_and_evaluate(a, ev, prompts[:8], responses[:8], eval_set, seed=0)
    assert s1b.step_losses == s1.step_losses and r1b.choice_scores == r1.choice_scores
    assert set(r1.per_domain) == {"d0", "d1", "d2"} and r1.seconds > 0 and s1.seconds > 0
    assert r1.choice_scores[-1] is None and isinstance(r1.predictions[-1], str)
    assert r1.per_domain["d2"] == float(r1.predictions[-1] == "cat")


def test_cpu_fallback_and_dagster_resource(tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: auto picks it")
    ft = LoraFinetuner(base_model=str(tiny_model_dir))
    assert ft.device_spec().device.type == "cpu" and ft.device_spec().dtype == torch.float32
    prompts, responses = _task(8)

    @dg.asset
    def leaf(finetuner: FinetunerResource) -> dg.MaterializeResult:
        stats = finetuner.train(prompts, responses)
        return dg.MaterializeResult(metadata={"steps": stats.steps})

    res = dg.materialize(
        [leaf],
        resources={"finetuner": FinetunerResource(base_model=str(tiny_model_dir), device=DeviceResource(device="auto"),
                                                  epochs=1)},
    )
    assert res.success
    mats = res.asset_materializations_for_node("leaf")
    assert mats[0].metadata["steps"].value == 1


def test_bad_inputs_are_rejected(tiny_model_dir):
    ft = _finetuner(tiny_model_dir)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        ft.train(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="no training examples"):
        ft.train([], [])
    with pytest.raises(TypeError, match="example #1"):
        ft.train(["a", "b"], ["c", None])
    with pytest.raises(ValueError, match="match no module"):
        _finetuner(tiny_model_dir, target_modules=["q_proj"]).train(["a"], ["b"])
    with pytest.raises(ValueError, match="separator"):
        train_and_evaluate(ft, Evaluator(separator=" "), ["a"], ["b"], [], seed=0)


def test_long_examples_are_truncated_keeping_the_response(tiny_model_dir):
    ft = _finetuner(tiny_model_dir, max_length=16)
    long_prompt = " ".join(["red"] * 40)
    seqs, plens, cut = ft.encode_examples([long_prompt, "red"], ["cat dog", "sun"])
    assert cut == 1 and len(seqs[0]) == 16
    tok = ft.tokenizer
    assert seqs[0][-1] == tok.eos_token_id
    assert tok.decode(seqs[0][plens[0] :], skip_special_tokens=True) == "cat dog"
    stats = ft.train([long_prompt], ["cat dog"])
    assert stats.truncated == 1
