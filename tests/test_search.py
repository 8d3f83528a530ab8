"""Search by face: transformed photos find their character, tenants stay apart, the index is used."""

import io

import numpy as np
import pytest
from django.db import connection
from PIL import Image, ImageEnhance, ImageOps

from characters.models import Character, FaceEmbedding, ReferenceImage
from characters.search import nearest_characters, reference_search_sql, vector_literal
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


def _synthetic(tenant, count: int, centre: np.ndarray, spread: float, rng) -> None:
    """`count` characters of `tenant` with one embedding each, scattered around `centre`."""
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


@pytest.fixture
def crowded_database(studio_a, studio_b):
    """Tenant B: 2000 embeddings right around the query. Tenant A: 600 further away. Tenant C: 15."""
    rng = np.random.default_rng(7)
    query = rng.standard_normal(128)
    query /= np.linalg.norm(query)
    _synthetic(studio_b.tenant, 2000, query, 0.02, rng)
    _synthetic(studio_a.tenant, 600, query, 0.15, rng)
    small = make_tenant("studio-c").tenant
    _synthetic(small, 15, query, 0.15, rng)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE characters_faceembedding")
    return query, small


def explain(sql: str, params: dict) -> str:
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN " + sql, params)
        return "\n".join(row[0] for row in cursor.fetchall())


def search_params(query, tenant, candidates=10) -> dict:
    return {"query": vector_literal(query), "tenant": tenant.pk, "candidates": candidates}


def test_query_plan_uses_the_hnsw_index(crowded_database, studio_a, studio_b):
    query, _ = crowded_database
    for tenant in (studio_a.tenant, studio_b.tenant):
        plan = explain(reference_search_sql("dlib"), search_params(query, tenant))
        assert "Index Scan using faceemb_hnsw_dlib" in plan, plan


def test_small_tenant_is_searched_exactly_through_its_tenant_index(crowded_database):
    """Few rows of the tenant: the planner reads them by tenant and sorts (exact, no recall loss)."""
    query, small = crowded_database
    plan = explain(reference_search_sql("dlib"), search_params(query, small))
    assert "faceemb_hnsw_dlib" not in plan and "tenant_id" in plan, plan
    assert len(nearest_characters(tenant_id=small.pk, embedder="dlib", vector=query, limit=10)) == 10


def test_tenant_filter_still_returns_limit_results(crowded_database, studio_a, settings):
    """B's rows crowd the query's neighbourhood; A's are further away but must still fill the limit."""
    query, _ = crowded_database
    settings.ALKEMY_MAX_REFERENCES = 1  # one candidate row per character: the index scan alone must supply 10
    results = nearest_characters(tenant_id=studio_a.tenant.pk, embedder="dlib", vector=query, limit=10)
    assert len(results) == 10
    tenants = Character.objects.unscoped().filter(pk__in=[r.character_id for r in results]).values_list("tenant")
    assert set(tenants) == {(studio_a.tenant.pk,)}
    assert [r.similarity for r in results] == sorted((r.similarity for r in results), reverse=True)

    # The same query forced through the HNSW index: with pgvector 0.8's iterative scan it fills the
    # limit; without it, B's rows fill ef_search and it comes back short.
    only_hnsw_left()
    params = search_params(query, studio_a.tenant)
    assert "Index Scan using faceemb_hnsw_dlib" in explain(reference_search_sql("dlib"), params)
    with connection.cursor() as cursor:
        cursor.execute("SET hnsw.ef_search = 40")
        try:
            cursor.execute("SET hnsw.iterative_scan = relaxed_order")
            cursor.execute(reference_search_sql("dlib"), params)
            assert len(cursor.fetchall()) == 10
            cursor.execute("SET hnsw.iterative_scan = off")
            cursor.execute(reference_search_sql("dlib"), params)
            assert len(cursor.fetchall()) < 10
        finally:
            cursor.execute("RESET hnsw.iterative_scan")
            cursor.execute("RESET hnsw.ef_search")
            cursor.execute("RESET enable_seqscan")


def only_hnsw_left() -> None:
    """Drop the B-tree paths and sequential scans for this test (DDL rolls back with the test)."""
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # fire the deferred FK checks of the inserts first
        cursor.execute("ALTER TABLE characters_faceembedding DROP CONSTRAINT embedding_unique_per_reference_embedder")
        cursor.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'characters_faceembedding' "
            "AND indexdef LIKE '%%btree%%' AND indexname NOT LIKE '%%pkey'"
        )
        for (name,) in cursor.fetchall():
            cursor.execute(f'DROP INDEX "{name}"')
        cursor.execute("SET enable_seqscan = off")
