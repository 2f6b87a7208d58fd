"""Loading and validating the user's data: the training pool and the evaluation set.

Every problem raises one `DataContractError` whose message names the file and the offending rows or ids, so
that a bad record is fixed at its source instead of surfacing later as a cryptic failure deep in a run.
These functions only read; the writers at the end write atomically (temporary file, then `os.replace`).

Formats: JSON Lines (`.jsonl`, `.ndjson`), Parquet (`.parquet`, `.pq`) or Arrow (`.arrow`), chosen by suffix,
or a folder of such files (top level only, read in sorted file-name order and concatenated; hidden files and
files with other suffixes are skipped with a warning). Two Hugging Face layouts are read as they are:
- a `datasets` folder written by `save_to_disk`: a `Dataset` (its `state.json` lists the Arrow shards, read
  in that order) or a `DatasetDict` (`dataset_dict.json`; its `train` split, or the one folder named);
- a hub-style dataset folder: Parquet shards under `data/` (searched below it), the `train-*` shards when
  the shard names carry a split.
Rows are located as `row N` (0-based record index within its file); for JSON Lines the 1-based `line` is
given as well.

Text rules, checked before anything else reads the data (so a model never loads on bad input):
- `example_id` is a string, or an integer (cast to a string; a boolean is not an integer); it has no leading or
  trailing whitespace and no NUL character, so ids that differ only by spacing cannot both exist;
- `prompt`, `response` (pool) and `domain`, `prompt` (eval) are strings, never numbers or objects turned into
  text; no text field holds a NUL character or a lone UTF-16 surrogate (`"\ud800"`, which JSON can encode but
  UTF-8 cannot);
- JSON Lines: blank lines are skipped; `NaN`, `Infinity` and `-Infinity` literals are refused (they are not
  JSON); an empty file is refused;
- multiple-choice `choices` are distinct non-blank strings.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from harp import io
from harp.io import atomic_write

log = logging.getLogger("harp.data")

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
ARROW_SUFFIXES = (".arrow",)
SUPPORTED_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES
HF_SPLITS = ("train", "validation", "test")
POOL_COLUMNS = ("example_id", "prompt", "response")
EVAL_COLUMNS = ("example_id", "domain", "prompt", "answer")
_SHOW = 10  # offending ids listed per message; the count says how many there are in all
_FILE = "__harp_file"
_ROW = "__harp_row"


class DataContractError(ValueError):
    """The user's data breaks the contract; the message names the file and the offending rows/ids."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


