"""The job system end to end: real qcluster processes run tiny models on the CPU."""

import pytest

from alkemy.jobs import JobStatus
from characters.services import character_create, reference_add
from generation.models import GeneratedImage, GenerationJob
from generation.tasks import reap_jobs
from tests import photos
from tests.qcluster import Cluster, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def worker_env(settings, tiny_models_dir, media_root):
    settings.ALKEMY_MODELS_DIR = tiny_models_dir
    return settings


@pytest.fixture
def eileen(studio_a, worker_env):
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=character, upload=photos.upload(photos.astronaut()))
    return character


@pytest.fixture
def gpu_cluster(worker_env):
    cluster = Cluster("gpu", ALKEMY_JOB_LEASE_SECONDS="3").start()
    yield cluster
    cluster.stop()


def submit(api, character, **overrides):
    body = {"character": character.pk, "prompt": "walking in the rain", "width": 64, "height": 64, "steps": 3,
            "seed": 11, "num_images": 2, **overrides}  # fmt: skip
    response = api.post("/api/v1/generations", body, format="json")
    assert response.status_code == 202, response.json()
    return response.json()["id"]


def job(job_id) -> GenerationJob:
    return GenerationJob.objects.unscoped().get(pk=job_id)


def test_gpu_cluster_runs_a_job_to_success(api_a, eileen, gpu_cluster):
    job_id = submit(api_a, eileen)
    wait_for(lambda: job(job_id).is_terminal, timeout=300, what="the job to finish")
    body = api_a.get(f"/api/v1/generations/{job_id}").json()
    assert body["status"] == "succeeded", (body, "".join(gpu_cluster.log[-30:]))
    assert body["progress"] == 1.0 and body["attempt"] == 1
    assert body["device"] == "cpu" and body["device_seconds"] > 0
    assert body["queue_wait_seconds"] >= 0 and body["run_seconds"] > 0
    assert [o["seed"] for o in body["outputs"]] == [11, 12]
    for output in body["outputs"]:
        assert (output["width"], output["height"]) == (64, 64)
        # identity scored: tiny random networks draw no face, and the score says so
        assert output["identity_similarity"] is None and output["identity_reason"] == "no_face"
        download = api_a.get(output["url"])
        assert download.status_code == 200 and download["Content-Type"] == "image/png"


def test_cancel_a_running_job_stops_it_without_outputs(api_a, eileen, gpu_cluster):
    job_id = submit(api_a, eileen, steps=40, num_images=4)
    wait_for(lambda: job(job_id).current_step > 0, timeout=300, what="the job to make progress")
    assert api_a.post(f"/api/v1/generations/{job_id}/cancel").status_code == 200
    wait_for(lambda: job(job_id).is_terminal, timeout=300, what="the job to stop")
    stopped = job(job_id)
    assert stopped.status == JobStatus.CANCELED and stopped.error_code == "canceled"
    assert stopped.current_step < stopped.total_steps
    assert not GeneratedImage.objects.unscoped().filter(job_id=job_id).exists()


def test_killed_worker_job_is_requeued_and_finished_once(api_a, eileen, gpu_cluster, worker_env):
    job_id = submit(api_a, eileen, steps=16, num_images=2)
    wait_for(lambda: job(job_id).current_step > 0, what="the job to start")
    gpu_cluster.kill()
    assert job(job_id).status == JobStatus.RUNNING  # left behind by the dead worker

    wait_for(lambda: reap_jobs()["requeued"] == 1, timeout=30, what="the lease to expire and the reaper to act")
    assert job(job_id).status == JobStatus.QUEUED and job(job_id).attempt == 1

    fresh = Cluster("gpu", ALKEMY_JOB_LEASE_SECONDS="3").start()
    try:
        # generous: a fresh worker imports torch and loads the method before it can start
        wait_for(lambda: job(job_id).is_terminal, timeout=300, what="a fresh worker to finish the job")
    finally:
        fresh.stop()
    finished = job(job_id)
    assert finished.status == JobStatus.SUCCEEDED and finished.attempt == 2
    assert GeneratedImage.objects.unscoped().filter(job_id=job_id).count() == 2  # one set of outputs


def test_lease_is_renewed_while_a_method_loads(eileen, studio_a, settings, monkeypatch):
    """Loading real weights can outlast a lease: the background keeper renews it meanwhile."""
    import time

    from generation import worker
    from generation.jobs import generation_submit

    settings.ALKEMY_JOB_LEASE_SECONDS = 1
    job_row, _ = generation_submit(tenant=studio_a.tenant, character=eileen, prompt="x", width=64, height=64, steps=2)
    real_get = worker.PipelineCache.get
    leases = []

    def slow_get(cache, key):
        for _ in range(4):  # 2 s of "loading", twice the lease
            time.sleep(0.5)
            leases.append(job(job_row.pk).lease_expires_at)
        return real_get(cache, key)

    monkeypatch.setattr(worker.PipelineCache, "get", slow_get)
    assert worker.run_job(job_row.pk) == JobStatus.SUCCEEDED
    assert len(set(leases)) > 1 and leases[-1] > leases[0]  # extended during the load
    assert reap_jobs()["requeued"] == 0
