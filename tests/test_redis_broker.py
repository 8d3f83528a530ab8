"""django-q2's Redis broker (REDIS_URL) end to end against a real `redis-server` on loopback.

The ORM broker is what the rest of the suite uses; deployments (deploy/compose.yaml, deploy/k8s) set
REDIS_URL. A job submitted through the API travels through Redis to a real GPU cluster and succeeds; a
worker killed mid-job leaves it to the reaper, which re-queues it through Redis to a fresh cluster.
"""

import shutil

import pytest
import redis
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from alkemy.jobs import JobStatus
from characters.services import character_create, reference_add
from generation.models import GeneratedImage, GenerationJob
from generation.tasks import reap_jobs
from tests import photos
from tests.qcluster import Cluster, wait_for
from tests.servers import free_port, running

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

REDIS_SERVER = shutil.which("redis-server")


@pytest.fixture
def redis_url(tmp_path):
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server; .ci/run does as root)")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    argv = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(tmp_path)]  # fmt: skip
    client = redis.Redis.from_url(url)
    with running(argv, ready=client.ping, timeout=10, not_yet=(redis.ConnectionError,)):
        yield url


@pytest.fixture
def redis_broker(redis_url, settings, monkeypatch, tiny_models_dir, media_root):
    """This process submits through Redis (django-q2 reads its configuration once, at import)."""
    from django_q.conf import Conf

    settings.REDIS_URL = redis_url
    settings.ALKEMY_MODELS_DIR = tiny_models_dir
    monkeypatch.setattr(Conf, "ORM", None)
    monkeypatch.setattr(Conf, "REDIS", redis_url)
    monkeypatch.setenv("REDIS_URL", redis_url)  # the clusters' settings select the Redis broker from it
    return redis.Redis.from_url(redis_url)


def job(job_id) -> GenerationJob:
    return GenerationJob.objects.unscoped().get(pk=job_id)


def test_jobs_travel_through_redis_and_a_killed_worker_is_recovered(api_a, studio_a, redis_broker, settings):
    from django_q.models import OrmQ

    character = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=character, upload=photos.upload(photos.astronaut()))
    body = {"character": character.pk, "prompt": "walking in the rain", "width": 64, "height": 64, "steps": 16,
            "seed": 11, "num_images": 2}  # fmt: skip
    response = api_a.post("/api/v1/generations", body, format="json")
    assert response.status_code == 202, response.json()
    job_id = response.json()["id"]
    # the task is in Redis, not in PostgreSQL's broker table; /metrics reads the queue depth from Redis
    assert redis_broker.llen("django_q:gpu:q") == 1
    assert not OrmQ.objects.exists()
    settings.ALKEMY_METRICS_TOKEN = "scrape"
    scraped = Client().get("/metrics", HTTP_AUTHORIZATION="Bearer scrape").content.decode()
    depth = next(f for f in text_string_to_metric_families(scraped) if f.name == "alkemy_queue_depth")
    assert {s.labels["cluster"]: s.value for s in depth.samples} == {"default": 0, "gpu": 1, "webhooks": 0}

    cluster = Cluster("gpu", ALKEMY_JOB_LEASE_SECONDS="3").start()
    try:
        wait_for(lambda: job(job_id).current_step > 0, timeout=300, what="the job to start")
        cluster.kill()  # kill -9 mid-job: the job stays `running` under a lease nobody renews
    finally:
        cluster.stop()
    assert job(job_id).status == JobStatus.RUNNING

    wait_for(lambda: reap_jobs()["requeued"] == 1, timeout=30, what="the lease to expire and the reaper to act")
    assert job(job_id).status == JobStatus.QUEUED
    assert redis_broker.llen("django_q:gpu:q") == 1  # re-queued through Redis

    fresh = Cluster("gpu", ALKEMY_JOB_LEASE_SECONDS="3").start()
    try:
        wait_for(lambda: job(job_id).is_terminal, timeout=300, what="a fresh worker to finish the job")
        finished = job(job_id)
        assert finished.status == JobStatus.SUCCEEDED and finished.attempt == 2, "".join(fresh.log[-30:])
        assert GeneratedImage.objects.unscoped().filter(job_id=job_id).count() == 2  # one set of outputs

        # a second job, submitted while the cluster is up, runs straight through
        second = api_a.post("/api/v1/generations", {**body, "steps": 2, "num_images": 1}, format="json").json()
        wait_for(lambda: job(second["id"]).is_terminal, timeout=300, what="the second job to finish")
        assert job(second["id"]).status == JobStatus.SUCCEEDED and job(second["id"]).attempt == 1
    finally:
        fresh.stop()
    assert redis_broker.llen("django_q:gpu:q") == 0
