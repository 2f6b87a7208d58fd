"""Exact-match generation through vLLM with a LoRA adapter per request (GPU machines only).

vLLM is an optional dependency (`pip install 'harp-dagster[gpu]'`): nothing here imports it at module
load, so the rest of the project works without it. One engine per base model and process is kept,
because starting vLLM costs far more than a whole leaf's evaluation; adapters are passed per call.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install 'harp-dagster[gpu]'"
# LoRA ranks vLLM accepts for max_lora_rank.
_VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
_ENGINES: dict[tuple, VllmGenerator] = {}
_LOCK = threading.Lock()


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    """Raise a clear error when the vLLM backend is asked for but vLLM is not installed."""
    if not vllm_available():
        raise ImportError(
            "Evaluator(backend='vllm') needs vLLM, which is not installed. Install the GPU extras with "
            f"`{INSTALL_HINT}` (needs a CUDA GPU), or use backend='transformers'."
        )


def _supported_rank(rank: int) -> int:
    for r in _VLLM_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"LoRA rank {rank} exceeds the largest rank vLLM serves ({_VLLM_RANKS[-1]})")


def _adapter_id(adapter_path: Path) -> int:
    """A stable positive id per adapter content: vLLM caches adapters by id, so new weights need a new id."""
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        p = adapter_path / name
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing: not a saved LoRA adapter directory")
        h.update(p.read_bytes())
    return int.from_bytes(h.digest()[:4], "little") % (2**31 - 1) + 1


class VllmGenerator:
    """A vLLM engine for one base model that generates greedily with an optional LoRA adapter."""

    def __init__(
        self,
        base_model: str,
        *,
        max_lora_rank: int = 64,
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        dtype: str = "auto",
        seed: int = 0,
    ) -> None:
        require_vllm()
        from vllm import LLM

        self.max_lora_rank = _supported_rank(max_lora_rank)
        kwargs: dict[str, Any] = {
            "model": base_model,
            "enable_lora": True,
            "max_lora_rank": self.max_lora_rank,
            "max_loras": 1,
            "gpu_memory_utilization": gpu_memory_utilization,
            "dtype": dtype,
            "seed": seed,
        }
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        self.llm = LLM(**kwargs)

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        *,
        max_new_tokens: int,
        adapter_path: str | os.PathLike | None = None,
    ) -> list[list[int]]:
        """Greedy continuations (token ids) of already-encoded prompts, in input order."""
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        lora = None
        if adapter_path is not None:
            path = Path(adapter_path).resolve()
            rank = json.loads((path / "adapter_config.json").read_text()).get("r", 0)
            if rank > self.max_lora_rank:
                raise ValueError(f"adapter {path} has rank {rank}; the engine was started with {self.max_lora_rank}")
            lid = _adapter_id(path)
            lora = LoRARequest(f"adapter-{lid}", lid, str(path))
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_token_ids]
        outputs = self.llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]


def get_vllm_generator(base_model: str, **kwargs: Any) -> VllmGenerator:
    """The process-wide engine for `base_model` and these settings, started on first use."""
    require_vllm()
    key = (base_model, tuple(sorted(kwargs.items())))
    with _LOCK:
        gen = _ENGINES.get(key)
        if gen is None:
            gen = VllmGenerator(base_model, **kwargs)
            _ENGINES[key] = gen
        return gen