# ---- reading ---------------------------------------------------------------------------------------------
def data_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files a path stands for: itself, the shards of a Hugging Face dataset folder, or the supported
    files in a folder in sorted name order."""
    p = Path(path)
    if not p.exists():
        raise DataContractError(p, "no such file or folder")
    if p.is_dir():
        hf = _hf_files(p)
        if hf is not None:
            return hf
        files, skipped = _listed(p)
        if skipped:
            log.warning("%s: skipped files without a data suffix: %s", p, ", ".join(q.name for q in skipped))
        if not files:
            raise DataContractError(
                p, f"folder holds no data files (expected suffixes {', '.join(SUPPORTED_SUFFIXES)})"
            )
        return files
    if p.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise DataContractError(
            p, f"unsupported file suffix {p.suffix!r}; use one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    return [p]


def _listed(folder: Path) -> tuple[list[Path], list[Path]]:
    files, skipped = [], []
    for q in sorted(folder.iterdir(), key=lambda q: q.name):
        if not q.is_file() or q.name.startswith((".", "_")):
            continue
        (files if q.suffix.lower() in SUPPORTED_SUFFIXES else skipped).append(q)
    return files, skipped


def _hf_files(folder: Path) -> list[Path] | None:
    """The shards of a Hugging Face dataset folder, or None when `folder` is not one."""
    if (folder / "dataset_dict.json").is_file():
        try:
            splits = list(json.loads((folder / "dataset_dict.json").read_text())["splits"])
        except (ValueError, KeyError, TypeError) as exc:
            raise DataContractError(folder / "dataset_dict.json", f"unreadable DatasetDict index ({exc})") from exc
        if "train" not in splits:
            raise DataContractError(folder, f"this DatasetDict has no `train` split; name one of its splits "
                                            f"as the path: {', '.join(str(folder / s) for s in splits)}")
        return data_files(folder / "train")
    if (folder / "state.json").is_file():
        try:
            names = [d["filename"] for d in json.loads((folder / "state.json").read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataContractError(folder / "state.json", f"unreadable `datasets` state ({exc})") from exc
        files = [folder / n for n in names]
        missing = [n for n, f in zip(names, files, strict=True) if not f.is_file()]
        if missing or not files:
            raise DataContractError(folder, f"`datasets` folder without its shards: missing {missing or 'all'}")
        return files
    data = folder / "data"
    if data.is_dir() and not _listed(folder)[0]:
        shards = sorted((q for q in data.rglob("*") if q.is_file() and q.suffix.lower() in SUPPORTED_SUFFIXES
                         and not q.name.startswith((".", "_"))), key=lambda q: str(q.relative_to(data)))
        split_of = {q: next((s for s in HF_SPLITS if q.name.startswith(f"{s}-") or q.parent.name == s), None)
                    for q in shards}
        if any(split_of.values()):
            shards = [q for q in shards if split_of[q] == "train"]
            if not shards:
                raise DataContractError(data, "the shards carry splits but none is `train`; name a shard folder "
                                              "or file as the path")
        return shards or None
    return None


def _first_bad_jsonl_line(path: Path) -> str:
    """Find why a JSON Lines file failed to parse, naming the line (only run on the error path)."""
    kinds: dict[str, tuple[str, int]] = {}
    try:
        with path.open("r", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    return f"line {lineno} is not valid JSON ({exc.msg} at column {exc.colno})"
                if not isinstance(obj, dict):
                    return f"line {lineno} is a JSON {_json_kind(obj)}, not an object"
                for col, value in obj.items():
                    kind = _json_kind(value)
                    first = kinds.setdefault(col, (kind, lineno))
                    if kind != first[0] and {kind, first[0]} - {"null"} and not {kind, first[0]} <= {"int", "float"}:
                        return (f"column {col!r} mixes JSON types: {first[0]} at line {first[1]}, {kind} at line "
                                f"{lineno} (a column holds one type)")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    return "could not be parsed"


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    return {int: "int", float: "float", str: "string", list: "array", dict: "object"}.get(type(value), "value")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _text_problem(value: Any, *, allow_int: bool = False, is_id: bool = False) -> str | None:
    """Why a required text value breaks the rules in the module docstring, or None."""
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        return None
    if value is None:
        return None  # blank values are reported by the column checks, with the rest of their kind
    if not isinstance(value, str):
        return f"is a JSON {_json_kind(value)} ({json.dumps(value)[:40]}), not a string"
    if "\x00" in value:
        return "contains a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone UTF-16 surrogate (not encodable as UTF-8)"
    if is_id and value != value.strip():
        return f"has leading or trailing whitespace ({value!r})"
    return None


def _check_jsonl_records(path: Path, text_cols: Sequence[str]) -> None:
    """Parse each line with Python's json to name the exact line of any problem polars would blur or hide."""
    problems: list[str] = []
    records = 0
    try:
        with path.open("r", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                records += 1
                try:
                    obj = json.loads(line, parse_constant=_refuse_constant)
                except ValueError as exc:
                    msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                    col = f" at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
                    problems.append(f"line {lineno} is not valid JSON ({msg}{col})")
                    continue
                if not isinstance(obj, dict):
                    problems.append(f"line {lineno} is a JSON {_json_kind(obj)}, not an object")
                    continue
                for col in text_cols:
                    why = _text_problem(obj.get(col), allow_int=col == "example_id", is_id=col == "example_id")
                    if why:
                        problems.append(f"line {lineno}: {col} {why}")
                choices = obj.get("choices")
                if isinstance(choices, list):
                    bad = [c for c in choices if not isinstance(c, str) or _text_problem(c)]
                    if bad:
                        problems.append(f"line {lineno}: choices must be strings, found {json.dumps(bad)[:60]}")
                    elif len(set(choices)) != len(choices):
                        dup = sorted({c for c in choices if choices.count(c) > 1})
                        problems.append(f"line {lineno}: choices repeat {dup!r}")
    except UnicodeDecodeError as exc:
        raise DataContractError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if problems:
        raise DataContractError(path, f"{len(problems)} bad record(s): {_listing(problems)}")
    if records == 0:
        raise DataContractError(path, "file holds no records (it is empty or has only blank lines)")


def _read_one(path: Path) -> pl.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix in PARQUET_SUFFIXES:
            df = pl.read_parquet(path)
        elif suffix in ARROW_SUFFIXES:  # `datasets` writes the streaming format; plain Arrow files the other
            try:
                df = pl.read_ipc_stream(path)
            except Exception:  # noqa: BLE001 - not a stream: try the file format, which reports its own error
                df = pl.read_ipc(path, memory_map=False)
        else:
            df = pl.read_ndjson(path, infer_schema_length=None)
    except Exception as exc:  # polars raises several error types for malformed input
        if suffix in JSONL_SUFFIXES:
            raise DataContractError(
                path, f"unreadable JSON Lines file: {_first_bad_jsonl_line(path)}"
            ) from exc
        kind = "Arrow" if suffix in ARROW_SUFFIXES else "Parquet"
        raise DataContractError(path, f"unreadable {kind} file ({type(exc).__name__}: {exc})") from exc
    if df.height == 0:
        raise DataContractError(path, "file holds no records")
    return df


def _jsonl_line_numbers(path: Path) -> list[int]:
    """1-based line number of each record (blank lines are skipped by the reader)."""
    with path.open("r", encoding="utf-8") as fh:
        return [i for i, line in enumerate(fh, start=1) if line.strip()]


@dataclass
class _Where:
    """Turns (file, row) into 'file row N (line L)' for messages."""

    _lines: dict[str, list[int]]

    def __call__(self, file: str, row: int) -> str:
        if Path(file).suffix.lower() in JSONL_SUFFIXES:
            if file not in self._lines:
                self._lines[file] = _jsonl_line_numbers(Path(file))
            lines = self._lines[file]
            if 0 <= row < len(lines):
                return f"{Path(file).name} row {row} (line {lines[row]})"
        return f"{Path(file).name} row {row}"


def _listing(items: Sequence[str]) -> str:
    more = f" ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return "; ".join(items[:_SHOW]) + more


def _check_columns(df: pl.DataFrame, required: Iterable[str], file: Path) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataContractError(
            file,
            f"missing required column(s) {', '.join(map(repr, missing))}; columns present: "
            f"{', '.join(map(repr, df.columns)) or '(none)'}",
        )


def _as_string_column(df: pl.DataFrame, col: str, file: Path, *, allow_int: bool = False) -> pl.DataFrame:
    """Ensure `col` holds strings (all-null columns count as strings; integer ids are cast if allowed)."""
    dtype = df.schema[col]
    if dtype == pl.String:
        return df
    if dtype == pl.Null or (allow_int and dtype.is_integer()):
        return df.with_columns(pl.col(col).cast(pl.String))
    kinds = "strings (or integers)" if allow_int else "strings"
    raise DataContractError(file, f"column {col!r} must hold {kinds}, found type {dtype}")


def _check_mapping(columns: Mapping[str, str] | None, allowed: Sequence[str]) -> dict[str, str]:
    mapping = dict(columns or {})
    unknown = sorted(set(mapping) - set(allowed))
    if unknown:
        raise ValueError(f"column mapping names {unknown}, which are not columns of this file kind {list(allowed)}")
    return mapping


Renderer = Callable[[Sequence[dict[str, str]]], tuple[str, str]]
CHAT_RENDERED = ("prompt", "response")  # what a chat row's `messages` are rendered into


def _is_chat(path: Path) -> bool:
    """A file of chat rows: a `messages` column and neither `prompt` nor `response`."""
    suffix = path.suffix.lower()
    try:
        if suffix in PARQUET_SUFFIXES:
            names = set(pl.read_parquet_schema(path))
        elif suffix in ARROW_SUFFIXES:
            names = set(_read_one(path).columns)
        else:
            with path.open("r", encoding="utf-8") as fh:
                first = next((line for line in fh if line.strip()), "{}")
            obj = json.loads(first)
            names = set(obj) if isinstance(obj, dict) else set()
    except (OSError, ValueError, UnicodeDecodeError, pl.exceptions.PolarsError):
        return False  # the regular checks name what is wrong with the file
    return "messages" in names and not names & set(CHAT_RENDERED)


def _render_chat(df: pl.DataFrame, file: Path, render: Renderer) -> pl.DataFrame:
    """`prompt` and `response` from each row's `messages`; every bad row is named before any is rendered."""
    from harp.chat import messages_problem

    where = _Where({})
    rows = df["messages"].to_list()
    problems = [f"{where(str(file), i)}: {why}" for i, m in enumerate(rows) if (why := messages_problem(m))]
    if problems:
        raise DataContractError(file, f"{len(problems)} bad chat row(s): {_listing(problems)}")
    try:
        rendered = [render(m) for m in rows]
    except ValueError as exc:
        raise DataContractError(file, f"chat rows cannot be rendered: {exc}") from exc
    return df.with_columns(pl.Series("prompt", [p for p, _ in rendered], dtype=pl.String),
                           pl.Series("response", [r for _, r in rendered], dtype=pl.String))


def _read_all(
    path: str | os.PathLike[str], required: Sequence[str], string_cols: Sequence[str],
    columns: Mapping[str, str] | None = None, render: Renderer | None = None,
) -> tuple[pl.DataFrame, Path]:
    """Read every file, rename mapped columns (ours -> the file's), check the columns, tag rows with their
    file and row, and concatenate."""
    root = Path(path)
    mapping = _check_mapping(columns, required)
    theirs = {ours: mapping.get(ours, ours) for ours in string_cols}
    frames = []
    for f in data_files(root):
        chat = render is not None and _is_chat(f)
        if f.suffix.lower() in JSONL_SUFFIXES:
            _check_jsonl_records(f, [theirs[c] for c in string_cols if not (chat and c in CHAT_RENDERED)])
        df = _read_one(f)
        if chat:
            df = _render_chat(df, f, render)  # type: ignore[arg-type]
        if mapping:
            clash = [ours for ours, col in mapping.items() if ours in df.columns and col in df.columns and ours != col]
            if clash:
                raise DataContractError(f, f"column(s) {clash} exist and are also mapped from other columns "
                                           f"({', '.join(f'{mapping[c]!r} -> {c!r}' for c in clash)})")
            df = df.rename({col: ours for ours, col in mapping.items() if col in df.columns})
        _check_columns(df, required, f)
        for col in string_cols:
            df = _as_string_column(df, col, f, allow_int=(col == "example_id"))
        df = df.with_columns(pl.lit(str(f)).alias(_FILE), pl.int_range(pl.len(), dtype=pl.Int64).alias(_ROW))
        _check_text_content(df, string_cols, f)
        frames.append(df)
    try:
        out = pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0]
    except Exception as exc:
        raise DataContractError(
            root, f"files disagree on column types and cannot be combined: {exc}"
        ) from exc
    return out, root


