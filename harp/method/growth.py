"""Leaf identity as the pool changes: a persistable leaf table keyed by example ids, and its update.

Measured leaf utilities are cached per leaf (a Dagster dynamic partition keyed by the leaf id, whose data
version is the leaf's member hash plus the model settings), so a changing pool must disturb as few
measured leaves as possible, and a stored measurement must stay exact for the member set it was made on.
``grow_leaf_table`` applies these rules:

- an example keeps its leaf while its id and content hash are unchanged; a removed example (id gone) and
  an edited one (same id, other content) leave their leaf, and a leaf left without members is retired;
- an arriving example (a new id, or an edited one) goes to the leaf whose centroid has the largest cosine
  with it (faiss, exact; ties to the lower leaf index) among the leaves that still have members, unless
  that leaf is *frozen* (the caller's list: leaves with a stored measurement). Then it goes to its
  parent's open *delta leaf* ``<parent id>d<k>`` (the highest-numbered unfrozen one), opened when the
  parent has none, with ``k`` from a per-parent counter kept in the table. A frozen leaf therefore never
  gains members, so its measurement stays exact; delta leaves are inferred from their parent and region
  like any unmeasured leaf until a round decides they are worth measuring;
- a leaf that gained examples and now holds more than ``max_leaf_size`` is split by seeded spherical
  k-means into ``max(2, ceil(size / target))`` children with ``target = max(1, max_leaf_size // 2)``,
  so children start near half the maximum and can grow again before the next split. k-means clusters
  under ``min_leaf_size`` rows are folded into their nearest sibling; a child still over the maximum is
  split again, and a set k-means cannot separate (e.g. duplicates) is cut into equal chunks in
  example-id order. Children are named ``<retired id>s1``, ``s2``, ... numbered by their smallest
  example id, stay in the split leaf's parent, and the split id is retired. A leaf id therefore encodes
  its whole lineage ("L00007s2s1", "P0003d2s1"), so within one history no id is ever made twice;
- a leaf whose members did not change keeps its id, member sequence, centroid and member hash exactly;
  a leaf that gained or lost members keeps its id but gets a new member hash, a recomputed centroid and
  a recomputed member order;
- parent centroids are recomputed for parents whose leaves changed; a parent left without leaves is
  dropped. A representative keeps its flag while its leaf exists; a parent that lost one (to a split or
  to emptying) fills the free slots with its leaves nearest the parent centroid (ties by leaf id).

The split of a leaf depends only on its member set and their embeddings (rows are sorted by example id
before k-means, and the k-means seed comes from the seed and the leaf id), not on the pool's row order.

Centroids are normalised means of the L2-normalised member embeddings, as in the hierarchy. Only the
embedding rows of arriving examples and of parents whose leaves changed are read and validated.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from harp.io import write_npz
from harp.method.hierarchy import (
    Hierarchy,
    UseGpu,
    _canonical_groups,
    _cluster_sums,
    _FlatIP,
    _merge_small_clusters,
    _resolve_gpu,
    _sub_seed,
    _unit_centroids,
)
from harp.validate import check_int

__all__ = [
    "GrowthResult",
    "LeafTable",
    "LeafTableFormatError",
    "grow_leaf_table",
    "leaf_table_from_hierarchy",
    "tree_generation",
]

_HASH_HEX = 16
# Leaf and parent ids are Dagster partition keys and file-name parts: a conservative character set.
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_MAX_SHOWN = 10
_FORMAT = "harp-leaf-table-v2"
_BLOCK_ROWS = 32768
_MIN_MEAN_NORM = 1e-6
# Offset in the k-means seed path so split seeds never coincide with the hierarchy's own seed paths.
_SPLIT_SEED_TAG = 3


def _show(values: Any) -> str:
    arr = np.asarray(values).ravel()
    vals = [repr(v) if isinstance(v, str) else str(v) for v in arr[:_MAX_SHOWN].tolist()]
    more = f", ... ({arr.size} in total)" if arr.size > _MAX_SHOWN else ""
    return "[" + ", ".join(vals) + more + "]"


def _as_str_array(values: Any, name: str) -> np.ndarray:
    """1-D numpy unicode array of ``values``; non-strings are rejected rather than converted."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind == "O":
        bad = np.flatnonzero(np.fromiter((not isinstance(v, str) for v in arr), dtype=bool, count=arr.size))
        if bad.size:
            raise ValueError(f"{name} must hold strings; positions {_show(bad)} do not")
        arr = arr.astype(str) if arr.size else np.zeros(0, dtype="<U1")
    elif arr.dtype.kind != "U":
        if arr.size == 0:
            return np.zeros(0, dtype="<U1")
        raise ValueError(f"{name} must hold strings, got dtype {arr.dtype}")
    return arr


