"""GET /metrics: Prometheus exposition behind a bearer token, figures that follow the jobs in the database."""

import pytest
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from characters.services import character_create, reference_add
from generation.jobs import generation_submit
from generation.tasks import run_generation_job
from tests import photos

pytestmark = pytest.mark.django_db

TOKEN = "metrics-scrape-token"


def scrape(token: str | None = TOKEN):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token else {}
    return Client().get("/metrics", **headers)


def families(response) -> dict:
    assert response.status_code == 200, response.content[:300]
    assert response["Content-Type"].startswith("text/plain; version=")
    return {family.name: family for family in text_string_to_metric_families(response.content.decode())}


def value(family, name: str, **labels) -> float:
    found = [s.value for s in family.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, family.samples)
    return found[0]


def test_metrics_are_refused_without_the_token(settings):
    settings.ALKEMY_METRICS_TOKEN = ""
    assert scrape().status_code == 404  # not configured: there is no endpoint
    settings.ALKEMY_METRICS_TOKEN = TOKEN
    assert scrape(None).status_code == 401
    refused = scrape("not-the-token")
    assert refused.status_code == 401
    assert refused["WWW-Authenticate"].startswith("Bearer")
    assert b"alkemy_jobs" not in refused.content


def test_metrics_follow_jobs_queue_and_requests(
    settings, studio_a, api_a, media_root, tiny_models_dir, django_capture_on_commit_callbacks
):
    settings.ALKEMY_METRICS_TOKEN = TOKEN
    settings.ALKEMY_MODELS_DIR = tiny_models_dir
    before = families(scrape())
    enrolments_before = value(before["alkemy_enrolment_duration_seconds"], "alkemy_enrolment_duration_seconds_count")
    searches_before = value(before["alkemy_search_duration_seconds"], "alkemy_search_duration_seconds_count")

    character = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=character, upload=photos.upload(photos.astronaut()))
    jobs = []
    with django_capture_on_commit_callbacks(execute=True):  # enqueued for real: rows in the ORM broker
        for seed in (1, 2):
            job, _ = generation_submit(
                tenant=studio_a.tenant, character=character, prompt="a portrait", width=64, height=64, steps=2,
                seed=seed, method="instantid_sdxl",
            )  # fmt: skip
            jobs.append(job)
    assert run_generation_job(jobs[0].pk) == "succeeded"
    assert api_a.get(f"/api/v1/characters/{character.pk}").status_code == 200
    assert api_a.post("/api/v1/search/faces", {"image": photos.upload(photos.astronaut())}).status_code == 200

    after = families(scrape())
    jobs_family = after["alkemy_jobs"]
    assert value(jobs_family, "alkemy_jobs", kind="generation", status="succeeded", method="instantid_sdxl") == 1
    assert value(jobs_family, "alkemy_jobs", kind="generation", status="queued", method="instantid_sdxl") == 1
    # both tasks are still rows of the ORM broker (nothing consumed them; the job ran in-process)
    assert value(after["alkemy_queue_depth"], "alkemy_queue_depth", cluster="gpu") == 2
    assert value(after["alkemy_queue_depth"], "alkemy_queue_depth", cluster="webhooks") == 0

    wait = after["alkemy_job_wait_seconds"]
    assert value(wait, "alkemy_job_wait_seconds_count", kind="generation") == 1
    assert value(wait, "alkemy_job_wait_seconds_bucket", kind="generation", le="+Inf") == 1
    run = after["alkemy_job_run_seconds"]
    assert value(run, "alkemy_job_run_seconds_count", kind="generation") == 1
    assert value(run, "alkemy_job_run_seconds_sum", kind="generation") > 0
    assert value(run, "alkemy_job_run_seconds_count", kind="training") == 0
    device = value(after["alkemy_device_seconds"], "alkemy_device_seconds_total", kind="generation",
                   method="instantid_sdxl")  # fmt: skip
    assert device > 0

    http = after["alkemy_http_request_duration_seconds"]
    # labelled by the URL name, never the raw path (the id would make one series per character)
    routes = {s.labels["route"] for s in http.samples}
    assert "character-detail" in routes, routes
    assert not any(str(character.pk) in r for r in routes)
    assert "search-faces" in routes
    assert value(after["alkemy_enrolment_duration_seconds"], "alkemy_enrolment_duration_seconds_count") == (
        enrolments_before + 1
    )
    assert value(after["alkemy_search_duration_seconds"], "alkemy_search_duration_seconds_count") == (
        searches_before + 1
    )
    assert "alkemy_warm_pipelines" in after
