"""Proxy-set evaluation: per-example correctness and per-domain means for one model.

Prompt format, shared with the finetuner so that training and scoring see the same token boundary:
the prompt is encoded as `tokenizer(prompt + separator)` with the tokenizer's own special tokens (BOS for
most causal LMs), and a response or answer choice is encoded on its own, without special tokens, and
appended to those ids. Encoding the continuation separately keeps the boundary exact: the tokens scored
for a choice are exactly the choice's tokens, never a merge across the separator.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field

from harp.versions import NOT_MEASUREMENT

log = logging.getLogger("harp.evaluator")

DEFAULT_SEPARATOR = "\n"
BACKENDS = ("transformers", "vllm")


def encode_prompt(tokenizer: Any, prompt: str, separator: str = DEFAULT_SEPARATOR) -> list[int]:
    """Token ids of `prompt + separator`, with the tokenizer's special tokens (e.g. BOS)."""
    ids = list(tokenizer(prompt + separator, add_special_tokens=True)["input_ids"])
    if not ids:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise ValueError("prompt encodes to no tokens and the tokenizer has no BOS token to start from")
        ids = [bos]
    return ids


def encode_continuation(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a response or answer choice, encoded on its own and without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def model_max_length(model: Any, default: int = 2048) -> int:
    """The longest sequence the model's position embeddings allow."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


@dataclass(frozen=True)
class EvalItem:
    """One validated eval row: multiple choice when `choices` is set, exact match otherwise."""

    example_id: str
    domain: str
    prompt: str
    choices: tuple[str, ...] | None
    answer: int | str

    @property
    def is_choice(self) -> bool:
        return self.choices is not None


def _rows(eval_set: Any) -> list[Mapping[str, Any]]:
    if hasattr(eval_set, "to_dicts"):  # polars DataFrame
        return eval_set.to_dicts()
    if isinstance(eval_set, Mapping):
        raise TypeError("eval_set must be a polars DataFrame or a list of dicts, not a single dict")
    return list(eval_set)


def parse_eval_set(eval_set: Any) -> list[EvalItem]:
    """Validate an eval set (polars DataFrame or list of dicts) into EvalItems, naming the bad row."""
    rows = _rows(eval_set)
    if not rows:
        raise ValueError("eval_set is empty")
    items: list[EvalItem] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"eval_set row {i}: expected a dict, got {type(row).__name__}")
        if "answer" not in row and "kind" in row:
            # The normalised form `data_contracts.load_eval_set` returns: the answer is split by kind.
            row = {**row, "answer": row.get("answer_index") if row["kind"] == "choice" else row.get("answer_text")}
        missing = [k for k in ("example_id", "domain", "prompt", "answer") if k not in row]
        if missing:
            raise ValueError(f"eval_set row {i}: missing field(s) {missing}")
        eid = row["example_id"]
        where = f"eval_set row {i} (example_id={eid!r})"
        if not isinstance(eid, str) or not eid:
            raise ValueError(f"{where}: example_id must be a non-empty string")
        if eid in seen:
            raise ValueError(f"{where}: duplicate example_id")
        seen.add(eid)
        if not isinstance(row["domain"], str) or not row["domain"]:
            raise ValueError(f"{where}: domain must be a non-empty string, got {row['domain']!r}")
        if not isinstance(row["prompt"], str):
            raise ValueError(f"{where}: prompt must be a string, got {type(row['prompt']).__name__}")
        choices = row.get("choices")
        answer = row["answer"]
        if choices is not None:
            choices = list(choices)
            if len(choices) < 2:
                raise ValueError(f"{where}: choices needs at least 2 entries, got {len(choices)}")
            for j, c in enumerate(choices):
                if not isinstance(c, str) or not c:
                    raise ValueError(f"{where}: choice {j} must be a non-empty string, got {c!r}")
            try:
                ans = int(answer)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: answer must be a choice index, got {answer!r}") from None
            if isinstance(answer, float) and answer != ans or not 0 <= ans < len(choices):
                raise ValueError(f"{where}: answer {answer!r} is not an index into {len(choices)} choices")
            items.append(EvalItem(eid, row["domain"], row["prompt"], tuple(choices), ans))
        else:
            if not isinstance(answer, str):
                raise ValueError(
                    f"{where}: without choices the answer must be the expected string, got {answer!r}"
                )
            items.append(EvalItem(eid, row["domain"], row["prompt"], None, answer))
    return items


@dataclass
class EvalResult:
    """Per-example correctness (0/1) and per-domain accuracy of one model on one eval set."""

    example_ids: list[str]
    domains: list[str]
    correct: np.ndarray
    per_domain: dict[str, float]
    seconds: float
    predictions: list[int | str] = field(default_factory=list)
    choice_scores: list[list[float] | None] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(self.correct.mean()) if len(self.correct) else float("nan")

    def to_frame(self):
        """A polars table, one row per example: example_id, domain, correct, prediction."""
        import polars as pl

        return pl.DataFrame(
            {
                "example_id": self.example_ids,
                "domain": self.domains,
                "correct": self.correct,
                "prediction": [str(p) for p in self.predictions],
            }
        )


def _per_domain(domains: Sequence[str], correct: np.ndarray) -> dict[str, float]:
    out: dict[str, float] = {}
    arr = np.asarray(domains)
    for d in sorted(set(domains)):
        out[d] = float(correct[arr == d].mean())
    return out


def _model_device(model: Any) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    return next(model.parameters()).device


class Evaluator(BaseModel):
    """Scores a model on the proxy eval set: log-likelihood multiple choice, greedy exact match.

    Every field enters the data versions of base scores and leaf measurements unless marked `NOT_MEASUREMENT`.
    """

    batch_size: int = Field(default=32, description="sequences per forward pass / generation batch")
    length_normalize: bool = Field(
        default=False, description="multiple choice: mean log-prob per choice token instead of the sum"
    )
    max_new_tokens: int = Field(default=32, description="exact match: tokens generated at most")
    separator: str = Field(default=DEFAULT_SEPARATOR, description="joins prompt and answer (as in training)")
    max_length: int | None = Field(
        default=None, description="longest sequence scored; None: the model's position limit"
    )
    backend: str = Field(default="transformers", description="transformers, or vllm for exact-match generation")
    vllm_gpu_memory_utilization: float = Field(
        default=0.5, description="vLLM's share of GPU memory", json_schema_extra=NOT_MEASUREMENT
    )
    vllm_max_lora_rank: int = Field(
        default=64, description="largest LoRA rank vLLM must serve", json_schema_extra=NOT_MEASUREMENT
    )

    def check_backend(self) -> None:
        """Fail early on an unknown backend or a missing vLLM install."""
        if self.backend not in BACKENDS:
            raise ValueError(f"Evaluator.backend={self.backend!r}: expected one of {BACKENDS}")
        if self.backend == "vllm":
            from harp.models.vllm_backend import require_vllm

            require_vllm()

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        eval_set: Any,
        *,
        base_model_path: str | os.PathLike | None = None,
        adapter_path: str | os.PathLike | None = None,
    ) -> EvalResult:
        """Score `model` on `eval_set`; per-example correctness plus per-domain means.

        With `backend="vllm"`, exact-match rows are generated by vLLM from `base_model_path` (default: the
        model's own name_or_path) with the LoRA adapter saved at `adapter_path` (None: the base model);
        multiple-choice rows are always scored here with `model`.
        """
        self.check_backend()
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("Evaluator.batch_size and max_new_tokens must be >= 1")
        t0 = time.perf_counter()
        items = parse_eval_set(eval_set)
        n = len(items)
        correct = np.zeros(n, dtype=np.float32)
        predictions: list[int | str] = [""] * n
        scores: list[list[float] | None] = [None] * n
        was_training = model.training
        model.eval()
        try:
            mc = [i for i, it in enumerate(items) if it.is_choice]
            em = [i for i, it in enumerate(items) if not it.is_choice]
            if mc:
                mc_scores = self._score_choices(model, tokenizer, [items[i] for i in mc])
                for i, sc in zip(mc, mc_scores, strict=True):
                    pred = int(np.argmax(sc))
                    scores[i] = sc
                    predictions[i] = pred
                    correct[i] = float(pred == items[i].answer)
            if em:
                em_items = [items[i] for i in em]
                if self.backend == "vllm":
                    texts = self._generate_vllm(model, tokenizer, em_items, base_model_path, adapter_path)
                else:
                    texts = self.generate(model, tokenizer, [it.prompt for it in em_items])
                for i, text in zip(em, texts, strict=True):
                    predictions[i] = text
                    correct[i] = float(text.strip() == str(items[i].answer).strip())
        finally:
            if was_training:
                model.train()
        domains = [it.domain for it in items]
        return EvalResult(
            example_ids=[it.example_id for it in items],
            domains=domains,
            correct=correct,
            per_domain=_per_domain(domains, correct),
            seconds=time.perf_counter() - t0,
            predictions=predictions,
            choice_scores=scores,
        )

    # -- multiple choice ---------------------------------------------------------------------------------

    def _score_choices(self, model: Any, tokenizer: Any, items: list[EvalItem]) -> list[list[float]]:
        """Summed (or mean) log-probability of each choice's tokens given its prompt."""
        limit = self.max_length or model_max_length(model)
        seqs: list[tuple[list[int], int]] = []  # (ids, number of trailing choice tokens)
        owners: list[tuple[int, int]] = []
        n_cut = 0
        for k, it in enumerate(items):
            p_ids = encode_prompt(tokenizer, it.prompt, self.separator)
            for j, choice in enumerate(it.choices or ()):
                c_ids = encode_continuation(tokenizer, choice)
                if not c_ids:
                    raise ValueError(f"example_id={it.example_id!r}: choice {j} {choice!r} encodes to no tokens")
                if len(c_ids) >= limit:
                    raise ValueError(
                        f"example_id={it.example_id!r}: choice {j} has {len(c_ids)} tokens, the limit is {limit}"
                    )
                room = limit - len(c_ids)
                if len(p_ids) > room:
                    n_cut += 1
                seqs.append((p_ids[-room:] + c_ids, len(c_ids)))
                owners.append((k, j))
        if n_cut:
            log.warning("%d (prompt, choice) pairs exceeded %d tokens: their prompts were cut from the left", n_cut, limit)
        flat = self._choice_logprobs(model, seqs)
        out: list[list[float]] = [[0.0] * len(it.choices or ()) for it in items]
        for (k, j), (total, count) in zip(owners, flat, strict=True):
            out[k][j] = total / count if self.length_normalize else total
        return out

    @torch.inference_mode()
    def _choice_logprobs(self, model: Any, seqs: list[tuple[list[int], int]]) -> list[tuple[float, int]]:
        """(sum of log-probs, token count) of the last `c` tokens of each sequence, batched, right-padded."""
        device = _model_device(model)
        order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i][0]), i))
        result: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = max(len(seqs[i][0]) for i in idx)
            ids = torch.zeros((len(idx), width), dtype=torch.long)
            attn = torch.zeros((len(idx), width), dtype=torch.long)
            rows, cols = [], []
            for r, i in enumerate(idx):
                s, c = seqs[i]
                ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
                attn[r, : len(s)] = 1
                # the logit at position t predicts token t+1: choice tokens sit at len(s)-c .. len(s)-1
                rows.extend([r] * c)
                cols.extend(range(len(s) - c - 1, len(s) - 1))
            ids, attn = ids.to(device), attn.to(device)
            logits = model(input_ids=ids, attention_mask=attn).logits
            r_t = torch.tensor(rows, device=device)
            c_t = torch.tensor(cols, device=device)
            picked = logits[r_t, c_t].float().log_softmax(-1)
            targets = ids[r_t, c_t + 1]
            tok_lp = picked.gather(-1, targets[:, None])[:, 0].cpu().numpy().astype(np.float64)
            pos = 0
            for i in idx:
                c = seqs[i][1]
                result[i] = (float(tok_lp[pos : pos + c].sum()), c)
                pos += c
        return result

    # -- exact match -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, model: Any, tokenizer: Any, prompts: Sequence[str]) -> list[str]:
        """Greedy continuations of `prompts` (left-padded batches), decoded up to the first EOS."""
        device = _model_device(model)
        limit = self.max_length or model_max_length(model)
        room = limit - self.max_new_tokens
        if room < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} leaves no room for a prompt within {limit}")
        enc = [encode_prompt(tokenizer, p, self.separator)[-room:] for p in prompts]
        pad_id, eos_id = _pad_eos(tokenizer)
        order = sorted(range(len(enc)), key=lambda i: (-len(enc[i]), i))
        out: list[str] = [""] * len(enc)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = max(len(enc[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            attn = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, width - len(enc[i]) :] = torch.tensor(enc[i], dtype=torch.long)
                attn[r, width - len(enc[i]) :] = 1
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=attn.to(device),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
            )
            new = gen[:, width:].cpu().tolist()
            for r, i in enumerate(idx):
                out[i] = decode_until_eos(tokenizer, new[r], eos_id)
        return out

    def _generate_vllm(
        self,
        model: Any,
        tokenizer: Any,
        items: list[EvalItem],
        base_model_path: str | os.PathLike | None,
        adapter_path: str | os.PathLike | None,
    ) -> list[str]:
        from harp.models.vllm_backend import get_vllm_generator

        base = base_model_path or getattr(getattr(model, "config", None), "name_or_path", None)
        if not base:
            raise ValueError("backend='vllm' needs base_model_path: the model does not record where it came from")
        limit = self.max_length or model_max_length(model)
        room = limit - self.max_new_tokens
        enc = [encode_prompt(tokenizer, it.prompt, self.separator)[-room:] for it in items]
        gen = get_vllm_generator(
            str(base),
            max_lora_rank=self.vllm_max_lora_rank,
            gpu_memory_utilization=self.vllm_gpu_memory_utilization,
            max_model_len=limit,
        )
        _, eos_id = _pad_eos(tokenizer)
        outs = gen.generate(enc, max_new_tokens=self.max_new_tokens, adapter_path=adapter_path)
        return [decode_until_eos(tokenizer, o, eos_id) for o in outs]


def _pad_eos(tokenizer: Any) -> tuple[int, int]:
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no EOS token; exact-match generation needs one to stop")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    return pad_id, eos_id


def decode_until_eos(tokenizer: Any, ids: Iterable[int], eos_id: int) -> str:
    """Decode generated ids up to (not including) the first EOS, without special tokens, stripped."""
    ids = list(ids)
    if eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
