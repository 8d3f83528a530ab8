"""Face-search benchmark: pgvector HNSW (the production query shapes) against exact search and FAISS.

Standalone: it starts its own embedded PostgreSQL 18 + pgvector in `--pgdata` (never the test
server's data directory), creates `characters_faceembedding` and `characters_characteridentity`
there with the production columns and indexes (migrations 0002/0003), loads synthetic ArcFace-like
identities with binary COPY, and times the SQL of `characters.search` on them.

    cd /work/main && PYTHONPATH=. .venv/bin/python bench/search.py --sizes 100000

Progress goes to stderr, one JSON document with every figure to stdout (and `--json-out`).
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

EMBEDDER = "arcface_antelopev2"
DIMS = 512
TOP_K = 10
BIG_TENANT_CHARACTERS = 10_000
SMALL_TENANT_TARGET = 100
MEDIUM_TENANT_TARGET = 1_000
#: per-photo noise scale: a reference is normalise(centre + s * n), n ~ N(0, I/d), s uniform in this range.
#: Two photos of one person then score 1/sqrt((1+s1^2)(1+s2^2)) = 0.61-0.80 cosine; strangers ~0 +- 0.045.
NOISE = (0.5, 0.8)
GOALS = {
    "tenant_p95_ms": 10.0,
    "global_p95_ms": 20.0,
    "identity_recall": 0.99,
    "enrol_s": 0.15,
}
PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)

_started = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _started:7.1f}s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------


def normalise(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def noisy(rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    """One fresh "photo" per row of `centres` (unit vectors), float32 and unit length."""
    scale = rng.uniform(*NOISE, size=(len(centres), 1)).astype(np.float32)
    noise = rng.standard_normal(centres.shape, dtype=np.float32) / np.float32(np.sqrt(DIMS))
    return normalise(centres + scale * noise).astype(np.float32)


@dataclass
class Dataset:
    size: int
    vectors: np.ndarray  # (rows, DIMS) float32; row i is faceembedding id i+1, reference_id i+1
    identity_of_row: np.ndarray  # (rows,) int32; identity j is character_id j+1
    first_row: np.ndarray  # (identities,) first row of each identity (its rows are contiguous)
    ref_count: np.ndarray  # (identities,)
    tenant_of_identity: np.ndarray  # (identities,) tenant ids, 1 = the big tenant
    identities: np.ndarray  # (identities, DIMS) renormalised mean of each identity's references
    tenants: dict[str, int] = field(default_factory=dict)  # role -> tenant id
    query_centres: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.vectors)

    @property
    def tenant_of_row(self) -> np.ndarray:
        return self.tenant_of_identity[self.identity_of_row]


def make_dataset(size: int, seed: int, queries: int, chunk_identities: int = 25_000) -> tuple[Dataset, dict]:
    """`size` reference embeddings of ~size/4 identities over a skewed set of tenants, plus the queries."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(3, 6, size=size // 3 + 10)
    total = np.cumsum(counts)
    n_ident = int(np.searchsorted(total, size)) + 1
    counts = counts[:n_ident].copy()
    counts[-1] -= int(total[n_ident - 1] - size)  # exactly `size` rows; the last identity may have fewer
    if counts[-1] <= 0:
        counts, n_ident = counts[:-1], n_ident - 1
    first_row = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)

    # Tenants: one big tenant, the rest lognormal sizes (median ~40 characters, long tail), interleaved
    # over the table the way rows of many tenants arrive over time.
    big = min(BIG_TENANT_CHARACTERS, int(0.4 * n_ident))
    order = rng.permutation(n_ident)
    tenant_of_identity = np.empty(n_ident, dtype=np.int32)
    tenant_of_identity[order[:big]] = 1
    sizes = []
    left = n_ident - big
    while left > 0:
        n = int(np.clip(rng.lognormal(np.log(40), 1.2), 1, 3000))
        sizes.append(min(n, left))
        left -= sizes[-1]
    start = big
    for tenant, n in enumerate(sizes, start=2):
        tenant_of_identity[order[start : start + n]] = tenant
        start += n
    tenant_sizes = np.bincount(tenant_of_identity)
    small_tenants = np.arange(2, len(tenant_sizes))

    def closest(target: int) -> int:
        return int(small_tenants[np.argmin(np.abs(tenant_sizes[2:] - target))])

    tenants = {"big": 1, "small": closest(SMALL_TENANT_TARGET), "medium": closest(MEDIUM_TENANT_TARGET)}

    # Query identities per scope: global draws from every identity, tenant scopes from the tenant's.
    query_ids = {"global": rng.choice(n_ident, size=queries, replace=n_ident < queries)}
    for role, tenant in tenants.items():
        members = np.flatnonzero(tenant_of_identity == tenant)
        query_ids[role] = rng.choice(members, size=queries, replace=len(members) < queries)
    wanted = np.unique(np.concatenate(list(query_ids.values())))

    vectors = np.empty((size, DIMS), dtype=np.float32)
    identities = np.empty((n_ident, DIMS), dtype=np.float32)
    identity_of_row = np.repeat(np.arange(n_ident, dtype=np.int32), counts)
    centres_kept: dict[int, np.ndarray] = {}
    for lo in range(0, n_ident, chunk_identities):
        hi = min(lo + chunk_identities, n_ident)
        centres = normalise(rng.standard_normal((hi - lo, DIMS), dtype=np.float32))
        r0, r1 = first_row[lo], first_row[hi - 1] + counts[hi - 1]
        refs = noisy(rng, centres[identity_of_row[r0:r1] - lo])
        vectors[r0:r1] = refs
        sums = np.add.reduceat(refs, first_row[lo:hi] - r0, axis=0)
        identities[lo:hi] = normalise(sums)
        for j in wanted[(wanted >= lo) & (wanted < hi)]:
            centres_kept[int(j)] = centres[j - lo].copy()

    data = Dataset(
        size=size,
        vectors=vectors,
        identity_of_row=identity_of_row,
        first_row=first_row,
        ref_count=counts.astype(np.int64),
        tenant_of_identity=tenant_of_identity,
        identities=identities,
        tenants=tenants,
    )
    queries_by_scope = {}
    for scope, ids in query_ids.items():
        centres = np.stack([centres_kept[int(j)] for j in ids])
        queries_by_scope[scope] = (ids.astype(np.int64), noisy(rng, centres))
    return data, queries_by_scope