def _id_problems(ids: np.ndarray, name: str) -> list[str]:
    """Empty, NUL-containing and duplicate ids (NUL separates ids in the member hash)."""
    problems = []
    empty = np.flatnonzero(np.strings.str_len(ids) == 0)
    if empty.size:
        problems.append(f"{name}: {empty.size} empty id(s) at positions {_show(empty)}")
    listed = ids.tolist()
    if "\x00" in "".join(listed):  # numpy string ops treat NUL as padding, so test in Python
        nul = np.flatnonzero(np.fromiter(("\x00" in v for v in listed), dtype=bool, count=len(listed)))
        problems.append(f"{name}: id(s) containing NUL at positions {_show(nul)}")
    s = np.sort(ids)
    dup = np.unique(s[1:][s[1:] == s[:-1]])
    if dup.size:
        problems.append(f"{name}: duplicate id(s) {_show(dup)}")
    return problems


def _bad_key_ids(ids: np.ndarray) -> np.ndarray:
    return np.asarray([v for v in ids.tolist() if _ID_PATTERN.fullmatch(v) is None], dtype=str)


def _hash_sorted(ids: list[str]) -> str:
    return hashlib.sha256("\x00".join(ids).encode("utf-8")).hexdigest()[:_HASH_HEX]


class LeafTableFormatError(ValueError):
    """A saved leaf table of another format version: rebuild the hierarchy rather than guess."""


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LeafTable:
    """Leaves of the pool under stable string ids, as flat arrays that persist as columns or npz.

    Rows are the pool's examples in pool order. Leaves are grouped by parent; inside a leaf,
    ``members`` lists rows nearest the leaf centroid first. Arrays are read-only.
    """

    example_ids: np.ndarray  # (n,) str, pool order
    leaf_ids: np.ndarray  # (G,) str
    leaf_index_of_row: np.ndarray  # (n,) int32 into leaf_ids
    parent_ids: np.ndarray  # (P,) str
    parent_of_leaf: np.ndarray  # (G,) int32 into parent_ids
    region_of_parent: np.ndarray  # (P,) int32
    leaf_centroids: np.ndarray  # (G, dim) float32, unit rows
    parent_centroids: np.ndarray  # (P, dim) float32, unit rows
    representative: np.ndarray  # (G,) bool: leaf is measured for its parent
    member_order: np.ndarray  # (n,) int64: rows grouped by leaf, nearest centroid first
    leaf_offsets: np.ndarray  # (G + 1,) int64: CSR offsets into member_order
    # (n,) str: content hash of each example ("" when only ids are tracked); part of the member hash.
    example_content: np.ndarray | None = None
    # (P,) int32: delta leaves ever opened in each parent, so a delta leaf id is never made twice.
    delta_count: np.ndarray | None = None

    _ARRAYS = (
        "example_ids",
        "leaf_ids",
        "leaf_index_of_row",
        "parent_ids",
        "parent_of_leaf",
        "region_of_parent",
        "leaf_centroids",
        "parent_centroids",
        "representative",
        "member_order",
        "leaf_offsets",
        "example_content",
        "delta_count",
    )
    _DTYPES = {
        "leaf_index_of_row": np.int32,
        "parent_of_leaf": np.int32,
        "region_of_parent": np.int32,
        "leaf_centroids": np.float32,
        "parent_centroids": np.float32,
        "representative": np.bool_,
        "member_order": np.int64,
        "leaf_offsets": np.int64,
        "delta_count": np.int32,
    }

    def __post_init__(self) -> None:
        if self.example_content is None:
            object.__setattr__(self, "example_content", np.full(len(self.example_ids), "", dtype="<U1"))
        if self.delta_count is None:
            object.__setattr__(self, "delta_count", np.zeros(len(self.parent_ids), dtype=np.int32))
        for name in ("example_ids", "leaf_ids", "parent_ids", "example_content"):
            object.__setattr__(self, name, _as_str_array(getattr(self, name), name))
        for name, dtype in self._DTYPES.items():
            arr = np.asarray(getattr(self, name))
            if arr.dtype != dtype:
                if dtype is not np.float32 and arr.size and arr.dtype.kind not in "iub":
                    raise ValueError(f"{name} must hold integers/booleans, got dtype {arr.dtype}")
                arr = arr.astype(dtype)
            object.__setattr__(self, name, np.ascontiguousarray(arr))
        for name in self._ARRAYS:
            arr = getattr(self, name)
            if arr.flags.writeable:  # copy so the caller's array stays writeable and unshared
                arr = arr.copy()
                arr.flags.writeable = False
                object.__setattr__(self, name, arr)

    # ---- sizes -------------------------------------------------------------------------------

    @property
    def n_examples(self) -> int:
        return int(self.example_ids.shape[0])

    @property
    def n_leaves(self) -> int:
        return int(self.leaf_ids.shape[0])

    @property
    def n_parents(self) -> int:
        return int(self.parent_ids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.leaf_centroids.shape[1])

    @property
    def leaf_sizes(self) -> np.ndarray:
        return np.diff(self.leaf_offsets)

    # ---- lookups -----------------------------------------------------------------------------

    def members(self, g: int) -> np.ndarray:
        """Rows of leaf ``g``, nearest its centroid first."""
        if not 0 <= g < self.n_leaves:
            raise IndexError(f"leaf index {g} out of range [0, {self.n_leaves})")
        return self.member_order[self.leaf_offsets[g] : self.leaf_offsets[g + 1]]

    def member_ids(self, g: int) -> np.ndarray:
        """Example ids of leaf ``g``, nearest its centroid first (the order selection takes them in)."""
        return self.example_ids[self.members(g)]

    @cached_property
    def _index_by_id(self) -> dict[str, int]:
        return {leaf_id: g for g, leaf_id in enumerate(self.leaf_ids.tolist())}

    def index_of(self, leaf_id: str) -> int:
        """Position of ``leaf_id`` in ``leaf_ids``; ``KeyError`` naming it when absent (e.g. retired)."""
        try:
            return self._index_by_id[leaf_id]
        except KeyError:
            raise KeyError(f"leaf id {leaf_id!r} is not in this leaf table ({self.n_leaves} leaves)") from None

    @cached_property
    def _hashes(self) -> np.ndarray:
        rank = np.empty(self.n_examples, dtype=np.int64)
        rank[np.argsort(self.example_ids, kind="stable")] = np.arange(self.n_examples)
        order = np.lexsort((rank, self.leaf_index_of_row))
        content = self.example_content[order].tolist()
        sorted_ids = [e if not c else f"{e}\x1f{c}" for e, c in zip(self.example_ids[order].tolist(), content, strict=True)]
        offsets = np.zeros(self.n_leaves + 1, dtype=np.int64)
        np.cumsum(np.bincount(self.leaf_index_of_row, minlength=self.n_leaves), out=offsets[1:])
        out = np.asarray(
            [_hash_sorted(sorted_ids[offsets[g] : offsets[g + 1]]) for g in range(self.n_leaves)],
            dtype=f"<U{_HASH_HEX}",
        )
        out.flags.writeable = False
        return out

    def member_hash(self, g: int) -> str:
        """sha256 (first 16 hex digits) of the leaf's members in example-id order, NUL-separated; each
        member is its id, or ``id + "\\x1f" + content hash`` when the table tracks content.

        Depends only on the member set and the members' content, so it is the leaf's content key:
        unchanged while no member joins, leaves or is edited, different as soon as one does.
        """
        if not 0 <= g < self.n_leaves:
            raise IndexError(f"leaf index {g} out of range [0, {self.n_leaves})")
        return str(self._hashes[g])

    def member_hashes(self) -> np.ndarray:
        """``member_hash`` of every leaf, as a (G,) string array."""
        return self._hashes

    def leaf_columns(self) -> dict[str, np.ndarray]:
        """One row per leaf (id, parent id, region, size, representative flag, member hash) as columns."""
        return {
            "leaf_id": self.leaf_ids,
            "parent_id": self.parent_ids[self.parent_of_leaf],
            "region": self.region_of_parent[self.parent_of_leaf],
            "size": self.leaf_sizes,
            "representative": self.representative,
            "member_hash": self.member_hashes(),
        }

    # ---- validation --------------------------------------------------------------------------

    def check(self) -> None:
        """Raise ``ValueError`` listing every broken promise: partition, unique ids, CSR, shapes."""
        n, G, P = self.n_examples, self.n_leaves, self.n_parents
        errors: list[str] = []
        if n == 0 or G == 0 or P == 0:
            raise ValueError(f"invalid leaf table: empty ({n} examples, {G} leaves, {P} parents)")
        if self.leaf_centroids.ndim != 2:
            raise ValueError(f"invalid leaf table: leaf_centroids must be 2-D, got {self.leaf_centroids.shape}")
        d = self.dim
        shapes = {
            "leaf_index_of_row": (n,),
            "member_order": (n,),
            "parent_of_leaf": (G,),
            "representative": (G,),
            "leaf_centroids": (G, d),
            "leaf_offsets": (G + 1,),
            "region_of_parent": (P,),
            "parent_centroids": (P, d),
            "example_content": (n,),
            "delta_count": (P,),
        }
        bad_shapes = [f"{k} {getattr(self, k).shape} != {v}" for k, v in shapes.items() if getattr(self, k).shape != v]
        if bad_shapes:
            raise ValueError("invalid leaf table: wrong shapes: " + "; ".join(bad_shapes))
        errors += _id_problems(self.example_ids, "example_ids")
        errors += _id_problems(self.leaf_ids, "leaf_ids")
        errors += _id_problems(self.parent_ids, "parent_ids")
        for name in ("leaf_ids", "parent_ids"):
            bad = _bad_key_ids(getattr(self, name))
            if bad.size:
                errors.append(f"{name}: {_show(bad)} are not partition keys (letters, digits, '_', '.', '-')")
        li = self.leaf_index_of_row
        if li.min() < 0 or li.max() >= G:
            errors.append(f"leaf_index_of_row outside [0, {G}) at rows {_show(np.flatnonzero((li < 0) | (li >= G)))}")
        else:
            counts = np.bincount(li, minlength=G)
            if np.any(counts == 0):
                errors.append(f"leaves without examples: {_show(self.leaf_ids[counts == 0])}")
            if not np.array_equal(np.diff(self.leaf_offsets), counts) or self.leaf_offsets[0] != 0:
                errors.append("leaf_offsets disagree with the leaf sizes given by leaf_index_of_row")
            elif not np.array_equal(np.sort(self.member_order), np.arange(n)):
                errors.append("member_order is not a permutation of the rows")
            else:
                owner = np.repeat(np.arange(G), counts)
                wrong = np.flatnonzero(li[self.member_order] != owner)
                if wrong.size:
                    errors.append(f"member_order lists rows under the wrong leaf: {_show(self.leaf_ids[owner[wrong]])}")
        po = self.parent_of_leaf
        if po.min() < 0 or po.max() >= P:
            errors.append(f"parent_of_leaf outside [0, {P}) for leaves {_show(self.leaf_ids[(po < 0) | (po >= P)])}")
        else:
            n_leaves_of = np.bincount(po, minlength=P)
            if np.any(n_leaves_of == 0):
                errors.append(f"parents without leaves: {_show(self.parent_ids[n_leaves_of == 0])}")
            reps_of = np.bincount(po[self.representative], minlength=P)
            if np.any(reps_of == 0):
                errors.append(f"parents without a representative leaf: {_show(self.parent_ids[reps_of == 0])}")
        if self.region_of_parent.min() < 0:
            errors.append("region_of_parent holds negative ids")
        for name in ("leaf_centroids", "parent_centroids"):
            C = getattr(self, name)
            ids = self.leaf_ids if name == "leaf_centroids" else self.parent_ids
            norms = np.linalg.norm(C.astype(np.float64), axis=1)
            bad = ~np.isfinite(norms) | (np.abs(norms - 1.0) > 1e-3)
            if bad.any():
                errors.append(f"{name} are not finite unit vectors for {_show(ids[bad])}")
        if errors:
            raise ValueError("invalid leaf table: " + "; ".join(errors))

    # ---- persistence -------------------------------------------------------------------------

    def to_npz(self, path: str | os.PathLike[str]) -> None:
        """Write the table atomically (`harp.io.write_npz`); no pickles."""
        write_npz(path, **{k: getattr(self, k) for k in self._ARRAYS}, format=np.str_(_FORMAT))

    @classmethod
    def from_npz(cls, path: str | os.PathLike[str]) -> LeafTable:
        """Load and ``check`` a table written by ``to_npz``; errors name the file."""
        with np.load(path, allow_pickle=False) as data:
            if "format" in data.files and str(data["format"]) != _FORMAT:
                raise LeafTableFormatError(
                    f"{path}: leaf table format {str(data['format'])!r}, expected {_FORMAT!r}")
            missing = [k for k in (*cls._ARRAYS, "format") if k not in data.files]
            if missing:
                raise ValueError(f"{path}: not a saved leaf table, missing arrays {missing}")
            try:
                table = cls(**{k: np.array(data[k]) for k in cls._ARRAYS})
                table.check()
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None
        return table


