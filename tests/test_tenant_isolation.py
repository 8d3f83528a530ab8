"""Tenants never see each other's data: another tenant's id answers 404 and nothing changes."""

import pytest

from alkemy.tenancy.scoping import TenantScopeMissing, tenant_scope
from characters.models import Character
from characters.services import character_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def hero_of_a(studio_a):
    return character_create(tenant=studio_a.tenant, name="Mara Quill", description="Lead", tags=["lead"])


def test_other_tenant_lists_nothing(hero_of_a, api_b):
    response = api_b.get("/api/v1/characters")
    assert response.status_code == 200
    assert response.json()["count"] == 0
    assert api_b.get("/api/v1/characters?search=Mara").json()["count"] == 0


def test_other_tenant_gets_404_for_character(hero_of_a, api_b):
    response = api_b.get(f"/api/v1/characters/{hero_of_a.pk}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "character_not_found"


def test_other_tenant_cannot_update(hero_of_a, api_b):
    response = api_b.patch(f"/api/v1/characters/{hero_of_a.pk}", {"name": "Stolen"}, format="json")
    assert response.status_code == 404
    assert Character.objects.unscoped().get(pk=hero_of_a.pk).name == "Mara Quill"


def test_other_tenant_cannot_delete(hero_of_a, api_b):
    assert api_b.delete(f"/api/v1/characters/{hero_of_a.pk}").status_code == 404
    assert Character.objects.unscoped().filter(pk=hero_of_a.pk).exists()


def test_owner_tenant_sees_and_edits_its_character(hero_of_a, api_a):
    assert api_a.get("/api/v1/characters").json()["count"] == 1
    response = api_a.patch(f"/api/v1/characters/{hero_of_a.pk}", {"name": "Mara Q."}, format="json")
    assert response.status_code == 200
    assert response.json()["name"] == "Mara Q."


def test_manager_fails_closed_without_scope(hero_of_a):
    with pytest.raises(TenantScopeMissing):
        list(Character.objects.all())


def test_manager_scope_returns_only_that_tenant(hero_of_a, studio_b):
    character_create(tenant=studio_b.tenant, name="Other")
    with tenant_scope(studio_b.tenant):
        assert [c.name for c in Character.objects.all()] == ["Other"]
    with tenant_scope(hero_of_a.tenant):
        assert [c.name for c in Character.objects.all()] == ["Mara Quill"]
