"""Structured logs: every line JSON with the request id (and tenant, job), no API key or webhook secret in any."""

import io
import json
import logging

import pytest
from django.test import Client

from alkemy.api import health
from alkemy.webhooks import services as webhook_services
from characters.import_jobs import run_import_job

pytestmark = pytest.mark.django_db


@pytest.fixture
def log_lines():
    """What the configured console handler (settings.LOGGING) writes, as lines."""
    handler = next(h for h in logging.getLogger().handlers if h.name == "console")
    buffer = io.StringIO()
    previous = handler.setStream(buffer)
    try:
        yield lambda: buffer.getvalue().splitlines()
    finally:
        handler.setStream(previous)


def test_log_lines_are_json_with_request_id_and_no_secrets(studio_a, settings, monkeypatch, log_lines):
    settings.ALKEMY_WEBHOOK_ALLOW_PRIVATE = True
    key = studio_a.key
    client = Client(raise_request_exception=False)
    auth = {"HTTP_AUTHORIZATION": f"Api-Key {key}"}
    logger = logging.getLogger("alkemy.test")

    original_create = webhook_services.endpoint_create

    def create_and_log(**kwargs):
        endpoint = original_create(**kwargs)
        # careless code that logs what it holds: the handler's filter must catch all of it
        logger.info("created endpoint secret=%s for %s", endpoint.secret, kwargs)
        logger.info("request headers: {'Authorization': 'Api-Key %s'}", key)
        return endpoint

    monkeypatch.setattr(webhook_services, "endpoint_create", create_and_log)
    created = client.post(
        "/api/v1/webhooks",
        {"url": "http://127.0.0.1:9/hook", "events": ["generation.succeeded"]},
        content_type="application/json",
        HTTP_X_REQUEST_ID="req-webhook-1",
        **auth,
    )
    assert created.status_code == 201, created.content
    assert created["X-Request-ID"] == "req-webhook-1"  # the caller's id, echoed
    secret = created.json()["secret"]
    assert secret.startswith("whsec_")

    def broken_database_health():
        logger.warning("checking with %s and webhook secret %s", key, secret)
        raise RuntimeError(f"database exploded (key {key}, secret {secret})")

    monkeypatch.setattr(health, "database_health", broken_database_health)
    failed = client.get("/api/v1/health", HTTP_X_REQUEST_ID="bad id with spaces", **auth)
    assert failed.status_code == 500
    generated = failed["X-Request-ID"]
    assert generated != "bad id with spaces" and len(generated) == 32  # unusable ids are replaced

    lines = log_lines()
    assert lines
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    for line, entry in zip(lines, entries, strict=True):
        assert entry["request_id"] in {"req-webhook-1", generated}, line
        assert key not in line and key.split("_", 2)[2] not in line, line
        assert secret not in line and secret.removeprefix("whsec_") not in line, line
    by_id = {entry["request_id"] for entry in entries}
    assert by_id == {"req-webhook-1", generated}
    created_line = next(e for e in entries if e["message"].startswith("created endpoint"))
    assert created_line["tenant"] == "studio-a" and "[REDACTED]" in created_line["message"]
    error = next(e for e in entries if e["level"] == "ERROR")
    assert error["logger"] == "django.request" and "RuntimeError: database exploded" in error["exception"]
    assert "[REDACTED]" in error["exception"]


def test_job_log_lines_name_the_job(log_lines):
    run_import_job(987654)  # not claimable (no such import): the task logs that it skipped it
    entries = [json.loads(line) for line in log_lines()]
    skipped = next(e for e in entries if "not claimed" in e["message"])
    assert skipped["job_kind"] == "import" and skipped["job_id"] == 987654
    assert skipped["request_id"] is None
