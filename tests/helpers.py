"""What several test modules share: the tiny corpus and model settings, and the tiny Dagster pipeline.

The pipeline is materialised once per session (`conftest.tiny_pipeline`) and each Dagster test module works
on its own copy of that folder (demo, pool, DAGSTER_HOME with its runs, partitions and artifacts), so no
module rebuilds it and no module sees another's changes.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

# The fixture corpus: "<four words>\n<word>" lines over a small vocabulary, so the tiny model learns the
# format and every word is a known token (LoRA cannot raise the logits of tokens the base never saw).
TINY_WORDS = (
    "alpha beta gamma delta red green blue one two three cat dog sun moon apple river stone cloud fast slow"
).split()
TINY_CONFIG = dict(
    vocab_size=400, n_layer=2, n_head=2, n_embd=64, n_positions=64, steps=100, batch_size=16, lr=1e-2
)


def tiny_corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{' '.join(rng.choices(TINY_WORDS, k=4))}\n{rng.choice(TINY_WORDS)}" for _ in range(n)]


# --------------------------------------------------------------------------------------------------------
# A tiny pool and eval set with known structure, for the stage functions and harp()
# --------------------------------------------------------------------------------------------------------

# Pool templates: (words the prompt is drawn from, the response). Two of them match an eval domain whose
# right answer is that response; the third is off-task filler.
TEMPLATES: dict[str, tuple[list[str], str]] = {
    "greek": (TINY_WORDS[0:4], "dog"),
    "colors": (TINY_WORDS[4:7], "moon"),
    "sky": (TINY_WORDS[14:18], "apple"),
}
CHOICES = {"greek": ["cat", "dog"], "colors": ["sun", "moon"]}
HIERARCHY = {"leaf_size": 15, "leaves_per_parent": 2, "parents_per_region": 2}
LORA = {"r": 4, "lora_alpha": 8, "learning_rate": 1e-2, "epochs": 2, "batch_size": 8}


def make_pool(per_template: int = 50, seed: int = 0, dim: int = 16) -> tuple[list[dict], np.ndarray]:
    """Train examples from the templates, in template blocks, and features clustered by template."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    centers = nrng.normal(size=(len(TEMPLATES), dim))
    rows, feats = [], []
    for k, (name, (words, response)) in enumerate(TEMPLATES.items()):
        for i in range(per_template):
            rows.append(
                {
                    "example_id": f"{name}-{i}",
                    "prompt": " ".join(rng.choices(words, k=4)),
                    "response": response,
                }
            )
            feats.append(centers[k] + 0.3 * nrng.normal(size=dim))
    return rows, np.asarray(feats, dtype=np.float32)


def make_eval_set(per_domain: int = 12, seed: int = 1) -> list[dict]:
    """Multiple-choice rows, domains interleaved so that eval order differs from domain order."""
    rng = random.Random(seed)
    rows = []
    for i in range(per_domain):
        for name in ("greek", "colors"):  # "greek" first: sorted domain order is the other way round
            words, answer = TEMPLATES[name]
            choices = CHOICES[name] if i % 2 else CHOICES[name][::-1]
            rows.append(
                {
                    "example_id": f"q-{name}-{i}",
                    "domain": name,
                    "prompt": " ".join(rng.choices(words, k=4)),
                    "choices": choices,
                    "answer": choices.index(answer),
                }
            )
    return rows



