"""Small causal LMs trained here from text, so the demo and the tests never need a model hub.

The tokenizer is a byte-level BPE (any text encodes, no unknown tokens) whose post-processor prepends BOS,
so `tokenizer(prompt)` starts with BOS the way many hub tokenizers do, and the model is a GPT-2 style
decoder (or, with `architecture="llama"`, a Llama style one: the architecture vLLM serves LoRA adapters
for, used by scripts/gpu_check.py). Both are saved as an ordinary Hugging Face directory that
`AutoTokenizer` and `AutoModelForCausalLM` load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from harp.io import file_lock, replace_dir, temp_prefix

log = logging.getLogger("harp.base_model")

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
BUILD_FILE = "harp_build.json"
# Bumped whenever the recipe changes in a way that changes the trained weights for the same inputs.
_RECIPE_VERSION = 1
_MIN_VOCAB = 256 + 4  # the byte alphabet plus the four special tokens
ARCHITECTURES = ("gpt2", "llama")


def _check_texts(texts: Sequence[str], what: str) -> list[str]:
    texts = list(texts)
    if not texts:
        raise ValueError(f"{what}: no texts given")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{what}: text #{i} is {type(t).__name__}, expected str")
    if not any(t.strip() for t in texts):
        raise ValueError(f"{what}: every text is empty")
    return texts



def train_tokenizer(
    texts: Sequence[str],
    *,
    vocab_size: int = 2000,
    min_frequency: int = 2,
    out_dir: str | os.PathLike | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts`; with `out_dir`, save it there (atomically) as well.

    Special tokens: `<pad>` (id 0), `<s>` (BOS, added in front of every encoded text), `</s>` (EOS) and
    `<unk>` (never produced by byte-level BPE, set because some tooling expects one).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    texts = _check_texts(texts, "train_tokenizer")
    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} is below {_MIN_VOCAB} (256 bytes + 4 special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )
    if out_dir is not None:
        dest = Path(out_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(dest), dir=dest.parent))
        try:
            fast.save_pretrained(tmp)
            replace_dir(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return fast


def build_fingerprint(texts: Sequence[str], config: dict, seed: int) -> str:
    """Hash of everything that determines the trained weights: the texts, the recipe and the seed."""
    h = hashlib.sha256()
    h.update(f"recipe={_RECIPE_VERSION};seed={seed};".encode())
    h.update(json.dumps(config, sort_keys=True).encode())
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def read_build_info(model_dir: str | os.PathLike) -> dict | None:
    """The build record of a model directory, or None when it is missing or unreadable."""
    p = Path(model_dir) / BUILD_FILE
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _is_complete(model_dir: Path, fingerprint: str) -> bool:
    info = read_build_info(model_dir)
    if not info or info.get("fingerprint") != fingerprint:
        return False
    return all((model_dir / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def _lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac))))


def train_small_causal_lm(
    texts: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 2000,
    n_layer: int = 2,
    n_head: int = 4,
    n_embd: int = 128,
    n_positions: int = 128,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    max_seconds: float | None = None,
    log_every: int = 50,
    architecture: str = "gpt2",
) -> Path:
    """Train (or reuse) a small GPT-2 (or Llama, `architecture="llama"`) style causal LM on `texts` and
    return its directory.

    Every text is one sequence `<s> text </s>` (truncated to `n_positions`), so a model sees its inputs
    starting at position 0 exactly as prompts arrive at evaluation. Batches are drawn from a seeded
    permutation of the texts, epoch after epoch, until `steps` optimiser steps are done. The result is
    cached: when `out_dir` already holds a model built from the same texts, configuration and seed, it is
    returned untouched. `max_seconds` is a safety cap: a run stopped by it is saved (with the steps done
    recorded) but is then no longer reproducible step for step, which a warning says.
    """
    texts = _check_texts(texts, "train_small_causal_lm")
    if n_embd % n_head:
        raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must be >= 1")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture={architecture!r}: expected one of {ARCHITECTURES}")
    dest = Path(out_dir)
    recipe = {
        "vocab_size": vocab_size,
        "n_layer": n_layer,
        "n_head": n_head,
        "n_embd": n_embd,
        "n_positions": n_positions,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
    }
    if architecture != "gpt2":  # absent for GPT-2, so the fingerprints of existing models stay valid
        recipe["architecture"] = architecture
    fingerprint = build_fingerprint(texts, recipe, seed)
    if _is_complete(dest, fingerprint):
        log.info("base model at %s is up to date (fingerprint %s), not retraining", dest, fingerprint[:12])
        return dest

    with file_lock(dest.parent / f".{dest.name}.lock"):  # several runs may ask for the same model
        if _is_complete(dest, fingerprint):  # built by another process while we waited
            return dest
        return _train_and_save(texts, dest, recipe, fingerprint, seed, max_seconds, log_every)


def _train_and_save(
    texts: list[str],
    dest: Path,
    recipe: dict,
    fingerprint: str,
    seed: int,
    max_seconds: float | None,
    log_every: int,
) -> Path:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(texts, vocab_size=recipe["vocab_size"])
    n_pos = recipe["n_positions"]
    seqs = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=True)["input_ids"][: n_pos - 1] + [tokenizer.eos_token_id]
        seqs.append(torch.tensor(ids, dtype=torch.long))
    special = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model: GPT2LMHeadModel | LlamaForCausalLM
    torch.manual_seed(seed)
    if recipe.get("architecture", "gpt2") == "llama":
        # Untied head: the plainest Llama layout, which every vLLM version serves LoRA adapters for.
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=recipe["n_embd"],
            intermediate_size=4 * recipe["n_embd"],
            num_hidden_layers=recipe["n_layer"],
            num_attention_heads=recipe["n_head"],
            num_key_value_heads=recipe["n_head"],
            max_position_embeddings=n_pos,
            tie_word_embeddings=False,
            **special,
        ))
    else:
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=n_pos,
            n_embd=recipe["n_embd"],
            n_layer=recipe["n_layer"],
            n_head=recipe["n_head"],
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            **special,
        ))
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "training a %.2fM-parameter causal LM on %d texts (%d steps, batch %d) into %s",
        n_params / 1e6, len(texts), recipe["steps"], recipe["batch_size"], dest,
    )
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe["lr"],
        betas=(0.9, 0.98),
    )
    rng = np.random.default_rng(seed)
    order: list[int] = []
    total, bs = recipe["steps"], recipe["batch_size"]
    warmup = max(1, total // 20)
    pad_id = tokenizer.pad_token_id
    model.train()
    losses: list[float] = []
    done = 0
    t_train = time.perf_counter()
    for step in range(total):
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            log.warning("stopped after %d of %d steps: max_seconds=%s reached", step, total, max_seconds)
            break
        while len(order) < bs:
            order.extend(rng.permutation(len(seqs)).tolist())
        idx, order = order[:bs], order[bs:]
        batch = [seqs[i] for i in idx]
        width = max(len(s) for s in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for row, s in enumerate(batch):
            input_ids[row, : len(s)] = s
            attn[row, : len(s)] = 1
        labels = input_ids.masked_fill(attn == 0, -100)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, total, recipe["lr"], warmup)
        loss = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        done = step + 1
        if log_every and (done % log_every == 0 or done == total):
            rate = done / max(1e-9, time.perf_counter() - t_train)
            log.info("step %d/%d  loss %.4f  %.1f steps/s", done, total, losses[-1], rate)

    model.eval()
    info = {
        "fingerprint": fingerprint,
        "recipe": recipe,
        "recipe_version": _RECIPE_VERSION,
        "seed": seed,
        "n_texts": len(texts),
        "n_params": n_params,
        "steps_done": done,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(dest), dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / BUILD_FILE).write_text(json.dumps(info, indent=2))
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "saved base model to %s: loss %.4f -> %.4f in %.1f s",
        dest, info["first_loss"] or float("nan"), info["final_loss"] or float("nan"), info["seconds"],
    )
    return dest


# -- benchmark: one leaf's train-and-evaluate cycle on a small model --------------------------------------

_BENCH_WORDS = (
    "alpha beta gamma delta red green blue one two three four five cat dog bird fish sun moon star cloud "
    "apple pear plum river stone tree fast slow big small hot cold up down left right"
).split()


def _bench_data(seed: int) -> tuple[list[str], list[str], list[str], list[dict]]:
    """Pretraining texts, a 100-example leaf and 240 four-way multiple-choice questions."""
    rng = np.random.default_rng(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(_BENCH_WORDS, size=k).tolist())

    texts = [f"{words(int(rng.integers(4, 12)))}\n{words(int(rng.integers(1, 4)))}" for _ in range(2000)]
    prompts = [words(int(rng.integers(6, 14))) for _ in range(100)]
    responses = [p.split()[0] + " " + words(2) for p in prompts]
    eval_set = []
    for i in range(240):
        prompt = words(int(rng.integers(6, 14)))
        choices = [words(int(rng.integers(1, 4))) for _ in range(4)]
        eval_set.append(
            {"example_id": f"q{i}", "domain": f"d{i % 6}", "prompt": prompt, "choices": choices, "answer": i % 4}
        )
    return texts, prompts, responses, eval_set


def bench_cycle(out_dir: str | os.PathLike, *, threads: int = 0, cycles: int = 3, n_embd: int = 256) -> dict:
    """Time `train_and_evaluate` (100 examples, 240 MC questions) on a ~2M-parameter model; print figures."""
    from harp.models.device import DeviceResource
    from harp.models.evaluator import Evaluator
    from harp.models.finetuner import LoraFinetuner, train_and_evaluate

    if threads:
        torch.set_num_threads(threads)
    texts, prompts, responses, eval_set = _bench_data(0)
    t0 = time.perf_counter()
    path = train_small_causal_lm(texts, out_dir, n_embd=n_embd, n_head=4, n_layer=2, steps=300, batch_size=32)
    build_s = time.perf_counter() - t0
    ft = LoraFinetuner(base_model=str(path), device=DeviceResource(device="auto"), epochs=3, batch_size=8,
                       learning_rate=1e-3)
    ev = Evaluator(batch_size=64)
    t0 = time.perf_counter()
    ft.reset_adapter()
    first_use_s = time.perf_counter() - t0
    times, train_s, eval_s = [], [], []
    for c in range(cycles):
        t0 = time.perf_counter()
        stats, res = train_and_evaluate(ft, ev, prompts, responses, eval_set, seed=c)
        times.append(time.perf_counter() - t0)
        train_s.append(stats.seconds)
        eval_s.append(res.seconds)
    # adapter reset: re-initialising the LoRA tensors vs deleting and re-adding the adapter
    base, name = ft._ensure()
    t0 = time.perf_counter()
    for _ in range(10):
        ft.reset_adapter()
    reinit_ms = (time.perf_counter() - t0) * 100
    cfg = base.peft.peft_config[name]
    t0 = time.perf_counter()
    for _ in range(10):
        base.peft.delete_adapter(name)
        base.peft.add_adapter(name, cfg)
        base.peft.set_adapter(name)
    readd_ms = (time.perf_counter() - t0) * 100
    figures = {
        "device": str(base.spec.device),
        "threads": torch.get_num_threads(),
        "params_M": round(read_build_info(path)["n_params"] / 1e6, 2),
        "build_s": round(build_s, 2),
        "load_and_wrap_s": round(first_use_s, 3),
        "cycle_s_median": round(float(np.median(times)), 3),
        "train_s_median": round(float(np.median(train_s)), 3),
        "eval_s_median": round(float(np.median(eval_s)), 3),
        "reset_reinit_ms": round(reinit_ms, 3),
        "reset_delete_readd_ms": round(readd_ms, 3),
        "train_tokens": stats.tokens,
        "final_epoch_losses": [round(x, 4) for x in stats.epoch_losses],
    }
    for k, v in figures.items():
        print(f"{k}: {v}")
    return figures


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Time one leaf's train-and-evaluate cycle on a small model.")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "harp_bench_lm"))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--n-embd", type=int, default=256)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    bench_cycle(args.out, threads=args.threads, cycles=args.cycles, n_embd=args.n_embd)
