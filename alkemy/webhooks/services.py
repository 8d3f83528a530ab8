"""Webhooks: signed POSTs of job state changes, delivered from the CPU cluster with retries.

Signature: header `X-Alkemy-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
Receivers recompute the HMAC over the timestamp, a dot and the raw body, compare in constant
time and reject old timestamps. Only http(s) URLs; addresses that resolve to private, loopback,
link-local or reserved networks are refused (SSRF) unless ALKEMY_WEBHOOK_ALLOW_PRIVATE is set,
both when the endpoint is saved and again at every delivery (DNS can change).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import secrets
import socket
import ssl
import time
from datetime import timedelta
from urllib.parse import urlsplit

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from alkemy.errors import AlkemyError
from alkemy.tenancy.models import Tenant
from alkemy.webhooks.models import EVENTS, DeliveryStatus, WebhookAttempt, WebhookDelivery, WebhookEndpoint

SIGNATURE_HEADER = "X-Alkemy-Signature"
EVENT_HEADER = "X-Alkemy-Event"
DELIVERY_HEADER = "X-Alkemy-Delivery"
BACKOFF_BASE_SECONDS = 5
BACKOFF_MAX_SECONDS = 3600


class UnsafeWebhookUrl(AlkemyError):
    code = "unsafe_webhook_url"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, header: str, body: bytes, *, tolerance_seconds: int = 300) -> bool:
    """What a receiver does (used by our tests and documented for integrators)."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance_seconds:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), header)


def check_url(url: str) -> str:
    """Refuse non-http(s) URLs and, unless allowed, hosts resolving to non-public addresses.

    Returns the address to connect to: the delivery connects to exactly the address that was
    checked, so a DNS answer that changes between check and connect (rebinding) cannot reach
    a private network.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeWebhookUrl("Webhook URLs must be http:// or https:// with a host.", field="url")
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except (socket.gaierror, UnicodeError, ValueError):
        raise UnsafeWebhookUrl(f"The host '{parts.hostname}' does not resolve.", field="url") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not settings.ALKEMY_WEBHOOK_ALLOW_PRIVATE:
        for address in addresses:
            if not address.is_global:
                raise UnsafeWebhookUrl(
                    f"The host '{parts.hostname}' resolves to a non-public address ({address}); refused.",
                    field="url",
                    details={"address": str(address)},
                )
    return str(addresses[0])


def endpoint_create(*, tenant: Tenant, url: str, events: list[str] | None = None) -> WebhookEndpoint:
    events = list(events or [])
    unknown = sorted(set(events) - set(EVENTS))
    if unknown:
        raise AlkemyError(f"Unknown events {unknown}; known: {EVENTS}", code="unknown_event", field="events")
    check_url(url)
    return WebhookEndpoint.objects.unscoped().create(
        tenant=tenant, url=url, events=events, secret="whsec_" + secrets.token_urlsafe(32)
    )


def emit(*, tenant_id: int, event: str, payload: dict) -> list[WebhookDelivery]:
    """Record a delivery per interested endpoint and send each after the transaction commits."""
    deliveries = [
        WebhookDelivery.objects.unscoped().create(
            tenant_id=tenant_id, endpoint=endpoint, event=event, payload=payload, next_attempt_at=timezone.now()
        )
        for endpoint in WebhookEndpoint.objects.unscoped().filter(tenant_id=tenant_id, is_active=True)
        if endpoint.wants(event)
    ]
    for delivery in deliveries:
        transaction.on_commit(lambda pk=delivery.pk: enqueue_delivery(pk))
    return deliveries


def enqueue_delivery(delivery_id: int) -> None:
    from django_q.tasks import async_task

    async_task("alkemy.webhooks.services.deliver", delivery_id, task_name=f"webhook-{delivery_id}-{time.time_ns()}")


def backoff(attempt: int) -> timedelta:
    return timedelta(seconds=min(BACKOFF_BASE_SECONDS * 2 ** (attempt - 1), BACKOFF_MAX_SECONDS))


def deliver(delivery_id: int) -> str:
    """One attempt of a delivery (a django-q2 task on the default cluster). Returns the new status."""
    with transaction.atomic():
        delivery = (
            WebhookDelivery.objects.unscoped()
            .select_for_update(skip_locked=True)
            .select_related("endpoint")
            .filter(pk=delivery_id, status=DeliveryStatus.PENDING)
            .first()
        )
        if delivery is None:
            return "skipped"  # delivered, given up, or another worker is on it
        delivery.attempts += 1
        body = json.dumps(
            {
                "id": delivery.pk,
                "event": delivery.event,
                "created_at": delivery.created_at.isoformat(),
                "data": delivery.payload,
            },
            separators=(",", ":"),
            sort_keys=True,
        ).encode()
        started = time.monotonic()
        status_code, error = _post(delivery.endpoint, delivery, body)
        WebhookAttempt.objects.unscoped().create(
            tenant_id=delivery.tenant_id,
            delivery=delivery,
            number=delivery.attempts,
            status_code=status_code,
            error=error,
            duration_ms=int((time.monotonic() - started) * 1000),
        )
        delivery.last_status_code = status_code
        delivery.last_error = error
        if status_code is not None and 200 <= status_code < 300:
            delivery.status, delivery.delivered_at, delivery.next_attempt_at = (
                DeliveryStatus.DELIVERED,
                timezone.now(),
                None,
            )
        elif delivery.attempts >= settings.ALKEMY_WEBHOOK_MAX_ATTEMPTS:
            delivery.status, delivery.next_attempt_at = DeliveryStatus.FAILED, None
        else:
            delivery.next_attempt_at = timezone.now() + backoff(delivery.attempts)
        delivery.save()
    return delivery.status


def _post(endpoint: WebhookEndpoint, delivery: WebhookDelivery, body: bytes) -> tuple[int | None, str]:
    try:
        address = check_url(endpoint.url)
    except UnsafeWebhookUrl as exc:
        return None, exc.message
    parts = urlsplit(endpoint.url)
    timeout = settings.ALKEMY_WEBHOOK_TIMEOUT_SECONDS
    if parts.scheme == "https":
        connection = _PinnedHTTPSConnection(parts.hostname, parts.port or 443, address=address, timeout=timeout)
    else:
        connection = http.client.HTTPConnection(address, parts.port or 80, timeout=timeout)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = {
        "Host": parts.netloc.rsplit("@", 1)[-1],
        "Content-Type": "application/json",
        "User-Agent": "AlkemyCast-Webhooks/1",
        SIGNATURE_HEADER: sign(endpoint.secret, int(time.time()), body),
        EVENT_HEADER: delivery.event,
        DELIVERY_HEADER: str(delivery.pk),
    }
    try:
        connection.request("POST", path, body=body, headers=headers)
        status = connection.getresponse().status  # redirects are not followed: they could point anywhere
    except (OSError, http.client.HTTPException) as exc:
        return None, f"{type(exc).__name__}: {exc}"[:500]
    finally:
        connection.close()
    return status, "" if 200 <= status < 300 else f"HTTP {status}"


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to the address we checked, with SNI and certificate checks for the URL's host name."""

    def __init__(self, host: str, port: int, *, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def deliver_due() -> int:
    """Periodic: send every pending delivery whose retry time has come. Returns how many were sent."""
    due = list(
        WebhookDelivery.objects.unscoped()
        .filter(status=DeliveryStatus.PENDING, next_attempt_at__lte=timezone.now())
        .values_list("pk", flat=True)[:500]
    )
    for delivery_id in due:
        deliver(delivery_id)
    return len(due)
