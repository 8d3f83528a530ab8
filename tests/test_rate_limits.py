"""Abuse limits: request rates per API key and per tenant (429 `rate_limited` + Retry-After), counted in
PostgreSQL so every worker shares them, and admin login throttling."""

from __future__ import annotations

import threading
import time

import pytest
from django.contrib.auth import get_user_model
from django.db import connection, connections
from django.test import Client
from rest_framework.test import APIClient

from alkemy import ratelimit
from alkemy.tenancy.models import Role
from alkemy.tenancy.services import api_key_create
from tests.conftest import TenantFixture

pytestmark = pytest.mark.django_db


def assert_rate_limited(response, scope: str, limit: int) -> int:
    assert response.status_code == 429, response.content
    error = response.json()["error"]
    assert error["code"] == "rate_limited"
    assert error["details"]["scope"] == scope
    assert error["details"]["limit_per_minute"] == limit
    retry_after = int(response["Retry-After"])
    assert 1 <= retry_after <= 60 // limit + 1
    assert error["details"]["retry_after_seconds"] == retry_after
    return retry_after


def test_per_key_limit_refuses_with_retry_after_and_other_keys_go_on(settings, studio_a):
    settings.ALKEMY_RATE_LIMIT_PER_KEY = 3
    client = studio_a.client()
    for _ in range(3):
        assert client.get("/api/v1/characters").status_code == 200
    assert_rate_limited(client.get("/api/v1/characters"), "key", 3)
    assert_rate_limited(client.post("/api/v1/characters", {"name": "X"}, format="json"), "key", 3)

    _, other_key = api_key_create(tenant=studio_a.tenant, name="second", role=Role.MEMBER)
    assert studio_a.client(other_key).get("/api/v1/characters").status_code == 200


def test_per_tenant_limit_counts_all_keys_of_the_tenant_only(settings, studio_a, studio_b):
    settings.ALKEMY_RATE_LIMIT_PER_TENANT = 4
    _, second = api_key_create(tenant=studio_a.tenant, name="second", role=Role.VIEWER)
    clients = [studio_a.client(), studio_a.client(second)]
    for i in range(4):
        assert clients[i % 2].get("/api/v1/characters").status_code == 200
    assert_rate_limited(clients[1].get("/api/v1/characters"), "tenant", 4)
    assert_rate_limited(clients[0].get("/api/v1/usage/budget"), "tenant", 4)
    assert studio_b.client().get("/api/v1/characters").status_code == 200


def test_session_users_count_per_user_and_unauthenticated_requests_do_not_count(settings, studio_a, staff_of_a):
    settings.ALKEMY_RATE_LIMIT_PER_KEY = 2
    client = APIClient()
    client.force_login(staff_of_a)
    assert client.get("/api/v1/characters").status_code == 200
    assert client.get("/api/v1/characters").status_code == 200
    assert_rate_limited(client.get("/api/v1/characters"), "user", 2)
    for _ in range(3):
        assert APIClient().get("/api/v1/characters").status_code == 401
    assert studio_a.client().get("/api/v1/characters").status_code == 200  # the key has its own bucket


def test_zero_turns_a_limit_off(settings, studio_a):
    settings.ALKEMY_RATE_LIMIT_PER_KEY = 0
    settings.ALKEMY_RATE_LIMIT_PER_TENANT = 0
    for _ in range(3):
        assert studio_a.client().get("/api/v1/characters").status_code == 200
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM alkemy_rate_limit WHERE bucket IN (%s, %s)",
            [f"key:{studio_a.api_key.pk}", f"tenant:{studio_a.tenant.pk}"],
        )
        assert cursor.fetchone()[0] == 0


def test_buckets_refill_continuously():
    limit = ratelimit.Limit("test:refill", 4, 1.0)  # 4 a second
    assert all(not ratelimit.take([limit]) for _ in range(4))
    [refusal] = ratelimit.take([limit])
    assert refusal.bucket == "test:refill" and refusal.retry_after == 1
    assert ratelimit.peek([limit])
    time.sleep(0.3)  # 1.2 tokens back
    assert not ratelimit.peek([limit])
    assert not ratelimit.take([limit])
    assert ratelimit.take([limit])


