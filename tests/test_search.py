"""Search by face: transformed photos find their character, tenants stay apart, the plan is the one chosen."""

import io

import numpy as np
import pytest
from django.core.management import call_command
from django.db import connection, transaction
from PIL import Image, ImageEnhance, ImageOps

from characters.models import Character, CharacterIdentity, FaceEmbedding, ReferenceImage
from characters.search import (
    forget_indexes,
    nearest_characters,
    plan_search,
    platform_nearest_characters,
    platform_search_sql,
    similar_identities,
    tenant_index_name,
    tenant_indexes_sync,
    vector_literal,
)
from characters.services import character_create, reference_add
from tests import photos
from tests.conftest import make_tenant

pytestmark = pytest.mark.django_db


@pytest.fixture
def cast(studio_a, media_root):
    """Eight characters of tenant A, one real photo each."""
    enrolled = {}
    for name, pixels in photos.people().items():
        character = character_create(tenant=studio_a.tenant, name=name)
        reference_add(character=character, upload=photos.upload(pixels))
        enrolled[name] = character
    return enrolled


def transformed(pixels: np.ndarray):
    image = Image.fromarray(pixels)
    width, height = image.size
    yield "flip", ImageOps.mirror(image)
    yield "crop", image.crop((int(width * 0.08), int(height * 0.05), int(width * 0.95), int(height * 0.97)))
    yield "rescale", image.resize((int(width * 1.6), int(height * 1.6)), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=60)
    yield "jpeg", Image.open(buffer)
    yield "brighter", ImageEnhance.Brightness(image).enhance(1.35)


def search(client, pixels, **fields):
    return client.post(
        "/api/v1/search/faces", {"image": photos.upload(np.asarray(pixels)), **fields}, format="multipart"
    )


def test_transformed_photo_finds_its_character_first(api_a, cast):
    for name, pixels in photos.people().items():
        for transform, image in transformed(pixels):
            response = search(api_a, image, limit=3)
            assert response.status_code == 200, response.json()
            body = response.json()
            top = body["results"][0]
            assert top["character"]["name"] == name, f"{name} / {transform}: {body['results']}"
            assert top["is_match"], f"{name} / {transform}: similarity {top['similarity']}"
            assert top["reference"] == ReferenceImage.objects.unscoped().get(character=cast[name]).pk
            assert body["embedder"] == "dlib"
            assert len(body["results"]) == 3


def test_min_similarity_keeps_only_close_matches(api_a, cast):
    body = search(api_a, photos.astronaut(), min_similarity=0.95).json()
    assert [r["character"]["name"] for r in body["results"]] == ["astronaut"]


def test_search_never_returns_another_tenants_characters(api_b, cast):
    body = search(api_b, photos.astronaut()).json()
    assert body["results"] == []


def test_search_photo_without_face_is_422(api_a, cast):
    flat = np.full((200, 200, 3), 128, np.uint8)
    response = search(api_a, flat)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "no_face"


def test_search_limit_is_validated(api_a, cast):
    response = search(api_a, photos.astronaut(), limit=0)
    assert response.status_code == 400
    assert response.json()["error"]["details"]["field"] == "limit"


def test_similar_characters_of_a_character(api_a, api_b, studio_a, cast):
    twin = character_create(tenant=studio_a.tenant, name="astronaut twin")
    reference_add(character=twin, upload=photos.upload(photos.astronaut()[:, ::-1].copy()))
    body = api_a.get(f"/api/v1/characters/{cast['astronaut'].pk}/similar?limit=3").json()
    names = [r["character"]["name"] for r in body["results"]]
    assert names[0] == "astronaut twin" and "astronaut" not in names and len(names) == 3
    assert api_b.get(f"/api/v1/characters/{cast['astronaut'].pk}/similar").status_code == 404


def test_similar_without_references_is_422(api_a, studio_a):
    empty = character_create(tenant=studio_a.tenant, name="No photos yet")
    response = api_a.get(f"/api/v1/characters/{empty.pk}/similar")
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "no_identity"


def _synthetic(tenant, count: int, centre: np.ndarray, spread: float, rng) -> dict[int, np.ndarray]:
    """`count` characters of `tenant`, one embedding and identity each, scattered around `centre`."""
    characters = Character.objects.unscoped().bulk_create(
        [Character(tenant=tenant, name=f"synthetic {tenant.slug} {i}", slug=f"syn-{i}") for i in range(count)]
    )
    references = ReferenceImage.objects.unscoped().bulk_create(
        [
            ReferenceImage(
                tenant=tenant,
                character=c,
                file="synthetic",
                sha256=f"{c.pk:064d}",
                image_format="PNG",
                file_size=1,
                width=1,
                height=1,
                embedder="dlib",
                face_box=[],
                landmarks=[],
                det_score=1.0,
            )
            for c in characters
        ]
    )
    vectors = centre + spread * rng.standard_normal((count, 128))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    FaceEmbedding.objects.unscoped().bulk_create(
        [
            FaceEmbedding(tenant=tenant, character=c, reference=r, embedder="dlib", dims=128, embedding=v)
            for c, r, v in zip(characters, references, vectors, strict=True)
        ]
    )
    CharacterIdentity.objects.unscoped().bulk_create(
        [
            CharacterIdentity(tenant=tenant, character=c, embedder="dlib", dims=128, embedding=v, reference_count=1)
            for c, v in zip(characters, vectors, strict=True)
        ]
    )
    return {c.pk: v for c, v in zip(characters, vectors, strict=True)}