def _check_text_content(df: pl.DataFrame, cols: Sequence[str], file: Path) -> None:
    """NUL characters in any text column and whitespace around ids (Parquet can hold both), by row."""
    where = _Where({})
    items = []
    for col in cols:
        nul = df.filter(pl.col(col).str.contains("\x00", literal=True))
        items += [f"{col} contains a NUL character at {where(r[_FILE], r[_ROW])}"
                  for r in nul.select(_FILE, _ROW).iter_rows(named=True)]
    spaced = df.filter(pl.col("example_id") != pl.col("example_id").str.strip_chars())
    items += [f"example_id {r['example_id']!r} has leading or trailing whitespace at {where(r[_FILE], r[_ROW])}"
              for r in spaced.select("example_id", _FILE, _ROW).iter_rows(named=True)]
    if items:
        raise DataContractError(file, f"{len(items)} bad value(s): {_listing(items)}")


def _blank(col: str) -> pl.Expr:
    return pl.col(col).is_null() | (pl.col(col).str.strip_chars() == "")


def _report_rows(df: pl.DataFrame, where: _Where, *, with_id: bool = True) -> list[str]:
    items = []
    for rec in df.select(["example_id", _FILE, _ROW]).iter_rows(named=True):
        loc = where(rec[_FILE], rec[_ROW])
        items.append(f"id {rec['example_id']!r} at {loc}" if with_id and rec["example_id"] else loc)
    return items


