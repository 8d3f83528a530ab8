"""Nearest-character search in pgvector, with the plan chosen here, not by the planner.

The tenant is the unit of the index. A search of one tenant's rows runs one of two plans, and the
application picks which (bench/README.md has the measurements behind every number here):

* **exact**: the tenant's rows are read through the `(tenant_id, embedder)` B-tree and sorted by
  their full-precision similarity. Reference vectors are stored inline (`STORAGE MAIN`, migration
  0007), so this costs no TOAST lookup per row; it is the plan below `min_rows` rows.
* **hnsw**: a tenant with at least `min_rows` rows of one embedder gets its own partial HNSW index,
  `((embedding::halfvec(D)) halfvec_cosine_ops) WHERE embedder = '<name>' AND tenant_id = <id>`,
  built by `tenant_indexes_sync` (a schedule every few minutes, `manage.py sync_search_indexes`,
  migration 0007). Its graph holds only that tenant's rows, so its recall does not fall as the
  whole database grows. The query orders by exactly that cast with the tenant id as a literal (or
  PostgreSQL cannot prove the index's predicate) and turns off the plans that would sort instead.

A **reference search** ("who is this?") of a tenant with an identity index runs in two stages in one
statement: the identity graph (one vector per character, a quarter of the rows) shortlists
`SHORTLIST_FACTOR × limit` characters at a small `ef_search`, then every reference of those
characters is scored exactly and each character ranked by its best one. The per-tenant reference
index serves only tenants with many references but too few identities for an identity index.

The choice is "does a valid index of this tenant exist?": a tenant that just crossed the threshold
is searched exactly (correct, slower) until its index is built. The tenant id is always in the
WHERE clause of either plan; an index scan can only return rows of the index's own tenant.

**Platform-wide** search (`platform_nearest_characters`, superusers only: duplicates across studios)
ranks every identity's binary quantisation (`embedding_bits`, a stored generated column,
`binary_quantize(embedding)`, 64 bytes for 512-d) by Hamming distance, keeps a shortlist and
re-ranks it at full precision; then each found character's best reference is read exactly. The codes
are scanned in this process's memory (`characters.platform_codes`, kept current from an identity change
log), or by PostgreSQL in a transaction that has written itself. (ArcFace only: dlib's uncentred
descriptors are scanned exactly, see BINARY_SHORTLIST_EMBEDDERS.)

Literal SQL: embedder names come from the registry and tenant ids are ints, never request text.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import psycopg
from django.conf import settings
from django.db import connection, transaction

from alkemy.metrics import SEARCH_SECONDS
from characters import platform_codes
from characters.faces import embedder_infos

logger = logging.getLogger(__name__)

#: candidates the HNSW scan keeps, per table (bench/search.py: identity recall 0.99+ at 1M). The
#: identity graph is a quarter the size and its vectors are each character's mean, nearer any new
#: photo of them than a single reference, so it needs far fewer
EF_SEARCH = {"faceemb": 200, "identity": 64}
#: a reference search through the identity index shortlists this many characters per one asked for
SHORTLIST_FACTOR, MIN_SHORTLIST = 2, 20
#: graph parameters of every per-tenant index
HNSW_M, HNSW_EF_CONSTRUCTION = 16, 64
#: table short name -> table
TABLES = {"faceemb": "characters_faceembedding", "identity": "characters_characteridentity"}
#: rows of one tenant and embedder from which the tenant gets its own HNSW index over that table
#: (settings.ALKEMY_SEARCH_INDEX_MIN_ROWS overrides; None: never); below half of it the index is
#: dropped again. Reference searches go through the identity graph from 300 characters on; below
#: that a tenant has at most 1,500 references (MAX_REFERENCES 5), an exact scan of ~5 ms
#: (bench/README.md). No reference graphs by default: each partial index build reads the whole
#: reference heap (2.6 GB at 1M rows), and the identity graph answers the same question faster.
MIN_ROWS: dict[str, int | None] = {"faceemb": None, "identity": 300}
#: binary-quantised shortlist re-ranked at full precision by the platform-wide search
PLATFORM_SHORTLIST = 100
#: advisory lock key held while indexes are created or dropped (one sync at a time)
SYNC_LOCK = 0x616C6B73  # "alks"


@dataclass(frozen=True)
class Neighbour:
    character_id: int
    reference_id: int | None
    similarity: float


@dataclass(frozen=True)
class PlatformNeighbour:
    tenant_id: int
    character_id: int
    similarity: float  # of the character's identity
    reference_id: int | None  # its best reference, and that reference's similarity
    reference_similarity: float | None


@dataclass(frozen=True)
class SearchPlan:
    """What one tenant search runs: `strategy` is "exact" or "hnsw" (then `index` names the index)."""

    strategy: str
    index: str | None
    sql: str
    settings: tuple[str, ...]


def vector_literal(vector: np.ndarray) -> str:
    return "[" + ",".join(f"{float(v):.7g}" for v in vector) + "]"


def _checked(embedder: str) -> int:
    infos = embedder_infos()
    if embedder not in infos:
        raise ValueError(f"unknown embedder {embedder!r}")
    return infos[embedder].dims


def min_rows() -> dict[str, int | None]:
    return {**MIN_ROWS, **getattr(settings, "ALKEMY_SEARCH_INDEX_MIN_ROWS", {})}


def tenant_index_name(table: str, tenant_id: int, embedder: str) -> str:
    """`faceemb_t42_dlib`: the per-tenant HNSW index of table short name `table` (<= 63 characters)."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}")
    return f"{table}_t{int(tenant_id)}_{embedder}"