@pytest.fixture
def crowded_database(studio_a, studio_b, settings):
    """Tenant B: 420 embeddings right around the query. Tenant A: 340 further away. Tenant C: 15.

    With the thresholds lowered to 300 rows, A and B get their own HNSW indexes and C is searched exactly."""
    settings.ALKEMY_SEARCH_INDEX_MIN_ROWS = {"faceemb": 300, "identity": 300}
    rng = np.random.default_rng(7)
    query = rng.standard_normal(128)
    query /= np.linalg.norm(query)
    small = make_tenant("studio-c").tenant
    vectors = {
        studio_b.tenant.pk: _synthetic(studio_b.tenant, 420, query, 0.02, rng),
        studio_a.tenant.pk: _synthetic(studio_a.tenant, 340, query, 0.15, rng),
        small.pk: _synthetic(small, 15, query, 0.15, rng),
    }
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE characters_faceembedding")
        cursor.execute("ANALYZE characters_characteridentity")
    report = sync()
    return query, small, vectors, report


def sync():
    with connection.cursor() as cursor:  # fire the deferred FK checks first: no CREATE INDEX with pending triggers
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
    return tenant_indexes_sync()


def explain(table: str, tenant_id: int, query: np.ndarray) -> tuple[str, str]:
    """(strategy, EXPLAIN text) of the tenant search production runs, with its pinned settings."""
    with transaction.atomic(), connection.cursor() as cursor:
        plan = plan_search(cursor, table=table, tenant_id=tenant_id, embedder="dlib")
        cursor.execute("; ".join(plan.settings))
        cursor.execute("EXPLAIN " + plan.sql, {"query": vector_literal(query), "candidates": 50})
        return plan.strategy, "\n".join(row[0] for row in cursor.fetchall())


def exact_top(vectors: dict[int, np.ndarray], query: np.ndarray, limit: int = 10) -> list[int]:
    ids = list(vectors)
    scores = np.stack([vectors[i] for i in ids]) @ query
    return [ids[i] for i in np.argsort(-scores, kind="stable")[:limit]]


def probes(query: np.ndarray, vectors: dict[int, np.ndarray], rng) -> list[np.ndarray]:
    """The crowd's centre, a few random directions and a few noisy copies of stored vectors."""
    out = [query]
    for _ in range(3):
        v = rng.standard_normal(128)
        out.append(v / np.linalg.norm(v))
    for v in list(vectors.values())[:3]:
        w = v + 0.05 * rng.standard_normal(128)
        out.append(w / np.linalg.norm(w))
    return out


def test_large_tenants_get_their_own_index_and_small_ones_are_searched_exactly(crowded_database, studio_a, studio_b):
    query, small, _, report = crowded_database
    for tenant in (studio_a.tenant, studio_b.tenant):
        identity_index = tenant_index_name("identity", tenant.pk, "dlib")
        for table in ("faceemb", "identity"):
            assert tenant_index_name(table, tenant.pk, "dlib") in report.created
            # a reference search shortlists characters in the identity graph, then scores their references
            strategy, plan = explain(table, tenant.pk, query)
            assert strategy == "hnsw" and f"Index Scan using {identity_index}" in plan and "Sort" not in plan, plan
        assert "characters_faceembedding_character_id" in explain("faceemb", tenant.pk, query)[1]
    for table in ("faceemb", "identity"):
        strategy, plan = explain(table, small.pk, query)
        assert strategy == "exact" and "_t" + str(small.pk) not in plan, plan
        assert "Sort" in plan and "Seq Scan" not in plan and "tenant_id" in plan, plan
    # no index of any other tenant can serve C, and a second sync changes nothing
    out = io.StringIO()
    call_command("sync_search_indexes", stdout=out)
    assert "created: 0\ndropped: 0\nkept: 4" in out.getvalue()


