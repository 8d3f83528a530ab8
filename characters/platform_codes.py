"""The platform-wide search's binary codes, held in this process's memory and scanned with numpy.

PostgreSQL scanning 250k identities' 64-byte codes costs ~200 ns of executor work per row, 78-82 ms p95 at
1M references (bench/README.md); the same scan over a numpy matrix (XOR, popcount, a partial sort) is a few
milliseconds. Each process loads the codes of one embedder once (`embedding_bits`, read in binary), then
before every search applies what changed since, from the identity log of migration 0009: the identities
written by transactions that the snapshot of its previous read did not see. One small statement when
nothing changed; the codes are never older than the search's own statement.

The shortlist is only the codes' order: `characters.search.search_platform` re-ranks it at full precision
from the table. A transaction that has written anything itself is answered by PostgreSQL's scan instead
(`shortlist` returns None): the log cannot tell a reader about changes it has not committed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import psycopg

#: when more than this share of the matrix's rows are deleted ones, it is rebuilt without them
COMPACT_DEAD_SHARE = 0.25

_STATE = """
SELECT pg_current_xact_id_if_assigned() IS NOT NULL, pg_current_snapshot()::text,
    COALESCE((SELECT pruned_below > pg_snapshot_xmin(%(seen)s::pg_snapshot)
              FROM characters_identity_log_state WHERE id = 1), false),
    ARRAY(SELECT DISTINCT identity_id FROM characters_identity_log
          WHERE xid >= pg_snapshot_xmin(%(seen)s::pg_snapshot)
          AND NOT pg_visible_in_snapshot(xid, %(seen)s::pg_snapshot)
          AND (embedder = %(embedder)s OR identity_id IS NULL))
"""

_LOAD = """
SELECT NULL::bigint, NULL::bigint, NULL::bigint, NULL::varbit, pg_current_snapshot()::text,
    pg_current_xact_id_if_assigned() IS NOT NULL
UNION ALL
SELECT id, tenant_id, character_id, embedding_bits, NULL, NULL FROM characters_characteridentity
WHERE embedder = %(embedder)s
"""

_ROWS = """
SELECT id, tenant_id, character_id, embedding_bits FROM characters_characteridentity
WHERE embedder = %(embedder)s AND id = ANY(%(ids)s)
"""


@dataclass
class _Codes:
    """One embedder's codes, one row of `codes` per 64-bit word of the code (column `r` is identity `ids[r]`):
    the scan then runs over long contiguous rows. Columns of deleted identities stay (dead, id -1) until the
    matrix is compacted."""

    dims: int
    snapshot: str = ""
    codes: np.ndarray = field(default=None)  # uint64 [dims / 64, capacity]
    ids: np.ndarray = field(default=None)  # int64 [capacity]: identity id per column, -1 when dead
    rows: int = 0  # columns in use (live and dead)
    position: dict[int, int] = field(default_factory=dict)  # identity id -> column

    def reset(self, capacity: int) -> None:
        self.codes = np.zeros((self.dims // 64, max(capacity, 16)), dtype=np.uint64)
        self.ids = np.full(max(capacity, 16), -1, dtype=np.int64)
        self.rows = 0
        self.position = {}

    def put(self, identity_id: int, code: np.ndarray) -> None:
        column = self.position.get(identity_id)
        if column is None:
            if self.rows == len(self.ids):
                grown = np.zeros((self.codes.shape[0], len(self.ids) * 2), dtype=np.uint64)
                grown[:, : self.rows] = self.codes
                self.codes = grown
                self.ids = np.concatenate([self.ids, np.full(len(self.ids), -1, dtype=np.int64)])
            column, self.rows = self.rows, self.rows + 1
            self.position[identity_id] = column
            self.ids[column] = identity_id
        self.codes[:, column] = code

    def remove(self, identity_id: int) -> None:
        column = self.position.pop(identity_id, None)
        if column is not None:
            self.ids[column] = -1

    def compact(self) -> None:
        live = self.ids[: self.rows] >= 0
        codes, ids = self.codes[:, : self.rows][:, live], self.ids[: self.rows][live]
        self.reset(len(ids) * 2)
        self.codes[:, : len(ids)], self.ids[: len(ids)] = codes, ids
        self.rows = len(ids)
        self.position = {int(identity_id): column for column, identity_id in enumerate(ids)}

    def distances(self, query: np.ndarray) -> np.ndarray:
        """Hamming distance of every column's code to `query` (uint64 words); dead columns get dims + 1."""
        count = self.rows
        total = np.zeros(count, dtype=np.int16)
        word = np.empty(count, dtype=np.uint64)
        for row, query_word in zip(self.codes[:, :count], query, strict=True):
            np.bitwise_xor(row, query_word, out=word)
            total += np.bitwise_count(word)
        total[self.ids[:count] < 0] = self.dims + 1
        return total


_cache: dict[str, _Codes] = {}
_lock = threading.Lock()


