"""`harp-dagster run`: one command from your own pool to a finetuning-ready selection.

    harp-dagster run --pool PATH --eval PATH --base-model PATH_OR_NAME --budget N --home DIR --out DIR
                     [--seed S] [--methods harp_c,harp_e,tsds,random] [--pool-columns prompt=instruction,...]
                     [--eval-columns prompt=question,...] [--lora recipe.json] [--storage sqlite|postgres]

It validates the inputs first (every bad row named with file, line and reason, before any model loads), then
materialises the graph through Dagster exactly as `make demo` does (`run_harp`) on the instance in `--home`
(created with the project's instance config when new, so `dagster dev` can open it later), and writes, per
method, `OUT/<method>.parquet` and `OUT/<method>.jsonl` with the original columns of the selected examples in
selection order, plus `OUT/manifest.json`. A second call with nothing changed trains nothing.

A new home stores its runs in SQLite files inside it (nothing to set up); `--storage postgres` creates it with
`dagster_home/dagster.postgres.yaml` instead, which reads the server from `DAGSTER_PG_URL` (docs/storage.md).
An existing home keeps the storage its dagster.yaml names.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

EXPORT_METHODS = ("harp_c", "harp_e", "tsds", "random")  # as harp_assets.exports (imported late: start-up)
PROJECT_INSTANCE_CONFIG = Path(__file__).resolve().parents[1] / "dagster_home" / "dagster.yaml"
# The instance config a new home gets per `--storage`; SQLite needs no server, so it stays the default.
INSTANCE_CONFIGS = {"sqlite": PROJECT_INSTANCE_CONFIG,
                    "postgres": PROJECT_INSTANCE_CONFIG.with_name("dagster.postgres.yaml")}
PG_URL_ENV = "DAGSTER_PG_URL"
# The driver is named: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, and dagster-postgres ships psycopg2.
PG_URL_EXAMPLE = "postgresql+psycopg2://USER:PASSWORD@HOST:5432/DATABASE"


class UsageError(Exception):
    """Bad arguments or inputs: printed as the command's last line, exit code 2."""


def _mapping(text: str | None, flag: str) -> dict[str, str]:
    """`prompt=instruction,response=output` -> {"prompt": "instruction", "response": "output"}."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        ours, sep, theirs = part.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise UsageError(f"{flag}: expected OURS=THEIRS pairs separated by commas, got {part!r}")
        out[ours.strip()] = theirs.strip()
    return out


def _recipe(path: str | None) -> dict[str, Any]:
    """The LoRA recipe: the demo's, with the fields of a JSON file over it."""
    from harp.models.finetuner import LoraFinetuner
    from harp_demo.build import DEMO_LORA

    recipe = dict(DEMO_LORA)
    if path:
        try:
            given = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"--lora {path}: cannot read a JSON object ({exc})") from None
        if not isinstance(given, dict):
            raise UsageError(f"--lora {path}: expected a JSON object of LoRA fields, got {type(given).__name__}")
        fields = set(LoraFinetuner.model_fields) - {"base_model", "device"}
        unknown = sorted(set(given) - fields)
        if unknown:
            raise UsageError(f"--lora {path}: unknown field(s) {unknown}; valid fields: {sorted(fields)}")
        recipe.update(given)
    return recipe


def instance_storage(config: Path) -> str:
    """The storage an instance config names (`sqlite`, `postgres`, ...): `storage:`'s one key, else the module
    of a per-part `run_storage:`, else Dagster's default, SQLite."""
    import yaml

    data = yaml.safe_load(config.read_text()) or {}
    storage = data.get("storage")
    if isinstance(storage, dict) and storage:
        return str(next(iter(storage)))
    module = str((data.get("run_storage") or {}).get("module", ""))
    return next((kind for kind in ("postgres", "mysql") if kind in module), "sqlite")


