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


def test_demo_sets_up_tenant_samples_and_a_search(media_root):
    out = io.StringIO()
    call_command("demo", "--no-serve", stdout=out)
    text = out.getvalue()
    key = next(line.split()[-1] for line in text.splitlines() if "API key:" in line)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Api-Key {key}")
    assert client.get("/api/v1/characters?tag=sample").json()["count"] == 8
    ranking = text[text.index("Search by photo") :].splitlines()
    assert "1. Eileen Collins" in ranking[1] and "(same person)" in ranking[1]
    # Running it again reuses what is there and hands out a fresh key.
    call_command("demo", "--no-serve", stdout=io.StringIO())
    assert client.get("/api/v1/characters").status_code == 401  # the old demo key was revoked
