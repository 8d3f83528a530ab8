"""Deployment security: `check --deploy` clean in production settings, CSRF on admin and session API
writes, revoked keys refused on the very next request.

Covered elsewhere: keys stored only as a keyed hash (test_api_keys.test_secret_is_stored_only_as_hash),
webhook SSRF guard (test_review_webhooks, test_webhooks), rate limits and login throttling
(test_rate_limits)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from rest_framework.test import APIClient

ROOT = Path(__file__).resolve().parent.parent


def test_check_deploy_is_clean_in_production_settings(tmp_path):
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("ALKEMY_", "DJANGO_", "DEBUG", "SECRET_KEY", "ALLOWED_HOSTS"))
    }
    env.update(
        DJANGO_SETTINGS_MODULE="alkemy.settings",
        SECRET_KEY=secrets.token_urlsafe(50),
        ALLOWED_HOSTS="cast.example.com",
        ALKEMY_HTTPS="1",
        ALKEMY_DATA_DIR=str(tmp_path),
    )
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


@pytest.mark.django_db
def test_admin_login_without_csrf_token_is_403(staff_of_a):
    client = Client(enforce_csrf_checks=True)
    form = {"username": "alice", "password": "pw-alice-123"}
    assert client.post("/admin/login/", form).status_code == 403
    assert "_auth_user_id" not in client.session

    token = client.get("/admin/login/").cookies["csrftoken"].value
    response = client.post("/admin/login/?next=/admin/", {**form, "csrfmiddlewaretoken": token})
    assert response.status_code == 302 and "_auth_user_id" in client.session


@pytest.mark.django_db
def test_session_api_writes_need_the_csrf_token(staff_of_a):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(staff_of_a)
    assert client.get("/api/v1/characters").status_code == 200
    response = client.post("/api/v1/characters", {"name": "Kai"}, format="json")
    assert response.status_code == 403 and "CSRF" in response.json()["error"]["message"]


@pytest.mark.django_db
def test_key_revoked_in_admin_is_refused_on_the_next_request(studio_a):
    api = studio_a.client()
    assert api.get("/api/v1/characters").status_code == 200
    root = get_user_model().objects.create_superuser("root", "root@example.com", "root-pw-123")
    admin = Client()
    admin.force_login(root)
    admin.post("/admin/tenancy/apikey/", {"action": "revoke", "_selected_action": [studio_a.api_key.pk]})
    response = api.get("/api/v1/characters")
    assert response.status_code == 401 and response.json()["error"]["code"] == "revoked_api_key"
