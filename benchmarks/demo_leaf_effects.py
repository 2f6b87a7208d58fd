"""Leaf effects on the demo: does one ~100-example leaf move its domain's proxy accuracy the right way?

For every domain, one example set per kind (clean, harmful, redundant; plus filler sets) is trained into a
LoRA adapter on the demo base model and evaluated on the proxy set, through the real finetuner and
evaluator, with the demo's LoRA recipe. Sets come from the ground truth (random members of a kind and
domain) or, with `--leaves hierarchy`, from real leaves: the pool is embedded, the hierarchy is built, and
for each domain and kind `--leaves-per-kind` leaves whose largest group is that (domain, kind) are drawn at
random (their purity and the number of entities they mention are printed), together with the leaf purity
of the whole hierarchy. Leaves that mention only the entities of one answer (clusters that follow the
answer word) teach a bias rather than the table, and show it as a small change.

Acceptance: the mean own-domain gain of clean sets is >= 10 points, the mean own-domain change of harmful
sets is negative, and a train-and-evaluate cycle takes <= 10 s (CPU; the figure is noisy on a loaded host).

    python benchmarks/demo_leaf_effects.py [--out demo_data/default] [--leaves hierarchy] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harp.contracts import load_eval_set, load_pool  # noqa: E402
from harp.io import atomic_write, write_text  # noqa: E402
from harp.models.evaluator import Evaluator  # noqa: E402
from harp.models.finetuner import LoraFinetuner, train_and_evaluate  # noqa: E402
from harp_demo.build import DEMO_LORA, DemoPaths, build_demo  # noqa: E402

KINDS_MEASURED = ("clean", "harmful", "redundant")


def eval_rows(path: Path) -> list[dict]:
    """The proxy set, validated by the data contract, in the evaluator's row shape."""
    df = load_eval_set(path)
    return (
        df.select("example_id", "domain", "prompt", "choices", pl.col("answer_index").alias("answer"))
        .to_dicts()
    )


def sets_from_ground_truth(truth: pl.DataFrame, size: int, seed: int, n_filler: int) -> list[dict]:
    rng = random.Random(seed)
    sets = []
    domains = sorted(d for d in truth["domain"].unique().to_list() if d)
    for dom in domains:
        for kind in KINDS_MEASURED:
            ids = truth.filter((pl.col("domain") == dom) & (pl.col("kind") == kind))["example_id"].to_list()
            if len(ids) < size:
                print(f"  skip {dom}/{kind}: only {len(ids)} examples", file=sys.stderr)
                continue
            sets.append({"domain": dom, "kind": kind, "ids": rng.sample(ids, size), "purity": 1.0, "leaf": None})
    fill = truth.filter(pl.col("kind") == "filler")["example_id"].to_list()
    for _ in range(n_filler if len(fill) >= size else 0):
        sets.append({"domain": "", "kind": "filler", "ids": rng.sample(fill, size), "purity": 1.0, "leaf": None})
    return sets