def _check_ids(df: pl.DataFrame, root: Path, where: _Where) -> None:
    bad = df.filter(_blank("example_id"))
    if bad.height:
        raise DataContractError(
            root,
            f"{bad.height} row(s) with a null or empty example_id: {_listing(_report_rows(bad, where, with_id=False))}",
        )
    dup = df.filter(pl.col("example_id").is_duplicated())
    if dup.height:
        groups = (
            dup.group_by("example_id", maintain_order=True)
            .agg(pl.col(_FILE), pl.col(_ROW))
            .sort("example_id")
        )
        items = [
            f"{rec['example_id']!r} at "
            + ", ".join(where(f, r) for f, r in zip(rec[_FILE], rec[_ROW], strict=True))
            for rec in groups.iter_rows(named=True)
        ]
        raise DataContractError(root, f"{groups.height} duplicate example_id(s): {_listing(items)}")


# ---- pool ------------------------------------------------------------------------------------------------
def load_pool(
    path: str | os.PathLike[str], *, columns: Mapping[str, str] | None = None, render: Renderer | None = None
) -> pl.DataFrame:
    """Load the candidate pool: unique `example_id`, non-blank `prompt` and `response`; extra columns kept.

    Integer ids are accepted and cast to strings. Rows keep file order (files in sorted name order).
    `columns` maps our column names to the file's (`{"prompt": "instruction", "response": "output"}`); messages
    name the file's own columns where a JSON line is at fault, ours after renaming. With `render` (a
    `harp.chat.ChatTemplate`), a file of chat rows (`messages`, no prompt/response) gets its prompt and
    response rendered from them, and keeps `messages`.
    """
    df, root = _read_all(path, POOL_COLUMNS, POOL_COLUMNS, columns, render)
    where = _Where({})
    _check_ids(df, root, where)
    for col in ("prompt", "response"):
        bad = df.filter(_blank(col))
        if bad.height:
            raise DataContractError(
                root, f"{bad.height} row(s) with a null or empty {col}: {_listing(_report_rows(bad, where))}"
            )
    return df.drop(_FILE, _ROW)


