from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY_CONFIG, tiny_corpus
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from harp_demo import base_model as bm

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_tokenizer_saves_loads_and_sets_special_tokens(tmp_path):
    texts = tiny_corpus(200)
    tok = bm.train_tokenizer(texts, vocab_size=300, out_dir=tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    for t in (tok, loaded):
        assert (t.pad_token, t.bos_token, t.eos_token, t.unk_token) == (bm.PAD, bm.BOS, bm.EOS, bm.UNK)
        assert t.pad_token_id == 0 and t.bos_token_id != t.eos_token_id
    ids = loaded("red cat\nsun")["input_ids"]
    assert ids[0] == loaded.bos_token_id
    assert loaded("red cat", add_special_tokens=False)["input_ids"][0] != loaded.bos_token_id
    assert loaded.decode(ids, skip_special_tokens=True) == "red cat\nsun"
    # byte-level: text the tokenizer never saw still round-trips
    assert loaded.decode(loaded("Zürich ✓", add_special_tokens=False)["input_ids"]) == "Zürich ✓"
    # training is deterministic
    again = bm.train_tokenizer(texts, vocab_size=300)
    assert again.get_vocab() == tok.get_vocab()


def test_tokenizer_rejects_bad_input():
    with pytest.raises(ValueError, match="no texts"):
        bm.train_tokenizer([])
    with pytest.raises(ValueError, match="vocab_size"):
        bm.train_tokenizer(["a b c"], vocab_size=100)
    with pytest.raises(TypeError, match="text #1"):
        bm.train_tokenizer(["ok", 3])


def test_tiny_model_loads_as_a_normal_hf_directory(tiny_model_dir):
    files = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", bm.BUILD_FILE} <= files
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "gpt2"
    assert model.config.n_embd == TINY_CONFIG["n_embd"] and model.config.n_layer == TINY_CONFIG["n_layer"]
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    assert model.get_input_embeddings().num_embeddings == len(tok)
    info = bm.read_build_info(tiny_model_dir)
    assert info["steps_done"] == TINY_CONFIG["steps"]
    # brief pretraining still learns the corpus format
    assert info["final_loss"] < info["first_loss"] - 1.0
    with torch.no_grad():
        ids = tok("red cat sun moon\n", return_tensors="pt")["input_ids"]
        out = model(input_ids=ids).logits[0, -1]
    # after the separator the model puts most of its mass on corpus words
    word_ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in ("red", "cat", "sun", "moon", "dog")]
    assert out.softmax(-1)[word_ids].sum() > 5 * len(word_ids) / len(tok)


def test_build_is_cached_by_fingerprint(tiny_model_dir, monkeypatch):
    info = json.loads((tiny_model_dir / bm.BUILD_FILE).read_text())
    fp = bm.build_fingerprint(tiny_corpus(), {k: v for k, v in TINY_CONFIG.items()} | {"weight_decay": 0.01}, 0)
    assert info["fingerprint"] == fp

    def boom(*a, **k):
        raise AssertionError("retrained although the directory was up to date")

    monkeypatch.setattr(bm, "_train_and_save", boom)
    assert bm.train_small_causal_lm(tiny_corpus(), tiny_model_dir, seed=0, **TINY_CONFIG) == tiny_model_dir
    # another seed changes the fingerprint, so the cache must not answer
    with pytest.raises(AssertionError, match="retrained"):
        bm.train_small_causal_lm(tiny_corpus(), tiny_model_dir, seed=1, **TINY_CONFIG)


def test_training_is_deterministic_and_replaces_stale_builds(tmp_path):
    texts = tiny_corpus(60, seed=3)
    cfg = dict(TINY_CONFIG, steps=4)
    a = bm.train_small_causal_lm(texts, tmp_path / "a", seed=5, **cfg)
    b = bm.train_small_causal_lm(texts, tmp_path / "b", seed=5, **cfg)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # a different seed in the same directory retrains and swaps the directory in place
    c = bm.train_small_causal_lm(texts, tmp_path / "a", seed=6, **cfg)
    assert c == a and bm.read_build_info(c)["seed"] == 6
    wc = load_file(c / "model.safetensors")
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["a", "b"]


def test_bad_model_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        bm.train_small_causal_lm(["a b"], tmp_path / "m", n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="no texts"):
        bm.train_small_causal_lm([], tmp_path / "m")
