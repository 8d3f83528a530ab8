"""Viewer role is read-only, for API keys and for session users alike."""

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from alkemy.tenancy.models import Role
from alkemy.tenancy.services import api_key_create, membership_set
from characters.services import character_create

pytestmark = pytest.mark.django_db


def test_viewer_key_reads_but_cannot_write(studio_a):
    character = character_create(tenant=studio_a.tenant, name="Ivo")
    _, viewer_key = api_key_create(tenant=studio_a.tenant, name="viewer", role=Role.VIEWER)
    viewer = studio_a.client(viewer_key)

    assert viewer.get("/api/v1/characters").json()["count"] == 1
    assert viewer.get(f"/api/v1/characters/{character.pk}").status_code == 200

    for response in (
        viewer.post("/api/v1/characters", {"name": "New"}, format="json"),
        viewer.patch(f"/api/v1/characters/{character.pk}", {"name": "X"}, format="json"),
        viewer.delete(f"/api/v1/characters/{character.pk}"),
    ):
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "read_only_role"
    assert viewer.get(f"/api/v1/characters/{character.pk}").json()["name"] == "Ivo"


def test_viewer_member_session_cannot_write(studio_a):
    user = get_user_model().objects.create_user("vic", password="pw-vic-12345")
    membership_set(tenant=studio_a.tenant, user=user, role=Role.VIEWER)
    client = APIClient()
    client.force_login(user)
    assert client.get("/api/v1/characters").status_code == 200
    response = client.post("/api/v1/characters", {"name": "New"}, format="json")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "read_only_role"


def test_session_user_with_several_tenants_must_name_one(studio_a, studio_b):
    user = get_user_model().objects.create_user("multi", password="pw-multi-12345")
    membership_set(tenant=studio_a.tenant, user=user, role=Role.MEMBER)
    membership_set(tenant=studio_b.tenant, user=user, role=Role.MEMBER)
    character_create(tenant=studio_b.tenant, name="Only in B")
    client = APIClient()
    client.force_login(user)
    assert client.get("/api/v1/characters").json()["error"]["code"] == "tenant_required"
    response = client.get("/api/v1/characters", HTTP_X_ALKEMY_TENANT="studio-b")
    assert [c["name"] for c in response.json()["results"]] == ["Only in B"]


def test_user_without_membership_gets_no_rows(studio_a):
    character_create(tenant=studio_a.tenant, name="Hidden")
    user = get_user_model().objects.create_user("nobody", password="pw-nobody-123")
    client = APIClient()
    client.force_login(user)
    response = client.get("/api/v1/characters")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "tenant_required"