@contextlib.contextmanager
def counting_base_loads() -> Iterator[list[str]]:
    """Every causal-LM load from disk while the block runs (the finetuner's base cache misses)."""
    import transformers

    calls: list[str] = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def counted(path: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(str(path))
        return original(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformers.AutoModelForCausalLM, "from_pretrained", counted)
        yield calls


# --------------------------------------------------------------------------------------------------------
# The tiny pipeline
# --------------------------------------------------------------------------------------------------------

# The tiny demo plants strong effects: 4 facts per domain, so a leaf of about 100 examples states each of its
# facts about 4 times; a base model that has just learned the practice lookups (so LoRA picks up new facts
# quickly, and entity numbers are single tokens); leaves of 60 that split the pool into a harmful-and-filler
# region and a clean one. Measured on seed 0: 7 leaves, 3 representatives (one all harmful, phi < 0 on most
# domains; two clean, phi up to +0.8), harp_c and harp_e both select 100 examples and none harmful. The
# base model's step count is a narrow window: 250 or 400 steps give effects too weak for that.
POOL = 400  # examples in the first pool file
GROWTH = 40  # examples kept back for a growth step (written as a second pool file by the tests that grow)
BUDGET = 100
SETTINGS = dict(leaf_size=60, leaves_per_parent=2, parents_per_region=2, n_representatives=1, top_k_points=BUDGET,
                n_boot=50, tsds_K=10, tsds_K_kde=10, z_active=0.0, max_leaf_size=80)
PIPELINE_LORA = dict(r=8, epochs=12, batch_size=16, max_length=96, learning_rate=1e-2)


def tiny_base() -> Any:
    from harp_demo.build import BaseModelConfig

    return BaseModelConfig(vocab_size=2000, n_layer=1, n_head=2, n_embd=64, n_positions=128, steps=300,
                           batch_size=16, lr=1e-2)


def tiny_data() -> Any:
    from harp_demo.generator import DemoDataConfig

    return DemoDataConfig(keys_per_domain=4, practice_keys_per_domain=4, pretrain_sentences=4000)


def build_tiny_demo(root: Path) -> None:
    """The demo under `root/demo`, its first POOL rows as `root/pool/part-000.parquet`, the next GROWTH rows
    as `root/growth.parquet` (not in the pool until a test moves it there)."""
    import polars as pl

    from harp_demo.build import build_demo

    demo = build_demo(root / "demo", pool_size=POOL + GROWTH, seed=0, data=tiny_data(), model=tiny_base())
    full = pl.read_parquet(demo.pool)
    (root / "pool").mkdir()
    full.head(POOL).write_parquet(root / "pool" / "part-000.parquet")
    full.slice(POOL).write_parquet(root / "growth.parquet")


def pipeline_resources(root: Path, *, settings: dict | None = None, lora: dict | None = None,
                       evaluator: dict | None = None, device: dict | None = None,
                       leaf_execution: dict | None = None) -> dict[str, Any]:
    """The pipeline's resources over the demo under `root`, on one CPU thread."""
    from harp_resources import (
        DeviceResource,
        EmbedderResource,
        EvaluatorResource,
        FinetunerResource,
        LeafExecutionResource,
        LineageResource,
        PoolSourceResource,
        SettingsResource,
        ValidationResource,
    )

    demo = root / "demo"
    device = DeviceResource(**{"device": "cpu", "cpu_threads": 1, **(device or {})})
    recipe = {**PIPELINE_LORA, **(lora or {})}
    return {
        "pool_source": PoolSourceResource(pool_path=str(root / "pool"), eval_path=str(demo / "eval.jsonl")),
        "lineage": LineageResource(),
        "settings": SettingsResource(**{**SETTINGS, **(settings or {})}),
        "embedder": EmbedderResource(device=DeviceResource(device="cpu"), max_length=32),
        "finetuner": FinetunerResource(base_model=str(demo / "base_model"), device=device, **recipe),
        "evaluator": EvaluatorResource(**{"batch_size": 64, **(evaluator or {})}),
        "validation_finetuner": FinetunerResource(base_model=str(demo / "base_model"), device=device,
                                                  **{**recipe, "epochs": 1}),
        "validation": ValidationResource(test_path=str(demo / "test.jsonl"),
                                         ground_truth_path=str(demo / "ground_truth.parquet")),
        "leaf_execution": LeafExecutionResource(**(leaf_execution or {})),
    }


def pipeline_defs(resources: dict[str, Any], **extra: Any) -> Any:
    """The code location's assets, checks and jobs over `resources` (sensors and schedules when given)."""
    import dagster as dg

    from harp_assets import definitions

    return dg.Definitions(
        assets=definitions.defs.assets, asset_checks=definitions.defs.asset_checks, jobs=definitions.defs.jobs,
        resources=resources, **extra,
    )


@contextlib.contextmanager
def dagster_env(root: Path) -> Iterator[Any]:
    """A Dagster instance stored in `root/dagster_home` (DAGSTER_HOME points there), torch on one thread."""
    import dagster as dg

    home = root / "dagster_home"
    home.mkdir(exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DAGSTER_HOME", str(home))
            with dg.instance_for_test(temp_dir=str(home)) as instance:
                yield instance
    finally:
        torch.set_num_threads(threads)


@dataclass
class TinyPipeline:
    """The session's materialised tiny pipeline: its folder and the results of the `run_harp` that built it."""

    root: Path
    results: dict[str, Any]
    wall: float


@dataclass
class PipelineCopy:
    """One module's own copy of the tiny pipeline, with a Dagster instance open on it."""

    root: Path
    instance: Any
    resources: dict[str, Any]
    defs: Any
    first: TinyPipeline

    @property
    def lineage(self) -> Any:
        return self.resources["lineage"]

    def grow(self) -> None:
        """Add the held-back GROWTH examples to the pool as a second file."""
        shutil.copy2(self.root / "growth.parquet", self.root / "pool" / "part-001.parquet")


def materialise_tiny_pipeline(root: Path) -> TinyPipeline:
    from harp_assets.runner import run_harp

    build_tiny_demo(root)
    with dagster_env(root) as instance:
        t0 = time.perf_counter()
        results = run_harp(instance, pipeline_defs(pipeline_resources(root)))
        return TinyPipeline(root=root, results=results, wall=time.perf_counter() - t0)


@contextlib.contextmanager
def copy_of(template: TinyPipeline, root: Path, *, fresh_instance: bool = False, **overrides: Any) -> Iterator[PipelineCopy]:
    """A copy of the materialised pipeline in `root` (an empty folder), or only its data with a fresh instance
    (`fresh_instance`: no runs, partitions or artifacts yet). `overrides` go to `pipeline_resources`."""
    ignore = shutil.ignore_patterns("dagster_home") if fresh_instance else None
    shutil.copytree(template.root, root, dirs_exist_ok=True, ignore=ignore)
    with dagster_env(root) as instance:
        resources = pipeline_resources(root, **overrides)
        yield PipelineCopy(root=root, instance=instance, resources=resources, defs=pipeline_defs(resources),
                           first=template)


def metadata(result: Any, asset: str) -> dict[str, Any]:
    """The metadata values of the first materialisation of `asset` in an in-process run result."""
    return {k: v.value for k, v in result.asset_materializations_for_node(asset)[0].metadata.items()}


def leaf_events(runs: list[Any]) -> list[dict[str, Any]]:
    """The metadata of every leaf partition the runs materialised (trained or found up to date)."""
    return [{"partition": m.partition, **{k: v.value for k, v in m.metadata.items()}}
            for r in runs for m in r.asset_materializations_for_node("leaf_utilities")]


def trained_leaves(runs: list[Any]) -> list[str]:
    """The leaf partitions the runs trained (not those skipped as up to date), in order."""
    return [e["partition"] for e in leaf_events(runs) if e["trained"]]