def test_pinned_plans_return_exactly_the_exact_top_results(crowded_database, studio_a, studio_b):
    """HNSW (A, B: own index) and exact (C) plans give the same characters, in the same order, as brute force.

    Probes: the crowd's centre and noisy copies of stored faces get exactly brute force's answer. Random
    directions (a face nobody registered: every similarity is noise, B's 420 all within ~0.01 of each
    other) may swap one of those near-ties at the graph's ef_search, never a similarity or a tenant."""
    query, small, vectors, _ = crowded_database
    rng = np.random.default_rng(11)
    for tenant_id in (studio_a.tenant.pk, studio_b.tenant.pk, small.pk):
        own = vectors[tenant_id]
        for i, probe in enumerate(probes(query, own, rng)):
            found = nearest_characters(tenant_id=tenant_id, embedder="dlib", vector=probe, limit=10)
            assert all(round(n.similarity, 4) == round(float(own[n.character_id] @ probe), 4) for n in found)
            stranger = 1 <= i <= 3  # probes() puts its random directions there
            if stranger and tenant_id != small.pk:
                assert len(set(n.character_id for n in found) & set(exact_top(own, probe))) >= 9, tenant_id
            else:
                assert [n.character_id for n in found] == exact_top(own, probe), tenant_id
            exclude = exact_top(own, probe)[0]
            twins = similar_identities(
                tenant_id=tenant_id,
                embedder="dlib",
                vector=probe,
                exclude_character_id=exclude,
                min_similarity=-1.0,
                limit=5,
            )
            rest = {c: v for c, v in own.items() if c != exclude}
            assert [n.character_id for n in twins] == exact_top(rest, probe, 5)
    # the searches are prepared statements (characters.search.run_search): past its fifth run PostgreSQL may
    # answer one from a generic plan, and the answers above came from such plans too
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT sum(generic_plans), sum(custom_plans) FROM pg_prepared_statements "
            "WHERE statement LIKE '%%characters_faceembedding%%'"
        )
        generic, custom = cursor.fetchone()
    assert generic > 0 and custom > 0, (generic, custom)


def test_searches_without_prepared_statements_answer_the_same(crowded_database, studio_b, monkeypatch):
    """ALKEMY_DB_PREPARED_STATEMENTS=0 (a pooler that cannot keep them): the connection prepares nothing, and
    run_search's statements are parsed and planned each time, with the same answers."""
    query, _, vectors, _ = crowded_database
    def prepared() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_prepared_statements")
            return cursor.fetchone()[0]

    before = prepared()
    monkeypatch.setattr(connection.connection, "prepare_threshold", None)
    own = vectors[studio_b.tenant.pk]
    for probe in probes(query, own, np.random.default_rng(12))[4:]:  # noisy copies of stored faces
        found = nearest_characters(tenant_id=studio_b.tenant.pk, embedder="dlib", vector=probe, limit=10)
        assert [n.character_id for n in found] == exact_top(own, probe)
    assert prepared() == before


def test_a_tenant_without_an_identity_index_searches_its_reference_graph(crowded_database, studio_a, settings):
    """Many references, too few identities for their own graph: the one-stage reference HNSW plan."""
    query, _, vectors, _ = crowded_database
    settings.ALKEMY_SEARCH_INDEX_MIN_ROWS = {"faceemb": 300, "identity": 1000}
    report = sync()
    tenant_id = studio_a.tenant.pk
    assert tenant_index_name("identity", tenant_id, "dlib") in report.dropped
    strategy, plan = explain("faceemb", tenant_id, query)
    name = tenant_index_name("faceemb", tenant_id, "dlib")
    assert strategy == "hnsw" and f"Index Scan using {name}" in plan and "identity" not in plan, plan
    own = vectors[tenant_id]
    for probe in probes(query, own, np.random.default_rng(5)):
        found = nearest_characters(tenant_id=tenant_id, embedder="dlib", vector=probe, limit=10)
        assert [n.character_id for n in found] == exact_top(own, probe)


def test_search_never_returns_another_tenants_rows(crowded_database, studio_a, studio_b, settings):
    """B's rows crowd the query's neighbourhood; A (own index) and C (exact) still get only their own."""
    query, small, vectors, _ = crowded_database
    settings.ALKEMY_MAX_REFERENCES = 1  # one candidate row per character: the scan alone must supply 10
    for tenant_id in (studio_a.tenant.pk, small.pk, studio_b.tenant.pk):
        results = nearest_characters(tenant_id=tenant_id, embedder="dlib", vector=query, limit=10)
        assert len(results) == 10
        assert {r.character_id for r in results} <= set(vectors[tenant_id])
        tenants = Character.objects.unscoped().filter(pk__in=[r.character_id for r in results]).values_list("tenant")
        assert set(tenants) == {(tenant_id,)}
        assert [r.similarity for r in results] == sorted((r.similarity for r in results), reverse=True)
        twins = similar_identities(
            tenant_id=tenant_id, embedder="dlib", vector=query, exclude_character_id=0, min_similarity=-1, limit=20
        )
        assert len(twins) == min(20, len(vectors[tenant_id])) and {t.character_id for t in twins} <= set(
            vectors[tenant_id]
        )


