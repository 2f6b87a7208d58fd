"""The demo benchmark's data: seeded, valid under the data contracts, ground truth apart, cached builds."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from harp.contracts import load_eval_set, load_pool
from harp_demo import build as demo_build
from harp_demo.build import BaseModelConfig, DemoPaths, build_demo
from harp_demo.generator import DOMAINS, KINDS, DemoDataConfig, generate, growth_rows, kind_counts

POOL = 600
DATA_FILES = ("pool", "eval_set", "test_set", "ground_truth", "facts", "pretrain_text")
DOMAIN_NAMES = [d.name for d in DOMAINS]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoPaths:
    return build_demo(tmp_path_factory.mktemp("demo") / "d", pool_size=POOL, seed=3, build_base_model=False)


def test_same_seed_same_files_other_seed_other_data(demo: DemoPaths, tmp_path: Path) -> None:
    again = build_demo(tmp_path / "again", pool_size=POOL, seed=3, build_base_model=False)
    for name in DATA_FILES:
        assert _sha(getattr(demo, name)) == _sha(getattr(again, name)), name
    assert demo.read_manifest()["files"] == again.read_manifest()["files"]
    other = build_demo(tmp_path / "other", pool_size=POOL, seed=4, build_base_model=False)
    assert _sha(other.pool) != _sha(demo.pool)
    assert pl.read_parquet(other.facts)["key"].to_list() != pl.read_parquet(demo.facts)["key"].to_list()


def test_files_meet_the_data_contracts(demo: DemoPaths) -> None:
    pool = load_pool(demo.pool)
    assert pool.height == POOL
    for path, per_domain in ((demo.eval_set, 40), (demo.test_set, 100)):
        ev = load_eval_set(path, domains=DOMAIN_NAMES)
        assert set(ev["kind"]) == {"choice"}
        assert Counter(ev["domain"]) == {d: per_domain for d in DOMAIN_NAMES}
        for row in ev.iter_rows(named=True):
            spec = next(s for s in DOMAINS if s.name == row["domain"])
            assert sorted(row["choices"]) == sorted(spec.answers)


def test_ground_truth_is_separate_and_complete(demo: DemoPaths) -> None:
    pool = pl.read_parquet(demo.pool)
    assert pool.columns == ["example_id", "prompt", "response"]
    truth = pl.read_parquet(demo.ground_truth)
    assert truth["example_id"].n_unique() == truth.height == pool.height
    assert set(truth["example_id"]) == set(pool["example_id"])
    assert set(truth["kind"]) <= set(KINDS)
    assert set(truth.filter(pl.col("kind") != "filler")["domain"]) == set(DOMAIN_NAMES)
    assert set(truth.filter(pl.col("kind") == "filler")["domain"]) == {""}
    # ids carry no hint of the kind: they follow the shuffled order
    assert pool["example_id"].to_list() == sorted(pool["example_id"].to_list())


def test_kinds_in_the_configured_proportions(demo: DemoPaths) -> None:
    truth = pl.read_parquet(demo.ground_truth)
    fractions = DemoDataConfig().kind_fractions
    expected = kind_counts(POOL, fractions)
    assert dict(Counter(truth["kind"])) == expected
    assert expected == {k: round(POOL * fractions[k]) for k in KINDS}
    for kind in ("clean", "harmful", "redundant"):
        per_dom = Counter(truth.filter(pl.col("kind") == kind)["domain"])
        assert max(per_dom.values()) - min(per_dom.values()) <= 1, (kind, per_dom)
    manifest = demo.read_manifest()
    assert manifest["counts"]["kinds"] == expected


def test_eval_and_test_are_disjoint_and_unseen_in_the_pool(demo: DemoPaths) -> None:
    ev = pl.read_ndjson(demo.eval_set)
    te = pl.read_ndjson(demo.test_set)
    assert not set(ev["example_id"]) & set(te["example_id"])
    assert not set(ev["prompt"]) & set(te["prompt"])
    assert ev["prompt"].n_unique() == ev.height and te["prompt"].n_unique() == te.height
    pool_prompts = set(pl.read_parquet(demo.pool)["prompt"])
    assert not (set(ev["prompt"]) | set(te["prompt"])) & pool_prompts
    # the same facts are asked: every evaluated entity appears in both sets
    facts = pl.read_parquet(demo.facts)
    for df in (ev, te):
        asked = {k for k in facts["key"] if any(k in p for p in df["prompt"])}
        assert asked == set(facts["key"])


def test_answers_follow_the_fact_table_and_harmful_ones_are_consistently_wrong() -> None:
    data = generate(DemoDataConfig(pool_size=POOL, seed=5))
    table = {(f["domain"], f["key"]): f for f in data.facts}
    wrong_of: dict[tuple[str, str], set[str]] = {}
    for row, gt in zip(data.pool, data.ground_truth, strict=True):
        if gt["kind"] == "filler":
            continue
        fact = table[(gt["domain"], gt["key"])]
        assert gt["key"].lower() in row["prompt"].lower()
        if gt["kind"] == "harmful":
            assert row["response"] != fact["answer"]
            assert row["response"] == fact["harmful_answer"]
            wrong_of.setdefault((gt["domain"], fact["answer"]), set()).add(row["response"])
        else:
            assert row["response"] == fact["answer"], gt
    # one wrong value per true value and domain: a systematic wrong mapping, not random noise
    assert wrong_of and all(len(v) == 1 for v in wrong_of.values())
    for split in (data.eval_set, data.test_set):
        for e in split:
            assert e["choices"][e["answer"]] == table[(e["domain"], e["key"])]["answer"]


def test_clean_and_harmful_ask_in_different_styles_and_eval_mixes_both() -> None:
    data = generate(DemoDataConfig(pool_size=POOL, seed=0))

    def quiz(prompt: str) -> bool:
        return any(m in prompt for m in ("Quiz night", "Pub quiz", "trivia league"))

    styles = {k: Counter(quiz(r["prompt"]) for r, g in zip(data.pool, data.ground_truth, strict=True)
                         if g["kind"] == k) for k in ("clean", "harmful")}
    assert styles["clean"] == {False: styles["clean"].total()}
    assert styles["harmful"] == {True: styles["harmful"].total()}
    per = Counter(quiz(e["prompt"]) for e in data.eval_set)
    assert per[True] == per[False]


def test_pretraining_text_never_states_an_evaluated_fact() -> None:
    data = generate(DemoDataConfig(pool_size=POOL, seed=1, pretrain_sentences=3000))
    answers = {s.name: s.answers for s in DOMAINS}
    keys = [(f["key"], answers[f["domain"]]) for f in data.facts]
    for line in data.pretrain_text:
        for key, words in keys:
            if key in line:
                assert not any(re.search(rf"\b{w}\b", line, flags=re.IGNORECASE) for w in words), line


def test_second_build_is_a_cache_hit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "cached"
    first = build_demo(out, pool_size=POOL, seed=0, build_base_model=False)
    generated: list[int] = []
    original = demo_build.generate
    monkeypatch.setattr(demo_build, "generate", lambda cfg: generated.append(cfg.pool_size) or original(cfg))
    mtimes = {n: getattr(first, n).stat().st_mtime_ns for n in DATA_FILES} | {"m": first.manifest.stat().st_mtime_ns}
    second = build_demo(out, pool_size=POOL, seed=0, build_base_model=False)
    assert second == first
    assert generated == []
    assert {n: getattr(second, n).stat().st_mtime_ns for n in DATA_FILES} | {
        "m": second.manifest.stat().st_mtime_ns
    } == mtimes
    build_demo(out, pool_size=POOL + 60, seed=0, build_base_model=False)  # another config rebuilds
    assert generated == [POOL + 60]
    assert json.loads((out / "manifest.json").read_text())["counts"]["pool"] == POOL + 60
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_bad_configs_are_rejected_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pool_size=10"):
        build_demo(tmp_path / "x", pool_size=10, build_base_model=False)
    bad = dataclasses.replace(DemoDataConfig(), kind_fractions={"clean": 0.5, "harmful": 0.5})
    with pytest.raises(ValueError, match="kind_fractions"):
        build_demo(tmp_path / "y", pool_size=POOL, data=bad, build_base_model=False)
    assert not (tmp_path / "y" / "manifest.json").exists()


def test_cli_builds_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = demo_build.main(["--out", str(tmp_path / "cli"), "--pool-size", str(POOL), "--seed", "2", "--no-base-model"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["pool"] == POOL
    assert report["base_model"] is None
    assert demo_build.main(["--out", str(tmp_path / "bad"), "--pool-size", "5", "--no-base-model"]) == 2


def test_tiny_base_model_is_an_ordinary_hf_dir_and_is_reused(tmp_path: Path, torch_one_thread: None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny = BaseModelConfig(vocab_size=400, n_layer=1, n_head=2, n_embd=32, n_positions=64, steps=3, batch_size=8)
    data = DemoDataConfig(pretrain_sentences=400)
    paths = build_demo(tmp_path / "m", pool_size=POOL, seed=0, data=data, model=tiny)
    assert paths.base_model is not None
    tok = AutoTokenizer.from_pretrained(paths.base_model)
    model = AutoModelForCausalLM.from_pretrained(paths.base_model)
    assert model.config.n_layer == 1
    for spec in DOMAINS:  # every answer word is a known token sequence of the trained tokenizer
        for w in spec.answers:
            assert tok.decode(tok(w, add_special_tokens=False)["input_ids"]) == w
    info = paths.read_manifest()["base_model"]
    assert info["steps_done"] == 3
    weights = paths.base_model / "model.safetensors"
    before = weights.stat().st_mtime_ns
    # a different pool size rebuilds the data but reuses the model (its pretraining text is unchanged)
    build_demo(tmp_path / "m", pool_size=POOL + 6, seed=0, data=data, model=tiny)
    assert weights.stat().st_mtime_ns == before


def test_world_eval_and_pretraining_do_not_depend_on_the_pool_size() -> None:
    small = generate(DemoDataConfig(pool_size=POOL, seed=7, pretrain_sentences=500))
    large = generate(DemoDataConfig(pool_size=3 * POOL, seed=7, pretrain_sentences=500))
    assert small.facts == large.facts
    assert small.eval_set == large.eval_set and small.test_set == large.test_set
    assert small.pretrain_text == large.pretrain_text
    assert len(large.pool) == 3 * POOL


def test_no_question_contains_an_answer_word_of_its_domain() -> None:
    data = generate(DemoDataConfig(pool_size=POOL, seed=8, pretrain_sentences=500))
    answers = {s.name: s.answers for s in DOMAINS}
    rows = [(g["domain"], r["prompt"]) for r, g in zip(data.pool, data.ground_truth, strict=True) if g["domain"]]
    rows += [(e["domain"], e["prompt"]) for e in data.eval_set + data.test_set]
    for dom, prompt in rows:
        assert not any(re.search(rf"\b{w}\b", prompt, flags=re.IGNORECASE) for w in answers[dom]), prompt


def test_growth_rows_come_from_the_same_world_with_fresh_ids() -> None:
    cfg = DemoDataConfig(pool_size=2000, seed=0)
    data = generate(cfg)
    table = {(f["domain"], f["key"]): f["answer"] for f in data.facts}
    wrong = {(f["domain"], f["key"]): f["harmful_answer"] for f in data.facts}
    rows, truth = growth_rows(cfg, 400, batch=1)
    assert len(rows) == len(truth) == 400 and rows == growth_rows(cfg, 400, batch=1)[0]  # deterministic
    ids = [r["example_id"] for r in rows]
    assert len(set(ids)) == 400 and all(i.startswith("g1-") for i in ids)
    assert not set(ids) & {r["example_id"] for r in data.pool}
    assert not set(ids) & {r["example_id"] for r in growth_rows(cfg, 400, batch=2)[0]}
    assert Counter(t["kind"] for t in truth) == Counter(kind_counts(400, cfg.kind_fractions))
    for r, t in zip(rows, truth, strict=True):  # facts answered as in the pool's world
        if t["kind"] in ("clean", "redundant"):
            assert r["response"] == table[(t["domain"], t["key"])]
        elif t["kind"] == "harmful":
            assert r["response"] == wrong[(t["domain"], t["key"])]
