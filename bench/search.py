"""Face-search benchmark: the production search (`characters/search.py`) at 100k / 1M references.

Standalone: it starts its own embedded PostgreSQL 18 + pgvector in `--pgdata` (never the test
server's data directory), creates `characters_faceembedding` and `characters_characteridentity`
there with the production columns, storage and B-trees (migrations 0002-0007), loads synthetic
ArcFace-like identities with binary COPY, builds the per-tenant HNSW indexes with production's
`sync_tenant_indexes`, and times production's own search functions (`search_references`,
`search_identities`, `search_platform`) on a psycopg connection: the same SQL, plan choice and
settings as the service. Every row is labelled with the plan it actually ran (checked by EXPLAIN).

    cd /work/main && PYTHONPATH=. .venv/bin/python bench/search.py --sizes 100000

The loaded tables stay in `--pgdata` with the parameters that made them; a later run with the same
size, seed and generator reuses them (`--reload` forces a new load). Progress goes to stderr, one
JSON document with every figure to stdout (and `--json-out`). See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

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
#: anisotropic generator: variance of component i (of a random rotation) ~ (i+1)^-ALPHA, mean 1, for
#: centres and noise alike; strangers then score ~0 +- 0.09 (ArcFace impostor scores spread like that)
ALPHA = 0.7
GOALS = {
    "tenant_p95_ms": 10.0,
    "platform_p95_ms": 50.0,
    "platform_stretch_p95_ms": 20.0,
    "identity_recall": 0.99,
    "platform_identity_recall": 0.95,
    "build_s": 900.0,
    "enrol_s": 0.15,
}
PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
INSERT_ID_BASE = 1_000_000_000  # rows of the concurrent insert stream (deleted afterwards)

_started = time.monotonic()
_shape: dict = {"generator": "isotropic", "scale": None, "rotation": None}


def log(message: str) -> None:
    print(f"[{time.monotonic() - _started:7.1f}s] {message}", file=sys.stderr, flush=True)


def set_generator(name: str, seed: int) -> None:
    _shape["generator"] = name
    if name == "anisotropic":
        spectrum = (np.arange(DIMS) + 1.0) ** -ALPHA
        spectrum *= DIMS / spectrum.sum()
        rotation, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((DIMS, DIMS)))
        _shape["scale"] = np.sqrt(spectrum).astype(np.float32)
        _shape["rotation"] = rotation.astype(np.float32)


def _shaped(z: np.ndarray) -> np.ndarray:
    """Isotropic Gaussian rows, or the anisotropic generator's power-law spectrum in a random basis."""
    if _shape["generator"] == "isotropic":
        return z
    return (z * _shape["scale"]) @ _shape["rotation"]


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------


