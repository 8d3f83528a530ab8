"""The ledger with real worker processes: a job run by a qcluster is billed once, however often it is delivered."""

from decimal import Decimal

import pytest

from characters.services import character_create, reference_add
from generation.jobs import enqueue
from generation.models import GenerationJob
from tests import photos
from tests.qcluster import Cluster, wait_for
from usage.models import UsageEvent
from usage.services import budget_set

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def eileen(studio_a, settings, tiny_models_dir, media_root):
    settings.ALKEMY_MODELS_DIR = tiny_models_dir
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=character, upload=photos.upload(photos.astronaut()))
    return character


def test_a_job_run_by_a_worker_process_is_billed_once_and_replaces_its_reservation(api_a, studio_a, eileen):
    from django_q.models import Task

    budget_set(tenant=studio_a.tenant, monthly_limit=Decimal("100.00"))
    request = {"character": eileen.pk, "method": "instantid_sdxl", "prompt": "p", "width": 64, "height": 64,
               "steps": 2, "seed": 5}  # fmt: skip
    answer = api_a.post("/api/v1/generations", request, format="json")
    assert answer.status_code == 202, answer.json()
    job_id = answer.json()["id"]
    assert Decimal(api_a.get("/api/v1/usage/budget").json()["reserved"]) > 0

    cluster = Cluster("gpu").start()
    try:
        wait_for(lambda: GenerationJob.objects.unscoped().get(pk=job_id).is_terminal, timeout=300, what="the job")
        enqueue(job_id)  # a duplicate delivery of the finished job
        wait_for(lambda: Task.objects.filter(name=f"generation-{job_id}").count() == 2, timeout=120,
                 what="the duplicate delivery to be processed")  # fmt: skip
    finally:
        cluster.stop()
    assert sorted(Task.objects.filter(name=f"generation-{job_id}").values_list("result", flat=True)) == [
        "skipped", "succeeded"]  # fmt: skip
    events = list(UsageEvent.objects.unscoped().filter(job_kind="generation", job_id=job_id))
    assert sorted(e.meter for e in events) == ["cpu_seconds", "images_generated"]
    budget = api_a.get("/api/v1/usage/budget").json()
    assert Decimal(budget["reserved"]) == 0
    assert Decimal(budget["spent"]) == sum(e.cost for e in events) > 0
    assert Decimal(api_a.get(f"/api/v1/generations/{job_id}").json()["cost"]["total"]) == Decimal(budget["spent"])
