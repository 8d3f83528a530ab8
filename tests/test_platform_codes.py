"""The platform-wide search's codes in memory (characters/platform_codes.py) answer what PostgreSQL's scan
answers, and stay current: identities committed, changed or deleted by other transactions, one still in
progress when a search runs, a TRUNCATE, a pruned log. Committed data (transactional tests): the memory
path serves only transactions that have not written themselves."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from characters import platform_codes
from characters.models import Character, CharacterIdentity
from characters.search import platform_nearest_characters, platform_search_sql, search_platform

pytestmark = pytest.mark.django_db(transaction=True)

EMBEDDER = "arcface_antelopev2"


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


@pytest.fixture
def identities(studio_a, studio_b):
    """300 committed 512-d identities in two tenants; the codes loaded afresh."""
    platform_codes.forget()
    centres = unit(np.random.default_rng(11).standard_normal((300, 512)))
    tenants = (studio_a.tenant, studio_b.tenant)
    characters = Character.objects.unscoped().bulk_create(
        [Character(tenant=tenants[i % 2], name=f"arc {i}", slug=f"arc-{i}") for i in range(300)]
    )
    add_identities(characters, centres)
    yield characters, centres
    platform_codes.forget()


def add_identities(characters, vectors) -> None:
    CharacterIdentity.objects.unscoped().bulk_create(
        [
            CharacterIdentity(
                tenant_id=c.tenant_id, character=c, embedder=EMBEDDER, dims=512, embedding=v, reference_count=1
            )
            for c, v in zip(characters, vectors, strict=True)
        ]
    )


def near(vector: np.ndarray, rng, spread: float = 0.7) -> np.ndarray:
    return unit(vector + spread * rng.standard_normal(512) / np.sqrt(512))


def found(probe: np.ndarray, limit: int = 5) -> list[int]:
    """Character ids of a platform search, asserting it ran from memory (no SQL scan of the codes)."""
    with CaptureQueriesContext(connection) as queries:
        result = platform_nearest_characters(embedder=EMBEDDER, vector=probe, limit=limit)
    assert not any("embedding_bits <~>" in query["sql"] for query in queries.captured_queries)
    return [n.character_id for n in result]


def assert_exact_over_a_valid_shortlist(probe: np.ndarray, limit: int = 5) -> list[int]:
    """The memory path's answer is the exact top `limit` of its shortlist, and that shortlist is the 100 nearest
    codes by PostgreSQL's own Hamming distance (ties at its edge in any order, as PostgreSQL's scan may)."""
    literal = str(list(map(float, probe)))
    with connection.cursor() as cursor:
        ids = platform_codes.shortlist(cursor, embedder=EMBEDDER, dims=512, vector=probe, size=100)
        cursor.execute(
            "SELECT id, character_id, embedding_bits <~> binary_quantize(%s::vector(512)), "
            "1 - (embedding <=> %s::vector(512)) FROM characters_characteridentity WHERE embedder = %s",
            [literal, literal, EMBEDDER],
        )
        rows = {identity: (character, hamming, similarity) for identity, character, hamming, similarity in cursor}
    edge = sorted(hamming for _, hamming, _ in rows.values())[min(100, len(rows)) - 1]
    assert len(ids) == len(set(ids)) == min(100, len(rows))
    assert all(rows[i][1] <= edge for i in ids)
    assert {i for i, (_, hamming, _) in rows.items() if hamming < edge} <= set(ids)
    expected = [rows[i][0] for i in sorted(ids, key=lambda i: -rows[i][2])[:limit]]
    assert found(probe, limit) == expected
    return expected


def test_memory_answers_what_postgresql_scans(identities):
    characters, centres = identities
    rng = np.random.default_rng(1)
    for i in range(0, 300, 23):
        probe = near(centres[i], rng)
        assert assert_exact_over_a_valid_shortlist(probe)[0] == characters[i].pk
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(platform_search_sql(EMBEDDER), {"query": str(list(map(float, probe))), "shortlist": 100,
                                                           "limit": 1})  # fmt: skip
            assert cursor.fetchone()[1] == characters[i].pk  # PostgreSQL's own scan agrees on the first
    stranger = unit(rng.standard_normal(512))  # no character near: the codes' order decides the shortlist
    assert_exact_over_a_valid_shortlist(stranger, limit=10)


def test_shortlist_is_the_nearest_codes(identities):
    _, centres = identities
    probe = unit(np.random.default_rng(2).standard_normal(512))
    with connection.cursor() as cursor:
        ids = platform_codes.shortlist(cursor, embedder=EMBEDDER, dims=512, vector=probe, size=20)
        cursor.execute(
            "SELECT id, embedding_bits <~> binary_quantize(%s::vector(512)) FROM characters_characteridentity "
            "ORDER BY 2, id",
            [str(list(map(float, probe)))],
        )
        distances = dict(cursor.fetchall())
    ranked = sorted(distances.values())
    assert len(ids) == 20 and sorted(distances[i] for i in ids) == ranked[:20]


def test_changes_committed_elsewhere_are_seen_by_the_next_search(identities, studio_a):
    characters, centres = identities
    rng = np.random.default_rng(3)
    assert found(near(centres[0], rng))[0] == characters[0].pk  # loaded

    newcomer = Character.objects.unscoped().create(tenant=studio_a.tenant, name="new", slug="new")
    fresh = unit(rng.standard_normal(512))
    add_identities([newcomer], [fresh])
    assert found(near(fresh, rng))[0] == newcomer.pk

    moved = unit(rng.standard_normal(512))  # character 5 re-enrolled: its identity moves
    CharacterIdentity.objects.unscoped().filter(character=characters[5]).update(embedding=moved)
    assert found(near(moved, rng))[0] == characters[5].pk
    assert characters[5].pk not in found(near(centres[5], rng, spread=0.3), limit=3)

    characters[7].delete()  # its identity goes with it
    assert characters[7].pk not in found(near(centres[7], rng, spread=0.3))
    for i in (1, 2, 3):
        assert assert_exact_over_a_valid_shortlist(near(centres[i], rng))[0] == characters[i].pk


def test_a_writer_in_progress_is_seen_once_it_commits(identities, studio_b):
    _, centres = identities
    rng = np.random.default_rng(4)
    found(near(centres[0], rng))
    newcomer = Character.objects.unscoped().create(tenant=studio_b.tenant, name="late", slug="late")
    vector = unit(rng.standard_normal(512))
    with psycopg.connect(**connection.get_connection_params()) as other:  # its own transaction
        other.execute(
            "INSERT INTO characters_characteridentity (tenant_id, character_id, embedder, dims, embedding, "
            "reference_count, updated_at) VALUES (%s, %s, %s, 512, %s::vector, 1, now())",
            [studio_b.tenant.pk, newcomer.pk, EMBEDDER, str(list(map(float, vector)))],
        )
        assert newcomer.pk not in found(near(vector, rng))  # not committed: not there yet ...
        other.commit()
    assert found(near(vector, rng))[0] == newcomer.pk  # ... but no change is lost after it


def test_a_transaction_that_wrote_is_answered_by_postgresql(identities, studio_a):
    _, centres = identities
    rng = np.random.default_rng(5)
    found(near(centres[0], rng))
    vector = unit(rng.standard_normal(512))
    with transaction.atomic():
        mine = Character.objects.unscoped().create(tenant=studio_a.tenant, name="mine", slug="mine")
        add_identities([mine], [vector])
        with connection.cursor() as cursor:
            assert platform_codes.shortlist(cursor, embedder=EMBEDDER, dims=512, vector=vector, size=5) is None
            result = search_platform(cursor, embedder=EMBEDDER, vector=near(vector, rng), limit=3)
        assert result[0].character_id == mine.pk  # its own uncommitted identity, through the SQL scan
        transaction.set_rollback(True)
    assert mine.pk not in found(near(vector, rng))  # rolled back: the memory never saw it


def test_truncate_and_a_pruned_log_load_everything_again(identities, studio_a):
    characters, centres = identities
    rng = np.random.default_rng(6)
    found(near(centres[0], rng))
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM characters_identity_log")
        assert cursor.fetchone()[0] >= 300  # the fixture's inserts, logged
    # the log pruned twice (its horizon passes this process's snapshot) while an identity changed
    moved = unit(rng.standard_normal(512))
    CharacterIdentity.objects.unscoped().filter(character=characters[9]).update(embedding=moved)
    with connection.cursor() as cursor:
        platform_codes.prune_log(cursor)
        deleted = platform_codes.prune_log(cursor)
        assert deleted >= 300
        cursor.execute("SELECT count(*) FROM characters_identity_log")
        assert cursor.fetchone()[0] == 0
    assert found(near(moved, rng))[0] == characters[9].pk  # reloaded: the change was only in the pruned log

    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE characters_characteridentity")
    assert found(near(centres[0], rng)) == []
    late = Character.objects.unscoped().create(tenant=studio_a.tenant, name="after", slug="after")
    add_identities([late], [centres[0]])
    assert found(near(centres[0], rng)) == [late.pk]


def test_many_deletions_compact_the_matrix(identities):
    characters, centres = identities
    rng = np.random.default_rng(7)
    found(near(centres[0], rng))
    Character.objects.unscoped().filter(pk__in=[c.pk for c in characters[:200]]).delete()
    assert assert_exact_over_a_valid_shortlist(near(centres[250], rng))[0] == characters[250].pk
    codes = platform_codes._cache[EMBEDDER]
    assert codes.rows == len(codes.position) == 100  # the dead rows are gone
    assert not set(found(near(centres[3], rng, spread=0.2), limit=20)) & {c.pk for c in characters[:200]}


def test_the_index_sync_schedule_prunes_the_log(identities):
    from characters.search import tenant_indexes_sync

    def logged() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM characters_identity_log")
            return cursor.fetchone()[0]

    assert logged() >= 300
    tenant_indexes_sync()  # remembers where the log was ...
    assert logged() >= 300
    tenant_indexes_sync()  # ... and deletes what is older than that, one run later
    assert logged() == 0
