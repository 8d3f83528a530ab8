"""Authorization: Api-Key <key> — every failure is a 401 in the error format."""

import pytest
from rest_framework.test import APIClient

from alkemy.tenancy.models import ApiKey
from alkemy.tenancy.services import api_key_revoke

pytestmark = pytest.mark.django_db


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert isinstance(body["error"]["details"], dict)
    return body["error"]


def test_missing_key_is_401_with_challenge(studio_a):
    response = APIClient().get("/api/v1/characters")
    assert_error(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"] == "Api-Key"


@pytest.mark.parametrize(
    "header",
    ["Api-Key", "Api-Key ", "Api-Key not-a-key", "Api-Key ak_short_x", "Api-Key ak_12345678_a b", "Bearer abc"],
)
def test_malformed_key_is_401(studio_a, header):
    response = APIClient().get("/api/v1/characters", HTTP_AUTHORIZATION=header)
    assert_error(response, 401, "malformed_api_key")


def test_wrong_secret_is_401(studio_a):
    tampered = studio_a.key[:-4] + ("AAAA" if not studio_a.key.endswith("AAAA") else "BBBB")
    assert_error(studio_a.client(tampered).get("/api/v1/characters"), 401, "invalid_api_key")


def test_unknown_prefix_is_401(studio_a):
    assert_error(studio_a.client("ak_00000000_" + "x" * 43).get("/api/v1/characters"), 401, "invalid_api_key")


def test_revoked_key_is_401(studio_a):
    api_key_revoke(api_key=studio_a.api_key)
    assert_error(studio_a.client().get("/api/v1/characters"), 401, "revoked_api_key")


def test_inactive_tenant_is_401(studio_a):
    studio_a.tenant.is_active = False
    studio_a.tenant.save()
    assert_error(studio_a.client().get("/api/v1/characters"), 401, "tenant_inactive")


def test_valid_key_is_200_and_records_last_use(studio_a):
    assert ApiKey.objects.unscoped().get(pk=studio_a.api_key.pk).last_used_at is None
    response = studio_a.client().get("/api/v1/characters")
    assert response.status_code == 200
    assert response.json()["results"] == []
    assert ApiKey.objects.unscoped().get(pk=studio_a.api_key.pk).last_used_at is not None


def test_secret_is_stored_only_as_hash(studio_a):
    stored = ApiKey.objects.unscoped().get(pk=studio_a.api_key.pk)
    secret = studio_a.key.split("_", 2)[2]
    assert secret not in stored.secret_hash
    assert len(stored.secret_hash) == 64
    assert studio_a.key.startswith(f"ak_{stored.prefix}_")
