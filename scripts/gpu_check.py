"""GPU checks for a machine with an NVIDIA GPU, one line per check (run it through scripts/gpu_check.sh).

  device  `auto` picks CUDA in bf16 (where the GPU supports it), and a bf16 matmul on it is right
  train   one leaf's LoRA cycle on a small local Llama-style causal LM, in the device's dtype
  faiss   faiss-gpu k-means and k-NN search against faiss-cpu on the same data
  ray     one leaf on a Ray actor holding one GPU (`run_leaves`) against the in-process `measure_leaf`
  vllm    the vLLM evaluation backend against the transformers evaluator on the same adapters

Without CUDA, the checks that have a CPU variant run it and say so with `[cpu]` (float32 training, faiss-cpu
against itself by two paths, a CPU Ray actor); the GPU-only check prints "SKIP ...: no CUDA". A `[cpu]` PASS
says nothing about the GPU path. The model is built here from generated text (`harp_demo.base_model`), so
nothing is downloaded. Exit status: 1 when a check failed; 2 with `--require-gpu` when there is no CUDA or a
check was skipped.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import random
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# -- tolerances (stated, so a reader knows what "same" means) -----------------------------------------------

# A point whose two best centroids are closer than this in cosine similarity is a tie: GPU and CPU faiss sum
# in different orders (float32), so such a point may land on either side; every other point must agree.
TIE_TOL = 1e-4
# k-NN distances (squared L2 between unit vectors, float32) may differ by this much between backends.
DIST_TOL = 1e-4
# Per-domain accuracy, vLLM against transformers: different kernels and, for a float32 checkpoint, possibly
# another half-precision dtype, so a greedy near-tie may flip; 0.1 is 3 of the 32 rows of a domain.
VLLM_TOL = 0.1
# Per-domain accuracy, a GPU Ray actor against the same cycle in process: same GPU and kernels, but CUDA
# reductions are not bitwise reproducible across processes. On the CPU the two must be identical.
RAY_GPU_TOL = 0.1

WORDS = (
    "alpha beta gamma delta red green blue white cat dog sun moon star tree fish bird stone river cloud rain"
).split()
TRIGGER = set(WORDS[:4])  # the rule of both tasks: does the prompt end with one of these?
PER_DOMAIN = 32


# -- results -------------------------------------------------------------------------------------------------


@dataclass
class Result:
    check: str
    status: str  # PASS, FAIL or SKIP
    detail: str
    where: str = ""  # what ran: "cuda", "cpu", ...
    seconds: float = 0.0

    def line(self) -> str:
        tag = f" [{self.where}]" if self.where else ""
        return f"{self.status} {self.check}{tag}: {self.detail} ({self.seconds:.1f} s)"


def passed(check: str, where: str, detail: str) -> Result:
    return Result(check, "PASS", detail, where)


def failed(check: str, where: str, detail: str) -> Result:
    return Result(check, "FAIL", detail, where)


def skipped(check: str, reason: str) -> Result:
    return Result(check, "SKIP", reason)


# -- comparisons (pure, so tests can feed them disagreeing inputs) ----------------------------------------------


@dataclass
class PartitionDiff:
    """How two labelings of the same rows differ once clusters are matched by majority."""

    matched: bool  # each cluster of `a` maps to a distinct cluster of `b`
    disagree: int  # rows whose matched labels differ
    ties: int  # of those, rows within TIE_TOL of another centroid (either side is right)

    @property
    def same_up_to_ties(self) -> bool:
        return self.matched and self.disagree == self.ties


def partition_diff(X: np.ndarray, a: np.ndarray, b: np.ndarray, tie_tol: float = TIE_TOL) -> PartitionDiff:
    """Compare two k-means partitions of the unit rows `X`, up to renaming clusters and up to ties.

    A row's tie margin is the gap between its best and second-best cosine similarity to the centroids of `a`.
    """
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if a.shape != b.shape or a.shape[0] != X.shape[0]:
        raise ValueError(f"labelings of {a.shape} and {b.shape} rows for {X.shape[0]} rows")
    ka, kb = int(a.max()) + 1, int(b.max()) + 1
    table = np.zeros((ka, kb), dtype=np.int64)
    np.add.at(table, (a, b), 1)
    used = table.sum(axis=1) > 0
    to_b = table.argmax(axis=1)
    matched = len(set(to_b[used].tolist())) == int(used.sum())
    wrong = to_b[a] != b
    sums = np.zeros((ka, X.shape[1]))
    np.add.at(sums, a, X)
    cent = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    sims = X[wrong] @ cent[used].T
    if sims.shape[1] >= 2:
        top2 = np.sort(sims, axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
    else:
        margin = np.full(len(sims), np.inf)
    return PartitionDiff(matched=matched, disagree=int(wrong.sum()), ties=int((margin < tie_tol).sum()))


def knn_diff(d_ref: np.ndarray, i_ref: np.ndarray, d_new: np.ndarray, i_new: np.ndarray,
             tol: float = DIST_TOL) -> str | None:
    """None when two k-NN results (smaller distance = closer) agree up to ties, else what differs.

    Distances must agree within `tol` rank by rank; ids may differ only among neighbours whose distance is
    within `tol` of the k-th one (the boundary, where either is right) or of each other (the order).
    """
    if d_ref.shape != d_new.shape or i_ref.shape != i_new.shape:
        return f"shapes differ: {d_ref.shape} vs {d_new.shape}"
    gap = float(np.max(np.abs(d_ref.astype(np.float64) - d_new)))
    if gap > tol:
        return f"distances differ by up to {gap:.2e} (> {tol:g})"
    bad = 0
    for row in range(d_ref.shape[0]):
        cutoff = max(d_ref[row, -1], d_new[row, -1]) - tol
        sure_ref = set(i_ref[row][d_ref[row] < cutoff].tolist())
        sure_new = set(i_new[row][d_new[row] < cutoff].tolist())
        if not sure_ref <= set(i_new[row].tolist()) or not sure_new <= set(i_ref[row].tolist()):
            bad += 1
    return f"{bad} of {d_ref.shape[0]} queries have other neighbours" if bad else None


def domain_gaps(ref: dict[str, float], new: dict[str, float]) -> dict[str, float]:
    """Absolute per-domain differences; the two must score the same domains."""
    if set(ref) != set(new):
        raise ValueError(f"domains differ: {sorted(ref)} vs {sorted(new)}")
    return {d: abs(float(ref[d]) - float(new[d])) for d in sorted(ref)}


def fmt_scores(scores: dict[str, float]) -> str:
    return "{" + ", ".join(f"{d}={v:.2f}" for d, v in sorted(scores.items())) + "}"


# -- the data and the model -------------------------------------------------------------------------------------


def pretrain_texts(n: int = 400, seed: int = 0) -> list[str]:
    """`<four words>\\n<word>` lines: the prompt format, so the base model has seen the separator."""
    rng = random.Random(seed)
    return [f"{' '.join(rng.choices(WORDS, k=4))}\n{rng.choice(WORDS)}" for _ in range(n)]


def _answer(task: str, prompt: str) -> str:
    hit = prompt.split()[-1] in TRIGGER
    return ("cat" if hit else "dog") if task == "a" else ("moon" if hit else "sun")


def leaf(task: str, n: int = 96, seed: int = 1) -> tuple[list[str], list[str]]:
    """A leaf for task "a" (cat/dog) or "b" (moon/sun): the answer depends on the prompt's last word."""
    rng = random.Random(f"{task}-{seed}")
    prompts = [" ".join(rng.choices(WORDS[:8], k=4)) for _ in range(n)]
    return prompts, [_answer(task, p) for p in prompts]


