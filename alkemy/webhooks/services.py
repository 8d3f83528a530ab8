"""Webhooks: signed POSTs of job state changes, delivered by the `webhooks` cluster with retries.

Signature: header `X-Alkemy-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
Receivers recompute the HMAC over the timestamp, a dot and the raw body, compare in constant
time and reject old timestamps. Only http(s) URLs; addresses that resolve to private, loopback,
link-local or reserved networks are refused (SSRF) unless ALKEMY_WEBHOOK_ALLOW_PRIVATE is set,
both when the endpoint is saved and again at every delivery (DNS can change).

Sending never holds a database lock: a delivery is claimed in a short transaction (attempt
counted, `next_attempt_at` pushed past the longest the send can take, so no other worker takes
it meanwhile and a worker that dies mid-send is retried), the POST runs outside any
transaction, and its result is written in a second short transaction that tolerates the
endpoint or delivery having been deleted meanwhile. A slow receiver therefore delays only its
own deliveries: never a submission or cancel that emits an event, another delivery to the same
endpoint, or deleting the endpoint. Deliveries run on their own django-q2 cluster
(`Q_CLUSTER_NAME=webhooks`), so receivers never occupy the workers that run tenants' jobs.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import secrets
import socket
import ssl
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from alkemy.errors import AlkemyError
from alkemy.tenancy.models import Tenant
from alkemy.webhooks.models import EVENTS, DeliveryStatus, WebhookAttempt, WebhookDelivery, WebhookEndpoint

SIGNATURE_HEADER = "X-Alkemy-Signature"
EVENT_HEADER = "X-Alkemy-Event"
DELIVERY_HEADER = "X-Alkemy-Delivery"
BACKOFF_BASE_SECONDS = 5
BACKOFF_MAX_SECONDS = 3600
WEBHOOK_CLUSTER = "webhooks"

logger = logging.getLogger(__name__)


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
    a private network. A refusal never says what the name resolved to, nor whether it resolved
    at all: the answer would map a private network's DNS for whoever can create endpoints.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeWebhookUrl("Webhook URLs must be http:// or https:// with a host.", field="url")
    refused = UnsafeWebhookUrl(
        f"The host '{parts.hostname}' does not resolve to a public address; refused.", field="url"
    )
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except (socket.gaierror, UnicodeError, ValueError):
        raise refused from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not settings.ALKEMY_WEBHOOK_ALLOW_PRIVATE and not all(is_public(address) for address in addresses):
        raise refused
    return str(addresses[0])


_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix: the IPv4 address is the last 32 bits
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215 local-use translation: never globally reachable
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally reachable, judging IPv6 forms that carry an IPv4 address by that address too.

    IPv4-mapped (`::ffff:127.0.0.1`), IPv4-compatible (`::7f00:1`), NAT64 (`64:ff9b::7f00:1`) and
    6to4 (`2002:7f00:1::`) addresses reach the embedded IPv4 host through the stack, a NAT64
    gateway or a 6to4 relay; Python calls most of them global whatever they embed.
    """
    if not address.is_global:
        return False
    if address.version == 4:
        return True
    if address in _LOCAL_NAT64:
        return False
    embedded = address.ipv4_mapped or address.sixtofour
    if embedded is None and (address in _IPV4_COMPATIBLE or address in _NAT64):
        embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return embedded is None or embedded.is_global


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
    """Record a delivery per interested endpoint and send each after the transaction commits.

    The endpoints are read FOR KEY SHARE: deleting one of them (`endpoint_delete`) waits for this
    transaction and then removes its new delivery too, and one deleted first is simply skipped,
    so a concurrent delete never fails the job transition that emits. Emits never wait for
    each other, nor for a delivery being sent.
    """
    endpoints = WebhookEndpoint.objects.unscoped().raw(
        f"SELECT * FROM {WebhookEndpoint._meta.db_table} WHERE tenant_id = %s AND is_active"
        " AND (cardinality(events) = 0 OR %s = ANY(events)) ORDER BY id FOR KEY SHARE",  # what wants(event) says
        [tenant_id, event],
    )
    deliveries = [
        WebhookDelivery.objects.unscoped().create(
            tenant_id=tenant_id, endpoint=endpoint, event=event, payload=payload, next_attempt_at=timezone.now()
        )
        for endpoint in endpoints
    ]
    for delivery in deliveries:
        transaction.on_commit(lambda pk=delivery.pk: enqueue_delivery(pk))
    return deliveries


