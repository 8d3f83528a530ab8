"""The character list's fast paths (bench/load.py) answer exactly what the general ones did: the serializer's
direct representation, the page and total in one query, the filter backend skipped when no filter is named."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework import serializers

from characters.serializers import CharacterSerializer
from characters.services import character_create, character_update
from tests.conftest import make_tenant

pytestmark = pytest.mark.django_db


@pytest.fixture
def many(studio_a):
    characters = [
        character_create(tenant=studio_a.tenant, name=f"Person {i:03d}", tags=["crowd"] if i % 3 else ["lead", "x"])
        for i in range(60)
    ]
    character_update(character=characters[0], is_archived=True, description="retired")
    return characters


def test_direct_representation_is_what_drf_fields_answer(studio_a, many):
    from alkemy.tenancy.scoping import tenant_scope
    from characters import selectors

    with tenant_scope(studio_a.tenant):
        characters = list(selectors.character_list(tenant=studio_a.tenant)[:5])
    for character in characters:
        fast = CharacterSerializer(character).data
        general = serializers.ModelSerializer.to_representation(CharacterSerializer(character), character)
        assert fast == dict(general)
        assert set(fast) == set(CharacterSerializer.Meta.fields)


def page(api, url):
    with CaptureQueriesContext(connection) as queries:
        response = api.get(url)
    return response, len(queries)


def test_page_and_total_in_one_query_and_constant_queries(api_a, studio_a, many):
    api_a.get("/api/v1/tenant")  # the key's first use also records last_used_at
    small, small_queries = page(api_a, "/api/v1/characters?page_size=10")
    large, large_queries = page(api_a, "/api/v1/characters?page_size=100")
    assert small.json()["count"] == large.json()["count"] == 60
    assert len(small.json()["results"]) == 10 and len(large.json()["results"]) == 60
    assert small_queries == large_queries == 3  # the key, its rate limit, the page with its total: no N+1
    last = api_a.get("/api/v1/characters?page_size=25&page=3").json()
    assert last["count"] == 60 and len(last["results"]) == 10 and last["next"] is None and last["previous"]
    assert api_a.get("/api/v1/characters?page_size=25&page=4").status_code == 404
    assert api_a.get("/api/v1/characters?tag=lead").json()["count"] == 20
    assert api_a.get("/api/v1/characters?search=Person 00").json()["count"] == 10
    assert api_a.get("/api/v1/characters?archived=true").json()["count"] == 1
    assert api_a.get("/api/v1/characters?archived=maybe").status_code == 400
    empty = make_tenant("studio-empty").client().get("/api/v1/characters").json()
    assert empty["count"] == 0 and empty["results"] == []


def test_a_page_further_than_postgresql_can_offset_is_past_the_end(api_a, studio_a):
    character_create(tenant=studio_a.tenant, name="Only one")
    for path in ("/api/v1/characters", "/api/v1/generations", "/api/v1/usage/events"):
        response = api_a.get(f"{path}?page=4154385444300455680147456&page_size=76")
        assert response.status_code == 404, (path, response.content)  # not a 500 from OFFSET out of bigint range


@pytest.fixture
def varied(studio_a, many):
    """Characters whose rows test the list's tuple path: whole-second and sub-second timestamps, a tenth and a
    millionth of a second, empty tags and description, archived ones, photos (reference_count > 0)."""
    from datetime import UTC, datetime

    from characters.models import Character, ReferenceImage

    tenant = studio_a.tenant
    made = [
        character_create(tenant=tenant, name="Zed", description="", tags=[]),
        character_create(tenant=tenant, name="Ann", description='Lead, "quoted" é 😀', tags=["lead", "b"]),
        character_create(tenant=tenant, name="Person 005", description="same name as another"),
        character_create(tenant=tenant, name="Old", tags=["x"]),
        character_create(tenant=tenant, name="100% Real_Name", description="O'Brien \\ back\\slash", tags=["lead"]),
        character_create(tenant=tenant, name="1000 RealXName", description="no wildcards here"),
    ]
    character_update(character=made[3], is_archived=True)
    stamps = [
        (datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), datetime(2026, 1, 2, 3, 4, 6, 100000, tzinfo=UTC)),
        (datetime(2025, 12, 31, 23, 59, 59, 1, tzinfo=UTC), datetime(2026, 6, 30, 22, 0, tzinfo=UTC)),
        (datetime(2026, 3, 29, 0, 30, tzinfo=UTC), datetime(2026, 10, 25, 1, 30, 0, 999999, tzinfo=UTC)),
    ]
    for character, (created, updated) in zip(made, stamps, strict=False):
        Character.objects.unscoped().filter(pk=character.pk).update(created_at=created, updated_at=updated)
    Character.objects.unscoped().filter(pk=many[7].pk).update(
        created_at=datetime(2026, 5, 5, tzinfo=UTC), updated_at=datetime(2026, 5, 5, tzinfo=UTC)
    )
    for character, photos in ((made[1], 2), (many[4], 1)):
        for n in range(photos):
            ReferenceImage.objects.unscoped().create(
                tenant=tenant, character=character, file=f"x/{character.pk}-{n}.jpg", sha256=f"{n:064d}",
                image_format="JPEG", file_size=1, width=1, height=1, embedder="test", face_box=[0, 0, 1, 1],
                landmarks=[[0, 0]] * 5, det_score=0.9,
            )  # fmt: skip
    return made


LIST_QUERIES = [
    "",
    "?page_size=7&page=3",
    "?page_size=200",
    "?page=2",
    "?search=person 00",
    "?search=quoted",
    "?search=nobody",
    "?tag=lead",
    "?tag=LEAD&archived=false&page_size=3&page=2",
    "?archived=true",
    "?archived=false&ordering=-created_at",
    "?ordering=updated_at,-name&page_size=11&page=2",
    "?ordering=-name",
    "?ordering=created_at&search=e&page_size=5",
    "?page_size=50&page=99",
    "?page=0",
    "?ordering=nope",
    # the search's LIKE wildcards and escapes are text, as in Django's icontains; DRF's quoting and commas
    "?search=100%25",
    "?search=l_n",
    "?search=real_",
    "?search=%5C",
    "?search=back%5Cslash",
    "?search=o'brien",
    '?search="lead, quoted"',
    "?search=lead,quoted",
    "?search=PERSON+0+05",
    "?search=%C3%89",
    "?search=a%00b",
    "?search=",
    "?tag=+Lead+",
    "?tag=",
    "?archived=",
    "?archived=1&tag=x",
    "?ordering=",
    "?ordering=name,",
    "?ordering=-updated_at,created_at,name&search=e&tag=lead",
    "?page_size=0",
    "?page_size=abc",
]


def test_list_tuples_answer_byte_for_byte_what_the_model_path_did(api_a, studio_a, varied, monkeypatch, settings):
    """The list reads its page as tuples with PostgreSQL-formatted timestamps; DRF's ListModelMixin with the
    ModelSerializer's fields (the general path) must answer the same bytes, in UTC and in another time zone."""
    from django.utils import timezone as dj_timezone
    from rest_framework import mixins

    from characters.api import CharacterViewSet

    def answers():
        responses = {url: api_a.get(f"/api/v1/characters{url}") for url in LIST_QUERIES}
        return {url: (response.status_code, response.content) for url, response in responses.items()}

    fast = answers()
    with dj_timezone.override("America/St_Johns"):  # -03:30 / -02:30: offsets, DST
        fast_local = answers()
    empty_fast = make_tenant("studio-empty").client().get("/api/v1/characters").content
    monkeypatch.setattr(CharacterViewSet, "list", mixins.ListModelMixin.list)
    monkeypatch.setattr(CharacterSerializer, "to_representation", serializers.ModelSerializer.to_representation)
    general = answers()
    with dj_timezone.override("America/St_Johns"):
        general_local = answers()
    assert fast == general
    assert fast_local == general_local
    assert make_tenant("studio-empty2").client().get("/api/v1/characters").content == empty_fast
    body = fast["?page_size=200"][1].decode()
    for text in ('"2026-01-02T03:04:05Z"', '"2026-01-02T03:04:06.100000Z"', '"2025-12-31T23:59:59.000001Z"',
                 '"2026-10-25T01:30:00.999999Z"', '"2026-05-05T00:00:00Z"', '"reference_count":2'):  # fmt: skip
        assert text in body
    local = fast_local["?page_size=200"][1].decode()
    assert '"2026-01-01T23:34:05-03:30"' in local and '"2026-06-30T19:30:00-02:30"' in local