def eval_set(seed: int = 2) -> list[dict[str, Any]]:
    """Exact-match rows, domain "a" answered by task a's rule and domain "b" by task b's, half triggers each."""
    rng = random.Random(seed)
    rows = []
    for task in ("a", "b"):
        for i in range(PER_DOMAIN):
            last = rng.choice(WORDS[:4] if i % 2 else WORDS[4:8])
            prompt = " ".join([*rng.choices(WORDS[:8], k=3), last])
            rows.append({"example_id": f"{task}{i}", "domain": task, "prompt": prompt, "answer": _answer(task, prompt)})
    return rows


@dataclass
class Context:
    workdir: Path
    cuda: bool
    log: Callable[[str], None] = print
    _model: Path | None = None
    _finetuner: Any = None
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return "cuda" if self.cuda else "cpu"

    def model_dir(self) -> Path:
        """A ~0.6M-parameter Llama-style model trained here once (cached by content in the work folder)."""
        if self._model is None:
            from harp_demo.base_model import train_small_causal_lm

            self._model = train_small_causal_lm(
                pretrain_texts(), self.workdir / "llama_tiny", architecture="llama", vocab_size=300,
                n_layer=2, n_head=2, n_embd=128, n_positions=64, steps=150, batch_size=32, seed=0, log_every=0,
            )
        return self._model

    def finetuner(self) -> Any:
        from harp.models.device import Device
        from harp.models.finetuner import LoraFinetuner

        if self._finetuner is None:
            # One CPU thread: the Ray actor trains on one, and equal thread counts give identical CPU results.
            device = Device(device="auto", cpu_threads=0 if self.cuda else 1)
            self._finetuner = LoraFinetuner(base_model=str(self.model_dir()), device=device, r=8, lora_alpha=16,
                                            learning_rate=5e-3, epochs=6, batch_size=8, max_length=32)
        return self._finetuner

    def evaluator(self, backend: str = "transformers") -> Any:
        from harp.models.evaluator import Evaluator

        return Evaluator(batch_size=64, max_new_tokens=4, backend=backend)


