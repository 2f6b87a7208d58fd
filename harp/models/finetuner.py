"""LoRA finetuning of one shared base model, leaf after leaf.

Measuring a leaf means: put the adapter back to its seeded initial state, train it on the leaf's examples,
evaluate, repeat for the next leaf. Loading the base model dominates the cost of a small leaf, so the
base (and its peft wrapper) is loaded once per process and shared by every finetuner with the same model,
dtype and device; only the adapter weights are re-initialised between leaves (a few small tensors, far
cheaper than deleting and re-creating the adapter modules).

Training format: `encode_prompt(prompt + separator)` followed by the response's own tokens and EOS; the
loss covers the response tokens and EOS only (prompt positions are labelled -100).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field, PrivateAttr

from harp.io import replace_dir, temp_prefix
from harp.models.device import Device, DeviceSpec, resolve_device
from harp.models.evaluator import (
    DEFAULT_SEPARATOR,
    EvalResult,
    Evaluator,
    encode_continuation,
    encode_prompt,
)
from harp.versions import NOT_MEASUREMENT

log = logging.getLogger("harp.finetuner")

# LoRA targets per architecture: attention and MLP projections (the usual choice for instruction tuning).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_bigcode": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def default_target_modules(model_type: str | None) -> list[str] | str:
    """Our per-architecture targets, else peft's own defaults, else every Linear layer but the LM head."""
    if model_type in DEFAULT_TARGET_MODULES:
        return list(DEFAULT_TARGET_MODULES[model_type])
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults

    if model_type in peft_defaults:
        return peft_defaults[model_type]
    return "all-linear"


# -- the per-process base-model cache ------------------------------------------------------------------


class _Base:
    """One loaded base model with its tokenizer and (once an adapter exists) its peft wrapper."""

    def __init__(self, model: Any, tokenizer: Any, spec: DeviceSpec, path: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.path = path
        self.peft: Any = None
        self.lock = threading.RLock()


_BASES: dict[tuple, _Base] = {}
_BASES_LOCK = threading.Lock()
def clear_base_cache() -> None:
    """Drop every cached base model (frees memory; the next use loads again)."""
    with _BASES_LOCK:
        _BASES.clear()


def _model_key(base_model: str) -> str:
    p = Path(base_model).expanduser()
    return str(p.resolve()) if p.exists() else base_model


def _load_base(base_model: str, trust_remote_code: bool, spec: DeviceSpec) -> _Base:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = (_model_key(base_model), str(spec.dtype), str(spec.device), trust_remote_code)
    with _BASES_LOCK:
        base = _BASES.get(key)
        if base is not None:
            return base
        t0 = time.perf_counter()
        path = key[0]
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"base model {path}: its tokenizer has no EOS token; responses need one to end")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(path, dtype=spec.dtype, trust_remote_code=trust_remote_code)
        model.to(spec.device)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        n = sum(p.numel() for p in model.parameters())
        log.info(
            "loaded base model %s (%.2fM parameters) on %s in %.2f s",
            path, n / 1e6, spec.device, time.perf_counter() - t0,
        )
        base = _Base(model, tokenizer, spec, path)
        _BASES[key] = base
        return base


# -- results -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdamMoments:
    """Adam's state over the LoRA parameters, flattened: what LESS preconditions gradients with."""

    exp_avg: np.ndarray
    exp_avg_sq: np.ndarray
    beta1: float
    beta2: float
    eps: float
    steps: int


@dataclass
class TrainStats:
    """What one adapter training did: losses, sizes and time."""

    step_losses: list[float]
    epoch_losses: list[float]
    seconds: float
    examples: int
    tokens: int
    target_tokens: int
    steps: int
    epochs: int
    seed: int
    truncated: int = 0
    # Adam's moments at the end of training, flattened in `adapter_parameters()` order (with keep_moments=True).
    moments: AdamMoments | None = None

    @property
    def first_loss(self) -> float:
        return self.step_losses[0] if self.step_losses else float("nan")

    @property
    def last_loss(self) -> float:
        return self.step_losses[-1] if self.step_losses else float("nan")


