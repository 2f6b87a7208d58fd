"""Where the pool and the proxy eval set come from: files on disk (a folder of JSONL/Parquet, or one file).

It also fingerprints the pool source cheaply (names, sizes, modification times), so a sensor can
tell that files were added without reading them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import polars as pl
from pydantic import BaseModel, Field

from harp.contracts import DataContractError, Renderer, data_files, load_eval_set, load_pool


def pool_version(pool: pl.DataFrame) -> str:
    """Content hash of the pool (ids, prompts, responses), independent of row order."""
    h = hashlib.sha256()
    for eid, prompt, response in sorted(pool.select("example_id", "prompt", "response").iter_rows()):
        for part in (eid, prompt, response):
            h.update(part.encode())
            h.update(b"\x1f")
    return h.hexdigest()[:16]


MIN_POOL = 10  # the smallest pool every selection method runs on (TSDS needs N >= 10)


class PoolSource(BaseModel):
    """The candidate pool (a JSONL/Parquet file or a folder of them) and the proxy eval set."""

    pool_path: str | None = Field(
        default=None,
        description="a JSONL/Parquet file, or a folder whose files are all read; default: the demo's pool",
    )
    eval_path: str | None = Field(
        default=None, description="the proxy eval set (JSONL or Parquet); default: the demo's eval.jsonl"
    )
    demo_dir: str | None = Field(
        default=None, description="the demo folder the defaults point into; default: HARP_DEMO_DIR or $DAGSTER_HOME/demo"
    )
    pool_columns: dict[str, str] = Field(
        default_factory=dict,
        description="our pool column -> the files' column, e.g. {prompt: instruction, response: output}")
    eval_columns: dict[str, str] = Field(
        default_factory=dict, description="our eval column -> the file's column, e.g. {prompt: question}")

    def _demo(self) -> Path:
        if self.demo_dir:
            return Path(self.demo_dir)
        from harp.config import demo_root

        return demo_root()

    def resolved_pool_path(self) -> Path:
        """The configured pool, else the demo's `pool/` folder when present, else its `pool.parquet`."""
        if self.pool_path:
            return Path(self.pool_path)
        folder = self._demo() / "pool"
        return folder if folder.is_dir() else self._demo() / "pool.parquet"

    def resolved_eval_path(self) -> Path:
        return Path(self.eval_path) if self.eval_path else self._demo() / "eval.jsonl"

    def files(self) -> list[Path]:
        return data_files(self.resolved_pool_path())

    def fingerprint(self) -> str:
        """Changes when a pool file is added, removed, resized or touched."""
        h = hashlib.sha256()
        for f in self.files():
            st = f.stat()
            h.update(f"{f.name}\x1f{st.st_size}\x1f{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    def load_pool(self, render: Renderer | None = None) -> pl.DataFrame:
        """All pool files, validated one by one (errors name the file), with a `source` column.

        `render` (a `harp.chat.ChatTemplate` of the base model) turns chat rows into prompt and response.
        """
        frames = []
        for f in self.files():
            frames.append(load_pool(f, columns=self.pool_columns, render=render).with_columns(
                pl.lit(f.name).alias("source")))
        pool = pl.concat(frames, how="diagonal_relaxed")
        if pool.height < MIN_POOL:
            raise DataContractError(
                self.resolved_pool_path(),
                f"the pool holds {pool.height} example(s); a selection run needs at least {MIN_POOL} (the TSDS "
                "baseline samples from K <= N/10 neighbours), checked before any model loads")
        dup = pool.filter(pl.col("example_id").is_duplicated())
        if dup.height:
            listing = ", ".join(
                f"{r['example_id']!r} in {sorted(set(r['source']))}"
                for r in dup.group_by("example_id", maintain_order=True).agg("source").head(10).iter_rows(named=True)
            )
            raise DataContractError(self.resolved_pool_path(), f"example_id repeated across files: {listing}")
        return pool

    def load_eval_set(self) -> pl.DataFrame:
        return load_eval_set(self.resolved_eval_path(), columns=self.eval_columns)

    @classmethod
    def from_env_or_demo(cls, demo_root: str | os.PathLike | None = None) -> PoolSource:
        """`HARP_POOL` / `HARP_EVAL` when set, else the demo benchmark's files (resolved at use)."""
        return cls(
            pool_path=os.environ.get("HARP_POOL") or None,
            eval_path=os.environ.get("HARP_EVAL") or None,
            demo_dir=str(demo_root) if demo_root is not None else None,
        )
