"""Shared fixtures: two tenants with API keys, clients that speak as them, real PostgreSQL."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from alkemy.tenancy.models import Role
from alkemy.tenancy.services import api_key_create, membership_set, tenant_create


class TenantFixture:
    def __init__(self, tenant, api_key, plaintext):
        self.tenant = tenant
        self.api_key = api_key
        self.key = plaintext

    def client(self, key: str | None = None) -> APIClient:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Api-Key {key or self.key}")
        return client


def make_tenant(slug: str, role: str = Role.OWNER) -> TenantFixture:
    tenant = tenant_create(slug=slug, name=slug.title())
    api_key, plaintext = api_key_create(tenant=tenant, name=f"{slug} key", role=role)
    return TenantFixture(tenant, api_key, plaintext)


@pytest.fixture
def studio_a(db) -> TenantFixture:
    return make_tenant("studio-a")


@pytest.fixture
def studio_b(db) -> TenantFixture:
    return make_tenant("studio-b")


@pytest.fixture
def api_a(studio_a) -> APIClient:
    return studio_a.client()


@pytest.fixture
def api_b(studio_b) -> APIClient:
    return studio_b.client()


@pytest.fixture
def staff_of_a(db, studio_a):
    """A staff (non-superuser) user who is a member of tenant A only."""
    user = get_user_model().objects.create_user("alice", "alice@example.com", "pw-alice-123", is_staff=True)
    membership_set(tenant=studio_a.tenant, user=user, role=Role.MEMBER)
    return user


@pytest.fixture
def media_root(settings, tmp_path):
    """Uploaded files go to a fresh folder per test, so file counts can be asserted."""
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.MEDIA_ROOT.mkdir()
    return settings.MEDIA_ROOT


def stored_files(root) -> list:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory):
    """Every method's tiny models, built once per test run (`manage.py build_test_models`)."""
    from generation.tiny.build import build_test_models

    directory = tmp_path_factory.mktemp("models")
    build_test_models(directory)
    return directory