def redact_url(url: str) -> str:
    """A database URL safe to print: a password, in the user part or as a `password=` parameter, is `***`."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is not None:
        userinfo, host = parts.netloc.rsplit("@", 1)
        parts = parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{host}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(k == "password" for k, _ in query):
        parts = parts._replace(query=urlencode([(k, "***" if k == "password" else v) for k, v in query], safe="/*"))
    return urlunsplit(parts)


def check_postgres(url: str | None) -> None:
    """Fail before any model loads when the Postgres instance cannot be reached the way Dagster will reach it
    (through SQLAlchemy): an unset `DAGSTER_PG_URL`, a driver that is not installed or a refused connection
    would otherwise surface as Dagster's retry loop ending in a bare "too many retries"."""
    if not url:
        raise UsageError(f"this instance stores its runs in PostgreSQL: set {PG_URL_ENV} to the server's URL, "
                         f"e.g. {PG_URL_EXAMPLE} (docs/storage.md)")
    import sqlalchemy as sa

    shown = f"{PG_URL_ENV}={redact_url(url)}"
    try:
        engine = sa.create_engine(url, connect_args={"connect_timeout": 10}, poolclass=sa.pool.NullPool)
    except ModuleNotFoundError as exc:  # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3
        raise UsageError(f"{shown}: SQLAlchemy {sa.__version__} needs the {exc.name!r} driver for this URL, which "
                         f"is not installed; name the installed one: {PG_URL_EXAMPLE}") from None
    except sa.exc.ArgumentError as exc:
        raise UsageError(f"{shown}: not a database URL ({exc}); expected e.g. {PG_URL_EXAMPLE}") from None
    try:
        engine.connect().close()
    except sa.exc.DBAPIError as exc:
        reason = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0]
        raise UsageError(f"{shown}: cannot connect to PostgreSQL ({reason})") from None
    finally:
        engine.dispose()


def prepare_home(home: Path, storage: str | None = None) -> str:
    """An instance folder: created with the instance config for `storage` (SQLite when not given) when new,
    refused when not writable or when it already holds another storage (its runs are there; switching would
    hide them). Returns the storage the home uses; a Postgres one is checked to be reachable."""
    from harp.io import check_writable, write_text

    if storage is not None and storage not in INSTANCE_CONFIGS:
        raise UsageError(f"--storage: expected one of {sorted(INSTANCE_CONFIGS)}, got {storage!r}")
    home.mkdir(parents=True, exist_ok=True)
    check_writable(home)
    config = home / "dagster.yaml"
    if not config.exists():
        write_text(config, INSTANCE_CONFIGS[storage or "sqlite"].read_text())
    used = instance_storage(config)
    if storage is not None and used != storage:
        raise UsageError(f"--home {home} already holds a {used} instance ({config}); --storage {storage} needs a "
                         "new --home, or change that file's `storage` yourself")
    if used == "postgres" and PG_URL_ENV in config.read_text():
        check_postgres(os.environ.get(PG_URL_ENV))
    return used


@dataclass
class Selected:
    """What one `harp-dagster run` did: the `run_harp` results, the definitions and instance folder it ran on,
    the manifest it exported and its log file; `python -m harp_demo.run` builds its summary from it."""

    results: dict[str, Any]
    definitions: Any
    home: Path
    out: Path
    manifest: dict[str, Any]
    info: dict[str, Any]
    log_file: Path


