"""Admin as studio staff use it, with the plain test client (the browser walk is tests/test_browser_admin.py):
the character page's generations, LoRA versions and spend; job lists that follow their jobs; search and
filters on every list; nothing staff may edit that must not change."""

import pytest
from django.contrib.admin.sites import site
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import RequestFactory

from alkemy.jobs import JobStatus
from alkemy.tenancy.models import Role
from alkemy.tenancy.services import membership_set
from characters.admin import identity_badge
from characters.services import character_create, reference_add
from generation.jobs import generation_submit
from generation.model_registry import component_path
from generation.models import GeneratedImage, GenerationJob
from generation.tasks import run_generation_job
from generation.tiny.lora import write_peft_lora
from tests import photos
from training import services as lora_services
from usage.models import UsageEvent

pytestmark = pytest.mark.django_db

PROJECT_APPS = {"tenancy", "webhooks", "characters", "generation", "training", "usage", "shotlists"}


@pytest.fixture
def eileen(studio_a, media_root, settings, tiny_models_dir):
    settings.ALKEMY_MODELS_DIR = tiny_models_dir
    character = character_create(tenant=studio_a.tenant, name="Eileen", tags=["lead", "noir"])
    reference_add(character=character, upload=photos.upload(photos.astronaut()))
    return character


def submit(character, **overrides):
    job, _ = generation_submit(
        tenant=character.tenant, character=character, prompt="a portrait", width=64, height=64, steps=2, seed=3,
        method=overrides.pop("method", "instantid_sdxl"), **overrides,
    )  # fmt: skip
    return job


@pytest.fixture
def outsider(db, studio_b):
    user = get_user_model().objects.create_user("bob", password="pw-bob-12345", is_staff=True)
    membership_set(tenant=studio_b.tenant, user=user)
    return user


@pytest.fixture
def owner_of_a(db, studio_a):
    user = get_user_model().objects.create_user("olga", password="pw-olga-12345", is_staff=True)
    membership_set(tenant=studio_a.tenant, user=user, role=Role.OWNER)
    return user


def test_character_page_shows_its_generations_lora_versions_and_spend(client, staff_of_a, eileen, tiny_models_dir):
    job = submit(eileen)
    assert run_generation_job(job.pk) == JobStatus.SUCCEEDED
    output = GeneratedImage.objects.unscoped().get(job=job)
    sdxl = component_path(tiny_models_dir, "sdxl")
    lora = write_peft_lora(tiny_models_dir.parent / "ux.safetensors", base_dir=sdxl, base_model="sdxl", rank=4, seed=5)
    lora_services.lora_upload(
        character=eileen, upload=SimpleUploadedFile("e.safetensors", lora.read_bytes()), base_model="sdxl",
        trigger_token="ohwx_eileen",
    )  # fmt: skip
    events = UsageEvent.objects.unscoped().filter(character_id=eileen.pk).count()
    assert events > 0  # the finished job was metered

    client.force_login(staff_of_a)
    page = client.get(f"/admin/characters/character/{eileen.pk}/change/").content.decode()
    assert 'class="generation-gallery"' in page
    assert f"/admin/generation/generationjob/outputs/{output.pk}/image.png" in page
    assert f"/admin/generation/generationjob/{job.pk}/change/" in page
    assert 'class="identity-badge identity-none"' in page and ">no face<" in page  # tiny models draw no face
    assert f"?character__id__exact={eileen.pk}" in page
    assert 'class="lora-versions"' in page and ">v1</a>" in page and "ohwx_eileen" in page and "in use" in page
    assert 'class="character-spend"' in page and f"over {events} usage events" in page
    assert "instantid_sdxl $" in page

    # the links the page offers lead to lists filtered to this character
    jobs = client.get(f"/admin/generation/generationjob/?character__id__exact={eileen.pk}")
    assert jobs.status_code == 200 and jobs.context["cl"].result_count == 1
    ledger = client.get(f"/admin/usage/usageevent/?character_id={eileen.pk}")
    assert ledger.status_code == 200 and ledger.context["cl"].result_count == events


def test_identity_badges_compare_with_the_same_person_threshold():
    scored = GeneratedImage(identity_similarity=0.951, identity_reason="")
    assert 'identity-same' in identity_badge(scored, threshold=0.92) and "identity 0.951" in identity_badge(
        scored, threshold=0.92
    )
    assert "identity-low" in identity_badge(scored, threshold=0.97)
    assert "identity-none" in identity_badge(GeneratedImage(identity_reason="no_identity"), threshold=0.92)