def tenant_index_sql(table: str, tenant_id: int, embedder: str, dims: int, *, concurrently: bool) -> str:
    return (
        f"CREATE INDEX {'CONCURRENTLY ' if concurrently else ''}IF NOT EXISTS "
        f"{tenant_index_name(table, tenant_id, embedder)} ON {TABLES[table]} USING hnsw "
        f"((embedding::halfvec({dims})) halfvec_cosine_ops) "
        f"WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION}) "
        f"WHERE embedder = '{embedder}' AND tenant_id = {int(tenant_id)}"
    )


def _index_distance(dims: int) -> str:
    """The expression every per-tenant HNSW index is built on."""
    return f"embedding::halfvec({dims}) <=> %(query)s::halfvec({dims})"


def _similarity(dims: int) -> str:
    return f"1 - (embedding::vector({dims}) <=> %(query)s::vector({dims}))"


#: seconds a process trusts what it saw of a tenant's index. A stale answer changes only the speed,
#: never the rows: both plans filter by tenant, so a dropped index means a sort, a new one an exact scan
INDEX_CACHE_SECONDS = 30.0
_index_seen: dict[tuple, tuple[float, bool]] = {}


def forget_indexes() -> None:
    """Forget what this process saw of the per-tenant indexes (after a sync, in tests)."""
    _index_seen.clear()


def _valid_index(cursor, name: str) -> bool:
    info = getattr(cursor, "cursor", cursor).connection.info  # Django's CursorWrapper or a psycopg cursor
    key = (info.host, info.port, info.dbname, name)
    now = time.monotonic()
    seen = _index_seen.get(key)
    if seen is not None and now - seen[0] < INDEX_CACHE_SECONDS:
        return seen[1]
    cursor.execute(
        "SELECT indisvalid AND indisready FROM pg_index WHERE indexrelid = to_regclass(%(name)s)", {"name": name}
    )
    row = cursor.fetchone()
    _index_seen[key] = (now, bool(row and row[0]))
    return _index_seen[key][1]


def _pinned(table: str) -> tuple[str, ...]:
    """Settings that leave PostgreSQL only the HNSW index scan for the ORDER BY distance LIMIT."""
    return (
        "SET LOCAL enable_seqscan = off",
        "SET LOCAL enable_bitmapscan = off",
        "SET LOCAL enable_sort = off",
        # only the excluded character can be filtered out: relaxed order keeps scanning past it
        "SET LOCAL hnsw.iterative_scan = relaxed_order",
        f"SET LOCAL hnsw.ef_search = {int(EF_SEARCH[table])}",
    )