def sets_from_hierarchy(
    paths: DemoPaths,
    pool: pl.DataFrame,
    truth: pl.DataFrame,
    leaf_size: int,
    seed: int,
    per_kind: int,
    n_filler: int,
) -> tuple[list[dict], dict]:
    """Embed the pool, build the hierarchy, then sample `per_kind` leaves per (domain, kind) among the leaves
    whose largest group is that (domain, kind); uniformly, so typical leaves are measured, not the largest."""
    from harp.method.hierarchy import build_parent_leaf_hierarchy
    from harp.models.embedder import Embedder

    emb = Embedder(device="cpu")
    pool_sha = paths.read_manifest()["files"][paths.pool.name][:12]
    cache = paths.root / f"embeddings-{emb.model_id}-pool{pool_sha}.npy"  # stale if the pool changes
    t0 = time.perf_counter()
    if cache.is_file():
        X = np.load(cache)
    else:
        X = emb.embed([p + "\n" + r for p, r in zip(pool["prompt"], pool["response"], strict=True)])
        with atomic_write(cache) as fh:
            np.save(fh, X)
    t_embed = time.perf_counter() - t0
    h = build_parent_leaf_hierarchy(X, leaf_size=leaf_size, seed=seed, use_gpu=False)
    t_hier = time.perf_counter() - t0 - t_embed
    kind_of = dict(zip(truth["example_id"], truth["kind"], strict=True))
    dom_of = dict(zip(truth["example_id"], truth["domain"], strict=True))
    ids = pool["example_id"].to_list()
    leaf_members: list[list[str]] = [[] for _ in range(h.n_leaves)]
    for row, leaf in enumerate(h.leaf_of.tolist()):
        leaf_members[leaf].append(ids[row])
    majority_total = 0
    by_kind: dict[str, list[int]] = {}  # kind -> [members in leaves whose majority is that kind, all members]
    for members in leaf_members:
        c = Counter(kind_of[e] for e in members)
        top, n_top = c.most_common(1)[0]
        majority_total += n_top
        for kind, n in c.items():
            s = by_kind.setdefault(kind, [0, 0])
            s[1] += n
            if kind == top:
                s[0] += n
    purity = {
        "n_leaves": h.n_leaves,
        "leaf_size_median": float(np.median(h.leaf_sizes)),
        "kind_purity": majority_total / len(ids),
        "share_in_own_majority_leaves": {k: v[0] / v[1] for k, v in sorted(by_kind.items())},
        "embed_seconds": round(t_embed, 1),
        "hierarchy_seconds": round(t_hier, 1),
    }
    rng = random.Random(seed)
    majority = []  # (kind, domain) of each leaf's largest group
    for members in leaf_members:
        majority.append(Counter((kind_of[e], dom_of[e]) for e in members).most_common(1)[0][0])
    sets = []
    domains = sorted(d for d in truth["domain"].unique().to_list() if d)
    groups = [(dom, kind, per_kind) for dom in domains for kind in KINDS_MEASURED] + [("", "filler", n_filler)]
    for dom, kind, n in groups:
        candidates = [g for g in range(h.n_leaves) if majority[g] == (kind, dom)]
        for g in sorted(rng.sample(candidates, min(n, len(candidates)))):
            members = leaf_members[g]
            share = sum(kind_of[e] == kind and dom_of[e] == dom for e in members) / len(members)
            sets.append({"domain": dom, "kind": kind, "ids": members, "purity": share, "leaf": g})
    return sets, purity


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "demo_data" / "default"), help="demo folder (built if needed)")
    ap.add_argument("--pool-size", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--leaves", choices=("ground-truth", "hierarchy"), default="ground-truth")
    ap.add_argument("--set-size", type=int, default=100, help="examples per ground-truth set / hierarchy leaf size")
    ap.add_argument("--filler-sets", type=int, default=2)
    ap.add_argument("--leaves-per-kind", type=int, default=2, help="hierarchy: leaves measured per (domain, kind)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--test", action="store_true", help="also score each adapter on the held-out test set")
    ap.add_argument("--json", dest="json_path", help="write the figures here as JSON")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    paths = build_demo(args.out, pool_size=args.pool_size, seed=args.seed)
    build_s = time.perf_counter() - t0
    manifest = paths.read_manifest()
    pool = load_pool(paths.pool)
    truth = pl.read_parquet(paths.ground_truth)
    proxy = eval_rows(paths.eval_set)
    test = eval_rows(paths.test_set) if args.test else None
    by_id = {e: (p, r) for e, p, r in zip(pool["example_id"], pool["prompt"], pool["response"], strict=True)}
    key_of = dict(zip(truth["example_id"], truth["key"], strict=True))

    purity = None
    if args.leaves == "hierarchy":
        sets, purity = sets_from_hierarchy(
            paths, pool, truth, args.set_size, args.seed, args.leaves_per_kind, args.filler_sets
        )
    else:
        sets = sets_from_ground_truth(truth, args.set_size, args.seed, args.filler_sets)

    assert paths.base_model is not None
    ft = LoraFinetuner(base_model=str(paths.base_model), seed=args.seed, **DEMO_LORA)
    ev = Evaluator(batch_size=64)
    with ft.base_for_eval() as (model, tok):
        base = ev.evaluate(model, tok, proxy)
        base_test = ev.evaluate(model, tok, test) if test else None
    domains = sorted(base.per_domain)
    print(f"demo: {paths.root} (fingerprint {manifest['fingerprint'][:12]}, ready in {build_s:.1f} s; "
          f"built in {manifest['seconds']['total']:.1f} s)")
    print(f"LoRA recipe: {DEMO_LORA}, torch threads {torch.get_num_threads()}")
    print("base proxy accuracy: " + ", ".join(f"{d} {base.per_domain[d]:.3f}" for d in domains)
          + f"; mean {base.mean:.3f}")
    if base_test:
        print(f"base test accuracy: mean {base_test.mean:.3f}")

    rows = []
    header = f"{'domain':12s} {'kind':9s} {'leaf':>5s} {'size':>5s} {'purity':>6s} {'keys':>4s} {'own':>7s} {'others':>7s} {'cycle s':>7s}"
    print(header + ("  test own" if test else ""))
    for s in sets:
        n_keys = len({key_of[e] for e in s["ids"] if key_of[e]})  # distinct entities the set mentions
        prompts = [by_id[e][0] for e in s["ids"]]
        responses = [by_id[e][1] for e in s["ids"]]
        t = time.perf_counter()
        stats, res = train_and_evaluate(ft, ev, prompts, responses, proxy)
        cycle = time.perf_counter() - t
        delta = {d: res.per_domain[d] - base.per_domain[d] for d in domains}
        own = delta[s["domain"]] if s["domain"] else None
        others = float(np.mean([v for d, v in delta.items() if d != s["domain"]]))
        row = {
            "domain": s["domain"] or None, "kind": s["kind"], "leaf": s["leaf"], "size": len(s["ids"]),
            "purity": s["purity"], "entities": n_keys, "own_change": own, "others_mean_change": others, "per_domain_change": delta,
            "cycle_seconds": cycle, "train_seconds": stats.seconds, "eval_seconds": res.seconds,
            "loss_first": stats.first_loss, "loss_last": stats.last_loss,
        }
        if test and base_test:
            with ft.model_for_eval() as (model, tok):
                rt = ev.evaluate(model, tok, test)
            row["test_own_change"] = (rt.per_domain[s["domain"]] - base_test.per_domain[s["domain"]]) if s["domain"] else None
        rows.append(row)
        own_s = f"{own:+.3f}" if own is not None else "    -"
        leaf_s = str(s["leaf"]) if s["leaf"] is not None else "-"
        line = (f"{s['domain'] or '(filler)':12s} {s['kind']:9s} {leaf_s:>5s} {len(s['ids']):5d} {s['purity']:6.2f} {n_keys:4d} "
                f"{own_s:>7s} {others:+7.3f} {cycle:7.2f}")
        if "test_own_change" in row and row["test_own_change"] is not None:
            line += f"  {row['test_own_change']:+.3f}"
        print(line, flush=True)

    def mean_own(kind: str) -> float:
        vals = [r["own_change"] for r in rows if r["kind"] == kind and r["own_change"] is not None]
        return float(np.mean(vals)) if vals else float("nan")

    cycles = [r["cycle_seconds"] for r in rows]
    summary = {
        "clean_mean_gain": mean_own("clean"),
        "harmful_mean_change": mean_own("harmful"),
        "redundant_mean_change": mean_own("redundant"),
        "filler_mean_change_all_domains": float(np.mean([r["others_mean_change"] for r in rows if r["kind"] == "filler"]))
        if any(r["kind"] == "filler" for r in rows) else None,
        "cycle_seconds_median": statistics.median(cycles),
        "cycle_seconds_max": max(cycles),
    }
    checks = {
        "clean_gain_ge_10_points": summary["clean_mean_gain"] >= 0.10,
        "harmful_lowers": summary["harmful_mean_change"] < 0,
        "cycle_le_10_s": summary["cycle_seconds_median"] <= 10.0,
    }
    print(f"clean sets: mean own-domain gain {summary['clean_mean_gain']:+.3f}")
    print(f"harmful sets: mean own-domain change {summary['harmful_mean_change']:+.3f}")
    print(f"redundant sets: mean own-domain change {summary['redundant_mean_change']:+.3f}")
    print(f"cycle seconds: median {summary['cycle_seconds_median']:.2f}, max {summary['cycle_seconds_max']:.2f}")
    if purity:
        print(f"hierarchy: {purity['n_leaves']} leaves, kind purity {purity['kind_purity']:.3f}, share of each kind "
              "in leaves of its own majority: "
              + ", ".join(f"{k} {v:.3f}" for k, v in purity["share_in_own_majority_leaves"].items()))
    print("acceptance: " + ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in checks.items()))
    if args.json_path:
        out = {
            "demo": str(paths.root), "fingerprint": manifest["fingerprint"], "build_seconds": manifest["seconds"],
            "lora": DEMO_LORA, "threads": torch.get_num_threads(), "leaves": args.leaves,
            "base_proxy": base.per_domain, "base_proxy_mean": base.mean,
            "base_test": base_test.per_domain if base_test else None,
            "sets": rows, "summary": summary, "checks": checks, "hierarchy_purity": purity,
        }
        write_text(Path(args.json_path), json.dumps(out, indent=2, default=float))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