def forget() -> None:
    """Drop every loaded matrix (tests; the next search loads again)."""
    with _lock:
        _cache.clear()


def _codes_of(bits: list, dims: int) -> np.ndarray:
    """varbit values in PostgreSQL's binary format (int32 bit length, then the bits, first one highest) as
    uint64 words; the query's code is packed the same way (`query_code`), so XOR lines them up."""
    width = 4 + dims // 8
    raw = np.frombuffer(b"".join(bits), dtype=np.uint8).reshape(len(bits), width)[:, 4:]
    return np.ascontiguousarray(raw).view(np.uint64)


def query_code(vector: np.ndarray) -> np.ndarray:
    """pgvector's `binary_quantize` of `vector` (a bit per dimension: value > 0), as uint64 words."""
    return np.packbits(np.asarray(vector) > 0).view(np.uint64)


def _binary_cursor(cursor):
    """A server-binding cursor on the same connection (and transaction) as `cursor`; its results are asked
    for in binary (`execute(..., binary=True)`): a varbit is then its bytes, not a string of 0s and 1s."""
    return psycopg.Cursor(cursor.connection)


def _load(cursor, embedder: str, dims: int) -> _Codes | None:
    with _binary_cursor(cursor) as binary:
        binary.execute(_LOAD, {"embedder": embedder}, binary=True)
        records = binary.fetchall()
    header = next(record for record in records if record[0] is None)
    if header[5]:
        return None  # this transaction wrote: its view is not the committed one
    body = [record for record in records if record[0] is not None]
    loaded = _Codes(dims=dims, snapshot=header[4])
    loaded.reset(len(body) + len(body) // 4)
    if body:
        count = len(body)
        loaded.codes[:, :count] = _codes_of([record[3] for record in body], dims).T
        loaded.ids[:count] = [record[0] for record in body]
        loaded.rows = count
        loaded.position = {record[0]: row for row, record in enumerate(body)}
    return loaded


def _refresh(cursor, codes: _Codes, embedder: str) -> bool | None:
    """Apply what changed since `codes.snapshot`: True when done; False when this transaction wrote (search in
    SQL); None when the log cannot tell (load again)."""
    cursor.execute(_STATE, {"seen": codes.snapshot, "embedder": embedder})
    own_writes, snapshot, pruned, changed = cursor.fetchone()
    if own_writes:
        return False
    if pruned or None in changed:  # the log no longer reaches back to our snapshot, or a TRUNCATE
        return None
    if changed:
        with _binary_cursor(cursor) as binary:
            binary.execute(_ROWS, {"embedder": embedder, "ids": changed}, binary=True)
            current = binary.fetchall()
        for identity_id in changed:
            codes.remove(identity_id)
        if current:
            new = _codes_of([record[3] for record in current], codes.dims)
            for (identity_id, *_), code in zip(current, new, strict=True):
                codes.put(identity_id, code)
        if codes.rows - len(codes.position) > COMPACT_DEAD_SHARE * max(codes.rows, 1):
            codes.compact()
    codes.snapshot = snapshot
    return True


def shortlist(cursor, *, embedder: str, dims: int, vector: np.ndarray, size: int) -> list[int] | None:
    """Ids of the `size` identities of `embedder` whose codes are nearest `vector` by Hamming distance, from
    this process's matrix brought up to date first; None when this transaction has written (scan in SQL)."""
    with _lock:
        codes = _cache.get(embedder)
        if codes is not None:
            fresh = _refresh(cursor, codes, embedder)
            if fresh is False:
                return None
            if fresh is None:
                codes = None
        if codes is None:
            codes = _load(cursor, embedder, dims)
            if codes is None:
                return None
            _cache[embedder] = codes
        if not codes.position:
            return []
        distances = codes.distances(query_code(vector))
        return codes.ids[_smallest(distances, min(size, len(codes.position)))].tolist()


def _smallest(distances: np.ndarray, size: int) -> np.ndarray:
    """Indexes of `size` smallest small non-negative ints: those under the size-th value, then that value's
    first ones (a histogram: 3x faster than a partial sort of 250k)."""
    edge = int(np.searchsorted(np.cumsum(np.bincount(distances)), size))
    inside = np.flatnonzero(distances < edge)
    return np.concatenate([inside, np.flatnonzero(distances == edge)[: size - len(inside)]])


def prune_log(cursor) -> int:
    """Delete log rows older than the previous prune (`horizon`), and remember this one's: a process that
    searched within the interval never reloads. One statement: no reader sees the rows gone but not
    `pruned_below` moved. Returns the rows deleted."""
    cursor.execute(
        "WITH state AS (UPDATE characters_identity_log_state SET pruned_below = horizon, "
        "horizon = pg_snapshot_xmin(pg_current_snapshot()) WHERE id = 1 RETURNING pruned_below) "
        "DELETE FROM characters_identity_log WHERE xid < (SELECT pruned_below FROM state)"
    )
    return cursor.rowcount
