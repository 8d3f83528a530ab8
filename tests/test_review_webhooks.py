"""Review findings on webhooks and job notifications: no lock held while a receiver answers, the
webhooks cluster, one `generation.canceled` per cancellation, owners/admins only, no DNS oracle,
IPv6 forms of private IPv4 addresses, and deletions racing a finishing job or a delivery."""

import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.core.files.storage import FileSystemStorage
from django.db import connection, transaction
from django.utils import timezone

from alkemy.jobs import JobStatus, job_claim
from alkemy.tenancy.services import api_key_create
from alkemy.webhooks.models import DeliveryStatus, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from alkemy.webhooks.services import (
    UnsafeWebhookUrl,
    check_url,
    deliver,
    deliver_due,
    emit,
    endpoint_create,
    endpoint_delete,
)
from characters.services import character_create, character_delete, reference_add
from generation.jobs import generation_cancel, generation_submit
from generation.models import GeneratedImage, GenerationJob
from generation.tasks import reap_jobs, run_generation_job
from tests import photos
from tests.qcluster import Cluster, wait_for
from tests.test_gemini import gemini, image_reply  # noqa: F401  (gemini is a fixture)

pytestmark = pytest.mark.django_db


class HeldReceiver:
    """A local receiver that keeps the first request waiting until `release()`; others answer 200 at once."""

    def __init__(self):
        self.arrived, self.released, self.answered = threading.Event(), threading.Event(), threading.Event()
        self.received: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                self.rfile.read(int(self.headers["Content-Length"]))
                first = not receiver.received
                receiver.received.append(self.headers["X-Alkemy-Delivery"])
                if first:
                    receiver.arrived.set()
                    receiver.released.wait(30)  # bounds a failing run only
                self.send_response(200)
                self.end_headers()
                if first:
                    receiver.answered.set()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def release(self):
        self.released.set()

    def close(self):
        self.release()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def held(settings):
    settings.ALKEMY_WEBHOOK_ALLOW_PRIVATE = True  # the receiver is on loopback
    receiver = HeldReceiver()
    yield receiver
    receiver.close()


class InThread(threading.Thread):
    """Runs `target` on its own database connection and keeps its result or exception."""

    def __init__(self, target):
        super().__init__(daemon=True)
        self.target, self.result, self.error = target, None, None
        self.start()

    def run(self):
        try:
            self.result = self.target()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            connection.close()