def execute(args: argparse.Namespace, *, stream: TextIO | None = None, bars: bool | None = None) -> Selected:
    """`harp-dagster run` up to its summary: check the inputs, run the graph through Dagster with progress on
    `stream` (stderr; bars on a terminal) and Dagster's event lines in a log file under the home, export."""
    home = Path(args.home).expanduser().resolve()
    out = Path(args.out).expanduser().resolve()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = sorted(set(methods) - set(EXPORT_METHODS))
    if bad:
        raise UsageError(f"--methods: unknown method(s) {bad}; choose from {list(EXPORT_METHODS)}")
    if args.budget < 1:
        raise UsageError(f"--budget must be a positive number of examples, got {args.budget}")
    pool_columns = _mapping(args.pool_columns, "--pool-columns")
    eval_columns = _mapping(args.eval_columns, "--eval-columns")
    recipe = _recipe(args.lora)
    storage = prepare_home(home, args.storage)
    os.environ["DAGSTER_HOME"] = str(home)

    from harp.contracts import DataContractError
    from harp.sources import PoolSource, pool_version

    source = PoolSource(pool_path=str(Path(args.pool).resolve()), eval_path=str(Path(args.eval).resolve()),
                        pool_columns=pool_columns, eval_columns=eval_columns)
    base_model = args.base_model
    if not Path(base_model).expanduser().is_dir() and "/" not in base_model:
        raise UsageError(f"--base-model {base_model}: no such folder (a hub name needs its owner, like org/name, "
                         "and must be in the local Hugging Face cache)")
    from harp.chat import ChatTemplate

    # Chat rows are rendered with the base model's own template: only its tokenizer loads, and only for them.
    render = ChatTemplate(str(Path(base_model).expanduser()) if Path(base_model).expanduser().is_dir() else base_model)
    try:  # every bad row is named here, before any model loads
        pool = source.load_pool(render)
        eval_set = source.load_eval_set()
    except (DataContractError, ValueError, OSError) as exc:
        raise UsageError(str(exc)) from None
    print(f"harp-dagster: pool {len(pool)} examples from {args.pool}, eval {len(eval_set)} questions in "
          f"{eval_set['domain'].n_unique()} domain(s); budget {args.budget}; instance {home} ({storage})",
          flush=True)

    import dagster as dg

    from harp_assets import definitions
    from harp_assets.runner import run_harp
    from harp_resources import (
        DeviceResource,
        FinetunerResource,
        LeafExecutionResource,
        LineageResource,
        PoolSourceResource,
        SettingsResource,
        configured,
        default_resources,
    )

    device = DeviceResource(cpu_threads=args.cpu_threads)
    resources = {
        **default_resources(),
        "pool_source": configured(PoolSourceResource, pool_path=source.pool_path, eval_path=source.eval_path,
                                  pool_columns=pool_columns, eval_columns=eval_columns),
        "lineage": LineageResource(),
        "settings": configured(SettingsResource, top_k_points=args.budget, seed=args.seed),
        "finetuner": configured(FinetunerResource, base_model=str(Path(base_model).expanduser())
                                if Path(base_model).expanduser().is_dir() else base_model, device=device, **recipe),
    }
    if args.leaf_backend:
        resources["leaf_execution"] = configured(
            LeafExecutionResource, backend=args.leaf_backend, ray_address=args.ray_address or "",
            actors=args.ray_actors)
    defs = dg.Definitions(assets=definitions.defs.assets, asset_checks=definitions.defs.asset_checks,
                          jobs=definitions.defs.jobs, resources=resources)
    from harp_assets.console import RunConsole

    t0 = time.perf_counter()
    with dg.DagsterInstance.get() as instance, RunConsole(home, stream=stream, bars=bars) as console:
        results = run_harp(instance, defs, events=console.events)
        failed = [stage for stage in ("prepare", "select") if not results.get(stage) or not results[stage].success]
        if failed or not all(r.success for r in results.get("leaf_runs", [])):
            raise RuntimeError(f"the HARP pipeline stopped at stage {failed[0] if failed else 'leaf_runs'!r}; "
                               f"open the run with `dagster dev` on DAGSTER_HOME={home}; event log {console.path}")
        trained = sum(bool(m.metadata["trained"].value) for r in results["leaf_runs"]
                      for m in r.asset_materializations_for_node("leaf_utilities"))
    lineage = resources["lineage"]
    info = {
        "pool": str(Path(args.pool).resolve()),
        "pool_version": pool_version(pool.select("example_id", "prompt", "response")),
        "eval": str(Path(args.eval).resolve()),
        "base_model": base_model,
        "budget": args.budget,
        "seed": args.seed,
        "lora": recipe,
        "pool_columns": pool_columns,
        "eval_columns": eval_columns,
        "home": str(home),
        "storage": storage,
        "leaves_trained_this_call": trained,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    from harp_assets.exports import export_selections

    manifest = export_selections(lineage, pool, out, methods, info)
    return Selected(results=results, definitions=defs, home=home, out=out, manifest=manifest, info=info,
                    log_file=console.path)


def _selection_metadata(select_run: Any, method: str) -> dict[str, Any]:
    """The metadata of `method`'s selection in the last selection run (empty when it did not run)."""
    if select_run is None:
        return {}
    mats = select_run.asset_materializations_for_node(f"{method}_selection")
    return {k: v.value for k, v in mats[0].metadata.items()} if mats else {}


def run(args: argparse.Namespace) -> int:
    """`harp-dagster run`: `execute`, then the summary on stdout."""
    got = execute(args)
    select = got.results.get("select")
    for method, f in got.manifest["methods"].items():
        print(f"  {method:<8} {f['examples']:>7} examples -> {got.out / f['parquet']}")
        md = _selection_metadata(select, method)
        if md.get("predicted_summary"):  # HARP's prediction per domain, with its band; saturation said
            print(f"  {'':<8} predicted {md['predicted_summary']}")
        if md.get("empty_reason"):
            print(f"  {'':<8} empty: {md['empty_reason']}")
    print(f"harp-dagster: done in {got.info['seconds']} s, {got.info['leaves_trained_this_call']} leaves trained "
          f"this call; manifest {got.out / 'manifest.json'}")
    print(f"harp-dagster: Dagster's event log of this call in {got.log_file}")
    return 0


def parser() -> argparse.ArgumentParser:
    """The command line of `harp-dagster` (`python -m harp_demo.run` builds its `run` from it too)."""
    ap = argparse.ArgumentParser(prog="harp-dagster", description="HARP data selection on your own data.")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="select from your pool and export the selections")
    r.add_argument("--pool", required=True, help="JSONL/Parquet file, or a folder of them")
    r.add_argument("--eval", required=True, help="the proxy eval set (JSONL or Parquet), with a domain column")
    r.add_argument("--base-model", required=True, help="a local model folder, or a hub name in the local cache")
    r.add_argument("--budget", required=True, type=int, help="examples each selection may hold")
    r.add_argument("--home", required=True, help="the Dagster instance folder (created when new)")
    r.add_argument("--out", required=True, help="where the exports and manifest.json go")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--methods", default=",".join(EXPORT_METHODS), help="methods to export (default: all)")
    r.add_argument("--pool-columns", help="OURS=THEIRS pairs, e.g. prompt=instruction,response=output")
    r.add_argument("--eval-columns", help="OURS=THEIRS pairs, e.g. prompt=question")
    r.add_argument("--lora", help="a JSON file of LoRA fields over the default recipe")
    r.add_argument("--cpu-threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    r.add_argument("--leaf-backend", choices=("local", "ray"),
                   help="where leaves train (default: $HARP_LEAF_BACKEND, else local; docs/scale-out.md)")
    r.add_argument("--ray-address", help='with ray: "" starts a local cluster, "auto" or "ray://HEAD:10001" joins one')
    r.add_argument("--ray-actors", type=int, default=0, help="with ray: actors (0: one per GPU, else per CPU slot)")
    r.add_argument("--storage", choices=sorted(INSTANCE_CONFIGS),
                   help=f"where a new --home stores runs and event logs: sqlite (default: files in the home, "
                   f"nothing to set up) or postgres (the server in ${PG_URL_ENV}); an existing home keeps its own")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    try:
        return run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the message, not the traceback, is the last line
        from harp_assets.runner import root_cause

        print(f"error: {root_cause(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