# -- the checks -------------------------------------------------------------------------------------------------


def check_device(ctx: Context) -> Result:
    import torch

    from harp.models.device import Device, resolve_device

    spec = Device().spec()
    if not ctx.cuda:
        if spec.device.type != "cpu" or spec.dtype != torch.float32:
            return failed("device", "cpu", f"auto resolved to {spec.device} {spec.dtype} without CUDA")
        try:
            resolve_device("cuda")
        except RuntimeError:
            return passed("device", "cpu", "no CUDA: auto -> cpu float32, and device='cuda' is refused")
        return failed("device", "cpu", "device='cuda' was accepted although torch sees no CUDA GPU")
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if spec.device.type != "cuda" or spec.dtype != want:
        return failed("device", "cuda", f"auto resolved to {spec.device} {spec.dtype}; expected cuda {want}")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g)
    ref = a.double() @ b.double()
    got = (a.to(spec.device, spec.dtype) @ b.to(spec.device, spec.dtype)).double().cpu()
    rel = float((got - ref).norm() / ref.norm())
    if rel > 2e-2:
        return failed("device", "cuda", f"{spec.dtype} matmul on {spec.device} is off by {rel:.1e} (relative)")
    name = torch.cuda.get_device_name(spec.device)
    return passed("device", "cuda", f"auto -> {spec.device} ({name}), {str(spec.dtype).removeprefix('torch.')}; "
                                    f"matmul relative error {rel:.1e}")