def test_a_shrinking_tenant_loses_its_index_and_a_broken_one_is_rebuilt(crowded_database, studio_a, studio_b):
    query, _, vectors, _ = crowded_database
    keep = list(vectors[studio_a.tenant.pk])[:140]  # below half the 300-row threshold
    Character.objects.unscoped().filter(tenant=studio_a.tenant).exclude(pk__in=keep).delete()
    broken = [tenant_index_name(t, studio_b.tenant.pk, "dlib") for t in ("faceemb", "identity")]
    with connection.cursor() as cursor:  # an interrupted CREATE INDEX CONCURRENTLY leaves an invalid index
        for name in broken:
            cursor.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = %s::regclass", [name])
    forget_indexes()  # what a process saw expires after INDEX_CACHE_SECONDS
    for table in ("faceemb", "identity"):
        assert explain(table, studio_b.tenant.pk, query)[0] == "exact"  # never searched through them
    report = sync()
    assert sorted(report.dropped) == sorted(
        [tenant_index_name(t, studio_a.tenant.pk, "dlib") for t in ("faceemb", "identity")] + broken
    )
    assert report.created == broken
    assert explain("faceemb", studio_a.tenant.pk, query)[0] == "exact"
    assert explain("faceemb", studio_b.tenant.pk, query)[0] == "hnsw"
    found = nearest_characters(tenant_id=studio_a.tenant.pk, embedder="dlib", vector=query, limit=10)
    assert [n.character_id for n in found] == exact_top({c: vectors[studio_a.tenant.pk][c] for c in keep}, query)


def test_platform_search_spans_tenants_for_operators_only(crowded_database, studio_a):
    """dlib (uncentred descriptors): an exact scan over every tenant's identities, same order as brute force."""
    query, small, vectors, _ = crowded_database
    everyone = {c: v for per_tenant in vectors.values() for c, v in per_tenant.items()}
    for probe in probes(query, vectors[small.pk], np.random.default_rng(5)):
        found = platform_nearest_characters(embedder="dlib", vector=probe, limit=5)
        assert [n.character_id for n in found] == exact_top(everyone, probe, 5)
        assert all(n.reference_id is not None and n.reference_similarity is not None for n in found)
    target = list(vectors[small.pk])[0]
    out = io.StringIO()
    call_command("platform_face_search", "--character", str(target), "--limit", "5", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines and all("tenant studio-" in line for line in lines) and f"({target})" not in out.getvalue()


def test_platform_search_of_arcface_shortlists_by_binary_codes(studio_a, studio_b):
    """512-d centred identities in two tenants: the Hamming shortlist re-ranked at full precision finds
    each query's own character first, from either tenant, like brute force."""
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((400, 512))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    characters = Character.objects.unscoped().bulk_create(
        [Character(tenant=(studio_a, studio_b)[i % 2].tenant, name=f"arc {i}", slug=f"arc-{i}") for i in range(400)]
    )
    CharacterIdentity.objects.unscoped().bulk_create(
        [
            CharacterIdentity(
                tenant_id=c.tenant_id,
                character=c,
                embedder="arcface_antelopev2",
                dims=512,
                embedding=v,
                reference_count=1,
            )
            for c, v in zip(characters, centres, strict=True)
        ]
    )
    assert "embedding_bits <~>" in platform_search_sql("arcface_antelopev2")
    assert "embedding_bits" not in platform_search_sql("dlib")
    for i in range(0, 400, 37):
        probe = centres[i] + 0.7 * rng.standard_normal(512) / np.sqrt(512)
        probe /= np.linalg.norm(probe)
        found = platform_nearest_characters(embedder="arcface_antelopev2", vector=probe, limit=5)
        assert found[0].character_id == characters[i].pk and found[0].tenant_id == characters[i].tenant_id
        assert found[0].similarity == pytest.approx(float(centres[i] @ probe), abs=1e-5)
        assert found[0].reference_id is None  # no references: identities only


def test_reference_vectors_are_stored_inline_and_identities_carry_their_bits(studio_a):
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT attstorage FROM pg_attribute WHERE attrelid = 'characters_faceembedding'::regclass "
            "AND attname = 'embedding'"
        )
        assert cursor.fetchone() == ("m",)
        cursor.execute(
            "SELECT attgenerated FROM pg_attribute WHERE attrelid = 'characters_characteridentity'::regclass "
            "AND attname = 'embedding_bits'"
        )
        assert cursor.fetchone() == ("s",)
        cursor.execute("SELECT count(*) FROM pg_indexes WHERE indexname ~ '^(faceemb|identity)_hnsw'")
        assert cursor.fetchone() == (0,)  # the per-embedder indexes of 0004 are gone
