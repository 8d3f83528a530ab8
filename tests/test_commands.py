"""Operator commands."""

import io

import pytest
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db


def test_create_tenant_prints_working_key_on_last_line():
    out = io.StringIO()
    call_command("create_tenant", "northlight", "--name", "Northlight Studio", "--api-key", stdout=out)
    key = out.getvalue().strip().splitlines()[-1]
    assert key.startswith("ak_") and " " not in key
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Api-Key {key}")
    assert client.get("/api/v1/characters").status_code == 200


def test_create_tenant_refuses_duplicates_and_bad_slugs():
    call_command("create_tenant", "dup", stdout=io.StringIO())
    with pytest.raises(CommandError, match="already exists"):
        call_command("create_tenant", "dup", stdout=io.StringIO())
    with pytest.raises(CommandError, match="lowercase"):
        call_command("create_tenant", "Bad Slug!", stdout=io.StringIO())