def normalise(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def noisy(rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    """One fresh "photo" per row of `centres` (unit vectors), float32 and unit length."""
    scale = rng.uniform(*NOISE, size=(len(centres), 1)).astype(np.float32)
    noise = _shaped(rng.standard_normal(centres.shape, dtype=np.float32)) / np.float32(np.sqrt(DIMS))
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
        centres = normalise(_shaped(rng.standard_normal((hi - lo, DIMS), dtype=np.float32)))
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


# --------------------------------------------------------------------------------------------
# PostgreSQL: the production schema
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
    raw_norm double precision NULL,
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
#: migration 0007's storage and generated column (run before COPY so the rows are written that way)
STORAGE_SQL = [
    "ALTER TABLE characters_faceembedding ALTER COLUMN embedding SET STORAGE MAIN",
    "ALTER TABLE characters_characteridentity ADD COLUMN embedding_bits varbit "
    "GENERATED ALWAYS AS (binary_quantize(embedding)::varbit) STORED",
]
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
META_DDL = "CREATE TABLE IF NOT EXISTS bench_meta (key text PRIMARY KEY, value jsonb NOT NULL)"


def connect(pgdata: str, dbname: str):
    import psycopg

    from alkemy.embedded_db import ensure_database, ensure_server

    server = ensure_server(pgdata)
    ensure_database(server, dbname)

    def open_connection():
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
        return conn

    conn = open_connection()
    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    return server, conn, open_connection


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
        with tqdm(total=total, unit="row", desc=f"COPY {table}", file=sys.stderr, unit_scale=True) as bar:
            for lo in range(0, total, chunk):
                hi = min(lo + chunk, total)
                fields, values = build_chunk(lo, hi)
                copy.write(_binary_copy(fields, values, hi - lo))
                bar.update(hi - lo)
        copy.write(struct.pack(">h", -1))
    return time.perf_counter() - began


def load(conn, data: Dataset) -> dict:
    emb = EMBEDDER.encode()
    stamp = int((dt.datetime.now(dt.UTC) - PG_EPOCH).total_seconds() * 1_000_000)
    with conn.cursor() as cur:
        for table in ("characters_faceembedding", "characters_characteridentity", "characters_identity_log_state",
                      "characters_identity_log"):  # fmt: skip
            cur.execute(f"DROP TABLE IF EXISTS {table}")
        cur.execute("DROP FUNCTION IF EXISTS characters_identity_logged()")
        cur.execute(REFERENCE_DDL)
        cur.execute(IDENTITY_DDL)
        for statement in STORAGE_SQL:
            cur.execute(statement)

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


def ensure_identity_log(conn) -> None:
    """Migration 0009's identity log and its triggers, after the load (as on a database migrated with rows in
    it): the platform-wide search keeps its codes current from it (characters/platform_codes.py)."""
    import importlib

    if conn.execute("SELECT to_regclass('characters_identity_log')").fetchone()[0] is None:
        conn.execute(importlib.import_module("characters.migrations.0009_identity_change_log").FORWARD)


def dataset_key(args, size: int) -> dict:
    key = {"size": size, "seed": args.seed + size, "generator": args.generator, "alpha": ALPHA, "noise": NOISE}
    return json.loads(json.dumps(key))  # as it comes back from jsonb


def loaded_key(conn) -> dict | None:
    conn.execute(META_DDL)
    row = conn.execute("SELECT value FROM bench_meta WHERE key = 'dataset'").fetchone()
    return row[0] if row else None


def set_loaded_key(conn, key: dict | None) -> None:
    conn.execute("DELETE FROM bench_meta WHERE key = 'dataset'")
    if key is not None:
        conn.execute("INSERT INTO bench_meta VALUES ('dataset', %s)", [json.dumps(key)])


def tenant_indexes(conn) -> dict[str, float]:
    rows = conn.execute(
        "SELECT c.relname, pg_relation_size(c.oid) FROM pg_class c WHERE c.relkind = 'i' "
        "AND (c.relname LIKE 'faceemb\\_t%%' OR c.relname LIKE 'identity\\_t%%') ORDER BY 1"
    ).fetchall()
    return {name: round(size / 2**20, 2) for name, size in rows}


def build_indexes(conn, args) -> dict:
    """Production's `sync_tenant_indexes` (the migration / schedule / command path), timed."""
    from characters.search import TABLES, min_rows, sync_tenant_indexes

    if args.rebuild_indexes:
        for name in tenant_indexes(conn):
            conn.execute(f"DROP INDEX {name}")
    conn.execute(f"SET maintenance_work_mem = '{args.maintenance_work_mem}'")
    conn.execute(f"SET max_parallel_maintenance_workers = {int(args.parallel_workers)}")
    log(f"sync_tenant_indexes (thresholds {min_rows()})")
    began = time.perf_counter()
    with conn.cursor() as cur:
        report = sync_tenant_indexes(cur, concurrently=False)
    seconds = time.perf_counter() - began
    conn.execute("RESET maintenance_work_mem")
    for table in TABLES.values():
        conn.execute(f"ANALYZE {table}")
    sizes = tenant_indexes(conn)
    log(f"  created {len(report.created)}, kept {len(report.kept)} in {seconds:.1f}s")
    return {
        "seconds": round(seconds, 1),
        "created": len(report.created),
        "kept": len(report.kept),
        "thresholds": min_rows(),
        "indexes": len(sizes),
        "index_mb_total": round(sum(sizes.values()), 1),
        "largest_mb": sorted(sizes.items(), key=lambda kv: -kv[1])[:3],
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def relation_sizes(conn) -> dict:
    rows = conn.execute(
        "SELECT c.relname, pg_relation_size(c.oid), pg_total_relation_size(c.oid) FROM pg_class c "
        "WHERE c.relname IN ('characters_faceembedding', 'characters_characteridentity')"
    ).fetchall()
    return {name: {"heap_mb": round(h / 2**20, 1), "total_mb": round(t / 2**20, 1)} for name, h, t in rows}


# --------------------------------------------------------------------------------------------
# Ground truth and measurement
# --------------------------------------------------------------------------------------------


@dataclass
class Scope:
    name: str
    tenant: int | None
    characters: int
    references: int
    query_ids: np.ndarray  # identity index of each query (character id - 1)
    queries: np.ndarray
    exact: dict[str, list[list[int]]] = field(default_factory=dict)  # table -> exact top-10 character ids


def _top(scores: np.ndarray, ids: np.ndarray, k: int = TOP_K) -> list[list[int]]:
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(scores, part, axis=1).argsort(axis=1)[:, ::-1]
    return [ids[row].tolist() for row in np.take_along_axis(part, order, axis=1)]


def build_scopes(data: Dataset, queries_by_scope: dict) -> dict[str, Scope]:
    scopes = {}
    for name, (ids, queries) in queries_by_scope.items():
        tenant = None if name == "global" else data.tenants[name]
        members = (
            np.arange(len(data.identities)) if tenant is None else np.flatnonzero(data.tenant_of_identity == tenant)
        )
        scope = Scope(name, tenant, len(members), int(data.ref_count[members].sum()), ids, queries)
        exact_ident = []
        for lo in range(0, len(queries), 50):
            exact_ident += _top(queries[lo : lo + 50] @ data.identities[members].T, members + 1)
        scope.exact["identity"] = exact_ident
        if tenant is not None:  # best reference per character, over the tenant's rows
            rows = np.flatnonzero(data.tenant_of_row == tenant)
            owners = data.identity_of_row[rows]
            starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
            best = np.maximum.reduceat(queries @ data.vectors[rows].T, starts, axis=1)
            scope.exact["faceemb"] = _top(best, owners[starts] + 1)
        scopes[name] = scope
    return scopes


def percentiles(latencies: list[float]) -> dict:
    ms = np.asarray(latencies) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "max_ms": round(float(ms.max()), 2),
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


def explain(conn, table: str, scope: Scope) -> dict:
    """What production runs for this scope: its strategy, and the plan PostgreSQL makes of it."""
    from characters import search

    with conn.cursor() as cur:
        query = search.vector_literal(scope.queries[0])
        if scope.tenant is None:  # the codes scanned in this process (characters/platform_codes.py), then SQL
            ids = search.platform_codes.shortlist(
                cur, embedder=EMBEDDER, dims=len(scope.queries[0]), vector=scope.queries[0],
                size=search.PLATFORM_SHORTLIST,
            )  # fmt: skip
            assert ids is not None, "the platform-wide search must run from memory here"
            cur.execute(
                "EXPLAIN (FORMAT JSON) " + search.rerank_sql(EMBEDDER), {"query": query, "ids": ids, "limit": TOP_K}
            )
            info = {"strategy": "platform", "index": "codes in memory, re-rank of the shortlist"}
        else:
            plan = search.plan_search(cur, table=table, tenant_id=scope.tenant, embedder=EMBEDDER)
            cur.execute("; ".join(plan.settings))
            cur.execute("EXPLAIN (FORMAT JSON) " + plan.sql, {"query": query, "exclude": None, "candidates": 50})
            info = {"strategy": plan.strategy, "index": plan.index}
        text = describe_plan(cur.fetchone()[0][0]["Plan"])
    conn.rollback()
    if info["strategy"] == "hnsw":  # the row must measure what it names
        assert f"using {info['index']}" in text, text
    if info["strategy"] == "exact":
        assert "using faceemb_t" not in text and "using identity_t" not in text, text
    return {**info, "plan": text}


def _process_cpu_s(pid: int) -> float:
    """utime + stime of a process (the PostgreSQL backend serving the connection)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(conn, table: str, scope: Scope, n: int, warmup: int = 5, label: str = "") -> dict:
    """Production's search function for `table` ("faceemb": references, "identity"; global scope:
    the platform-wide search), one query per transaction, execute + fetch + Python timed."""
    from characters import search

    queries, ids = scope.queries[:n], scope.query_ids[:n]
    backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    conn.autocommit = False
    try:
        plan = explain(conn, table, scope)
        latencies, found = [], []
        with conn.cursor() as cur:
            for i, q in enumerate(list(queries[:warmup]) + list(queries)):
                if i == min(warmup, len(queries)):
                    cpu = (_process_cpu_s(backend), time.thread_time())
                began = time.perf_counter()
                if scope.tenant is None:
                    result = search.search_platform(cur, embedder=EMBEDDER, vector=q, limit=TOP_K)
                elif table == "faceemb":
                    result = search.search_references(
                        cur, tenant_id=scope.tenant, embedder=EMBEDDER, vector=q, limit=TOP_K
                    )
                else:
                    result = search.search_identities(
                        cur, tenant_id=scope.tenant, embedder=EMBEDDER, vector=q, limit=TOP_K
                    )
                elapsed = time.perf_counter() - began
                conn.commit()
                if i >= min(warmup, len(queries)):
                    latencies.append(elapsed)
                    found.append([r.character_id for r in result])
            server_cpu, client_cpu = _process_cpu_s(backend) - cpu[0], time.thread_time() - cpu[1]
    finally:
        conn.rollback()
        conn.autocommit = True
    exact = scope.exact["identity" if scope.tenant is None else table][:n]
    right = ids + 1
    figures = {
        "queries": len(latencies),
        **percentiles(latencies),
        # CPU time per query of the backend and of this thread: what the latency would be on an idle
        # machine (less I/O waits); wall-clock latencies on the shared 2 cores include waiting for a core
        "server_cpu_ms": round(server_cpu * 1000 / len(latencies), 2),
        "client_cpu_ms": round(client_cpu * 1000 / len(latencies), 2),
        # the query's own character among the 10 returned characters / first
        "identity_recall": round(float(np.mean([r in f for f, r in zip(found, right, strict=True)])), 4),
        "top1_correct": round(float(np.mean([bool(f) and f[0] == r for f, r in zip(found, right, strict=True)])), 4),
        "recall_at_10": round(
            float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact, strict=True)])), 4
        ),
        **plan,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    log(f"  {label or scope.name + ' ' + table}: {figures}")
    return figures


def judge(figures: dict, p95_goal: float, recall_goal: float) -> dict:
    return {
        **figures,
        "goal": f"p95 <= {p95_goal:g} ms and identity recall >= {recall_goal}",
        "goal_met": figures["p95_ms"] <= p95_goal and figures["identity_recall"] >= recall_goal,
    }


class InsertStream:
    """One connection enrolling while searches are measured: each step inserts a reference embedding (big,
    medium, small and random tenants in turn) and writes its character's identity (a new character, or
    another reference of one the stream made: the identity moves), as enrolment does. As fast as it can, or
    at most `rate` steps a second; the rows are deleted after."""

    def __init__(self, open_connection, data: Dataset, seed: int, rate: float = 0) -> None:
        self.conn = open_connection()
        self.data = data
        self.rate_cap = rate
        self.rng = np.random.default_rng(seed)
        self.stop = threading.Event()
        self.count = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from characters.search import vector_literal

        data, tenants = self.data, [self.data.tenants[r] for r in ("big", "medium", "small")]
        n_ident = len(data.identities)
        while not self.stop.is_set():
            tenant = (
                tenants[self.count % 4]
                if self.count % 4 < 3
                else int(self.rng.integers(2, data.tenant_of_identity.max()))
            )
            identity = int(self.rng.integers(0, n_ident))
            vector = noisy(self.rng, data.identities[identity : identity + 1])[0]
            row, character = INSERT_ID_BASE + self.count, INSERT_ID_BASE + identity
            with self.conn.transaction():
                self.conn.execute(
                    "INSERT INTO characters_faceembedding (id, tenant_id, character_id, reference_id, embedder, "
                    "dims, embedding, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s::vector, now())",
                    [row, tenant, character, row, EMBEDDER, DIMS, vector_literal(vector)],
                )
                self.conn.execute(
                    "INSERT INTO characters_characteridentity AS i (id, tenant_id, character_id, embedder, dims, "
                    "embedding, reference_count, updated_at) VALUES (%s, %s, %s, %s, %s, %s::vector, 1, now()) "
                    "ON CONFLICT (character_id, embedder) DO UPDATE SET embedding = EXCLUDED.embedding, "
                    "reference_count = i.reference_count + 1, updated_at = now()",
                    [row, tenant, character, EMBEDDER, DIMS, vector_literal(vector)],
                )
            self.count += 1
            if self.rate_cap:
                time.sleep(max(0.0, self.began + self.count / self.rate_cap - time.perf_counter()))

    def __enter__(self):
        self.began = time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.rate = self.count / (time.perf_counter() - self.began)
        self.conn.execute(f"DELETE FROM characters_faceembedding WHERE id >= {INSERT_ID_BASE}")
        self.conn.execute(f"DELETE FROM characters_characteridentity WHERE id >= {INSERT_ID_BASE}")
        self.conn.execute("VACUUM characters_faceembedding")
        self.conn.execute("VACUUM characters_characteridentity")
        self.conn.close()


def measure_bit_hnsw(conn, args, scope: Scope, n: int) -> dict:
    """Alternative (bench-only SQL): HNSW over the identities' binary codes (Hamming), shortlist re-ranked
    at full precision, instead of production's exact Hamming scan."""
    from characters.search import PLATFORM_SHORTLIST, vector_literal

    name = "identity_bits_hnsw_bench"
    conn.execute(f"SET maintenance_work_mem = '{args.maintenance_work_mem}'")
    conn.execute(f"SET max_parallel_maintenance_workers = {int(args.parallel_workers)}")
    log(f"building {name}")
    began = time.perf_counter()
    conn.execute(
        f"CREATE INDEX IF NOT EXISTS {name} ON characters_characteridentity USING hnsw "
        f"((embedding_bits::bit({DIMS})) bit_hamming_ops) WITH (m = 16, ef_construction = 64) "
        f"WHERE embedder = '{EMBEDDER}'"
    )
    out: dict = {"build_s": round(time.perf_counter() - began, 1), "by_ef_search": {}}
    log(f"  {out['build_s']}s")
    sql = (
        f"SELECT tenant_id, character_id, 1 - (embedding::vector({DIMS}) <=> %(query)s::vector({DIMS})) AS s "
        f"FROM characters_characteridentity WHERE id = ANY(ARRAY(SELECT id FROM characters_characteridentity "
        f"WHERE embedder = '{EMBEDDER}' ORDER BY embedding_bits::bit({DIMS}) <~> "
        f"binary_quantize(%(query)s::vector({DIMS}))::bit({DIMS}) LIMIT %(shortlist)s)) ORDER BY s DESC LIMIT 10"
    )
    for ef in args.bit_hnsw_ef:
        latencies, found = [], []
        conn.autocommit = False
        with conn.cursor() as cur:
            for i, q in enumerate(list(scope.queries[:5]) + list(scope.queries[:n])):
                began = time.perf_counter()
                cur.execute(
                    f"SET LOCAL hnsw.ef_search = {int(ef)}; " + sql,
                    {"query": vector_literal(q), "shortlist": max(PLATFORM_SHORTLIST, ef)},
                )
                cur.nextset()
                rows = cur.fetchall()
                elapsed = time.perf_counter() - began
                conn.commit()
                if i >= 5:
                    latencies.append(elapsed)
                    found.append([int(r[1]) for r in rows])
        conn.autocommit = True
        right = scope.query_ids[:n] + 1
        figures = {
            **percentiles(latencies),
            "identity_recall": round(float(np.mean([r in f for f, r in zip(found, right, strict=True)])), 4),
            "loadavg_1m": round(os.getloadavg()[0], 2),
        }
        out["by_ef_search"][str(ef)] = figures
        log(f"  bit HNSW ef {ef}: {figures}")
    conn.execute(f"DROP INDEX {name}")
    return out


def measure_bit_tenant(conn, args, scopes: dict[str, Scope], n: int) -> dict:
    """Alternative (bench-only SQL): per-tenant HNSW over binary codes of the reference vectors (an
    expression index, Hamming), a shortlist re-ranked at full precision, best reference per character."""
    from characters.search import vector_literal

    conn.execute(f"SET maintenance_work_mem = '{args.maintenance_work_mem}'")
    conn.execute(f"SET max_parallel_maintenance_workers = {int(args.parallel_workers)}")
    code = f"(binary_quantize(embedding::vector({DIMS}))::bit({DIMS}))"
    out: dict = {}
    for role in ("big", "medium"):
        tenant = scopes[role].tenant
        name = f"faceemb_bits_t{tenant}_bench"
        began = time.perf_counter()
        conn.execute(
            f"CREATE INDEX IF NOT EXISTS {name} ON characters_faceembedding USING hnsw ({code} bit_hamming_ops) "
            f"WITH (m = 16, ef_construction = 64) WHERE embedder = '{EMBEDDER}' AND tenant_id = {tenant}"
        )
        result = out[role] = {"build_s": round(time.perf_counter() - began, 1), "by_ef_search": {}}
        log(f"  {name}: {result['build_s']}s")
        sql = (
            f"SELECT character_id, reference_id, 1 - (embedding::vector({DIMS}) <=> %(query)s::vector({DIMS})) AS s "
            f"FROM characters_faceembedding WHERE id = ANY(ARRAY(SELECT id FROM characters_faceembedding "
            f"WHERE embedder = '{EMBEDDER}' AND tenant_id = {tenant} ORDER BY {code} <~> "
            f"binary_quantize(%(query)s::vector({DIMS}))::bit({DIMS}) LIMIT %(shortlist)s)) ORDER BY s DESC LIMIT 50"
        )
        scope = scopes[role]
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        for ef in args.bit_tenant_ef:
            latencies, found = [], []
            conn.autocommit = False
            with conn.cursor() as cur:
                for i, q in enumerate(list(scope.queries[:5]) + list(scope.queries[:n])):
                    if i == 5:
                        cpu = _process_cpu_s(backend)
                    began = time.perf_counter()
                    cur.execute(
                        "SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off; "
                        f"SET LOCAL hnsw.ef_search = {int(ef)}; " + sql,
                        {"query": vector_literal(q), "shortlist": 100},
                    )
                    while cur.description is None and cur.nextset():
                        pass
                    rows = cur.fetchall()
                    best: list[int] = []
                    for character, _, _ in rows:
                        if character not in best:
                            best.append(int(character))
                    elapsed = time.perf_counter() - began
                    conn.commit()
                    if i >= 5:
                        latencies.append(elapsed)
                        found.append(best[:TOP_K])
                server_cpu = _process_cpu_s(backend) - cpu
            conn.autocommit = True
            right = scope.query_ids[:n] + 1
            figures = {
                **percentiles(latencies),
                "server_cpu_ms": round(server_cpu * 1000 / len(latencies), 2),
                "identity_recall": round(float(np.mean([r in f for f, r in zip(found, right, strict=True)])), 4),
                "loadavg_1m": round(os.getloadavg()[0], 2),
            }
            result["by_ef_search"][str(ef)] = figures
            log(f"  bit HNSW {role} tenant ef {ef}: {figures}")
        conn.execute(f"DROP INDEX {name}")
    return out


def run_size(args, size: int, conn, open_connection, out: dict, save) -> dict:
    """Measure one size into `out`, calling `save()` after each figure so an interrupted run keeps them."""
    from characters import search

    log(f"=== {size} reference embeddings ({args.generator}) ===")
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
            "generator": args.generator,
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
    key = dataset_key(args, size)
    if args.reload or loaded_key(conn) != key:
        set_loaded_key(conn, None)
        out["load"] = {k: round(v, 2) for k, v in load(conn, data).items()}
        set_loaded_key(conn, key)
    else:
        log("tables already hold this dataset: reusing them")
        out["load"] = "reused"
    ensure_identity_log(conn)
    out["index_build"] = build_indexes(conn, args)
    out["relation_mb"] = relation_sizes(conn)
    save()
    if args.prewarm:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        began = time.perf_counter()
        for name in tenant_indexes(conn):
            conn.execute("SELECT pg_prewarm(%s)", [name])
        # the heaps into the OS page cache ('read': they need not fit shared_buffers), as on a server
        # that has been answering searches; generating the dataset in numpy just before evicts them
        for table in ("characters_faceembedding", "characters_characteridentity"):
            conn.execute("SELECT pg_prewarm(%s, 'read')", [table])
        out["prewarm_s"] = round(time.perf_counter() - began, 1)
    n = args.queries
    tenant_goal, recall_goal = GOALS["tenant_p95_ms"], GOALS["identity_recall"]
    rows = out["production"] = {}
    for _repeat in range(args.repeats):
        for role in ("big", "medium", "small"):
            for table in ("faceemb", "identity"):
                figures = judge(measure(conn, table, scopes[role], n), tenant_goal, recall_goal)
                rows.setdefault(f"{role} tenant {table}", []).append(figures)
                save()
        figures = measure(conn, "identity", scopes["global"], n)
        figures = {
            **judge(figures, GOALS["platform_p95_ms"], GOALS["platform_identity_recall"]),
            "stretch_met": figures["p95_ms"] <= GOALS["platform_stretch_p95_ms"]
            and figures["identity_recall"] >= recall_goal,
        }
        rows.setdefault("platform", []).append(figures)
        save()
    if args.bit_hnsw_ef:
        out["alternative_platform_bit_hnsw"] = measure_bit_hnsw(conn, args, scopes["global"], n)
        save()
    if args.bit_tenant_ef:
        out["alternative_tenant_bit_hnsw"] = measure_bit_tenant(conn, args, scopes, n)
        save()
    if not args.skip_sweeps:
        sweep = out["ef_sweep"] = {}
        production_ef = dict(search.EF_SEARCH)
        valid_index = search._valid_index
        try:
            # the reference search of big and medium tenants goes through their identity graph: its ef
            for ef in args.ef:
                search.EF_SEARCH = {**production_ef, "identity": ef}
                for role in ("big", "medium"):
                    sweep[f"{role} tenant faceemb, identity ef {ef}"] = measure(
                        conn, "faceemb", scopes[role], n, label=f"{role} identity ef {ef}"
                    )
                    save()
            search.EF_SEARCH = production_ef
            # the one-stage alternative: the reference graph alone (what production ran before)
            search._valid_index = lambda cursor, name: not name.startswith("identity_") and valid_index(cursor, name)
            for role in ("big", "medium"):  # only where a reference graph was built (thresholds)
                index = search.tenant_index_name("faceemb", scopes[role].tenant, EMBEDDER)
                if index in tenant_indexes(conn):
                    sweep[f"{role} tenant faceemb, reference graph ef {production_ef['faceemb']}"] = measure(
                        conn, "faceemb", scopes[role], n, label=f"{role} reference graph"
                    )
                    save()
        finally:
            search.EF_SEARCH = production_ef
            search._valid_index = valid_index
        forced = out["forced_exact"] = {}
        valid_index = search._valid_index
        search._valid_index = lambda cursor, name: False  # what the big tenants would cost without their index
        try:
            for role in ("big", "medium"):
                for table in ("faceemb", "identity"):
                    forced[f"{role} tenant {table}"] = measure(
                        conn, table, scopes[role], min(n, args.exact_queries), label=f"{role} {table} forced exact"
                    )
                    save()
        finally:
            search._valid_index = valid_index
    if args.concurrent_inserts:
        under = out["under_inserts"] = {}
        with InsertStream(open_connection, data, args.seed, rate=args.insert_rate) as stream:
            for role in ("big", "medium", "small"):
                under[f"{role} tenant faceemb"] = judge(
                    measure(conn, "faceemb", scopes[role], n, label=f"{role} refs under inserts"),
                    tenant_goal,
                    recall_goal,
                )
            under["platform"] = measure(conn, "identity", scopes["global"], n, label="platform under inserts")
        under["inserts_per_s"] = round(stream.rate, 1)  # enrolments: a reference and an identity write each
        under["insert_rate_cap"] = args.insert_rate or None
        log(f"  insert stream: {stream.rate:.1f} rows/s")
        save()
    return out


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000", help="reference embeddings per run, comma-separated")
    parser.add_argument("--generator", choices=("isotropic", "anisotropic"), default="isotropic")
    parser.add_argument("--queries", type=int, default=200, help="timed queries per configuration")
    parser.add_argument("--repeats", type=int, default=3, help="measure the production rows this many times")
    parser.add_argument("--exact-queries", type=int, default=50, help="queries for the forced exact scans")
    parser.add_argument("--ef", default="100,400", help="hnsw.ef_search values tried besides production's")
    parser.add_argument("--concurrent-inserts", action="store_true", help="also measure under an insert stream")
    parser.add_argument(
        "--insert-rate", type=float, default=0, help="enrolments a second of the insert stream (0: as fast as it can)"
    )
    parser.add_argument("--prewarm", action="store_true", help="pg_prewarm indexes; heaps into the OS cache")
    parser.add_argument("--bit-hnsw-ef", default="", help="alternative: Hamming HNSW over identity codes at these ef")
    parser.add_argument("--bit-tenant-ef", default="", help="alternative: per-tenant Hamming HNSW at these ef")
    parser.add_argument("--skip-sweeps", action="store_true", help="production rows (and alternatives) only")
    parser.add_argument("--pgdata", default="/tmp/bench-pgdata")
    parser.add_argument("--dbname", default="bench")
    parser.add_argument("--reload", action="store_true", help="load the data again even if the tables hold it")
    parser.add_argument(
        "--rebuild-indexes", action="store_true", help="drop the per-tenant indexes and time their build"
    )
    parser.add_argument("--maintenance-work-mem", default="1GB")
    parser.add_argument(
        "--parallel-workers",
        type=int,
        default=max((os.cpu_count() or 2) - 1, 1),
        help="max_parallel_maintenance_workers (the leader works too)",
    )
    parser.add_argument("--seed", type=int, default=20261126)
    parser.add_argument("--enrol-runs", type=int, default=10)
    parser.add_argument("--skip-enrol", action="store_true")
    parser.add_argument("--json-out", type=Path, help="also write the JSON document here")
    args = parser.parse_args(argv)
    args.ef = [int(v) for v in args.ef.split(",") if v]
    args.bit_hnsw_ef = [int(v) for v in args.bit_hnsw_ef.split(",") if v]
    args.bit_tenant_ef = [int(v) for v in args.bit_tenant_ef.split(",") if v]
    if Path(args.pgdata).resolve() == (ROOT / ".alkemy" / "pgdata").resolve():
        parser.error("--pgdata must not be the project's own data directory")
    sizes = [int(v) for v in args.sizes.split(",") if v]
    set_generator(args.generator, args.seed)

    # production's search module reads the embedder registry and ALKEMY_MAX_REFERENCES from settings
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "alkemy.settings")
    os.environ.setdefault("SECRET_KEY", "bench-only-secret-key")  # settings refuse to start without one
    import django

    django.setup()
    from characters import search

    result: dict = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "loadavg_at_start": [round(v, 2) for v in os.getloadavg()],
        },
        "settings": {
            "embedder": EMBEDDER,
            "dims": DIMS,
            "top_k": TOP_K,
            "noise_scale": NOISE,
            "generator": args.generator,
            "alpha": ALPHA if args.generator == "anisotropic" else None,
            "queries": args.queries,
            "production_ef_search": search.EF_SEARCH,
            "tenant_index_min_rows": search.min_rows(),
            "platform_shortlist": search.PLATFORM_SHORTLIST,
            "goals": GOALS,
        },
        "sizes": {},
    }
    if not args.skip_enrol:
        result["enrolment"] = measure_enrolment(args.enrol_runs)

    server, conn, open_connection = connect(args.pgdata, args.dbname)
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

    def save() -> None:  # keep what was measured even if the run is interrupted
        result["elapsed_s"] = round(time.monotonic() - _started, 1)
        if args.json_out:
            args.json_out.write_text(json.dumps(result, indent=2) + "\n")

    try:
        for size in sizes:
            run_size(args, size, conn, open_connection, result["sizes"].setdefault(str(size), {}), save)
            save()
    finally:
        save()
        conn.close()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