def endpoint_delete(*, endpoint: WebhookEndpoint) -> None:
    """Delete an endpoint with its deliveries and their attempt log.

    The row is locked first, so the deliveries and attempts collected for the cascade are all
    there are: an emit or a delivery result committing meanwhile waits, then finds it gone.
    """
    with transaction.atomic():
        locked = WebhookEndpoint.objects.unscoped().select_for_update().filter(pk=endpoint.pk).first()
        if locked is not None:
            locked.delete()


def enqueue_delivery(delivery_id: int) -> None:
    """Hand one delivery to the webhooks cluster (never the clusters that run tenants' jobs)."""
    from django_q.tasks import async_task

    async_task(
        "alkemy.webhooks.services.deliver",
        delivery_id,
        cluster=WEBHOOK_CLUSTER,
        task_name=f"webhook-{delivery_id}-{time.time_ns()}",
    )


def backoff(attempt: int) -> timedelta:
    return timedelta(seconds=min(BACKOFF_BASE_SECONDS * 2 ** (attempt - 1), BACKOFF_MAX_SECONDS))


def send_lease() -> timedelta:
    """How long a claimed delivery is left alone: connect, send and read may each take the timeout."""
    return timedelta(seconds=3 * settings.ALKEMY_WEBHOOK_TIMEOUT_SECONDS + 30)


@dataclass(frozen=True)
class ClaimedDelivery:
    """What one attempt needs, read while claiming so the send itself touches no row."""

    pk: int
    tenant_id: int
    endpoint_id: int
    number: int
    event: str
    url: str
    secret: str
    body: bytes


def _due():
    return WebhookDelivery.objects.unscoped().filter(
        status=DeliveryStatus.PENDING,
        attempts__lt=settings.ALKEMY_WEBHOOK_MAX_ATTEMPTS,
        next_attempt_at__lte=timezone.now(),
    )


def _claim(due) -> ClaimedDelivery | None:
    """Claim the first of `due` no other worker holds: count the attempt and lease it, then commit."""
    with transaction.atomic():
        delivery = (
            due.select_for_update(skip_locked=True, of=("self",))  # the delivery row only, never the endpoint
            .select_related("endpoint")
            .order_by("next_attempt_at", "pk")
            .first()
        )
        if delivery is None:
            return None
        delivery.attempts += 1
        delivery.next_attempt_at = timezone.now() + send_lease()  # if this worker dies, the sweep retries
        delivery.save(update_fields=["attempts", "next_attempt_at"])
    body = json.dumps(
        {"id": delivery.pk, "event": delivery.event, "created_at": delivery.created_at.isoformat(),
         "data": delivery.payload},
        separators=(",", ":"),
        sort_keys=True,
    ).encode()  # fmt: skip
    return ClaimedDelivery(
        pk=delivery.pk, tenant_id=delivery.tenant_id, endpoint_id=delivery.endpoint_id, number=delivery.attempts,
        event=delivery.event,
        url=delivery.endpoint.url, secret=delivery.endpoint.secret, body=body,
    )  # fmt: skip


def deliver(delivery_id: int) -> str:
    """One attempt of a delivery (a task on the webhooks cluster). Returns the new status, "skipped"
    when it is not due (delivered, given up, waiting for its retry or being sent by another
    worker), or "gone" when the endpoint was deleted while it was being sent."""
    claimed = _claim(_due().filter(pk=delivery_id))
    if claimed is None:
        return "skipped"
    return _attempt(claimed)


def deliver_due(limit: int = 500) -> int:
    """Periodic (webhooks cluster): send pending deliveries whose retry time has come, one claim at a
    time so that concurrent sweeps share the work. Returns how many were attempted."""
    stale = _stale_after_max_attempts().update(
        status=DeliveryStatus.FAILED, next_attempt_at=None,
        last_error="The worker sending the last attempt stopped before it finished; gave up.",
    )  # fmt: skip
    if stale:
        logger.warning("gave up %s webhook deliveries whose last attempt never reported back", stale)
    sent = 0
    while sent < limit and (claimed := _claim(_due())) is not None:
        _attempt(claimed)
        sent += 1
    return sent


def _stale_after_max_attempts():
    return WebhookDelivery.objects.unscoped().filter(
        status=DeliveryStatus.PENDING,
        attempts__gte=settings.ALKEMY_WEBHOOK_MAX_ATTEMPTS,
        next_attempt_at__lte=timezone.now(),
    )