# ---- eval set --------------------------------------------------------------------------------------------
def load_eval_set(
    path: str | os.PathLike[str], *, domains: Sequence[str] | None = None, columns: Mapping[str, str] | None = None
) -> pl.DataFrame:
    """Load the evaluation set and normalise each row to multiple choice or exact match.

    A row whose `choices` is a non-null list is multiple choice (`kind="choice"`): at least 2 non-blank
    string choices, and `answer` an integer index into them (an integer-valued string such as "2" is
    accepted, since a column cannot mix types). Any other row is exact match (`kind="exact"`): `answer` a
    non-blank string; an integer answer without choices is rejected as ambiguous. Mixed files are fine.

    Output columns: example_id, domain, prompt, kind, choices (list[str], null for exact), answer_index
    (Int64, null for exact), answer_text (the right choice's text, or the exact answer), then any extra
    columns as read. With `domains`, every expected domain must have examples and no other may appear.
    """
    df, root = _read_all(path, EVAL_COLUMNS, ("example_id", "domain", "prompt"), columns)
    where = _Where({})
    _check_ids(df, root, where)
    for col in ("domain", "prompt"):
        bad = df.filter(_blank(col))
        if bad.height:
            raise DataContractError(
                root, f"{bad.height} row(s) with a null or empty {col}: {_listing(_report_rows(bad, where))}"
            )

    has_choices = "choices" in df.columns
    if has_choices and not (df.schema["choices"] == pl.Null or isinstance(df.schema["choices"], pl.List)):
        raise DataContractError(
            root, f"column 'choices' must hold lists of strings, found type {df.schema['choices']}"
        )
    cols = ["example_id", "answer", _FILE, _ROW] + (["choices"] if has_choices else [])
    kinds: list[str] = []
    choices_out: list[list[str] | None] = []
    index_out: list[int | None] = []
    text_out: list[str] = []
    problems: dict[str, list[str]] = {}

    def problem(kind: str, rec: dict[str, Any], detail: str = "") -> None:
        loc = where(rec[_FILE], rec[_ROW])
        problems.setdefault(kind, []).append(f"id {rec['example_id']!r} at {loc}{detail}")

    for rec in df.select(cols).iter_rows(named=True):
        ch = rec["choices"] if has_choices else None
        ans = rec["answer"]
        if ch is not None:
            kinds.append("choice")
            choices_out.append(None)
            index_out.append(None)
            text_out.append("")
            if any(not isinstance(c, str) or not c.strip() for c in ch):
                problem("row(s) with null, blank or non-string choices", rec)
                continue
            if len(ch) < 2:
                problem("multiple-choice row(s) with fewer than 2 choices", rec, f" ({len(ch)} choice)")
                continue
            if len(set(ch)) != len(ch):
                problem("multiple-choice row(s) with repeated choices", rec,
                        f" ({sorted({c for c in ch if ch.count(c) > 1})!r})")
                continue
            idx = _as_index(ans)
            if idx is None:
                problem(
                    "multiple-choice row(s) whose answer is not an integer index", rec, f" (answer {ans!r})"
                )
                continue
            if not 0 <= idx < len(ch):
                problem(
                    "row(s) with an answer index out of range",
                    rec,
                    f" (answer {idx}, valid range 0..{len(ch) - 1})",
                )
                continue
            choices_out[-1], index_out[-1], text_out[-1] = [str(c) for c in ch], idx, ch[idx]
        else:
            kinds.append("exact")
            choices_out.append(None)
            index_out.append(None)
            text_out.append("")
            if isinstance(ans, bool) or isinstance(ans, (int, float)):
                problem(
                    "row(s) with a numeric answer but no choices (give 'choices' for multiple "
                    "choice, or the answer as a string for exact match)",
                    rec,
                    f" (answer {ans!r})",
                )
                continue
            if not isinstance(ans, str) or not ans.strip():
                problem("exact-match row(s) with a null or empty answer", rec)
                continue
            text_out[-1] = ans
    if problems:
        msg = "; ".join(f"{len(items)} {kind}: {_listing(items)}" for kind, items in problems.items())
        raise DataContractError(root, msg)

    out = df.drop("answer", *(["choices"] if has_choices else [])).with_columns(
        pl.Series("kind", kinds, dtype=pl.String),
        pl.Series("choices", choices_out, dtype=pl.List(pl.String)),
        pl.Series("answer_index", index_out, dtype=pl.Int64),
        pl.Series("answer_text", text_out, dtype=pl.String),
    )
    if domains is not None:
        _check_domains(out, root, domains, where)
    front = ["example_id", "domain", "prompt", "kind", "choices", "answer_index", "answer_text"]
    rest = [c for c in out.columns if c not in front and c not in (_FILE, _ROW)]
    return out.select(front + rest)