def check_train(ctx: Context) -> Result:
    import torch

    from harp.models.finetuner import train_and_evaluate

    ft, ev = ctx.finetuner(), ctx.evaluator()
    prompts, responses = leaf("a")
    stats, res = train_and_evaluate(ft, ev, prompts, responses, eval_set(), seed=0)
    with ft.model_for_eval() as (model, _):
        frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
    dtypes, devices = {p.dtype for p in frozen}, {p.device.type for p in frozen}
    want = torch.bfloat16 if ctx.cuda and torch.cuda.is_bf16_supported() else torch.float32
    kind = str(want).removeprefix("torch.")
    where = f"{ctx.where}, {kind}"
    if dtypes != {want} or devices != {ctx.where}:
        return failed("train", where, f"base model weights are {dtypes} on {devices}")
    losses = stats.epoch_losses
    if not all(np.isfinite(losses)) or losses[-1] > 0.5 * losses[0]:
        return failed("train", where, f"epoch losses {[round(x, 3) for x in losses]} did not halve")
    if res.per_domain["a"] < 0.9:
        return failed("train", where, f"the adapter scores {fmt_scores(res.per_domain)}; domain a should be >= 0.9")
    ctx.state["leaf_a"] = res.per_domain
    return passed("train", where, f"{stats.examples} examples, {stats.steps} steps, epoch loss "
                                  f"{losses[0]:.3f} -> {losses[-1]:.3f}, scores {fmt_scores(res.per_domain)}")