@pytest.mark.django_db(transaction=True)
def test_counter_is_shared_by_concurrent_database_connections():
    """Eight threads, each on its own PostgreSQL connection (as eight gunicorn workers would be), race for
    one bucket of 30: exactly 30 requests pass, whatever the interleaving."""
    limit = ratelimit.Limit("test:shared", 30, 3600.0)
    passed, refused = [], []
    start = threading.Barrier(8)

    def worker():
        try:
            start.wait()
            for _ in range(6):
                (refused if ratelimit.take([limit, ratelimit.Limit("test:other", 1000, 60.0)]) else passed).append(1)
        finally:
            connections["default"].close()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(passed), len(refused)) == (30, 18)

    other = connections.create_connection("default")  # a connection that took nothing sees the same count
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT tokens < 1 FROM alkemy_rate_limit WHERE bucket = 'test:shared'")
            assert cursor.fetchone() == (True,)
    finally:
        other.close()
        ratelimit.reset(["test:shared", "test:other"])  # committed rows: not rolled back after this test


def test_rate_limits_are_in_the_openapi_schema(studio_a):
    schema = APIClient().get("/api/v1/schema?format=json").json()
    listing = schema["paths"]["/api/v1/characters"]["get"]["responses"]["429"]
    assert listing["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "rate_limited" in listing["description"]
    assert "Retry-After" in listing["headers"]
    submit = schema["paths"]["/api/v1/generations"]["post"]["responses"]["429"]
    assert "too_many_jobs" in submit["description"] and "rate_limited" in submit["description"]
    assert "Retry-After" in submit["headers"]
    assert "429" not in schema["paths"]["/api/v1/health"]["get"]["responses"]


# --- admin login throttling ------------------------------------------------------------------------------


@pytest.fixture
def staff(db, settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # the throttle is under test
    return get_user_model().objects.create_user("carol", "carol@example.com", "right-password-1", is_staff=True)


def login(username: str, password: str, address: str = "10.0.0.1"):
    client = Client(REMOTE_ADDR=address)
    response = client.post("/admin/login/?next=/admin/", {"username": username, "password": password})
    return client, response


def logged_in(client) -> bool:
    return "_auth_user_id" in client.session


def test_failed_logins_lock_the_username_out_even_with_the_right_password(settings, staff):
    settings.ALKEMY_LOGIN_FAILURES_PER_USER = 3
    for _ in range(3):
        client, response = login("carol", "wrong")
        assert response.status_code == 200 and not logged_in(client)
        assert b"Too many failed logins" not in response.content
    client, response = login("Carol", "right-password-1", address="10.0.0.2")  # case and address do not help
    assert response.status_code == 200 and not logged_in(client)
    assert b"Too many failed logins" in response.content and b"Try again in 5 minutes" in response.content

    get_user_model().objects.create_user("dave", "", "dave-password-1", is_staff=True)
    client, response = login("dave", "dave-password-1")
    assert response.status_code == 302 and logged_in(client)


def test_failed_logins_from_one_address_lock_it_out_and_success_clears_the_username(settings, staff):
    settings.ALKEMY_LOGIN_FAILURES_PER_USER = 2
    settings.ALKEMY_LOGIN_FAILURES_PER_IP = 3
    login("carol", "wrong")
    client, response = login("carol", "right-password-1")
    assert response.status_code == 302 and logged_in(client)  # one failure left: success clears the username
    login("carol", "wrong")
    login("nobody-1", "x")
    client, response = login("carol", "right-password-1", address="10.0.0.1")
    assert b"Too many failed logins" in response.content and not logged_in(client)
    client, response = login("carol", "right-password-1", address="10.0.0.9")
    assert response.status_code == 302 and logged_in(client)


def test_api_key_fixture_still_usable_with_default_limits(studio_a: TenantFixture):
    """The suite's limits are high (tests/settings.py) but counting: a request leaves its two buckets."""
    assert studio_a.client().get("/api/v1/characters").status_code == 200
    buckets = [f"key:{studio_a.api_key.pk}", f"tenant:{studio_a.tenant.pk}"]
    with connection.cursor() as cursor:
        cursor.execute("SELECT bucket FROM alkemy_rate_limit WHERE bucket = ANY(%s) ORDER BY bucket", [buckets])
        assert [row[0] for row in cursor.fetchall()] == buckets