def _adam_moments(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> AdamMoments:
    group = opt.param_groups[0]
    states = [opt.state.get(p, {}) for p in params]
    if not all("exp_avg" in st for st in states):
        raise RuntimeError("the optimiser has no Adam moments for some LoRA parameter (no step taken?)")
    flat = [torch.cat([st[k].detach().reshape(-1).float().cpu() for st in states]).numpy() for k in ("exp_avg", "exp_avg_sq")]
    return AdamMoments(exp_avg=flat[0], exp_avg_sq=flat[1], beta1=float(group["betas"][0]),
                       beta2=float(group["betas"][1]), eps=float(group["eps"]), steps=int(states[0]["step"]))


# -- the resource --------------------------------------------------------------------------------------



class LoraFinetuner(BaseModel):
    """Finetuner: trains a LoRA adapter on a set of examples over a shared, once-loaded base model.

    Every field shapes what a trained adapter is, and so enters a leaf's data version, unless it is marked
    `NOT_MEASUREMENT` (the base model is identified by its files, the device by its dtype).
    """

    base_model: str = Field(
        description="local model directory or hub name (offline: must be cached)", json_schema_extra=NOT_MEASUREMENT
    )
    trust_remote_code: bool = False
    r: int = Field(default=8, description="LoRA rank")
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] | None = Field(
        default=None, description="module names to adapt; None picks per architecture"
    )
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    max_grad_norm: float = Field(default=1.0, description="gradient clipping; 0 disables")
    epochs: int = 3
    batch_size: int = 8
    max_length: int = Field(default=512, description="longest training sequence in tokens")
    group_by_length: bool = Field(
        default=False, description="sort each window of 16 shuffled batches by length (less padding)"
    )
    separator: str = Field(default=DEFAULT_SEPARATOR, description="joins prompt and response")
    seed: int = 0
    log_every_steps: int = Field(
        default=0, ge=0, description="log the training loss every N optimiser steps; 0: only per leaf",
        json_schema_extra=NOT_MEASUREMENT,
    )
    device: Device | None = Field(
        default=None, description="where the model runs; None: auto", json_schema_extra=NOT_MEASUREMENT
    )

    _state: dict = PrivateAttr(default_factory=dict)

    # -- setup ---------------------------------------------------------------------------------------------

    def device_spec(self) -> DeviceSpec:
        return self.device.spec() if self.device is not None else resolve_device("auto")

    def _lora_config(self, model: Any) -> Any:
        from peft import LoraConfig
        from transformers.pytorch_utils import Conv1D

        model_type = getattr(model.config, "model_type", None)
        targets = list(self.target_modules) if self.target_modules else default_target_modules(model_type)
        if isinstance(targets, list):
            present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
            missing = [t for t in targets if t not in present]
            if missing == targets:
                raise ValueError(
                    f"target_modules {targets} match no module of {self.base_model} (model_type={model_type!r})"
                )
        conv1d = any(isinstance(m, Conv1D) for m in model.modules())
        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=targets,
            fan_in_fan_out=conv1d,
            bias="none",
            task_type="CAUSAL_LM",
        )

    def _adapter_name(self, cfg: Any) -> str:
        desc = json.dumps(
            {
                "r": cfg.r,
                "alpha": cfg.lora_alpha,
                "dropout": cfg.lora_dropout,
                "targets": sorted(cfg.target_modules) if not isinstance(cfg.target_modules, str) else cfg.target_modules,
            },
            sort_keys=True,
        )
        return "harp_" + hashlib.sha256(desc.encode()).hexdigest()[:10]

    def _ensure(self) -> tuple[_Base, str]:
        """The shared base (loaded on first use) with this finetuner's adapter present and active."""
        st = self._state
        if "base" not in st:
            base = _load_base(self.base_model, self.trust_remote_code, self.device_spec())
            with base.lock:
                cfg = self._lora_config(base.model)
                name = self._adapter_name(cfg)
                if base.peft is None:
                    from peft import get_peft_model

                    base.peft = get_peft_model(base.model, cfg, adapter_name=name)
                    self._reinit(base, name, self.seed)
                elif name not in base.peft.peft_config:
                    base.peft.add_adapter(name, cfg)
                    self._reinit(base, name, self.seed)
            st["base"], st["name"] = base, name
        base, name = st["base"], st["name"]
        if base.peft.active_adapter != name:
            base.peft.set_adapter(name)
        return base, name

    @property
    def tokenizer(self) -> Any:
        return self._ensure()[0].tokenizer

    @property
    def adapter_name(self) -> str:
        return self._ensure()[1]

    def adapter_parameters(self) -> dict[str, torch.Tensor]:
        """This finetuner's LoRA tensors by name (live tensors: clone them to keep a snapshot)."""
        base, name = self._ensure()
        return {n: p for n, p in base.peft.named_parameters() if f".{name}." in n}

    # -- adapter state ---------------------------------------------------------------------------------

    @staticmethod
    def _reinit(base: _Base, name: str, seed: int) -> None:
        from peft.tuners.lora import LoraLayer

        init = base.peft.peft_config[name].init_lora_weights
        devices = [base.spec.device] if base.spec.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for _, module in base.peft.named_modules():
                if isinstance(module, LoraLayer) and name in module.lora_A:
                    module.reset_lora_parameters(name, init)

    def reset_adapter(self, seed: int | None = None) -> None:
        """Put the adapter back to its initial state for `seed` (default: the configured seed)."""
        base, name = self._ensure()
        with base.lock:
            self._reinit(base, name, self.seed if seed is None else seed)

    def save_adapter(self, path: str | os.PathLike) -> Path:
        """Save the adapter (safetensors + adapter_config.json) to `path`, replacing it atomically."""
        base, name = self._ensure()
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(dest), dir=dest.parent))
        try:
            with base.lock:
                base.peft.save_pretrained(tmp, selected_adapters=[name], safe_serialization=True)
            # peft writes a non-default adapter into a sub-folder named after it
            src = tmp / name if (tmp / name / "adapter_config.json").is_file() else tmp
            if not (src / "adapter_model.safetensors").is_file():
                raise RuntimeError(f"peft wrote no adapter_model.safetensors under {tmp}")
            if src is not tmp:
                flat = Path(tempfile.mkdtemp(prefix=temp_prefix(dest), dir=dest.parent))
                for f in src.iterdir():
                    os.replace(f, flat / f.name)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp = flat
            replace_dir(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest

    def load_adapter(self, path: str | os.PathLike) -> None:
        """Load saved adapter weights into this finetuner's adapter (rank and targets must match)."""
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        base, name = self._ensure()
        src = Path(path)
        cfg_file = src / "adapter_config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file} not found: {src} is not a saved adapter")
        saved = json.loads(cfg_file.read_text())
        ours = base.peft.peft_config[name]
        theirs_targets = saved.get("target_modules")
        ours_targets = ours.target_modules
        if not isinstance(ours_targets, str):
            ours_targets = sorted(ours_targets)
        if not isinstance(theirs_targets, str) and theirs_targets is not None:
            theirs_targets = sorted(theirs_targets)
        if saved.get("r") != ours.r or theirs_targets != ours_targets:
            raise ValueError(
                f"adapter {src}: r={saved.get('r')}, targets={theirs_targets} do not match this finetuner's "
                f"r={ours.r}, targets={ours_targets}"
            )
        weights = load_peft_weights(str(src), device=str(base.spec.device))
        with base.lock:
            result = set_peft_model_state_dict(base.peft, weights, adapter_name=name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise ValueError(f"adapter {src}: tensors {unexpected[:3]} do not fit the model")

    # -- training --------------------------------------------------------------------------------------

    def encode_examples(
        self, prompts: Sequence[str], responses: Sequence[str]
    ) -> tuple[list[list[int]], list[int], int]:
        """(ids per example, prompt length per example, number truncated) in the training format."""
        base, _ = self._ensure()
        tok = base.tokenizer
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        seqs, plens, cut = [], [], 0
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            if not isinstance(p, str) or not isinstance(r, str):
                raise TypeError(f"training example #{i}: prompt and response must be strings")
            p_ids = encode_prompt(tok, p, self.separator)
            r_ids = encode_continuation(tok, r) + [tok.eos_token_id]
            if len(p_ids) + len(r_ids) > self.max_length:
                cut += 1
                keep_p = max(self.max_length - len(r_ids), self.max_length // 2, 1)
                p_ids = p_ids[-keep_p:]
                r_ids = r_ids[: self.max_length - len(p_ids)]
            seqs.append(p_ids + r_ids)
            plens.append(len(p_ids))
        return seqs, plens, cut

    def _batches(self, n: int, lengths: list[int], rng: np.random.Generator) -> list[list[int]]:
        perm = rng.permutation(n).tolist()
        if self.group_by_length:
            window = self.batch_size * 16
            perm = [
                i
                for s in range(0, n, window)
                for i in sorted(perm[s : s + window], key=lambda j: (-lengths[j], j))
            ]
        batches = [perm[s : s + self.batch_size] for s in range(0, n, self.batch_size)]
        if self.group_by_length:
            order = rng.permutation(len(batches)).tolist()
            batches = [batches[k] for k in order]
        return batches

    def train(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        *,
        seed: int | None = None,
        reset: bool = True,
        keep_moments: bool = False,
    ) -> TrainStats:
        """Train the adapter on (prompt, response) pairs; it stays active afterwards.

        With `reset` (the default) the adapter starts from its initial state for `seed`, so the result
        depends only on the examples, the configuration and the seed.
        """
        if self.epochs < 1 or self.batch_size < 1 or self.max_length < 2:
            raise ValueError("epochs and batch_size must be >= 1 and max_length >= 2")
        if not prompts:
            raise ValueError("no training examples")
        seed = self.seed if seed is None else seed
        base, name = self._ensure()
        t0 = time.perf_counter()
        seqs, plens, cut = self.encode_examples(prompts, responses)
        if cut:
            log.warning("%d of %d examples exceeded max_length=%d and were truncated", cut, len(seqs), self.max_length)
        device = base.spec.device
        pad_id = base.tokenizer.pad_token_id
        lengths = [len(s) for s in seqs]
        with base.lock:
            if reset:
                self._reinit(base, name, seed)
            params = [p for n, p in base.peft.named_parameters() if f".{name}." in n]
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay)
            rng = np.random.default_rng(seed)
            moments: AdamMoments | None = None
            step_losses: list[float] = []
            epoch_losses: list[float] = []
            tokens = target_tokens = 0
            model = base.peft
            model.train()
            try:
                with torch.random.fork_rng(devices=[device] if base.spec.is_cuda else []):
                    torch.manual_seed(seed)
                    for _epoch in range(self.epochs):
                        ep_sum, ep_count = 0.0, 0
                        for idx in self._batches(len(seqs), lengths, rng):
                            width = max(lengths[i] for i in idx)
                            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                            attn = torch.zeros((len(idx), width), dtype=torch.long)
                            labels = torch.full((len(idx), width), -100, dtype=torch.long)
                            for row, i in enumerate(idx):
                                s = torch.tensor(seqs[i], dtype=torch.long)
                                ids[row, : len(s)] = s
                                attn[row, : len(s)] = 1
                                labels[row, plens[i] : len(s)] = s[plens[i] :]
                            ids, attn, labels = ids.to(device), attn.to(device), labels.to(device)
                            logits = model(input_ids=ids, attention_mask=attn).logits
                            tgt = labels[:, 1:]
                            mask = tgt != -100
                            loss = torch.nn.functional.cross_entropy(logits[:, :-1][mask].float(), tgt[mask])
                            opt.zero_grad(set_to_none=True)
                            loss.backward()
                            if self.max_grad_norm > 0:
                                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                            opt.step()
                            n_tgt = int(mask.sum())
                            value = loss.item()
                            step_losses.append(value)
                            if self.log_every_steps and len(step_losses) % self.log_every_steps == 0:
                                log.info("step %d: loss %.4f", len(step_losses), value)
                            ep_sum += value * n_tgt
                            ep_count += n_tgt
                            tokens += int(attn.sum())
                            target_tokens += n_tgt
                        epoch_losses.append(ep_sum / max(1, ep_count))
                if keep_moments:
                    moments = _adam_moments(opt, params)
            finally:
                model.eval()
                for p in params:
                    p.grad = None
        stats = TrainStats(
            step_losses=step_losses,
            epoch_losses=epoch_losses,
            seconds=time.perf_counter() - t0,
            examples=len(seqs),
            tokens=tokens,
            target_tokens=target_tokens,
            steps=len(step_losses),
            epochs=self.epochs,
            seed=seed,
            truncated=cut,
            moments=moments if keep_moments else None,
        )
        log.debug(
            "trained adapter on %d examples: %d steps, loss %.4f -> %.4f, %.2f s",
            stats.examples, stats.steps, stats.first_loss, stats.last_loss, stats.seconds,
        )
        return stats

    def example_gradients(
        self, prompts: Sequence[str], responses: Sequence[str], *, chunk: int = 64
    ) -> Iterator[np.ndarray]:
        """Each example's gradient of its own loss (mean over its response tokens) at the current adapter,
        flattened in `adapter_parameters()` order; yielded in chunks of rows (float32, (rows, P)).

        One forward and backward pass per example, no optimiser step: the adapter is left as it was.
        """
        base, name = self._ensure()
        seqs, plens, _ = self.encode_examples(prompts, responses)
        device = base.spec.device
        with base.lock:
            params = [p for n, p in base.peft.named_parameters() if f".{name}." in n]
            for p in params:
                p.requires_grad_(True)
            model = base.peft
            model.eval()  # no dropout: the gradient of the loss as the adapter computes it
            rows: list[np.ndarray] = []
            try:
                for i, seq in enumerate(seqs):
                    ids = torch.tensor([seq], dtype=torch.long, device=device)
                    labels = ids.clone()
                    labels[0, : plens[i]] = -100
                    logits = model(input_ids=ids).logits
                    tgt = labels[:, 1:]
                    mask = tgt != -100
                    loss = torch.nn.functional.cross_entropy(logits[:, :-1][mask].float(), tgt[mask])
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                    rows.append(torch.cat([
                        (g if g is not None else torch.zeros_like(p)).detach().reshape(-1).float().cpu()
                        for g, p in zip(grads, params, strict=True)]).numpy())
                    if len(rows) == chunk:
                        yield np.stack(rows)
                        rows = []
                if rows:
                    yield np.stack(rows)
            finally:
                for p in params:
                    p.grad = None

    # -- evaluation views ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def model_for_eval(self) -> Iterator[tuple[Any, Any]]:
        """(model, tokenizer) with this finetuner's adapter enabled, in eval mode."""
        base, _ = self._ensure()
        with base.lock:
            base.peft.eval()
            yield base.peft, base.tokenizer

    @contextlib.contextmanager
    def base_for_eval(self) -> Iterator[tuple[Any, Any]]:
        """(model, tokenizer) with every adapter disabled: the base model's own behaviour."""
        base, _ = self._ensure()
        with base.lock, base.peft.disable_adapter():
            base.peft.eval()
            yield base.peft, base.tokenizer


def train_and_evaluate(
    finetuner: LoraFinetuner,
    evaluator: Evaluator,
    prompts: Sequence[str],
    responses: Sequence[str],
    eval_set: Any,
    *,
    seed: int | None = None,
) -> tuple[TrainStats, EvalResult]:
    """One leaf's measurement: reset the adapter, train it on the examples, evaluate it on the proxy set."""
    if finetuner.separator != evaluator.separator:
        raise ValueError(
            f"finetuner.separator={finetuner.separator!r} differs from evaluator.separator="
            f"{evaluator.separator!r}: training and scoring would see different prompts"
        )
    evaluator.check_backend()
    stats = finetuner.train(prompts, responses, seed=seed, reset=True)
    if evaluator.backend == "vllm":
        with tempfile.TemporaryDirectory(prefix="harp-adapter-") as tmp:
            adapter = finetuner.save_adapter(Path(tmp) / "adapter")
            with finetuner.model_for_eval() as (model, tok):
                result = evaluator.evaluate(
                    model, tok, eval_set, base_model_path=finetuner.base_model, adapter_path=adapter
                )
    else:
        with finetuner.model_for_eval() as (model, tok):
            result = evaluator.evaluate(model, tok, eval_set)
    return stats, result
