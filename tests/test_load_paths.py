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
