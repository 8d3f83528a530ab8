"""Webhooks: signed deliveries to a real local HTTP server, retries, the SSRF guard."""

import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.utils import timezone

from alkemy.webhooks.models import DeliveryStatus, WebhookAttempt, WebhookDelivery
from alkemy.webhooks.services import (
    SIGNATURE_HEADER,
    UnsafeWebhookUrl,
    deliver,
    deliver_due,
    emit,
    endpoint_create,
    verify,
)

pytestmark = pytest.mark.django_db


class Receiver:
    """A local HTTP server answering with the queued status codes, recording what it received."""

    def __init__(self, statuses):
        self.statuses = list(statuses)
        self.received = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers), body))
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/alkemy"

    def close(self):
        self.server.shutdown()


@pytest.fixture
def receiver():
    server = Receiver([500, 200])
    yield server
    server.close()


def test_delivery_is_signed_and_retried_after_a_500(studio_a, receiver, settings, django_capture_on_commit_callbacks):
    settings.ALKEMY_WEBHOOK_ALLOW_PRIVATE = True  # the receiver is on loopback
    endpoint = endpoint_create(tenant=studio_a.tenant, url=receiver.url, events=["generation.succeeded"])
    emit(tenant_id=studio_a.tenant.pk, event="generation.failed", payload={"id": 1})  # not subscribed
    (delivery,) = emit(tenant_id=studio_a.tenant.pk, event="generation.succeeded", payload={"id": 7})

    assert deliver(delivery.pk) == DeliveryStatus.PENDING  # the receiver answered 500
    delivery.refresh_from_db()
    assert delivery.attempts == 1 and delivery.last_status_code == 500
    assert delivery.next_attempt_at > timezone.now()
    assert deliver_due() == 0  # not due yet

    WebhookDelivery.objects.unscoped().filter(pk=delivery.pk).update(next_attempt_at=timezone.now() - timedelta(1))
    assert deliver_due() == 1
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.DELIVERED and delivery.attempts == 2
    assert WebhookAttempt.objects.unscoped().filter(delivery=delivery).count() == 2

    headers, body = receiver.received[-1]
    assert verify(endpoint.secret, headers[SIGNATURE_HEADER], body)
    assert not verify(endpoint.secret, headers[SIGNATURE_HEADER], body + b" ")
    assert not verify("whsec_wrong", headers[SIGNATURE_HEADER], body)
    assert json.loads(body)["event"] == "generation.succeeded" and json.loads(body)["data"] == {"id": 7}
    assert headers["X-Alkemy-Event"] == "generation.succeeded"
    assert len(receiver.received) == 2
    assert deliver(delivery.pk) == "skipped"  # a delivered one is never sent again


def test_delivery_gives_up_after_max_attempts(studio_a, settings):
    settings.ALKEMY_WEBHOOK_ALLOW_PRIVATE = True
    settings.ALKEMY_WEBHOOK_MAX_ATTEMPTS = 2
    always_failing = Receiver([500, 500, 500])
    try:
        endpoint_create(tenant=studio_a.tenant, url=always_failing.url)
        (delivery,) = emit(tenant_id=studio_a.tenant.pk, event="generation.failed", payload={})
        assert deliver(delivery.pk) == DeliveryStatus.PENDING
        assert deliver(delivery.pk) == "skipped"  # its retry is not due yet
        WebhookDelivery.objects.unscoped().filter(pk=delivery.pk).update(next_attempt_at=timezone.now())
        assert deliver(delivery.pk) == DeliveryStatus.FAILED
    finally:
        always_failing.close()
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.FAILED and delivery.next_attempt_at is None


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8080/hook", "http://10.0.0.7/hook", "http://169.254.169.254/latest", "http://[::1]/x",
     "http://localhost/x", "ftp://example.com/hook", "file:///etc/passwd"],
)  # fmt: skip
def test_ssrf_guard_refuses_private_and_non_http_urls(studio_a, url):
    with pytest.raises(UnsafeWebhookUrl):
        endpoint_create(tenant=studio_a.tenant, url=url)


def test_webhook_api_creates_shows_secret_once_and_refuses_private_urls(api_a, studio_a, settings):
    response = api_a.post("/api/v1/webhooks", {"url": "http://10.1.2.3/hook"}, format="json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "unsafe_webhook_url"
    assert response.json()["error"]["details"]["field"] == "url"

    settings.ALKEMY_WEBHOOK_ALLOW_PRIVATE = True
    created = api_a.post("/api/v1/webhooks", {"url": "http://10.1.2.3/hook", "events": ["generation.failed"]},
                         format="json")  # fmt: skip
    assert created.status_code == 201
    assert created.json()["secret"].startswith("whsec_")
    shown = api_a.get(f"/api/v1/webhooks/{created.json()['id']}").json()
    assert "secret" not in shown and shown["secret_hint"].endswith("…")
    assert api_a.get(f"/api/v1/webhooks/{created.json()['id']}/deliveries").json() == []


def test_webhooks_are_tenant_private(api_a, api_b, settings):
    settings.ALKEMY_WEBHOOK_ALLOW_PRIVATE = True
    created = api_a.post("/api/v1/webhooks", {"url": "http://10.1.2.3/hook"}, format="json").json()
    assert api_b.get(f"/api/v1/webhooks/{created['id']}").status_code == 404
    assert api_b.delete(f"/api/v1/webhooks/{created['id']}").status_code == 404
    assert api_b.get("/api/v1/webhooks").json() == []


def test_delivery_connects_to_the_checked_address_not_a_fresh_dns_answer(studio_a, receiver, settings, monkeypatch):
    """DNS rebinding: the host name is resolved once, checked, and that address is the one used."""
    from alkemy.webhooks import services

    settings.ALKEMY_WEBHOOK_ALLOW_PRIVATE = True
    port = receiver.server.server_address[1]
    endpoint = endpoint_create(tenant=studio_a.tenant, url=f"http://127.0.0.1:{port}/hook")
    endpoint.url = f"http://hooks.invalid:{port}/hook"  # a name no resolver knows...
    endpoint.save()
    monkeypatch.setattr(services, "check_url", lambda url: "127.0.0.1")  # ...checked as this address
    receiver.statuses = [204]
    (delivery,) = emit(tenant_id=studio_a.tenant.pk, event="generation.queued", payload={})
    assert deliver(delivery.pk) == DeliveryStatus.DELIVERED
    headers, _ = receiver.received[-1]
    assert headers["Host"] == f"hooks.invalid:{port}"