def lock_waits() -> int:
    """How many database sessions wait for a lock now (a thread blocked on a row another one holds)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_locks WHERE NOT granted")
        return cursor.fetchone()[0]


# --- 4: no lock while a receiver answers; deliveries on their own cluster --------------------------------


@pytest.mark.django_db(transaction=True)
def test_deleting_an_endpoint_while_its_delivery_is_in_flight_does_not_wait_and_drops_the_result(studio_a, api_a, held):
    endpoint = endpoint_create(tenant=studio_a.tenant, url=held.url)
    (delivery,) = emit(tenant_id=studio_a.tenant.pk, event="generation.succeeded", payload={"id": 1})
    sending = InThread(lambda: deliver(delivery.pk))
    assert held.arrived.wait(10)

    response = api_a.delete(f"/api/v1/webhooks/{endpoint.pk}")

    assert response.status_code == 204
    assert not held.answered.is_set()  # the delete did not wait for the receiver
    held.release()
    sending.join(30)
    assert sending.error is None and sending.result == "gone"
    assert not WebhookEndpoint.objects.unscoped().exists()
    assert not WebhookDelivery.objects.unscoped().exists() and not WebhookAttempt.objects.unscoped().exists()


@pytest.mark.django_db(transaction=True)
def test_a_slow_receiver_delays_neither_new_events_nor_the_endpoints_other_deliveries(studio_a, held):
    endpoint_create(tenant=studio_a.tenant, url=held.url)
    (slow,) = emit(tenant_id=studio_a.tenant.pk, event="generation.queued", payload={"id": 1})
    sending = InThread(lambda: deliver(slow.pk))
    assert held.arrived.wait(10)

    with transaction.atomic():  # what a submission or a cancel does: emit inside its transaction
        others = [emit(tenant_id=studio_a.tenant.pk, event="generation.running", payload={"id": n})[0]
                  for n in range(11)]  # fmt: skip
    assert deliver(slow.pk) == "skipped"  # in flight: never sent twice
    assert deliver_due() == 11  # every other delivery to the same endpoint goes out now, none skipped

    assert not held.answered.is_set()  # all of it while the first receiver call was still open
    delivered = WebhookDelivery.objects.unscoped().filter(pk__in=[d.pk for d in others])
    assert set(delivered.values_list("status", flat=True)) == {DeliveryStatus.DELIVERED}
    held.release()
    sending.join(30)
    assert sending.error is None and sending.result == DeliveryStatus.DELIVERED
    assert sorted(held.received) == sorted(str(d.pk) for d in [slow, *others])  # each exactly once


@pytest.mark.django_db(transaction=True)
def test_an_endpoint_deleted_while_a_job_transition_emits_to_it_fails_neither(studio_a, settings):
    settings.ALKEMY_WEBHOOK_ALLOW_PRIVATE = True
    endpoint = endpoint_create(tenant=studio_a.tenant, url="http://10.0.0.1/hook")
    with transaction.atomic():
        emit(tenant_id=studio_a.tenant.pk, event="generation.succeeded", payload={"id": 1})
        deleting = InThread(lambda: endpoint_delete(endpoint=endpoint))
        wait_for(lambda: not deleting.is_alive() or lock_waits() >= 1, timeout=10, what="the delete")
    deleting.join(10)
    assert deleting.error is None
    assert not WebhookEndpoint.objects.unscoped().exists() and not WebhookDelivery.objects.unscoped().exists()


def test_a_delivery_whose_sender_died_is_retried_after_its_lease(studio_a, settings):
    settings.ALKEMY_WEBHOOK_ALLOW_PRIVATE = True
    settings.ALKEMY_WEBHOOK_MAX_ATTEMPTS = 2
    endpoint_create(tenant=studio_a.tenant, url="http://10.0.0.1/hook")
    (delivery,) = emit(tenant_id=studio_a.tenant.pk, event="generation.failed", payload={})
    # two claims whose workers never reported back, their leases long over
    WebhookDelivery.objects.unscoped().filter(pk=delivery.pk).update(attempts=2, next_attempt_at=timezone.now())
    assert deliver_due() == 0
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.FAILED and "stopped" in delivery.last_error


def test_webhooks_are_queued_for_the_webhooks_cluster_and_swept_there(studio_a, settings,
                                                                      django_capture_on_commit_callbacks):  # fmt: skip
    from django_q.models import OrmQ, Schedule

    settings.ALKEMY_WEBHOOK_ALLOW_PRIVATE = True
    endpoint_create(tenant=studio_a.tenant, url="http://10.0.0.1/hook")
    with django_capture_on_commit_callbacks(execute=True):
        emit(tenant_id=studio_a.tenant.pk, event="generation.queued", payload={})
    assert OrmQ.objects.filter(key="webhooks").count() == 1
    assert not OrmQ.objects.exclude(key="webhooks").exists()  # not the queue that runs tenants' jobs
    assert Schedule.objects.get(name="deliver due webhooks").cluster == "webhooks"


@pytest.mark.django_db(transaction=True)
def test_the_webhooks_cluster_sends_deliveries(studio_a, settings):
    settings.ALKEMY_WEBHOOK_ALLOW_PRIVATE = True
    receiver = HeldReceiver()
    receiver.release()
    cluster = Cluster("webhooks", ALKEMY_WEBHOOK_ALLOW_PRIVATE="1")
    try:
        endpoint_create(tenant=studio_a.tenant, url=receiver.url)
        with transaction.atomic():
            (delivery,) = emit(tenant_id=studio_a.tenant.pk, event="generation.queued", payload={})
        cluster.start()
        wait_for(
            lambda: WebhookDelivery.objects.unscoped().get(pk=delivery.pk).status == DeliveryStatus.DELIVERED,
            timeout=60, what="the delivery",
        )  # fmt: skip
        assert receiver.received == [str(delivery.pk)]
    finally:
        cluster.stop()
        receiver.close()


# --- 10: one generation.canceled per cancellation, timestamps across re-queues ---------------------------


@pytest.fixture
def eileen(studio_a, media_root):
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=character, upload=photos.upload(photos.astronaut()))
    return character


@pytest.fixture
def subscribed(studio_a, settings):
    settings.ALKEMY_WEBHOOK_ALLOW_PRIVATE = True
    endpoint_create(tenant=studio_a.tenant, url="http://10.0.0.1/hook")

    def events(name: str) -> int:
        return WebhookDelivery.objects.unscoped().filter(event=f"generation.{name}").count()

    return events


def submit(studio, character):
    job, _ = generation_submit(tenant=studio.tenant, character=character, prompt="x", width=64, height=64, steps=2)
    return job


def test_repeated_cancels_emit_one_canceled_event(studio_a, eileen, subscribed):
    job = submit(studio_a, eileen)
    for _ in range(3):
        assert generation_cancel(job=job).status == JobStatus.CANCELED
    assert subscribed("canceled") == 1


def test_cancelling_a_running_job_leaves_the_event_to_its_worker(studio_a, eileen, subscribed):
    job = submit(studio_a, eileen)
    job_claim(GenerationJob, job.pk, worker="w:1")
    assert generation_cancel(job=job).cancel_requested
    generation_cancel(job=job)
    assert subscribed("canceled") == 0


def test_a_job_requeued_by_the_reaper_then_canceled_emits_once_and_never_waits_negative_time(
    studio_a, eileen, subscribed
):
    job = submit(studio_a, eileen)
    job_claim(GenerationJob, job.pk, worker="gone:1")
    GenerationJob.objects.unscoped().filter(pk=job.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert reap_jobs()["requeued"] == 1
    requeued = GenerationJob.objects.unscoped().get(pk=job.pk)
    assert requeued.started_at is None and requeued.queue_wait_seconds is None  # waiting again, not started

    canceled = generation_cancel(job=requeued)
    generation_cancel(job=requeued)

    assert canceled.status == JobStatus.CANCELED and subscribed("canceled") == 1
    assert canceled.queue_wait_seconds is None


def test_a_requeued_job_measures_its_wait_from_the_requeue(studio_a, eileen):
    job = submit(studio_a, eileen)
    job_claim(GenerationJob, job.pk, worker="gone:1")
    GenerationJob.objects.unscoped().filter(pk=job.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    reap_jobs()
    job_claim(GenerationJob, job.pk, worker="w:2")
    job.refresh_from_db()
    assert job.attempt == 2 and job.queue_wait_seconds >= 0 and job.run_seconds >= 0


# --- 14: owners and admins only, reads included -----------------------------------------------------------


@pytest.mark.parametrize("role", ["member", "viewer"])
def test_members_and_viewers_cannot_read_webhook_urls_or_delivery_logs(studio_a, settings, role):
    settings.ALKEMY_WEBHOOK_ALLOW_PRIVATE = True
    endpoint = endpoint_create(tenant=studio_a.tenant, url="http://10.0.0.1/T0/B0/secret-token")
    _, key = api_key_create(tenant=studio_a.tenant, name=role, role=role)
    client = studio_a.client(key)
    for path in ["/api/v1/webhooks", f"/api/v1/webhooks/{endpoint.pk}", f"/api/v1/webhooks/{endpoint.pk}/deliveries"]:
        response = client.get(path)
        assert response.status_code == 403, path
        assert response.json()["error"]["code"] == "permission_denied"
        assert "owners and admins" in response.json()["error"]["message"]
        assert "secret-token" not in response.content.decode()


def test_admins_read_webhooks(studio_a, settings):
    settings.ALKEMY_WEBHOOK_ALLOW_PRIVATE = True
    endpoint = endpoint_create(tenant=studio_a.tenant, url="http://10.0.0.1/hook")
    _, key = api_key_create(tenant=studio_a.tenant, name="admin", role="admin")
    listed = studio_a.client(key).get("/api/v1/webhooks")
    assert listed.status_code == 200 and [e["id"] for e in listed.json()] == [endpoint.pk]


# --- 19 and the IPv6 forms: refusals say nothing about the network ----------------------------------------


@pytest.mark.parametrize("host", ["localhost", "no-such-host.invalid"])
def test_a_refused_host_is_not_told_what_it_resolves_to_or_whether_it_resolves(api_a, host):
    response = api_a.post("/api/v1/webhooks", {"url": f"http://{host}/hook"}, format="json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "unsafe_webhook_url" and error["details"] == {"field": "url"}
    assert error["message"] == f"The host '{host}' does not resolve to a public address; refused."
    assert "127.0.0.1" not in response.content.decode() and "::1" not in response.content.decode()


@pytest.mark.parametrize(
    "host",
    ["[::7f00:1]", "[64:ff9b::7f00:1]", "[64:ff9b::a9fe:a9fe]", "[2002:7f00:1::]", "[2002:a00:7::1]",
     "[::ffff:127.0.0.1]", "[::ffff:a00:1]", "[64:ff9b:1::a00:1]"],
)  # fmt: skip
def test_ipv6_forms_of_private_ipv4_addresses_are_refused(studio_a, host):
    with pytest.raises(UnsafeWebhookUrl):
        endpoint_create(tenant=studio_a.tenant, url=f"http://{host}/hook")


@pytest.mark.parametrize("host", ["[64:ff9b::808:808]", "[2002:808:808::1]", "8.8.8.8"])
def test_ipv6_forms_of_public_ipv4_addresses_are_accepted(host):
    assert check_url(f"https://{host}/hook")


# --- deleting a character while its job finishes ----------------------------------------------------------


class DeletingStorage(FileSystemStorage):
    """Media storage that runs `before_save` once, just before the worker's first output is written."""

    before_save = None

    def _save(self, name, content):
        hook, DeletingStorage.before_save = DeletingStorage.before_save, None
        if hook:
            hook()
        return super()._save(name, content)


