"""Hardening found in review: request validation, admin roles, cleanup, leases, cancel + lost worker."""

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from alkemy.jobs import JobStatus, job_claim, job_request_cancel
from alkemy.tenancy.services import api_key_create, membership_set
from alkemy.webhooks.services import endpoint_create
from characters.services import character_create, reference_add
from generation.jobs import generation_submit
from generation.models import GenerationJob
from generation.tasks import reap_jobs
from tests import photos
from tests.conftest import stored_files

pytestmark = pytest.mark.django_db


@pytest.fixture
def eileen(studio_a, media_root):
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=character, upload=photos.upload(photos.astronaut()))
    return character


def post(api, character, **overrides):
    body = {"character": character.pk, "prompt": "x", "width": 64, "height": 64, "steps": 2, **overrides}
    return api.post("/api/v1/generations", body, format="json", HTTP_IDEMPOTENCY_KEY=overrides.pop("key", ""))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"params": {"style_lora_path": "/etc/passwd"}}, "params"),
        ({"params": {"lora_id": "artifact-1"}}, "params"),
        ({"params": {"note": "nul\x00byte"}}, "params"),
        ({"params": {"lora_version": "abc"}}, "params.lora_version"),
        ({"params": {"style_lora": {}}}, "params.style_lora"),
        ({"seed": 2**31}, "seed"),
        ({"seed": 2**31 - 1, "num_images": 2}, "seed"),
    ],
)
def test_bad_generation_params_are_400_not_500(api_a, eileen, overrides, field):
    response = post(api_a, eileen, **overrides)
    assert response.status_code == 400, response.content
    assert response.json()["error"]["details"]["field"] == field


def test_overlong_idempotency_key_is_400(api_a, eileen):
    response = api_a.post(
        "/api/v1/generations", {"character": eileen.pk, "prompt": "x", "width": 64, "height": 64}, format="json",
        HTTP_IDEMPOTENCY_KEY="k" * 201,
    )  # fmt: skip
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_idempotency_key"


@pytest.mark.parametrize("path", ["/api/v1/webhooks/%C2%B2", "/api/v1/webhooks/%C2%B2/deliveries"])
def test_unicode_digit_ids_are_404(api_a, path):
    assert api_a.get(path).status_code == 404


def test_lora_id_with_unicode_digit_is_404(api_a, eileen):
    assert api_a.get(f"/api/v1/characters/{eileen.pk}/loras/%C2%B2").status_code == 404


def test_reaper_finishes_a_canceled_job_whose_worker_died(studio_a, eileen):
    job, _ = generation_submit(tenant=studio_a.tenant, character=eileen, prompt="x", width=64, height=64, steps=2)
    job_claim(GenerationJob, job.pk, worker="gone:1")
    job_request_cancel(GenerationJob, job.pk)
    GenerationJob.objects.unscoped().filter(pk=job.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert reap_jobs()["canceled"] == 1
    assert GenerationJob.objects.unscoped().get(pk=job.pk).status == JobStatus.CANCELED


def test_deleting_a_character_deletes_its_generated_and_lora_files(
    api_a, studio_a, eileen, media_root, settings, tiny_models_dir, django_capture_on_commit_callbacks
):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from generation.model_registry import component_path
    from generation.tasks import run_generation_job
    from generation.tiny.lora import write_peft_lora

    settings.ALKEMY_MODELS_DIR = tiny_models_dir
    lora = write_peft_lora(media_root.parent / "l.safetensors", base_dir=component_path(tiny_models_dir, "sdxl"),
                           base_model="sdxl", rank=2, seed=3)  # fmt: skip
    uploaded = api_a.post(f"/api/v1/characters/{eileen.pk}/loras",
                          {"file": SimpleUploadedFile("l.safetensors", lora.read_bytes()), "base_model": "sdxl"},
                          format="multipart")  # fmt: skip
    assert uploaded.status_code == 201
    job, _ = generation_submit(tenant=studio_a.tenant, character=eileen, method="lora", prompt="x", width=64,
                               height=64, steps=2)  # fmt: skip
    assert run_generation_job(job.pk) == JobStatus.SUCCEEDED
    assert len(stored_files(media_root)) == 3  # reference, LoRA, output
    with django_capture_on_commit_callbacks(execute=True):
        assert api_a.delete(f"/api/v1/characters/{eileen.pk}").status_code == 204
    assert stored_files(media_root) == []


@pytest.fixture
def staff(studio_a):
    def make(role):
        user = get_user_model().objects.create_user(f"staff-{role}", password="pw-staff-12345", is_staff=True)
        membership_set(tenant=studio_a.tenant, user=user, role=role)
        return user

    return make


def test_viewer_never_sees_a_webhook_secret_in_admin(client, studio_a, staff, settings):
    settings.ALKEMY_WEBHOOK_ALLOW_PRIVATE = True
    endpoint = endpoint_create(tenant=studio_a.tenant, url="http://10.0.0.1/hook")
    client.force_login(staff("viewer"))  # viewers may not even open it: the URL is a bearer secret too
    page = client.get(f"/admin/webhooks/webhookendpoint/{endpoint.pk}/change/")
    assert page.status_code in (302, 403) and endpoint.secret not in page.content.decode()
    client.force_login(staff("admin"))
    page = client.get(f"/admin/webhooks/webhookendpoint/{endpoint.pk}/change/")
    assert page.status_code == 200 and endpoint.secret not in page.content.decode()


def test_member_cannot_create_api_keys_or_webhooks_in_admin(client, studio_a, staff):
    client.force_login(staff("member"))
    response = client.post("/admin/tenancy/apikey/add/", {"tenant": studio_a.tenant.pk, "name": "x", "role": "owner"})
    assert response.status_code == 403
    assert client.get("/admin/webhooks/webhookendpoint/add/").status_code == 403


def test_cancel_action_spares_tenants_where_the_user_only_views(client, studio_a, studio_b, staff, media_root):
    other = character_create(tenant=studio_b.tenant, name="B's")
    reference_add(character=other, upload=photos.upload(photos.tom_hanks()))
    job, _ = generation_submit(tenant=studio_b.tenant, character=other, prompt="x", width=64, height=64, steps=2)
    user = staff("member")
    membership_set(tenant=studio_b.tenant, user=user, role="viewer")
    client.force_login(user)
    client.post("/admin/generation/generationjob/", {"action": "cancel", "_selected_action": [job.pk]})
    assert GenerationJob.objects.unscoped().get(pk=job.pk).status == JobStatus.QUEUED


def test_tenant_filter_lists_only_visible_tenants(client, studio_a, studio_b, staff):
    character_create(tenant=studio_b.tenant, name="Hidden")
    client.force_login(staff("member"))
    page = client.get("/admin/characters/character/").content.decode()
    assert "Studio-B" not in page and "studio-b" not in page


def test_api_key_member_key_cannot_reach_webhooks(studio_a):
    _, member = api_key_create(tenant=studio_a.tenant, name="m", role="member")
    response = studio_a.client(member).post("/api/v1/webhooks", {"url": "https://example.com/h"}, format="json")
    assert response.status_code == 403