def tree_generation(leaf_id: str) -> int:
    """The tree generation a leaf id belongs to: k for ``L<k>x...``, 0 for the first tree's ``L%05d...``."""
    m = re.match(r"^[LP](\d+)x", leaf_id)  # delta leaves are named after their parent: P<k>x...d<n>
    return int(m.group(1)) if m else 0


def _content_array(content: Any, n: int, name: str) -> np.ndarray:
    if content is None:
        return np.full(n, "", dtype="<U1")
    arr = _as_str_array(content, name)
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries but there are {n} examples")
    return arr


def leaf_table_from_hierarchy(h: Hierarchy, example_ids: Any, content: Any = None, generation: int = 0) -> LeafTable:
    """Name the hierarchy's leaves ``L%05d`` and parents ``P%04d`` in its order, keyed by example id.

    ``content`` (optional, one string per row) is each example's content hash; with it, an edited
    example changes its leaf's member hash. A rebuild of a pool that had leaves before passes
    ``generation`` k >= 1, naming leaves ``L<k>x%05d`` and parents ``P<k>x%04d``, so no leaf id of an
    earlier tree is reused for another member set.
    """
    generation = check_int(generation, "generation", minimum=0)
    tag = f"{generation}x" if generation else ""
    ids = _as_str_array(example_ids, "example_ids")
    if ids.shape[0] != h.n_examples:
        raise ValueError(f"example_ids has {ids.shape[0]} entries but the hierarchy has {h.n_examples} rows")
    problems = _id_problems(ids, "example_ids")
    if problems:
        raise ValueError("; ".join(problems))
    table = LeafTable(
        example_ids=ids,
        leaf_ids=np.asarray([f"L{tag}{g:05d}" for g in range(h.n_leaves)], dtype=str),
        leaf_index_of_row=h.leaf_of,
        parent_ids=np.asarray([f"P{tag}{p:04d}" for p in range(h.n_parents)], dtype=str),
        parent_of_leaf=h.parent_of_leaf,
        region_of_parent=h.region_of_parent,
        leaf_centroids=h.leaf_centroids,
        parent_centroids=h.parent_centroids,
        representative=h.is_representative,
        member_order=h.member_order,
        leaf_offsets=h.leaf_offsets,
        example_content=_content_array(content, h.n_examples, "content"),
    )
    table.check()
    return table