def test_a_character_deleted_as_its_job_stores_outputs_ends_the_job_quietly_without_files(
    gemini,  # noqa: F811
    studio_a,
    eileen,
    media_root,
    settings,
    subscribed,
):
    gemini.reply(image_reply())
    job, _ = generation_submit(tenant=studio_a.tenant, character=eileen, method="gemini", prompt="x", width=512,
                               height=512)  # fmt: skip
    settings.STORAGES = {**settings.STORAGES, "default": {"BACKEND": f"{__name__}.DeletingStorage"}}
    DeletingStorage.before_save = lambda: character_delete(character=eileen)

    assert run_generation_job(job.pk) == "lost"

    assert DeletingStorage.before_save is None  # the deletion did happen mid-store
    assert not GenerationJob.objects.unscoped().filter(pk=job.pk).exists()
    assert not GeneratedImage.objects.unscoped().exists()
    assert not [p for p in media_root.rglob("*") if p.is_file() and "generations" in p.parts]
    assert subscribed("succeeded") == 0


@pytest.mark.django_db(transaction=True)
def test_deleting_a_character_while_its_job_commits_outputs_deletes_everything(
    gemini,  # noqa: F811
    studio_a,
    eileen,
    media_root,
    settings,
):
    settings.ALKEMY_WEBHOOK_ALLOW_PRIVATE = True
    endpoint = endpoint_create(tenant=studio_a.tenant, url="http://10.0.0.1/hook", events=["generation.succeeded"])
    gemini.reply(image_reply())
    job, _ = generation_submit(tenant=studio_a.tenant, character=eileen, method="gemini", prompt="x", width=512,
                               height=512)  # fmt: skip
    locked, release = threading.Event(), threading.Event()

    def hold_endpoint():  # pauses the worker inside its finishing transaction, at its succeeded event
        with transaction.atomic():
            WebhookEndpoint.objects.unscoped().select_for_update().filter(pk=endpoint.pk).first()
            locked.set()
            release.wait(30)

    holder = InThread(hold_endpoint)
    assert locked.wait(10)
    finishing = InThread(lambda: run_generation_job(job.pk))
    wait_for(lambda: lock_waits() >= 1 or not finishing.is_alive(), timeout=60, what="the finish")
    deleting = InThread(lambda: character_delete(character=eileen))
    wait_for(lambda: not deleting.is_alive() or lock_waits() >= 2, timeout=10, what="the delete")
    release.set()
    for thread in (holder, finishing, deleting):
        thread.join(30)

    assert finishing.error is None and finishing.result == JobStatus.SUCCEEDED
    assert deleting.error is None
    assert not GenerationJob.objects.unscoped().exists() and not GeneratedImage.objects.unscoped().exists()
    assert not [p for p in media_root.rglob("*") if p.is_file()]