def similarity_stats(data: Dataset, rng: np.random.Generator) -> dict:
    """Cosine of photos of one person and of strangers, to check the data looks like ArcFace's."""
    ids = rng.choice(len(data.ref_count), size=2000, replace=False)
    same = []
    for j in ids:
        rows = data.vectors[data.first_row[j] : data.first_row[j] + data.ref_count[j]]
        if len(rows) >= 2:
            same.append(float(rows[0] @ rows[1]))
    a = data.vectors[rng.integers(0, data.rows, 5000)]
    b = data.vectors[rng.integers(0, data.rows, 5000)]
    diff = np.einsum("ij,ij->i", a, b)
    return {
        "same_identity_cosine_p5_p50_p95": [round(float(v), 3) for v in np.percentile(same, [5, 50, 95])],
        "different_identity_cosine_p5_p50_p95": [round(float(v), 3) for v in np.percentile(diff, [5, 50, 95])],
    }


def exact_topk(queries: np.ndarray, matrix: np.ndarray, k: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Indices (into `matrix`) of the k highest inner products per query, best first."""
    index = np.arange(len(matrix)) if rows is None else rows
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    step = 100_000
    for lo in range(0, len(index), step):
        part = index[lo : lo + step]
        block = matrix[lo : lo + step] if rows is None else matrix[part]
        scores = np.concatenate([best_s, queries @ block.T], axis=1)
        ids = np.concatenate([best_i, np.broadcast_to(part, (len(queries), len(part)))], axis=1)
        keep = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
        best_s = np.take_along_axis(scores, keep, axis=1)
        best_i = np.take_along_axis(ids, keep, axis=1)
    order = np.argsort(-best_s, axis=1)
    return np.take_along_axis(best_i, order, axis=1)


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------

REFERENCE_DDL = """
CREATE TABLE characters_faceembedding (
    id bigint NOT NULL,
    tenant_id bigint NOT NULL,
    character_id bigint NOT NULL,
    reference_id bigint NOT NULL,
    embedder varchar(40) NOT NULL,
    dims smallint NOT NULL CHECK (dims >= 0),
    embedding vector NOT NULL,
    created_at timestamptz NOT NULL
)"""
IDENTITY_DDL = """
CREATE TABLE characters_characteridentity (
    id bigint NOT NULL,
    tenant_id bigint NOT NULL,
    character_id bigint NOT NULL,
    embedder varchar(40) NOT NULL,
    dims smallint NOT NULL CHECK (dims >= 0),
    embedding vector NOT NULL,
    reference_count smallint NOT NULL CHECK (reference_count >= 0),
    updated_at timestamptz NOT NULL
)"""
#: The B-tree side of migration 0002: primary keys, FK indexes, (tenant, embedder), unique constraints.
BTREE_SQL = {
    "characters_faceembedding": [
        "ALTER TABLE characters_faceembedding ADD PRIMARY KEY (id)",
        "CREATE INDEX characters_faceembedding_tenant_id ON characters_faceembedding (tenant_id)",
        "CREATE INDEX characters_faceembedding_character_id ON characters_faceembedding (character_id)",
        "CREATE INDEX characters_faceembedding_reference_id ON characters_faceembedding (reference_id)",
        "CREATE INDEX embedding_tenant_embedder_idx ON characters_faceembedding (tenant_id, embedder)",
        "ALTER TABLE characters_faceembedding ADD CONSTRAINT embedding_unique_per_reference_embedder "
        "UNIQUE (reference_id, embedder)",
    ],
    "characters_characteridentity": [
        "ALTER TABLE characters_characteridentity ADD PRIMARY KEY (id)",
        "CREATE INDEX characters_characteridentity_tenant_id ON characters_characteridentity (tenant_id)",
        "CREATE INDEX identity_tenant_embedder_idx ON characters_characteridentity (tenant_id, embedder)",
        "ALTER TABLE characters_characteridentity ADD CONSTRAINT identity_unique_per_character_embedder "
        "UNIQUE (character_id, embedder)",
    ],
}
HNSW_NAMES = {"characters_faceembedding": "faceemb", "characters_characteridentity": "identity"}


def hnsw_sql(table: str, *, m: int = 16, ef_construction: int = 64, kind: str = "vector") -> tuple[str, str]:
    """Migration 0003's index (the `kind`/`m` variants are the alternatives); returns (name, SQL)."""
    suffix = "" if (m, ef_construction, kind) == (16, 64, "vector") else f"_{kind}_m{m}"
    name = f"{HNSW_NAMES[table]}_hnsw_{EMBEDDER}{suffix}"
    sql = (
        f"CREATE INDEX {name} ON {table} USING hnsw "
        f"((embedding::{kind}({DIMS})) {kind}_cosine_ops) WITH (m = {m}, ef_construction = {ef_construction}) "
        f"WHERE embedder = '{EMBEDDER}'"
    )
    return name, sql


def connect(pgdata: str, dbname: str):
    import psycopg

    from alkemy.embedded_db import ensure_database, ensure_server

    server = ensure_server(pgdata)
    ensure_database(server, dbname)
    conn = psycopg.connect(
        dbname=dbname,
        user=server.user,
        host=str(server.socket_dir),
        port=server.port,
        autocommit=True,
        # Django's psycopg 3 backend binds parameters client-side by default: no generic plans.
        cursor_factory=psycopg.ClientCursor,
    )
    conn.add_notice_handler(lambda notice: log(f"  postgres: {notice.message_primary}"))
    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    return server, conn


def _binary_copy(dtype_fields: list[tuple], values: dict[str, np.ndarray], n: int) -> bytes:
    """Rows of fixed-width fields in PostgreSQL's binary COPY tuple format (big-endian, length-prefixed)."""
    layout = [("nfields", ">i2")]
    for name, fmt in dtype_fields:
        layout += [(f"len_{name}", ">i4"), (name, fmt)]
    records = np.empty(n, dtype=np.dtype(layout))
    records["nfields"] = len(dtype_fields)
    for name, fmt in dtype_fields:
        records[f"len_{name}"] = np.dtype(fmt).itemsize
        records[name] = values[name]
    return records.tobytes()


def _pack_vector_column(name: str, vectors: np.ndarray) -> tuple[list[tuple], dict]:
    # pgvector's binary vector: int16 dims, int16 unused (0), float4 x dims, all big-endian
    fmt = np.dtype([("d", ">i2"), ("u", ">i2"), ("v", ">f4", (DIMS,))])
    packed = np.empty(len(vectors), dtype=fmt)
    packed["d"] = DIMS
    packed["u"] = 0
    packed["v"] = vectors
    return [(name, (np.void, fmt.itemsize))], {name: packed.view((np.void, fmt.itemsize))}


def copy_rows(conn, table: str, columns: list[tuple], build_chunk, total: int, chunk: int = 50_000) -> float:
    """Binary COPY of `total` rows; `build_chunk(lo, hi)` returns the values per column. Returns seconds."""
    header = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
    names = ", ".join(name for name, _ in columns)
    began = time.perf_counter()
    with conn.cursor() as cur, cur.copy(f"COPY {table} ({names}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.write(header)
        for lo in range(0, total, chunk):
            hi = min(lo + chunk, total)
            fields, values = build_chunk(lo, hi)
            copy.write(_binary_copy(fields, values, hi - lo))
        copy.write(struct.pack(">h", -1))
    return time.perf_counter() - began


def load(conn, data: Dataset) -> dict:
    emb = EMBEDDER.encode()
    stamp = int((dt.datetime.now(dt.UTC) - PG_EPOCH).total_seconds() * 1_000_000)
    with conn.cursor() as cur:
        for table in ("characters_faceembedding", "characters_characteridentity"):
            cur.execute(f"DROP TABLE IF EXISTS {table}")
        cur.execute(REFERENCE_DDL)
        cur.execute(IDENTITY_DDL)

    def reference_chunk(lo: int, hi: int):
        ids = np.arange(lo + 1, hi + 1, dtype=np.int64)
        identity = data.identity_of_row[lo:hi]
        vfields, vvalues = _pack_vector_column("embedding", data.vectors[lo:hi])
        fields = [
            ("id", ">i8"),
            ("tenant_id", ">i8"),
            ("character_id", ">i8"),
            ("reference_id", ">i8"),
            ("embedder", f"S{len(emb)}"),
            ("dims", ">i2"),
            *vfields,
            ("created_at", ">i8"),
        ]
        values = {
            "id": ids,
            "tenant_id": data.tenant_of_identity[identity],
            "character_id": identity + 1,
            "reference_id": ids,
            "embedder": emb,
            "dims": DIMS,
            **vvalues,
            "created_at": stamp,
        }
        return fields, values

    def identity_chunk(lo: int, hi: int):
        ids = np.arange(lo + 1, hi + 1, dtype=np.int64)
        vfields, vvalues = _pack_vector_column("embedding", data.identities[lo:hi])
        fields = [
            ("id", ">i8"),
            ("tenant_id", ">i8"),
            ("character_id", ">i8"),
            ("embedder", f"S{len(emb)}"),
            ("dims", ">i2"),
            *vfields,
            ("reference_count", ">i2"),
            ("updated_at", ">i8"),
        ]
        values = {
            "id": ids,
            "tenant_id": data.tenant_of_identity[lo:hi],
            "character_id": ids,
            "embedder": emb,
            "dims": DIMS,
            **vvalues,
            "reference_count": data.ref_count[lo:hi],
            "updated_at": stamp,
        }
        return fields, values

    ref_columns = [(c, None) for c in REFERENCE_COLUMNS]
    ident_columns = [(c, None) for c in IDENTITY_COLUMNS]
    result = {}
    log(f"COPY {data.rows} reference embeddings")
    result["copy_references_s"] = copy_rows(conn, "characters_faceembedding", ref_columns, reference_chunk, data.rows)
    log(f"  {result['copy_references_s']:.1f}s; COPY {len(data.identities)} identities")
    result["copy_identities_s"] = copy_rows(
        conn, "characters_characteridentity", ident_columns, identity_chunk, len(data.identities)
    )
    began = time.perf_counter()
    with conn.cursor() as cur:
        for statements in BTREE_SQL.values():
            for statement in statements:
                cur.execute(statement)
    result["btree_indexes_s"] = time.perf_counter() - began
    began = time.perf_counter()
    conn.execute("VACUUM (ANALYZE) characters_faceembedding")
    conn.execute("VACUUM (ANALYZE) characters_characteridentity")
    result["vacuum_analyze_s"] = time.perf_counter() - began
    log(f"  B-tree indexes {result['btree_indexes_s']:.1f}s, vacuum/analyze {result['vacuum_analyze_s']:.1f}s")
    return result


REFERENCE_COLUMNS = ["id", "tenant_id", "character_id", "reference_id", "embedder", "dims", "embedding", "created_at"]
IDENTITY_COLUMNS = ["id", "tenant_id", "character_id", "embedder", "dims", "embedding", "reference_count", "updated_at"]


def build_hnsw(conn, table: str, maintenance_work_mem: str, workers: int, **variant) -> tuple[str, float]:
    name, sql = hnsw_sql(table, **variant)
    conn.execute(f"DROP INDEX IF EXISTS {name}")
    conn.execute(f"SET maintenance_work_mem = '{maintenance_work_mem}'")
    conn.execute(f"SET max_parallel_maintenance_workers = {int(workers)}")
    log(f"building {name} ({variant or 'm=16, ef_construction=64'})")
    began = time.perf_counter()
    conn.execute(sql)
    seconds = time.perf_counter() - began
    conn.execute("RESET maintenance_work_mem")
    conn.execute(f"ANALYZE {table}")
    log(f"  {name}: {seconds:.1f}s")
    return name, seconds


def relation_sizes(conn) -> dict:
    rows = conn.execute(
        "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' "
        "AND c.relkind IN ('r', 'i') AND c.relname LIKE ANY (ARRAY['characters_%', '%hnsw%']) ORDER BY 1"
    ).fetchall()
    return {name: round(size / 2**20, 1) for name, size in rows}


# --------------------------------------------------------------------------------------------
# Query shapes
# --------------------------------------------------------------------------------------------


def query_shapes() -> dict[str, str]:
    """The production SQL (characters.search) plus the variants the benchmark compares it with."""
    from characters.search import identity_search_sql, reference_search_sql

    tenant_filter = " AND tenant_id = %(tenant)s"
    cast, query_cast = f"embedding::vector({DIMS})", f"%(query)s::vector({DIMS})"
    reference = reference_search_sql(EMBEDDER)
    identity = identity_search_sql(EMBEDDER)
    for sql in (reference, identity):
        assert tenant_filter in sql and cast in sql and query_cast in sql, sql

    def without_tenant(sql: str) -> str:
        return sql.replace(tenant_filter, "")

    def exact(sql: str) -> str:
        # Ordering by the uncast column matches no HNSW index expression: a scan that sorts every row.
        return sql.replace(cast, "embedding").replace(query_cast, "%(query)s::vector")

    def halfvec(sql: str) -> str:
        return sql.replace(f"::vector({DIMS})", f"::halfvec({DIMS})")

    return {
        "reference_tenant": reference,
        "reference_global": without_tenant(reference),
        "reference_tenant_exact": exact(reference),
        "reference_global_exact": exact(without_tenant(reference)),
        "reference_tenant_halfvec": halfvec(reference),
        "reference_global_halfvec": halfvec(without_tenant(reference)),
        "identity_tenant": identity,
        "identity_global": without_tenant(identity),
        "identity_tenant_exact": exact(identity),
        "identity_global_exact": exact(without_tenant(identity)),
    }


def describe_plan(node: dict) -> str:
    text = node["Node Type"]
    if node.get("Index Name"):
        text += f" using {node['Index Name']}"
    if node.get("Workers Planned"):
        text += f" ({node['Workers Planned']} workers)"
    children = [describe_plan(child) for child in node.get("Plans", [])]
    if len(children) == 1:
        return f"{text} > {children[0]}"
    if children:
        return f"{text} > ({'; '.join(children)})"
    return text


def percentiles(latencies: list[float]) -> dict:
    ms = np.asarray(latencies) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "mean_ms": round(float(ms.mean()), 2),
    }


def recall_figures(
    found: list[list[int]], exact: np.ndarray, own: list[set[int]], owner_of, query_ids: np.ndarray
) -> dict:
    """recall@10 vs exact; identity recall = share of the query identity's own vectors in the top 10;
    top1 = share of queries whose best hit belongs to the query identity."""
    recall = np.mean([len(set(f) & set(e.tolist())) / len(e) for f, e in zip(found, exact, strict=True)])
    identity = np.mean([len(set(f) & o) / len(o) for f, o in zip(found, own, strict=True)])
    top1 = np.mean([bool(f) and owner_of(f[0]) == q for f, q in zip(found, query_ids, strict=True)])
    return {
        "recall_at_10": round(float(recall), 4),
        "identity_recall": round(float(identity), 4),
        "top1_correct": round(float(top1), 4),
    }


class SqlRunner:
    def __init__(self, conn, vector_literal) -> None:
        self.conn = conn
        self.vector_literal = vector_literal

    def run(
        self,
        sql: str,
        queries: np.ndarray,
        *,
        ef: int,
        tenant: int | None,
        iterative: str = "relaxed_order",
        limit: int = TOP_K,
        warmup: int = 10,
    ) -> tuple[list[float], list[list[int]], str]:
        """Each query in its own transaction with the production SET LOCALs; times execute + fetch."""
        literals = [self.vector_literal(q) for q in queries]
        params = [{"query": lit, "tenant": tenant, "exclude": 0, "candidates": limit} for lit in literals]
        latencies: list[float] = []
        found: list[list[int]] = []
        self.conn.autocommit = False
        try:
            with self.conn.cursor() as cur:
                plan = self._explain(cur, sql, params[0], ef, iterative)
                for i, p in enumerate(params[:warmup] + params):
                    cur.execute(f"SET LOCAL hnsw.iterative_scan = {iterative}")
                    cur.execute(f"SET LOCAL hnsw.ef_search = {int(ef)}")
                    began = time.perf_counter()
                    cur.execute(sql, p)
                    rows = cur.fetchall()
                    elapsed = time.perf_counter() - began
                    self.conn.commit()
                    if i >= min(warmup, len(params)):
                        latencies.append(elapsed)
                        # relaxed order can return rows slightly out of order: re-sort like production
                        rows.sort(key=lambda row: -row[2])
                        found.append([int(row[1]) if row[1] is not None else int(row[0]) for row in rows])
        finally:
            self.conn.rollback()
            self.conn.autocommit = True
        return latencies, found, plan

    def _explain(self, cur, sql: str, params: dict, ef: int, iterative: str) -> str:
        cur.execute(f"SET LOCAL hnsw.iterative_scan = {iterative}")
        cur.execute(f"SET LOCAL hnsw.ef_search = {int(ef)}")
        cur.execute("EXPLAIN (FORMAT JSON) " + sql, params)
        plan = cur.fetchone()[0]
        self.conn.commit()
        if isinstance(plan, str):
            plan = json.loads(plan)
        return describe_plan(plan[0]["Plan"])


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


@dataclass
class Scope:
    name: str
    tenant: int | None
    query_ids: np.ndarray
    queries: np.ndarray
    exact_refs: np.ndarray  # (q, 10) row indices
    exact_idents: np.ndarray  # (q, 10) identity indices
    characters: int
    references: int


def build_scopes(data: Dataset, queries_by_scope: dict) -> dict[str, Scope]:
    scopes = {}
    tenant_of_row = data.tenant_of_row
    for name, (ids, queries) in queries_by_scope.items():
        tenant = None if name == "global" else data.tenants[name]
        rows = None if tenant is None else np.flatnonzero(tenant_of_row == tenant)
        idents = None if tenant is None else np.flatnonzero(data.tenant_of_identity == tenant)
        scopes[name] = Scope(
            name=name,
            tenant=tenant,
            query_ids=ids,
            queries=queries,
            exact_refs=exact_topk(queries, data.vectors, TOP_K, rows),
            exact_idents=exact_topk(queries, data.identities, TOP_K, idents),
            characters=len(data.identities) if idents is None else len(idents),
            references=data.rows if rows is None else len(rows),
        )
    return scopes


def measure_sql(runner: SqlRunner, data: Dataset, scope: Scope, sql: str, *, table: str, n: int, **kwargs) -> dict:
    queries, ids = scope.queries[:n], scope.query_ids[:n]
    latencies, found, plan = runner.run(sql, queries, tenant=scope.tenant, **kwargs)
    if table == "reference":
        # found: reference ids (= row + 1)
        rows = [[r - 1 for r in f] for f in found]
        own = [set(range(data.first_row[j], data.first_row[j] + data.ref_count[j])) for j in ids]
        figures = recall_figures(rows, scope.exact_refs[:n], own, lambda r: data.identity_of_row[r], ids)
    else:
        # found: character ids (= identity + 1)
        idents = [[c - 1 for c in f] for f in found]
        figures = recall_figures(idents, scope.exact_idents[:n], [{int(j)} for j in ids], lambda c: c, ids)
    # the 1-minute load average: other work on the machine inflates latencies
    load1 = round(os.getloadavg()[0], 2)
    return {"queries": len(latencies), **percentiles(latencies), **figures, "plan": plan, "loadavg_1m": load1}


def measure_faiss(data: Dataset, scope: Scope, efs: list[int], n: int, threads: int) -> dict:
    import faiss

    faiss.omp_set_num_threads(threads)
    index = faiss.IndexHNSWFlat(DIMS, 16, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 64
    log(f"FAISS IndexHNSWFlat M=16 efConstruction=64 over {data.rows} vectors ({threads} threads)")
    began = time.perf_counter()
    index.add(data.vectors)
    build = time.perf_counter() - began
    log(f"  built in {build:.1f}s")
    result = {"build_s": round(build, 2), "threads": threads, "by_ef_search": {}}
    queries, ids = scope.queries[:n], scope.query_ids[:n]
    own = [set(range(data.first_row[j], data.first_row[j] + data.ref_count[j])) for j in ids]
    faiss.omp_set_num_threads(1)  # one query at a time, like one SQL query
    for ef in efs:
        index.hnsw.efSearch = ef
        for q in queries[:10]:
            index.search(q[None, :], TOP_K)
        latencies, found = [], []
        for q in queries:
            began = time.perf_counter()
            _, labels = index.search(q[None, :], TOP_K)
            latencies.append(time.perf_counter() - began)
            found.append([int(v) for v in labels[0] if v >= 0])
        figures = recall_figures(found, scope.exact_refs[:n], own, lambda r: data.identity_of_row[r], ids)
        result["by_ef_search"][str(ef)] = {"queries": len(latencies), **percentiles(latencies), **figures}
        log(f"  FAISS ef {ef}: {result['by_ef_search'][str(ef)]}")
    return result


def enrolment_photos() -> dict[str, np.ndarray]:
    """~1-megapixel (1155x866) versions of skimage's astronaut photo (512x512).

    `padded` keeps the face's proportions (scaled to 866x866, edges extended to 1155 wide) and is the
    headline figure; `stretched` is a plain resize to 1155x866, which distorts the face by 4:3.
    """
    from PIL import Image
    from skimage import data as skdata

    astronaut = Image.fromarray(skdata.astronaut())
    square = np.asarray(astronaut.resize((866, 866), Image.BICUBIC))
    return {
        "padded": np.ascontiguousarray(np.pad(square, ((0, 0), (144, 145), (0, 0)), mode="edge")),
        "stretched": np.asarray(astronaut.resize((1155, 866), Image.BICUBIC)),
    }


def measure_enrolment(runs: int) -> dict:
    """Detect + embed one ~1-megapixel photo with the project's configured face embedder."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "alkemy.settings")
    os.environ.setdefault("SECRET_KEY", "bench-only-secret-key")  # settings refuse to start without one
    import django

    django.setup()
    from characters.faces import embedder_missing, get_embedder, resolve_embedder_name

    name = resolve_embedder_name()
    unavailable = {n: embedder_missing(n) for n in ("arcface_antelopev2", "arcface_buffalo_l") if embedder_missing(n)}
    log(f"enrolment: loading embedder {name!r}")
    began = time.perf_counter()
    embedder = get_embedder()
    result: dict = {
        "embedder": name,
        "dims": embedder.info.dims,
        "model_load_s": round(time.perf_counter() - began, 2),
        "unavailable_embedders": unavailable,
        "goal_s": GOALS["enrol_s"],
        "photos": {},
    }
    for label, photo in enrolment_photos().items():
        faces = embedder.analyze(photo)  # warm-up
        times = []
        for _ in range(runs):
            began = time.perf_counter()
            faces = embedder.analyze(photo)
            times.append(time.perf_counter() - began)
        mean = float(np.mean(times))
        result["photos"][label] = {
            "size": f"{photo.shape[1]}x{photo.shape[0]}",
            "faces_found": len(faces),
            "runs": runs,
            "mean_s": round(mean, 4),
            "p50_s": round(float(np.median(times)), 4),
            "max_s": round(float(np.max(times)), 4),
            # a photo where no face was found was never embedded: its time is not an enrolment
            "goal_met": bool(faces) and mean <= GOALS["enrol_s"],
        }
        log(f"  enrolment {label}: {result['photos'][label]}")
    return result


def judge(figures: dict, p95_goal: float) -> dict:
    return {
        **figures,
        "goal": f"p95 <= {p95_goal:g} ms and identity recall >= {GOALS['identity_recall']}",
        "goal_met": figures["p95_ms"] <= p95_goal and figures["identity_recall"] >= GOALS["identity_recall"],
    }


def run_size(args, size: int, runner: SqlRunner, conn, shapes: dict, out: dict, save) -> dict:
    """Measure one size into `out`, calling `save()` after each figure so an interrupted run keeps them."""
    log(f"=== {size} reference embeddings ===")
    began = time.perf_counter()
    data, queries_by_scope = make_dataset(size, args.seed + size, args.queries)
    gen_s = time.perf_counter() - began
    log(
        f"generated {data.rows} rows / {len(data.identities)} identities / "
        f"{int(data.tenant_of_identity.max())} tenants in {gen_s:.1f}s"
    )
    scopes = build_scopes(data, queries_by_scope)
    log("exact ground truth computed")
    out.update(
        {
            "references": data.rows,
            "characters": len(data.identities),
            "tenants": int(data.tenant_of_identity.max()),
            "generate_s": round(gen_s, 1),
            "data": similarity_stats(data, np.random.default_rng(args.seed)),
            "scopes": {
                name: {"tenant_id": s.tenant, "characters": s.characters, "references": s.references}
                for name, s in scopes.items()
            },
        }
    )
    if args.faiss_only:
        out["faiss_hnsw_flat"] = measure_faiss(data, scopes["global"], args.ef, args.queries, args.faiss_threads)
        return out
    out["load"] = {k: round(v, 2) for k, v in load(conn, data).items()}
    hnsw = {}
    for table, key in (("characters_faceembedding", "reference"), ("characters_characteridentity", "identity")):
        _, seconds = build_hnsw(conn, table, args.maintenance_work_mem, args.parallel_workers)
        hnsw[f"{key}_build_s"] = round(seconds, 2)
    out["hnsw_build"] = hnsw
    out["relation_mb"] = relation_sizes(conn)
    save()
    n, n_exact = args.queries, min(args.queries, args.exact_queries)
    efs = args.ef

    def sql_row(label: str, scope: str, shape: str, table: str = "reference", count: int = n, **kw) -> dict:
        figures = measure_sql(runner, data, scopes[scope], shapes[shape], table=table, n=count, **kw)
        log(f"  {label}: {figures}")
        save()
        return figures

    g = out["global_reference_hnsw"] = {}
    for ef in efs:
        g[str(ef)] = judge(sql_row(f"global refs ef {ef}", "global", "reference_global", ef=ef), GOALS["global_p95_ms"])
    out["global_reference_exact"] = sql_row(
        "global refs exact", "global", "reference_global_exact", ef=100, count=n_exact, warmup=2
    )
    t = out["tenant_reference_hnsw"] = {}
    for role in ("big", "medium", "small"):
        t[role] = {}
        for ef in efs:
            t[role][str(ef)] = judge(
                sql_row(f"{role} tenant refs ef {ef}", role, "reference_tenant", ef=ef), GOALS["tenant_p95_ms"]
            )
    t["big"]["100_iterative_scan_off"] = sql_row(
        "big tenant refs ef 100, iterative_scan off", "big", "reference_tenant", ef=100, iterative="off"
    )
    e = out["tenant_reference_exact"] = {}
    for role in ("big", "medium", "small"):
        e[role] = judge(
            sql_row(f"{role} tenant refs exact", role, "reference_tenant_exact", ef=100), GOALS["tenant_p95_ms"]
        )
    i = out["identity_table"] = {"global_hnsw": {}, "tenant_hnsw": {}, "tenant_exact": {}}
    for ef in efs:
        i["global_hnsw"][str(ef)] = judge(
            sql_row(f"global identities ef {ef}", "global", "identity_global", "identity", ef=ef),
            GOALS["global_p95_ms"],
        )
    i["global_exact"] = sql_row(
        "global identities exact", "global", "identity_global_exact", "identity", count=n_exact, ef=100, warmup=2
    )
    for role in ("big", "medium", "small"):
        i["tenant_hnsw"][role] = {
            str(ef): judge(
                sql_row(f"{role} tenant identities ef {ef}", role, "identity_tenant", "identity", ef=ef),
                GOALS["tenant_p95_ms"],
            )
            for ef in efs
        }
        i["tenant_exact"][role] = judge(
            sql_row(f"{role} tenant identities exact", role, "identity_tenant_exact", "identity", ef=100),
            GOALS["tenant_p95_ms"],
        )
    if not args.skip_faiss:
        out["faiss_hnsw_flat"] = measure_faiss(data, scopes["global"], efs, n, args.faiss_threads)

    alternatives = out["alternatives"] = {}
    for alt in args.alternatives:
        variant = {"halfvec": {"kind": "halfvec"}, "m32": {"m": 32, "ef_construction": 128}}[alt]
        conn.execute(f"DROP INDEX IF EXISTS {hnsw_sql('characters_faceembedding')[0]}")
        for other in alternatives.values():
            conn.execute(f"DROP INDEX IF EXISTS {other['index']}")
        name, seconds = build_hnsw(
            conn, "characters_faceembedding", args.maintenance_work_mem, args.parallel_workers, **variant
        )
        suffix = "_halfvec" if alt == "halfvec" else ""
        a = alternatives[alt] = {
            "index": name,
            "variant": variant,
            "build_s": round(seconds, 2),
            "global": {},
            "big_tenant": {},
            "medium_tenant": {},
            "index_mb": relation_sizes(conn).get(name),
        }
        for ef in efs:
            a["global"][str(ef)] = judge(
                sql_row(f"{alt} global refs ef {ef}", "global", f"reference_global{suffix}", ef=ef),
                GOALS["global_p95_ms"],
            )
            for role in ("big", "medium"):
                a[f"{role}_tenant"][str(ef)] = judge(
                    sql_row(f"{alt} {role} tenant refs ef {ef}", role, f"reference_tenant{suffix}", ef=ef),
                    GOALS["tenant_p95_ms"],
                )
    if not args.keep_tables:
        conn.execute("DROP TABLE IF EXISTS characters_faceembedding, characters_characteridentity")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="reference embeddings per run, comma-separated")
    parser.add_argument("--queries", type=int, default=200, help="timed queries per configuration")
    parser.add_argument("--exact-queries", type=int, default=50, help="queries for the global exact scans")
    parser.add_argument("--ef", default="40,100,200,400", help="hnsw.ef_search / FAISS efSearch values")
    parser.add_argument("--alternatives", default="", help="extra index builds to measure: halfvec,m32")
    parser.add_argument("--pgdata", default="/tmp/bench-pgdata")
    parser.add_argument("--dbname", default="bench")
    parser.add_argument("--maintenance-work-mem", default="4GB")
    parser.add_argument(
        "--parallel-workers",
        type=int,
        default=max((os.cpu_count() or 2) - 1, 1),
        help="max_parallel_maintenance_workers (the leader works too)",
    )
    parser.add_argument("--faiss-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=20261126)
    parser.add_argument("--enrol-runs", type=int, default=10)
    parser.add_argument("--skip-enrol", action="store_true")
    parser.add_argument("--skip-faiss", action="store_true")
    parser.add_argument("--faiss-only", action="store_true", help="generate the data and measure FAISS only")
    parser.add_argument("--keep-tables", action="store_true", help="leave the last size's tables in the database")
    parser.add_argument("--json-out", type=Path, help="also write the JSON document here")
    args = parser.parse_args(argv)
    args.ef = [int(v) for v in args.ef.split(",") if v]
    args.alternatives = [v for v in args.alternatives.split(",") if v]
    unknown = set(args.alternatives) - {"halfvec", "m32"}
    if unknown:
        parser.error(f"unknown alternatives: {', '.join(sorted(unknown))}")
    if Path(args.pgdata).resolve() == (ROOT / ".alkemy" / "pgdata").resolve():
        parser.error("--pgdata must not be the project's own data directory")
    sizes = [int(v) for v in args.sizes.split(",") if v]

    from characters.search import vector_literal

    result: dict = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        },
        "settings": {
            "embedder": EMBEDDER,
            "dims": DIMS,
            "top_k": TOP_K,
            "noise_scale": NOISE,
            "queries": args.queries,
            "ef_search": args.ef,
            "goals": GOALS,
        },
        "sizes": {},
    }
    if not args.skip_enrol:
        result["enrolment"] = measure_enrolment(args.enrol_runs)

    server, conn = connect(args.pgdata, args.dbname)
    result["postgres"] = {
        "pgdata": str(server.pgdata),
        "version": conn.execute("SHOW server_version").fetchone()[0],
        "pgvector": conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0],
        **{
            g: conn.execute(f"SHOW {g}").fetchone()[0]
            for g in ("shared_buffers", "work_mem", "effective_cache_size", "max_parallel_workers_per_gather", "jit")
        },
        "maintenance_work_mem_for_builds": args.maintenance_work_mem,
        "max_parallel_maintenance_workers": args.parallel_workers,
    }
    runner = SqlRunner(conn, vector_literal)
    shapes = query_shapes()
    result["sql"] = {k: v for k, v in shapes.items() if k in ("reference_tenant", "reference_global_exact")}

    def save() -> None:  # keep what was measured even if the run is interrupted
        result["elapsed_s"] = round(time.monotonic() - _started, 1)
        if args.json_out:
            args.json_out.write_text(json.dumps(result, indent=2) + "\n")

    try:
        for size in sizes:
            run_size(args, size, runner, conn, shapes, result["sizes"].setdefault(str(size), {}), save)
            save()
    finally:
        save()
        conn.close()
    result["elapsed_s"] = round(time.monotonic() - _started, 1)
    text = json.dumps(result, indent=2)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
