"""The tenant's own provider key: stored encrypted, never shown back in full, only admins set it."""

import pytest

from alkemy.tenancy.models import Tenant
from alkemy.tenancy.services import api_key_create, tenant_gemini_key

pytestmark = pytest.mark.django_db

KEY = "AIzaSyTEST-0123456789abcdefghijklmnop"


def test_gemini_key_is_encrypted_at_rest_and_masked(api_a, studio_a):
    response = api_a.put("/api/v1/tenant", {"api_key": KEY}, format="json")
    assert response.status_code == 200
    assert response.json()["gemini_api_key"] == "AIza…mnop"
    stored = Tenant.objects.get(pk=studio_a.tenant.pk)
    assert KEY not in stored.gemini_api_key_encrypted and stored.gemini_api_key_encrypted
    assert tenant_gemini_key(stored) == KEY
    assert api_a.get("/api/v1/tenant").json()["gemini_api_key"] == "AIza…mnop"

    cleared = api_a.put("/api/v1/tenant", {"api_key": ""}, format="json")
    assert cleared.json()["gemini_api_key"] is None
    assert tenant_gemini_key(Tenant.objects.get(pk=studio_a.tenant.pk)) is None


def test_only_owners_and_admins_set_the_key(studio_a):
    _, member_key = api_key_create(tenant=studio_a.tenant, name="member", role="member")
    response = studio_a.client(member_key).put("/api/v1/tenant", {"api_key": KEY}, format="json")
    assert response.status_code == 403
    assert studio_a.client(member_key).get("/api/v1/tenant").json()["role"] == "member"


def test_implausible_key_is_refused(api_a):
    response = api_a.put("/api/v1/tenant", {"api_key": "short"}, format="json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_api_key"