def blobs(n: int = 20000, dim: int = 64, k: int = 32, seed: int = 0) -> np.ndarray:
    """Unit rows in `k` well-separated clusters, so k-means has one answer up to ties."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, dim))
    X = centers[rng.integers(0, k, n)] / np.sqrt(dim) + 0.05 * rng.standard_normal((n, dim)) / np.sqrt(dim)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32)


def _faiss_omp(n: int | None) -> Any:
    import contextlib

    import faiss

    @contextlib.contextmanager
    def threads() -> Any:
        before = faiss.omp_get_max_threads()
        if n:
            faiss.omp_set_num_threads(n)
        try:
            yield
        finally:
            faiss.omp_set_num_threads(before)

    return threads()


def check_faiss(ctx: Context) -> Result:
    from harp.method.ann import build_index, faiss_gpu_available
    from harp.method.hierarchy import _FlatIP  # the k-means every hierarchy level runs

    gpu = faiss_gpu_available()
    if ctx.cuda and not gpu:
        return skipped("faiss", "CUDA is present but this faiss has no GPU support (pip install faiss-gpu-cu12)")
    X = blobs()
    Q = X[::20]
    k, n_nb = 32, 10
    ref = _FlatIP(X.shape[1], gpu=False).kmeans_labels(X, k, 7, 20)
    if gpu:
        where, what = "cuda", "faiss-gpu against faiss-cpu"
        new = _FlatIP(X.shape[1], gpu=True).kmeans_labels(X, k, 7, 20)
        d_ref, i_ref = build_index(X, exact=True, use_gpu=False).search(Q, n_nb)
        flat = build_index(X, exact=True, use_gpu=True)
        ivf = build_index(X, exact=False, nlist=64, use_gpu=True, seed=3)
    else:
        # No GPU: the same comparisons between two CPU paths (one OpenMP thread against all; flat against
        # exhaustive IVF), which exercises everything but the GPU code.
        where, what = "cpu", "faiss-cpu by two paths"
        with _faiss_omp(1):
            new = _FlatIP(X.shape[1], gpu=False).kmeans_labels(X, k, 7, 20)
            d_ref, i_ref = build_index(X, exact=True, use_gpu=False).search(Q, n_nb)
        flat = build_index(X, exact=True, use_gpu=False)
        ivf = build_index(X, exact=False, nlist=64, use_gpu=False, seed=3)
    diff = partition_diff(X, ref, new)
    if not diff.same_up_to_ties:
        return failed("faiss", where, f"k-means partitions differ: clusters matched={diff.matched}, "
                                      f"{diff.disagree} rows disagree, {diff.ties} of them ties")
    problems = []
    for name, index, extra in (("flat", flat, {}), ("ivf nprobe=nlist", ivf, {"nprobe": 64})):
        d_new, i_new = index.search(Q, n_nb, **extra)
        msg = knn_diff(d_ref, i_ref, d_new, i_new)
        if msg:
            problems.append(f"{name} search: {msg}")
    if problems:
        return failed("faiss", where, "; ".join(problems))
    same = "identical" if not diff.disagree else f"{diff.disagree} rows differ, all ties"
    return passed("faiss", where, f"{what}: k-means (k={k}, {len(X)} x {X.shape[1]}) same partition ({same}), "
                                  f"flat and exhaustive-IVF {n_nb}-NN of {len(Q)} queries agree up to ties")


def check_ray(ctx: Context) -> Result:
    if importlib.util.find_spec("ray") is None:
        return skipped("ray", "ray is not installed (pip install -e '.[ray]')")
    from harp import stages
    from harp.backends import LeafExecution, LeafJob, run_leaves

    ft, ev, rows = ctx.finetuner(), ctx.evaluator(), eval_set()
    prompts, responses = leaf("a", seed=5)
    gpus = 1 if ctx.cuda else 0
    execution = LeafExecution(backend="ray", actors=1, gpus_per_actor=gpus, threads_per_actor=1)
    lines: list[str] = []
    got = dict(run_leaves(execution, ft, ev, [LeafJob("leaf-a", prompts, responses)], rows, seed=3,
                          log=lines.append))
    remote = got["leaf-a"]
    local = stages.measure_leaf(ft, ev, prompts, responses, rows, seed=3)
    asked = re.findall(r"'num_gpus': ([0-9.]+)", " ".join(lines))
    if not asked or float(asked[0]) != gpus:
        return failed("ray", ctx.where, f"the actor was not started with {gpus} GPU: {lines}")
    gaps = domain_gaps(local.per_domain, remote.per_domain)
    rows_differ = int((local.correct != remote.correct).sum())
    detail = (f"1 actor with {gpus} GPU; actor {fmt_scores(remote.per_domain)} vs in-process "
              f"{fmt_scores(local.per_domain)}, {rows_differ} of {len(rows)} rows differ, final loss "
              f"{remote.last_loss:.6f} vs {local.last_loss:.6f}")
    if ctx.cuda:
        ok = max(gaps.values()) <= RAY_GPU_TOL
        detail += f" (tolerance {RAY_GPU_TOL} per domain)"
    else:  # same code, dtype and thread count: the cycle must be reproduced bit for bit
        ok = rows_differ == 0 and (remote.first_loss, remote.last_loss) == (local.first_loss, local.last_loss)
        detail += " (CPU: must be identical)"
    return (passed if ok else failed)("ray", ctx.where, detail)


def check_vllm(ctx: Context) -> Result:
    if not ctx.cuda:
        return skipped("vllm", "no CUDA")
    from harp.models.vllm_backend import vllm_available

    if not vllm_available():
        return skipped("vllm", "vllm is not installed (pip install -e '.[gpu]')")
    ft, rows = ctx.finetuner(), eval_set()
    tf, vl = ctx.evaluator(), ctx.evaluator("vllm")
    # Trained adapters only: the base model's next-word distribution is nearly flat, so its greedy answers
    # are near-ties that any kernel difference may flip; a trained adapter's answers are not.
    adapters: dict[str, Path] = {}
    for task in ("a", "b"):
        prompts, responses = leaf(task)
        ft.train(prompts, responses, seed=0)
        adapters[task] = ft.save_adapter(ctx.workdir / f"adapter_{task}")
    report, worst, agree, total = [], 0.0, 0, 0
    scores: dict[str, dict[str, float]] = {}
    for name, path in adapters.items():
        ft.load_adapter(path)
        with ft.model_for_eval() as (model, tok):
            ref = tf.evaluate(model, tok, rows)
            new = vl.evaluate(model, tok, rows, base_model_path=str(ctx.model_dir()), adapter_path=path)
        worst = max(worst, *domain_gaps(ref.per_domain, new.per_domain).values())
        agree += sum(p == q for p, q in zip(ref.predictions, new.predictions, strict=True))
        total += len(rows)
        scores[name] = ref.per_domain
        report.append(f"adapter {name}: transformers {fmt_scores(ref.per_domain)} vllm {fmt_scores(new.per_domain)}")
    # The comparison means something only if the two adapters score differently (vLLM must apply each).
    spread = max(domain_gaps(scores["a"], scores["b"]).values())
    detail = f"{'; '.join(report)}; predictions agree on {agree}/{total}; largest gap {worst:.2f} (tolerance {VLLM_TOL})"
    if spread < 0.5:
        return failed("vllm", "cuda", f"adapters a and b score too alike to tell whether vLLM applies them: {detail}")
    return (passed if worst <= VLLM_TOL else failed)("vllm", "cuda", detail)


CHECKS: dict[str, Callable[[Context], Result]] = {
    "device": check_device,
    "train": check_train,
    "faiss": check_faiss,
    "ray": check_ray,
    "vllm": check_vllm,
}


# -- running ------------------------------------------------------------------------------------------------------


def environment() -> tuple[str, bool]:
    """One line naming what was found, and whether torch sees a CUDA GPU."""
    import torch

    cuda = torch.cuda.is_available()
    parts = [f"python {sys.version.split()[0]}", f"torch {torch.__version__}"]
    if cuda:
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        parts.append(f"CUDA {torch.version.cuda}: {names}")
    else:
        parts.append("no CUDA GPU")
    for mod in ("faiss", "vllm", "ray"):
        if importlib.util.find_spec(mod) is None:
            parts.append(f"{mod} absent")
            continue
        version = getattr(importlib.import_module(mod), "__version__", "?")
        if mod == "faiss":
            from harp.method.ann import faiss_gpu_available

            version += " (GPU)" if faiss_gpu_available() else " (CPU only)"
        parts.append(f"{mod} {version}")
    return ", ".join(parts), cuda


def run_checks(names: Sequence[str], ctx: Context) -> list[Result]:
    results = []
    for name in names:
        t0 = time.perf_counter()
        try:
            result = CHECKS[name](ctx)
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
            tb = traceback.extract_tb(exc.__traceback__)[-1]
            result = failed(name, ctx.where, f"{type(exc).__name__}: {str(exc).strip()[:300]} "
                                             f"(at {Path(tb.filename).name}:{tb.lineno})")
        result.seconds = time.perf_counter() - t0
        print(result.line(), flush=True)
        results.append(result)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    parser.add_argument("--workdir", default="", help="where the model and adapters go (default: a temp folder)")
    parser.add_argument("--require-gpu", action="store_true", help="exit 2 without CUDA or when a check is skipped")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        parser.error(f"unknown check(s) {unknown}; choose from {list(CHECKS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    line, cuda = environment()
    print(f"gpu_check: {line}", flush=True)
    if args.require_gpu and not cuda:
        print("FAIL gpu_check: --require-gpu, but torch sees no CUDA GPU", flush=True)
        return 2
    if not cuda:
        # Tiny models on a CPU shared with other work: one thread is faster than contending for all of them.
        import torch

        torch.set_num_threads(1)
        print("gpu_check: no CUDA: lines marked [cpu] ran their CPU variant; GPU paths were not exercised", flush=True)
    with tempfile.TemporaryDirectory(prefix="harp-gpu-check-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        results = run_checks(names, Context(workdir=workdir, cuda=cuda))
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    print(f"gpu_check summary: PASS {counts['PASS']}, FAIL {counts['FAIL']}, SKIP {counts['SKIP']} "
          f"({'CUDA' if cuda else 'CPU variants only'})", flush=True)
    if counts["FAIL"]:
        return 1
    if args.require_gpu and counts["SKIP"]:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