def plan_search(cursor, *, table: str, tenant_id: int, embedder: str, exclude_character: bool = False) -> SearchPlan:
    """The SQL and settings of one tenant search (also what the tests EXPLAIN).

    `%(candidates)s` is the rows the SQL returns, except for the two-stage reference search
    (strategy "hnsw" with an identity index) where it is the characters shortlisted."""
    dims = _checked(embedder)
    tenant_id = int(tenant_id)
    exclude = "AND character_id <> %(exclude)s " if exclude_character else ""
    if table == "faceemb":
        identity_index = tenant_index_name("identity", tenant_id, embedder)
        if _valid_index(cursor, identity_index):
            shortlist = (
                f"SELECT character_id FROM {TABLES['identity']} "
                f"WHERE embedder = '{embedder}' AND tenant_id = {tenant_id} {exclude}"
                f"ORDER BY {_index_distance(dims)} LIMIT %(candidates)s"
            )
            sql = (
                f"SELECT character_id, reference_id, {_similarity(dims)} AS similarity FROM {TABLES['faceemb']} "
                f"WHERE embedder = '{embedder}' AND tenant_id = {tenant_id} "
                f"AND character_id = ANY(ARRAY({shortlist}))"
            )
            return SearchPlan("hnsw", identity_index, sql, _pinned("identity"))
    index = tenant_index_name(table, tenant_id, embedder)
    hnsw = _valid_index(cursor, index)
    reference = "reference_id" if table == "faceemb" else "NULL"
    order = _index_distance(dims) if hnsw else "similarity DESC"
    sql = (
        f"SELECT character_id, {reference}, {_similarity(dims)} AS similarity FROM {TABLES[table]} "
        f"WHERE embedder = '{embedder}' AND tenant_id = {tenant_id} {exclude}"
        f"ORDER BY {order} LIMIT %(candidates)s"
    )
    if hnsw:
        return SearchPlan("hnsw", index, sql, _pinned(table))
    return SearchPlan("exact", None, sql, ("SET LOCAL enable_seqscan = off",))


def run_search(cursor, plan: SearchPlan, params: dict) -> list[tuple]:
    """Run `plan` inside the caller's transaction (the settings are SET LOCAL).

    As a prepared statement, on a server-binding cursor of the same connection: a search's SQL differs only by
    tenant (a literal, which the partial index's predicate needs), so each connection plans it once per tenant
    instead of parsing a 20-KB statement and planning it on every search (~1 ms of ~6, bench/README.md). Django's
    query log does not see it."""
    searching = psycopg.Cursor(cursor.connection)
    searching.execute("; ".join(plan.settings))
    searching.execute(plan.sql, params, prepare=True)
    return searching.fetchall()


def search_references(
    cursor, *, tenant_id: int, embedder: str, vector: np.ndarray, limit: int, exclude_character_id: int | None = None
) -> list[Neighbour]:
    """The tenant's characters nearest to `vector`, best reference per character, best first.

    Runs on `cursor` inside the caller's transaction (bench/search.py calls it on its own connection)."""
    plan = plan_search(
        cursor,
        table="faceemb",
        tenant_id=tenant_id,
        embedder=embedder,
        exclude_character=exclude_character_id is not None,
    )
    two_stage = plan.index is not None and plan.index.startswith("identity_")
    params = {
        "query": vector_literal(vector),
        "exclude": exclude_character_id,
        # characters shortlisted by identity, or (one stage) rows: each character has at most
        # MAX_REFERENCES of them, so this many rows hold `limit` characters
        "candidates": max(SHORTLIST_FACTOR * limit, MIN_SHORTLIST)
        if two_stage
        else limit * max(settings.ALKEMY_MAX_REFERENCES, 1),
    }
    best: dict[int, Neighbour] = {}
    # relaxed order can return rows slightly out of order, the two-stage SQL returns them unordered
    for character_id, reference_id, similarity in sorted(run_search(cursor, plan, params), key=lambda r: -r[2]):
        if character_id not in best:
            best[character_id] = Neighbour(character_id, reference_id, float(similarity))
    return list(best.values())[:limit]


def search_identities(
    cursor, *, tenant_id: int, embedder: str, vector: np.ndarray, limit: int, exclude_character_id: int | None = None
) -> list[Neighbour]:
    """The tenant's characters whose identity is nearest to `vector`, best first (same plans)."""
    plan = plan_search(
        cursor,
        table="identity",
        tenant_id=tenant_id,
        embedder=embedder,
        exclude_character=exclude_character_id is not None,
    )
    # a few more candidates than asked: the half-precision graph order is re-sorted at full precision
    params = {"query": vector_literal(vector), "exclude": exclude_character_id, "candidates": max(limit, 40)}
    rows = run_search(cursor, plan, params)
    return sorted((Neighbour(c, None, float(s)) for c, _, s in rows), key=lambda n: -n.similarity)[:limit]