def _attempt(claimed: ClaimedDelivery) -> str:
    """Send outside any transaction, then record the result."""
    started = time.monotonic()
    status_code, error = _post(claimed)
    return _record(claimed, status_code, error, int((time.monotonic() - started) * 1000))


def _record(claimed: ClaimedDelivery, status_code: int | None, error: str, duration_ms: int) -> str:
    """Write one attempt's outcome; the endpoint or delivery may have been deleted during the send."""
    try:
        with transaction.atomic():
            # The endpoint, then the delivery, FOR NO KEY UPDATE: the order `endpoint_delete` locks and
            # deletes in, so a delete waits for these few milliseconds (and then removes this attempt
            # too) or has already removed both; new deliveries to the endpoint are not held up.
            endpoint = WebhookEndpoint.objects.unscoped().select_for_update(no_key=True).filter(pk=claimed.endpoint_id)
            delivery = WebhookDelivery.objects.unscoped().select_for_update(no_key=True).filter(pk=claimed.pk)
            if endpoint.values_list("pk", flat=True).first() is None or (delivery := delivery.first()) is None:
                return _gone(claimed)
            WebhookAttempt.objects.unscoped().create(
                tenant_id=claimed.tenant_id, delivery_id=claimed.pk, number=claimed.number,
                status_code=status_code, error=error, duration_ms=duration_ms,
            )  # fmt: skip
            if delivery.status != DeliveryStatus.PENDING or delivery.attempts != claimed.number:
                return delivery.status  # a newer attempt owns the outcome (this one outlived its lease)
            delivery.last_status_code, delivery.last_error = status_code, error
            if status_code is not None and 200 <= status_code < 300:
                delivery.status, delivery.delivered_at, delivery.next_attempt_at = (
                    DeliveryStatus.DELIVERED, timezone.now(), None,
                )  # fmt: skip
            elif delivery.attempts >= settings.ALKEMY_WEBHOOK_MAX_ATTEMPTS:
                delivery.status, delivery.next_attempt_at = DeliveryStatus.FAILED, None
            else:
                delivery.next_attempt_at = timezone.now() + backoff(delivery.attempts)
            delivery.save(update_fields=["status", "delivered_at", "next_attempt_at", "last_status_code", "last_error"])
            return delivery.status
    except IntegrityError:
        # deleted by a path that does not lock the endpoint first (a tenant, bulk deletes in admin)
        return _gone(claimed)


def _gone(claimed: ClaimedDelivery) -> str:
    logger.info(
        "webhook delivery %s (%s): its endpoint was deleted during attempt %s; result not recorded",
        claimed.pk, claimed.event, claimed.number,
    )  # fmt: skip
    return "gone"


def _post(claimed: ClaimedDelivery) -> tuple[int | None, str]:
    try:
        address = check_url(claimed.url)
    except UnsafeWebhookUrl as exc:
        return None, exc.message
    parts = urlsplit(claimed.url)
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
        SIGNATURE_HEADER: sign(claimed.secret, int(time.time()), claimed.body),
        EVENT_HEADER: claimed.event,
        DELIVERY_HEADER: str(claimed.pk),
    }
    deadline = _Deadline(connection, timeout)
    try:
        connection.request("POST", path, body=claimed.body, headers=headers)
        status = connection.getresponse().status  # redirects are not followed: they could point anywhere
    except (OSError, http.client.HTTPException) as exc:
        status, error = None, f"{type(exc).__name__}: {exc}"[:500]
    else:
        error = "" if 200 <= status < 300 else f"HTTP {status}"
    finally:
        deadline.cancel()
        connection.close()
    if deadline.expired:  # whatever was read, the answer was cut off at the deadline
        return None, f"Timed out: no complete answer within {timeout}s."
    return status, error


class _Deadline:
    """The whole request gets `seconds`: the socket timeout bounds each read alone, so a receiver that
    trickles its answer a byte at a time would otherwise hold a webhooks worker forever. At the deadline
    the socket is shut down, which ends whatever read or write the send is blocked in."""

    def __init__(self, connection: http.client.HTTPConnection, seconds: float) -> None:
        self.connection, self.expired = connection, False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        self.expired = True
        sock = self.connection.sock
        if sock is not None:
            with suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to the address we checked, with SNI and certificate checks for the URL's host name."""

    def __init__(self, host: str, port: int, *, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