# --------------------------------------------------------------------------------------------------
# Growth
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GrowthResult:
    """The updated table and what happened to each leaf id.

    ``unchanged`` leaves keep id, members and hash (their cached utilities stay valid); ``grown`` keep
    their id and gained members, ``shrunk`` keep their id and lost members (removed or edited); ``split``
    maps each retired id to its child ids; ``retired`` lists leaves left without members; ``new`` lists
    every id created (split children and ``delta`` leaves). ``deferred`` counts arrivals whose nearest
    leaf was frozen and that went to a delta leaf instead.
    """

    table: LeafTable
    unchanged: list[str]
    grown: list[str]
    shrunk: list[str]
    split: dict[str, list[str]]
    retired: list[str]
    new: list[str]
    delta: list[str]
    n_added: int
    n_removed: int
    n_edited: int
    deferred: int
    reselected_parents: list[str]
    removed_parents: list[str]

    @property
    def changed(self) -> list[str]:
        """Current leaf ids whose member set differs from any cached measurement: grown, shrunk and new."""
        return sorted({*self.grown, *self.shrunk, *self.new})


def _unit_rows(X: np.ndarray, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """L2-normalised float32 copy of ``X[rows]``; bad rows are named by pool row and example id."""
    out = np.empty((rows.size, X.shape[1]), dtype=np.float32)
    bad_rows: list[np.ndarray] = []
    zero_rows: list[np.ndarray] = []
    for start in range(0, rows.size, _BLOCK_ROWS):
        r = rows[start : start + _BLOCK_ROWS]
        with np.errstate(over="ignore", invalid="ignore"):
            block = np.asarray(X[r], dtype=np.float32)
        finite = np.isfinite(block).all(axis=1)
        b64 = block.astype(np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", b64, b64))
        bad_rows.append(r[~finite])
        zero_rows.append(r[finite & (norms == 0.0)])
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start : start + r.size] = b64 / norms[:, None]
    bad, zero = np.concatenate(bad_rows), np.concatenate(zero_rows)
    problems = []
    if bad.size:
        problems.append(f"rows {_show(bad)} (example ids {_show(ids[bad])}) hold NaN or inf as float32")
    if zero.size:
        problems.append(f"rows {_show(zero)} (example ids {_show(ids[zero])}) are all zeros")
    if problems:
        raise ValueError("X_all: " + "; ".join(problems))
    return out


def _leaf_seed(seed: int, leaf_id: str) -> list[int]:
    """k-means seed path of a leaf's split (mixed with the user seed): from the leaf id, not its index."""
    digest = hashlib.sha256(leaf_id.encode("utf-8")).digest()
    return [_SPLIT_SEED_TAG, int.from_bytes(digest[:4], "big"), int.from_bytes(digest[4:8], "big")]


def _split_rows(
    Xs: np.ndarray,
    *,
    target: int,
    max_leaf_size: int,
    min_leaf_size: int,
    seed: int,
    path: list[int],
    niter: int,
    backend: _FlatIP,
) -> list[np.ndarray]:
    """Partition the unit rows ``Xs`` into groups of at most ``max_leaf_size`` (local, ascending).

    A worklist instead of recursion: a clump of near-duplicates can need several rounds.
    """
    out: list[np.ndarray] = []
    todo: list[tuple[np.ndarray, list[int]]] = [(np.arange(Xs.shape[0]), path)]
    while todo:
        rows, sub_path = todo.pop()
        m = rows.size
        k = max(2, min(math.ceil(m / target), m))
        Xr = Xs[rows]
        labels = backend.kmeans_labels(Xr, k, _sub_seed(seed, *sub_path), niter)
        labels = _merge_small_clusters(labels, Xr, min_leaf_size)
        perm, offsets, _ = _canonical_groups(labels)
        groups = [perm[offsets[c] : offsets[c + 1]] for c in range(offsets.size - 1)]
        if len(groups) < 2:
            # k-means found one direction only (near-identical rows): cut in (example-id) order.
            groups = np.array_split(np.arange(m), k)
        for c, grp in enumerate(groups):
            if grp.size > max_leaf_size:
                todo.append((rows[grp], [*sub_path, c]))
            else:
                out.append(rows[grp])
    return out


def _delta_number(leaf_id: str, parent_id: str) -> int | None:
    """k of a delta leaf id ``<parent>d<k>`` (not of its split children), else None."""
    head = parent_id + "d"
    if not leaf_id.startswith(head) or not leaf_id[len(head):].isdigit():
        return None
    return int(leaf_id[len(head):])


def _check_inputs(table: LeafTable, X_all: Any, example_ids_all: Any) -> tuple[np.ndarray, np.ndarray]:
    ids = _as_str_array(example_ids_all, "example_ids_all")
    problems = _id_problems(ids, "example_ids_all")
    if problems:
        raise ValueError("; ".join(problems))
    X = np.asarray(X_all) if not isinstance(X_all, np.ndarray) else X_all
    if X.ndim != 2:
        raise ValueError(f"X_all must be a 2-D array (rows x dim), got shape {X.shape}")
    if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
        raise ValueError(f"X_all must hold real numbers, got dtype {X.dtype}")
    if X.shape[0] != ids.shape[0]:
        raise ValueError(f"X_all has {X.shape[0]} rows but example_ids_all has {ids.shape[0]} ids")
    if X.shape[1] != table.dim:
        raise ValueError(f"X_all has {X.shape[1]} dims but the leaf table's centroids have {table.dim}")
    return X, ids


def grow_leaf_table(
    table: LeafTable,
    X_all: Any,
    example_ids_all: Any,
    *,
    max_leaf_size: int,
    content_all: Any = None,
    frozen: Any = (),
    n_representatives: int = 1,
    seed: int = 0,
    min_leaf_size: int | None = None,
    niter: int = 20,
    use_gpu: UseGpu = "auto",
) -> GrowthResult:
    """Update the leaves for the new pool ``example_ids_all``: examples may be added, removed or edited.

    ``X_all`` holds the new pool's embeddings (raw or normalised) in the order of ``example_ids_all``; the
    pool may be reordered. ``content_all`` (one content hash per row, or None to track ids only) tells
    edited examples apart; ``frozen`` names leaves whose measurement must stay exact (they take no new
    member). See the module docstring for the rules. ``min_leaf_size`` (default ``max(1, target // 5)``)
    is the smallest k-means child kept separate when a leaf splits. Deterministic for the inputs and
    ``seed``.
    """
    max_leaf_size = check_int(max_leaf_size, "max_leaf_size", minimum=1)
    n_representatives = check_int(n_representatives, "n_representatives", minimum=1)
    niter = check_int(niter, "niter", minimum=1)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    target = max(1, max_leaf_size // 2)
    if min_leaf_size is None:
        min_leaf_size = max(1, target // 5)
    min_leaf_size = check_int(min_leaf_size, "min_leaf_size", minimum=1)
    table.check()
    X, ids = _check_inputs(table, X_all, example_ids_all)
    n_all, n_old, G, P = ids.shape[0], table.n_examples, table.n_leaves, table.n_parents
    frozen_ids = sorted({str(f) for f in frozen})
    unknown = [f for f in frozen_ids if f not in table._index_by_id]
    if unknown:
        raise ValueError(f"frozen names leaf id(s) not in the leaf table: {_show(np.asarray(unknown))}")
    is_frozen = np.zeros(G, dtype=bool)
    is_frozen[[table.index_of(f) for f in frozen_ids]] = True

    # Old examples in the new pool: kept (same id, same content), edited, or removed.
    sort_all = np.argsort(ids, kind="stable")
    sorted_ids = ids[sort_all]
    pos = np.minimum(np.searchsorted(sorted_ids, table.example_ids), n_all - 1)
    found = sorted_ids[pos] == table.example_ids
    row_of_old = np.where(found, sort_all[pos], -1)
    if content_all is None:  # ids only: every row keeps the content the table recorded
        content = np.full(n_all, "", dtype=table.example_content.dtype)
        content[row_of_old[found]] = table.example_content[found]
    else:
        content = _content_array(content_all, n_all, "content_all")
    kept = found.copy()
    kept[found] = table.example_content[found] == content[row_of_old[found]]
    n_removed, n_edited = int((~found).sum()), int((found & ~kept).sum())
    rank_of_row = np.empty(n_all, dtype=np.int64)
    rank_of_row[sort_all] = np.arange(n_all)

    leaf_of = np.full(n_all, -1, dtype=np.int64)
    leaf_of[row_of_old[kept]] = table.leaf_index_of_row[kept]
    lost = np.bincount(table.leaf_index_of_row[~kept], minlength=G)
    alive = np.flatnonzero(table.leaf_sizes - lost > 0)
    arrivals = np.flatnonzero(leaf_of < 0)
    if alive.size == 0 and arrivals.size:
        raise ValueError("every example of the leaf table left the pool or was edited: build a new hierarchy")
    backend = _FlatIP(table.dim, _resolve_gpu(use_gpu))
    for start in range(0, arrivals.size, _BLOCK_ROWS):
        r = arrivals[start : start + _BLOCK_ROWS]
        leaf_of[r] = alive[backend.nearest(table.leaf_centroids[alive], _unit_rows(X, r, ids))]

    # Arrivals whose nearest leaf is frozen go to their parent's open delta leaf (a new one if none).
    leaf_ids_ext = table.leaf_ids.tolist()
    parent_ext = table.parent_of_leaf.tolist()
    delta_count = table.delta_count.copy()
    to_delta = arrivals[is_frozen[leaf_of[arrivals]]]
    delta_ids: list[str] = []
    if to_delta.size:
        live = np.zeros(G, dtype=bool)
        live[alive] = True
        open_delta: dict[int, int] = {}
        for g in np.flatnonzero(live & ~is_frozen).tolist():
            p = int(table.parent_of_leaf[g])
            k = _delta_number(leaf_ids_ext[g], str(table.parent_ids[p]))
            if k is not None and (p not in open_delta or k > _delta_number(leaf_ids_ext[open_delta[p]],
                                                                             str(table.parent_ids[p]))):
                open_delta[p] = g
        parents_needing = np.unique(table.parent_of_leaf[leaf_of[to_delta]])
        for p in parents_needing.tolist():
            if p not in open_delta:
                delta_count[p] += 1
                name = f"{table.parent_ids[p]}d{int(delta_count[p])}"
                open_delta[p] = len(leaf_ids_ext)
                leaf_ids_ext.append(name)
                parent_ext.append(p)
                delta_ids.append(name)
        leaf_of[to_delta] = [open_delta[int(p)] for p in table.parent_of_leaf[leaf_of[to_delta]]]
    G_ext = len(leaf_ids_ext)
    parent_ext_arr = np.asarray(parent_ext, dtype=np.int64)

    added = np.bincount(leaf_of[arrivals], minlength=G_ext)
    lost_ext = np.r_[lost, np.zeros(G_ext - G, dtype=np.int64)]
    sizes = np.bincount(leaf_of, minlength=G_ext)
    gained = added > 0
    changed = gained | (lost_ext > 0)
    to_split = gained & (sizes > max_leaf_size)
    empty = sizes == 0
    affected_parent = np.zeros(P, dtype=bool)
    affected_parent[parent_ext_arr[changed]] = True

    # Embeddings of every row in a parent that changed: new centroids and member orders need them.
    rows_aff = np.flatnonzero(affected_parent[parent_ext_arr[leaf_of]])
    Xa = _unit_rows(X, rows_aff, ids) if rows_aff.size else np.zeros((0, table.dim), np.float32)
    loc = np.full(n_all, -1, dtype=np.int64)
    loc[rows_aff] = np.arange(rows_aff.size)

    # Split oversized leaves into children named <id>s1, s2, ... by their smallest example id.
    split_idx = np.flatnonzero(to_split)
    children: dict[int, list[np.ndarray]] = {}
    if split_idx.size:
        rows_s = np.flatnonzero(to_split[leaf_of])
        rows_s = rows_s[np.lexsort((rank_of_row[rows_s], leaf_of[rows_s]))]  # by leaf, then example id
        bounds = np.searchsorted(leaf_of[rows_s], np.r_[split_idx, G_ext])
        for j, g in enumerate(split_idx.tolist()):
            rows_g = rows_s[bounds[j] : bounds[j + 1]]
            parts = _split_rows(
                Xa[loc[rows_g]], target=target, max_leaf_size=max_leaf_size, min_leaf_size=min_leaf_size,
                seed=seed, path=_leaf_seed(seed, leaf_ids_ext[g]), niter=niter, backend=backend,
            )
            parts.sort(key=lambda p: int(p[0]))  # child s1 holds the smallest example id
            children[g] = [rows_g[p] for p in parts]

    # The new leaf list, grouped by parent: old leaves in their order (children in place of a split
    # leaf, emptied leaves dropped), then the parent's new delta leaves.
    by_parent = np.lexsort((np.arange(G_ext), parent_ext_arr))
    out_ids: list[str] = []
    out_parent: list[int] = []
    out_src: list[int] = []  # source leaf in the extended numbering
    new_leaf_of = np.full(n_all, -1, dtype=np.int64)
    src_to_out = np.full(G_ext, -1, dtype=np.int64)
    split_map: dict[str, list[str]] = {}
    for g in by_parent.tolist():
        if empty[g]:
            continue
        if g in children:
            names = [f"{leaf_ids_ext[g]}s{c + 1}" for c in range(len(children[g]))]
            split_map[leaf_ids_ext[g]] = names
            for name, rows_c in zip(names, children[g], strict=True):
                new_leaf_of[rows_c] = len(out_ids)
                out_ids.append(name)
                out_parent.append(int(parent_ext_arr[g]))
                out_src.append(g)
            continue
        src_to_out[g] = len(out_ids)
        out_ids.append(leaf_ids_ext[g])
        out_parent.append(int(parent_ext_arr[g]))
        out_src.append(g)
    plain = src_to_out[leaf_of] >= 0
    new_leaf_of[plain] = src_to_out[leaf_of[plain]]
    G_new = len(out_ids)
    src = np.asarray(out_src, dtype=np.int64)
    changed_new = changed[src]

    # Parents left without leaves drop out; the others keep their order.
    parent_alive = np.zeros(P, dtype=bool)
    parent_alive[out_parent] = True
    parent_map = np.cumsum(parent_alive) - 1
    parent_new = parent_map[np.asarray(out_parent, dtype=np.int64)].astype(np.int32)
    kept_parents = np.flatnonzero(parent_alive)

    # Centroids: leaves whose members changed, and parents that changed.
    leaf_centroids = np.zeros((G_new, table.dim), dtype=np.float32)
    old_src = src < G
    leaf_centroids[old_src] = table.leaf_centroids[src[old_src]]
    parent_centroids = table.parent_centroids[kept_parents].copy()
    if rows_aff.size:
        lab = new_leaf_of[rows_aff]
        sums = _cluster_sums(Xa, lab, G_new)
        counts = np.bincount(lab, minlength=G_new)
        by_id = np.argsort(rank_of_row[rows_aff], kind="stable")
        first_loc = np.zeros(G_new, dtype=np.int64)
        first_loc[lab[by_id][::-1]] = by_id[::-1]  # each leaf's member with the smallest example id
        ch = np.flatnonzero(changed_new)
        leaf_centroids[ch] = _unit_centroids(sums[ch], counts[ch], first_loc[ch], Xa)
        P_new = kept_parents.size
        aff_p = np.flatnonzero(affected_parent[kept_parents])
        p_sums = np.zeros((P_new, table.dim), dtype=np.float64)
        np.add.at(p_sums, parent_new, sums)
        p_counts = np.bincount(parent_new, weights=counts, minlength=P_new)
        p_lab = parent_new[lab]
        p_first = np.zeros(P_new, dtype=np.int64)
        p_first[p_lab[by_id][::-1]] = by_id[::-1]
        parent_centroids[aff_p] = _unit_centroids(p_sums[aff_p], p_counts[aff_p], p_first[aff_p], Xa)

    # Member order: unchanged leaves keep their sequence; changed ones sort by cosine to the centroid.
    key = np.zeros(n_all, dtype=np.float64)
    old_pos = np.empty(n_old, dtype=np.float64)
    old_pos[table.member_order] = np.arange(n_old)
    key[row_of_old[kept]] = old_pos[kept]
    rows_ch = np.flatnonzero(changed_new[new_leaf_of])
    if rows_ch.size:
        xr = Xa[loc[rows_ch]]
        key[rows_ch] = -np.einsum("ij,ij->i", xr, leaf_centroids[new_leaf_of[rows_ch]]).astype(np.float64)
    member_order = np.lexsort((rank_of_row, key, new_leaf_of)).astype(np.int64)
    leaf_offsets = np.zeros(G_new + 1, dtype=np.int64)
    np.cumsum(np.bincount(new_leaf_of, minlength=G_new), out=leaf_offsets[1:])

    # Representatives keep their flag while their leaf exists; a parent that lost one (split or
    # emptied) fills the free slots with its leaves nearest the parent centroid (ties by leaf id).
    rep_ext = np.r_[table.representative, np.zeros(G_ext - G, dtype=bool)]
    representative = rep_ext[src] & ~to_split[src]
    lost_rep = rep_ext & (to_split | empty)
    refill = np.zeros(kept_parents.size, dtype=bool)
    refill[parent_map[parent_ext_arr[lost_rep]][parent_alive[parent_ext_arr[lost_rep]]]] = True
    leaf_ids_new = np.asarray(out_ids, dtype=str)
    for p in np.flatnonzero(refill).tolist():
        members = np.flatnonzero(parent_new == p)
        free = n_representatives - int(representative[members].sum())
        cand = members[~representative[members]]
        if free <= 0 or cand.size == 0:
            continue
        sim = leaf_centroids[cand].astype(np.float64) @ parent_centroids[p].astype(np.float64)
        order = np.lexsort((leaf_ids_new[cand], -sim))
        representative[cand[order[:free]]] = True

    new_table = LeafTable(
        example_ids=ids,
        leaf_ids=leaf_ids_new,
        leaf_index_of_row=new_leaf_of.astype(np.int32),
        parent_ids=table.parent_ids[kept_parents],
        parent_of_leaf=parent_new,
        region_of_parent=table.region_of_parent[kept_parents],
        leaf_centroids=leaf_centroids,
        parent_centroids=parent_centroids,
        representative=representative,
        member_order=member_order,
        leaf_offsets=leaf_offsets,
        example_content=content,
        delta_count=delta_count[kept_parents],
    )
    new_table.check()
    old_ids = table.leaf_ids
    survivors = ~to_split[:G] & ~empty[:G]
    # Built once: a set per split or delta leaf would cost (splits + delta leaves) x leaves on a large pool.
    old_set, new_set = set(old_ids.tolist()), set(leaf_ids_new.tolist())
    return GrowthResult(
        table=new_table,
        unchanged=old_ids[survivors & ~changed[:G]].tolist(),
        grown=old_ids[survivors & gained[:G]].tolist(),
        shrunk=old_ids[survivors & (lost > 0)].tolist(),
        split={k: v for k, v in split_map.items() if k in old_set},
        retired=old_ids[empty[:G]].tolist(),
        new=[name for name in leaf_ids_new.tolist() if name not in table._index_by_id],
        delta=[d for d in delta_ids if d in new_set or d in split_map],
        n_added=int(arrivals.size - n_edited),
        n_removed=n_removed,
        n_edited=n_edited,
        deferred=int(to_delta.size),
        reselected_parents=table.parent_ids[kept_parents[refill]].tolist(),
        removed_parents=table.parent_ids[~parent_alive].tolist(),
    )