@SEARCH_SECONDS.time()
def nearest_characters(
    *,
    tenant_id: int,
    embedder: str,
    vector: np.ndarray,
    limit: int,
    min_similarity: float | None = None,
    exclude_character_id: int | None = None,
) -> list[Neighbour]:
    """The tenant's characters nearest to `vector`, best reference per character, best first."""
    with transaction.atomic(), connection.cursor() as cursor:
        found = search_references(
            cursor,
            tenant_id=tenant_id,
            embedder=embedder,
            vector=vector,
            limit=limit,
            exclude_character_id=exclude_character_id,
        )
    return [n for n in found if min_similarity is None or n.similarity >= min_similarity]


def similar_identities(
    *,
    tenant_id: int,
    embedder: str,
    vector: np.ndarray,
    exclude_character_id: int,
    min_similarity: float,
    limit: int = 10,
) -> list[Neighbour]:
    """Other characters whose identity is at least `min_similarity` to `vector` (duplicate hunting)."""
    with transaction.atomic(), connection.cursor() as cursor:
        found = search_identities(
            cursor,
            tenant_id=tenant_id,
            embedder=embedder,
            vector=vector,
            limit=limit,
            exclude_character_id=exclude_character_id,
        )
    return [n for n in found if n.similarity >= min_similarity]


# --- platform-wide (superusers only) ----------------------------------------------------------


#: embedders whose vectors are centred on the origin (ArcFace), so the sign bits of `binary_quantize`
#: spread strangers apart; dlib's descriptors share one large mean direction (strangers score
#: 0.80-0.91), their bits say little, and their platform-wide search is an exact scan instead
BINARY_SHORTLIST_EMBEDDERS = frozenset({"arcface_antelopev2", "arcface_buffalo_l"})


def platform_search_sql(embedder: str) -> str:
    dims = _checked(embedder)
    if embedder not in BINARY_SHORTLIST_EMBEDDERS:
        return (
            f"SELECT tenant_id, character_id, {_similarity(dims)} AS similarity FROM characters_characteridentity "
            f"WHERE embedder = '{embedder}' ORDER BY similarity DESC LIMIT %(limit)s"
        )
    return (
        f"SELECT tenant_id, character_id, {_similarity(dims)} AS similarity FROM characters_characteridentity "
        f"WHERE id = ANY(ARRAY(SELECT id FROM characters_characteridentity WHERE embedder = '{embedder}' "
        f"ORDER BY embedding_bits <~> binary_quantize(%(query)s::vector({dims})) LIMIT %(shortlist)s)) "
        f"ORDER BY similarity DESC LIMIT %(limit)s"
    )


def rerank_sql(embedder: str) -> str:
    """The identities of a shortlist (`platform_codes.shortlist`) by their full-precision similarity. A join
    with the unnested ids, not `id = ANY(...)`: planning that for 100 literal ids took 5 ms (bench/README.md)."""
    return (
        f"SELECT tenant_id, character_id, {_similarity(_checked(embedder))} AS similarity "
        f"FROM unnest(%(ids)s::bigint[]) AS shortlist(identity_id) "
        f"JOIN characters_characteridentity ON id = shortlist.identity_id "
        f"WHERE embedder = '{embedder}' ORDER BY similarity DESC LIMIT %(limit)s"
    )


def best_references_sql(embedder: str) -> str:
    dims = _checked(embedder)
    return (
        f"SELECT DISTINCT ON (character_id) character_id, reference_id, {_similarity(dims)} AS similarity "
        f"FROM characters_faceembedding WHERE embedder = '{embedder}' AND character_id = ANY(%(characters)s) "
        f"ORDER BY character_id, similarity DESC"
    )


def search_platform(
    cursor, *, embedder: str, vector: np.ndarray, limit: int, shortlist: int = PLATFORM_SHORTLIST
) -> list[PlatformNeighbour]:
    """Every tenant's characters nearest to `vector` by identity, with each one's best reference.

    Runs on `cursor`; never call it for a tenant: it crosses tenants by design."""
    query, size = vector_literal(vector), max(shortlist, limit)
    ids = None
    if embedder in BINARY_SHORTLIST_EMBEDDERS:
        ids = platform_codes.shortlist(cursor, embedder=embedder, dims=_checked(embedder), vector=vector, size=size)
    if ids is None:  # dlib, or this transaction wrote identities: PostgreSQL scans, seeing its own writes
        cursor.execute(platform_search_sql(embedder), {"query": query, "shortlist": size, "limit": limit})
    else:
        cursor.execute(rerank_sql(embedder), {"query": query, "ids": ids, "limit": limit})
    found = [(int(t), int(c), float(s)) for t, c, s in cursor.fetchall()]
    best: dict[int, tuple[int, float]] = {}
    if found:
        cursor.execute(best_references_sql(embedder), {"query": query, "characters": [c for _, c, _ in found]})
        best = {int(c): (int(r), float(s)) for c, r, s in cursor.fetchall()}
    return [
        PlatformNeighbour(t, c, s, *(best.get(c) or (None, None))) for t, c, s in sorted(found, key=lambda f: -f[2])
    ]


