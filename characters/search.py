"""Nearest-character search in pgvector.

Embeddings sit in one untyped `vector` column (full precision); each embedder has a partial
expression HNSW index over a half-precision cast,
`((embedding::halfvec(D)) halfvec_cosine_ops) WHERE embedder = '<name>'` (migration 0004 says
why). The queries below order by exactly that cast and predicate (as literals: both come from
the embedder registry, never from the request), or PostgreSQL cannot use the index; the
similarity of each returned row is computed at full precision.

Tenant filters run with `hnsw.iterative_scan = relaxed_order` (pgvector 0.8): the index keeps
scanning until enough rows of the tenant are found, so a small tenant inside a large database
still gets `limit` results. Relaxed order can return rows slightly out of order, so results are
re-sorted here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from django.conf import settings
from django.db import connection, transaction

from characters.faces import embedder_infos

#: candidates the HNSW scan keeps; bench/search.py: identity recall 0.99+ at 100k from 200 on
EF_SEARCH = 200


@dataclass(frozen=True)
class Neighbour:
    character_id: int
    reference_id: int | None
    similarity: float


def vector_literal(vector: np.ndarray) -> str:
    return "[" + ",".join(f"{float(v):.7g}" for v in vector) + "]"


def _checked(embedder: str) -> int:
    infos = embedder_infos()
    if embedder not in infos:
        raise ValueError(f"unknown embedder {embedder!r}")
    return infos[embedder].dims


def reference_search_sql(embedder: str, *, exclude_character: bool = False) -> str:
    """SQL of the per-reference nearest-neighbour query (also used by EXPLAIN in the tests)."""
    dims = _checked(embedder)
    exclude = "AND character_id <> %(exclude)s" if exclude_character else ""
    return (
        f"SELECT character_id, reference_id, {_similarity(dims)} AS similarity "
        f"FROM characters_faceembedding "
        f"WHERE embedder = '{embedder}' AND tenant_id = %(tenant)s {exclude} "
        f"ORDER BY {_index_distance(dims)} LIMIT %(candidates)s"
    )


def _index_distance(dims: int) -> str:
    """The expression the HNSW indexes are built on (migration 0004)."""
    return f"embedding::halfvec({dims}) <=> %(query)s::halfvec({dims})"


def _similarity(dims: int) -> str:
    return f"1 - (embedding::vector({dims}) <=> %(query)s::vector({dims}))"


def identity_search_sql(embedder: str) -> str:
    dims = _checked(embedder)
    return (
        f"SELECT character_id, NULL, {_similarity(dims)} AS similarity "
        f"FROM characters_characteridentity "
        f"WHERE embedder = '{embedder}' AND tenant_id = %(tenant)s AND character_id <> %(exclude)s "
        f"ORDER BY {_index_distance(dims)} LIMIT %(candidates)s"
    )


def _run(sql: str, params: dict) -> list[tuple]:
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
        cursor.execute(f"SET LOCAL hnsw.ef_search = {int(EF_SEARCH)}")
        cursor.execute(sql, params)
        return cursor.fetchall()


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
    params = {
        "query": vector_literal(vector),
        "tenant": tenant_id,
        "exclude": exclude_character_id,
        # each character has at most MAX_REFERENCES rows, so this many rows hold `limit` characters
        "candidates": limit * max(settings.ALKEMY_MAX_REFERENCES, 1),
    }
    rows = _run(reference_search_sql(embedder, exclude_character=exclude_character_id is not None), params)
    best: dict[int, Neighbour] = {}
    for character_id, reference_id, similarity in sorted(rows, key=lambda row: -row[2]):
        if character_id not in best:
            best[character_id] = Neighbour(character_id, reference_id, float(similarity))
    results = [n for n in best.values() if min_similarity is None or n.similarity >= min_similarity]
    return results[:limit]


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
    params = {
        "query": vector_literal(vector),
        "tenant": tenant_id,
        "exclude": exclude_character_id,
        "candidates": limit,
    }
    rows = _run(identity_search_sql(embedder), params)
    return sorted(
        (Neighbour(c, None, float(s)) for c, _, s in rows if s >= min_similarity), key=lambda n: -n.similarity
    )