def _as_index(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        s = value.strip()
        if s.lstrip("-").isdigit():
            return int(s)
    return None


def _check_domains(df: pl.DataFrame, root: Path, domains: Sequence[str], where: _Where) -> None:
    if isinstance(domains, str):
        raise TypeError("domains must be a sequence of domain names, not a single string")
    expected = list(dict.fromkeys(domains))
    counts = dict(df.group_by("domain").len().iter_rows())
    empty = [d for d in expected if d not in counts]
    if empty:
        raise DataContractError(
            root,
            f"expected domain(s) with no examples: {', '.join(map(repr, empty))}; "
            f"domains present: {', '.join(map(repr, sorted(counts)))}",
        )
    unexpected = sorted(d for d in counts if d not in set(expected))
    if unexpected:
        items = []
        for d in unexpected:
            rows = df.filter(pl.col("domain") == d).head(3)
            items.append(f"{d!r} ({counts[d]} rows, e.g. {', '.join(_report_rows(rows, where))})")
        raise DataContractError(
            root,
            f"domain(s) not in the expected list {expected!r}: {_listing(items)}",
        )


# ---- atomic writers ---------------------------------------------------------------------------------------
def write_jsonl(df: pl.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write `df` as JSON Lines, atomically (readers never see a half-written file)."""
    with atomic_write(path) as fh:
        df.write_ndjson(fh)
    return Path(path)


def write_parquet(df: pl.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write `df` as Parquet, atomically."""
    io.write_parquet(df, path)
    return Path(path)