def platform_nearest_characters(
    *, embedder: str, vector: np.ndarray, limit: int = 10, min_similarity: float | None = None
) -> list[PlatformNeighbour]:
    """Superusers only (`manage.py platform_face_search`): nearest characters across every tenant."""
    with transaction.atomic(), connection.cursor() as cursor:
        found = search_platform(cursor, embedder=embedder, vector=vector, limit=limit)
    return [n for n in found if min_similarity is None or n.similarity >= min_similarity]


# --- per-tenant indexes -----------------------------------------------------------------------


@dataclass
class SyncReport:
    created: list[str]
    dropped: list[str]
    kept: list[str]


def sync_tenant_indexes(
    cursor, *, concurrently: bool, thresholds: dict[str, int] | None = None, tenant_id: int | None = None
) -> SyncReport:
    """Create the per-tenant HNSW indexes tenants have grown into and drop those they shrank out of.

    A tenant gets an index over a table at `thresholds[table]` rows of one embedder and loses it
    below half of that. `concurrently` builds with CREATE INDEX CONCURRENTLY (needs autocommit);
    an invalid index (an interrupted concurrent build) is dropped and built again."""
    thresholds = {**min_rows(), **(thresholds or {})}
    infos = embedder_infos()
    report = SyncReport([], [], [])
    cursor.execute("SELECT pg_try_advisory_lock(%(key)s)", {"key": SYNC_LOCK})
    if not cursor.fetchone()[0]:
        logger.info("another search-index sync is running")
        return report
    try:
        for table, name in TABLES.items():
            only = f"WHERE tenant_id = {int(tenant_id)} " if tenant_id is not None else ""
            cursor.execute(f"SELECT tenant_id, embedder, count(*) FROM {name} {only}GROUP BY 1, 2")
            counts = {(int(t), e): int(n) for t, e, n in cursor.fetchall()}
            cursor.execute(
                "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE i.indrelid = %(table)s::regclass AND c.relname LIKE %(pattern)s",
                {"table": name, "pattern": f"{table}\\_t%"},
            )
            existing = dict(cursor.fetchall())
            threshold = thresholds[table]
            wanted = {
                tenant_index_name(table, t, e): (t, e)
                for (t, e), n in counts.items()
                if e in infos and threshold is not None and n >= threshold
            }
            keep_until = {
                tenant_index_name(table, t, e)
                for (t, e), n in counts.items()
                if e in infos and threshold is not None and n >= threshold / 2
            }
            for index, valid in existing.items():
                mine = tenant_id is None or index.startswith(f"{table}_t{int(tenant_id)}_")
                if mine and (index not in keep_until or not valid):
                    cursor.execute(f"DROP INDEX {'CONCURRENTLY ' if concurrently else ''}IF EXISTS {index}")
                    report.dropped.append(index)
                elif mine:
                    report.kept.append(index)
            for index, (t, e) in sorted(wanted.items(), key=lambda item: -counts[item[1]]):
                if index in report.kept:
                    continue
                cursor.execute(tenant_index_sql(table, t, e, infos[e].dims, concurrently=concurrently))
                report.created.append(index)
                logger.info("built search index %s (%d rows)", index, counts[(t, e)])
    finally:
        cursor.execute("SELECT pg_advisory_unlock(%(key)s)", {"key": SYNC_LOCK})
        forget_indexes()
    return report


def tenant_indexes_sync(*, tenant_id: int | None = None, thresholds: dict[str, int] | None = None) -> SyncReport:
    """Django entry point of `sync_tenant_indexes` (schedule, management command); also prunes the identity log
    of the platform-wide search's codes (`platform_codes.prune_log`)."""
    with connection.cursor() as cursor:
        report = sync_tenant_indexes(
            cursor, concurrently=not connection.in_atomic_block, thresholds=thresholds, tenant_id=tenant_id
        )
        platform_codes.prune_log(cursor)
    return report