def test_character_page_without_renders_says_so(client, staff_of_a, eileen):
    client.force_login(staff_of_a)
    page = client.get(f"/admin/characters/character/{eileen.pk}/change/").content.decode()
    assert "No renders yet." in page and "No LoRA versions yet." in page
    assert "This month $0.000000, all time $0.000000 over 0 usage events" in page


def test_job_lists_follow_their_jobs_without_a_reload(client, staff_of_a, outsider, eileen):
    job = submit(eileen)
    client.force_login(staff_of_a)
    page = client.get("/admin/generation/generationjob/").content.decode()
    assert "alkemy/job_status.js" in page  # the polling script is on the list
    assert f'data-job-status="{job.pk}"' in page and f'data-job-progress="{job.pk}"' in page
    assert 'data-job-status-url="/admin/generation/generationjob/status.json"' in page
    change = client.get(f"/admin/generation/generationjob/{job.pk}/change/").content.decode()
    assert "alkemy/job_status.js" in change and f'data-job-status="{job.pk}"' in change
    assert 'name="_save"' not in change and 'name="_continue"' not in change  # a record: nothing to save

    response = client.get(f"/admin/generation/generationjob/status.json?ids={job.pk},999999,x,")
    assert response.status_code == 200 and "no-store" in response["Cache-Control"]
    assert response.json() == {
        "jobs": {str(job.pk): {"status": "queued", "progress": 0.0, "label": "0%", "terminal": False}}
    }
    GenerationJob.objects.unscoped().filter(pk=job.pk).update(
        status=JobStatus.RUNNING, progress=0.5, current_step=1, total_steps=2
    )
    running = client.get(f"/admin/generation/generationjob/status.json?ids={job.pk}").json()["jobs"][str(job.pk)]
    assert running == {"status": "running", "progress": 0.5, "label": "50% (step 1/2)", "terminal": False}
    assert client.get("/admin/generation/generationjob/status.json").json() == {"jobs": {}}

    client.force_login(outsider)  # another tenant's job is not there at all
    assert client.get(f"/admin/generation/generationjob/status.json?ids={job.pk}").json() == {"jobs": {}}
    assert client.get("/admin/training/trainingjob/status.json?ids=1").json() == {"jobs": {}}


def test_shot_lists_follow_their_jobs_too(client, staff_of_a, eileen):
    from shotlists.services import ShotSpec, shotlist_submit

    shot_list, _ = shotlist_submit(
        tenant=eileen.tenant, name="Chase", characters=[eileen], methods=["instantid_sdxl"],
        shots=[ShotSpec(prompt="on a rooftop", width=64, height=64, steps=2)],
    )  # fmt: skip
    client.force_login(staff_of_a)
    page = client.get("/admin/shotlists/shotlist/").content.decode()
    assert f'data-job-progress="{shot_list.pk}"' in page and "0% (1 queued)" in page
    url = f"/admin/shotlists/shotlist/status.json?ids={shot_list.pk}"
    assert client.get(url).json()["jobs"][str(shot_list.pk)] == {
        "status": "queued", "progress": 0.0, "label": "0% (1 queued)", "terminal": False,
    }  # fmt: skip
    GenerationJob.objects.unscoped().filter(tenant=eileen.tenant).update(status=JobStatus.CANCELED)
    assert client.get(url).json()["jobs"][str(shot_list.pk)]["terminal"] is True  # polling stops


def test_polling_script_is_a_static_file():
    from pathlib import Path

    from django.contrib.staticfiles import finders

    script = finders.find("alkemy/job_status.js")
    assert script and "data-job-status-url" in Path(script).read_text()  # the status URL comes from the page


def test_every_changelist_has_search_and_filters_that_run(client, db):
    root = get_user_model().objects.create_superuser("root", "root@example.com", "pw-root-12345")
    client.force_login(root)
    checked = []
    for model, model_admin in site._registry.items():
        if model._meta.app_label not in PROJECT_APPS:
            continue
        name = f"{model._meta.app_label}.{model._meta.model_name}"
        assert model_admin.search_fields, f"{name} has no search"
        assert model_admin.list_filter, f"{name} has no filters"
        url = f"/admin/{model._meta.app_label}/{model._meta.model_name}/"
        response = client.get(url, {"q": "12"})  # every search lookup compiles against the real database
        assert response.status_code == 200, name
        checked.append(name)
    assert len(checked) >= 14


def tag_choices(page) -> set[str]:
    changelist = page.context["cl"]
    return {choice["display"] for spec in changelist.filter_specs if spec.title == "tag"
            for choice in spec.choices(changelist)}  # fmt: skip


def test_character_list_filters_by_tag_and_searches_by_id(client, staff_of_a, eileen, studio_a):
    character_create(tenant=studio_a.tenant, name="Tom", tags=["extra"])
    client.force_login(staff_of_a)
    assert {"lead", "noir", "extra"} <= tag_choices(client.get("/admin/characters/character/"))
    assert client.get("/admin/characters/character/?tag=noir").context["cl"].result_count == 1
    assert client.get("/admin/characters/character/", {"q": str(eileen.pk)}).context["cl"].result_count >= 1


def test_other_tenants_tags_are_not_offered(client, outsider, eileen):
    client.force_login(outsider)
    assert not {"noir", "lead"} & tag_choices(client.get("/admin/characters/character/"))


#: what nobody edits by hand: the ledger's numbers, file hashes, a job's record of what ran
PROTECTED = {
    "sha256", "file", "file_size", "secret_hash", "prefix", "request_hash", "idempotency_key", "status", "progress",
    "current_step", "total_steps", "attempt", "worker", "lease_expires_at", "heartbeat_at", "cancel_requested",
    "error_code", "error_message", "error_details", "device", "device_seconds", "usage", "quantity", "unit_price",
    "cost", "billable", "occurred_at", "job_id", "job_kind", "estimated_cost", "estimated_device_seconds",
    "version", "rank", "lora_format", "is_selected", "source", "metadata", "payload", "attempts",
}  # fmt: skip


def editable_fields(model_admin, user, obj) -> set[str]:
    request = RequestFactory().get("/admin/")
    request.user = user
    return set(model_admin.get_form(request, obj, change=True).base_fields)


def test_staff_cannot_edit_the_ledger_hashes_or_job_internals(client, owner_of_a, eileen, tiny_models_dir):
    from django.utils import timezone

    from usage.services import usage_record_storage

    job = submit(eileen)  # queued: the request is already fixed
    sdxl = component_path(tiny_models_dir, "sdxl")
    lora_file = write_peft_lora(tiny_models_dir.parent / "ro.safetensors", base_dir=sdxl, base_model="sdxl", rank=4,
                                seed=6)  # fmt: skip
    artifact = lora_services.lora_upload(
        character=eileen, upload=SimpleUploadedFile("e.safetensors", lora_file.read_bytes()), base_model="sdxl"
    )
    event = usage_record_storage(tenant_id=eileen.tenant_id, day=timezone.now().date())  # the reference photo
    from alkemy.tenancy.models import ApiKey

    api_key = ApiKey.objects.unscoped().filter(tenant=eileen.tenant).first()
    rows = [job, artifact, event, api_key, eileen]
    for row in rows:
        model_admin = site._registry[type(row)]
        assert not editable_fields(model_admin, owner_of_a, row) & PROTECTED, type(row).__name__
    assert editable_fields(site._registry[GenerationJob], owner_of_a, job) == set()  # a job is a record
    assert editable_fields(site._registry[UsageEvent], owner_of_a, event) == set()

    # and a POST that tries anyway changes nothing
    client.force_login(owner_of_a)
    before = GenerationJob.objects.unscoped().get(pk=job.pk)
    client.post(f"/admin/generation/generationjob/{job.pk}/change/",
                {"status": "queued", "progress": "0", "request_hash": "x", "prompt": "changed"})  # fmt: skip
    after = GenerationJob.objects.unscoped().get(pk=job.pk)
    assert (after.status, after.progress, after.request_hash, after.prompt) == (
        before.status, before.progress, before.request_hash, before.prompt,
    )  # fmt: skip
    ledger = client.post(f"/admin/usage/usageevent/{event.pk}/change/", {"cost": "0", "quantity": "0"})
    assert ledger.status_code == 403
    assert UsageEvent.objects.unscoped().get(pk=event.pk).cost == event.cost


@pytest.mark.parametrize("model_path", ["generation.GenerationJob", "training.TrainingJob",
                                        "webhooks.WebhookDelivery", "shotlists.ShotList"])  # fmt: skip
def test_every_field_of_a_job_record_is_read_only(model_path):
    """Even for a superuser: the change page of a job shows its record and offers nothing to edit."""
    from django.apps import apps

    model = apps.get_model(model_path)
    superuser = get_user_model()(is_superuser=True, is_staff=True, is_active=True)
    assert editable_fields(site._registry[model], superuser, None) == set()


def test_status_json_is_for_staff_only(client, eileen):
    job = submit(eileen)
    response = client.get(f"/admin/generation/generationjob/status.json?ids={job.pk}")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
