"""Review fixes in admin: rows never change tenant, related choices stay in the row's tenant,
deletes take their files with them, API keys never regain power, one-time secrets stay server-side."""

import pytest
from django.contrib.admin.sites import site
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import RequestFactory

from alkemy.jobs import JobStatus
from alkemy.tenancy.models import ApiKey, Role, Tenant
from alkemy.tenancy.scoping import all_tenants
from alkemy.tenancy.services import membership_set
from alkemy.webhooks.models import WebhookEndpoint
from characters.models import Character, FaceEmbedding, ReferenceImage
from characters.services import character_create, faces_search, reference_add
from generation.model_registry import component_path
from generation.models import GeneratedImage, GenerationJob
from generation.tiny.lora import write_peft_lora
from tests import photos
from tests.conftest import stored_files
from training import services as lora_services
from training.models import LoraArtifact, StyleLora

pytestmark = pytest.mark.django_db

CHARACTER_FORM = {"tags": "", "description": "", "references-TOTAL_FORMS": "0", "references-INITIAL_FORMS": "0"}


@pytest.fixture
def root(db):
    return get_user_model().objects.create_superuser("root", "root@example.com", "pw-root-12345")


@pytest.fixture
def staff_of_both(db, studio_a, studio_b):
    """Member of A, viewer of B: the reviewer's cross-tenant staff user."""
    user = get_user_model().objects.create_user("bob", "bob@example.com", "pw-bob-12345", is_staff=True)
    membership_set(tenant=studio_a.tenant, user=user, role=Role.MEMBER)
    membership_set(tenant=studio_b.tenant, user=user, role=Role.VIEWER)
    return user


@pytest.fixture
def committed(django_capture_on_commit_callbacks):
    """Run what the code defers to after commit (file deletion) when the block ends."""
    return lambda: django_capture_on_commit_callbacks(execute=True)


@pytest.fixture
def models(settings, tiny_models_dir, media_root):
    settings.ALKEMY_MODELS_DIR = tiny_models_dir
    return tiny_models_dir


@pytest.fixture(scope="module")
def lora_bytes(tmp_path_factory, tiny_models_dir):
    folder = tmp_path_factory.mktemp("review-loras")
    sdxl = component_path(tiny_models_dir, "sdxl")
    return write_peft_lora(folder / "a.safetensors", base_dir=sdxl, base_model="sdxl", rank=4, seed=3).read_bytes()


def upload_lora(character, data):
    return lora_services.lora_upload(
        character=character, upload=SimpleUploadedFile("l.safetensors", data), base_model="sdxl"
    )


# --- 1. a row never changes tenant ---------------------------------------------------------


def test_moving_a_character_to_another_tenant_in_admin_changes_nothing(client, root, studio_a, studio_b, media_root):
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=character, upload=photos.upload(photos.astronaut()))
    client.force_login(root)

    response = client.post(
        f"/admin/characters/character/{character.pk}/change/",
        {"tenant": studio_b.tenant.pk, "name": "Eileen renamed", "slug": character.slug, **CHARACTER_FORM},
    )

    assert response.status_code == 302
    character.refresh_from_db()
    assert character.name == "Eileen renamed"  # the edit itself is kept
    assert character.tenant_id == studio_a.tenant.pk  # the tenant is not
    assert ReferenceImage.objects.unscoped().get(character=character).tenant_id == studio_a.tenant.pk
    # B's face search does not find A's character; A's still does
    assert faces_search(tenant=studio_b.tenant, upload=photos.upload(photos.astronaut())).results == []
    found = faces_search(tenant=studio_a.tenant, upload=photos.upload(photos.astronaut())).results
    assert [r.character.pk for r in found] == [character.pk]
    page = client.get(f"/admin/characters/character/{character.pk}/change/").content.decode()
    assert 'name="tenant"' not in page


def test_webhook_endpoint_and_api_key_keep_their_tenant(client, root, studio_a, studio_b):
    endpoint = WebhookEndpoint.objects.unscoped().create(
        tenant=studio_a.tenant, url="https://hooks.example.com/a", events=[], secret="whsec_x"
    )
    client.force_login(root)
    client.post(
        f"/admin/webhooks/webhookendpoint/{endpoint.pk}/change/",
        {"tenant": studio_b.tenant.pk, "url": "https://hooks.example.com/a", "events": "[]", "is_active": "on"},
    )
    assert WebhookEndpoint.objects.unscoped().get(pk=endpoint.pk).tenant_id == studio_a.tenant.pk

    key = studio_a.api_key
    client.post(
        f"/admin/tenancy/apikey/{key.pk}/change/", {"tenant": studio_b.tenant.pk, "name": "moved", "role": "owner"}
    )
    key.refresh_from_db()
    assert key.tenant_id == studio_a.tenant.pk and key.name == "moved"


def test_lora_version_keeps_its_tenant_and_character(client, root, studio_a, studio_b, models, lora_bytes):
    kai = character_create(tenant=studio_a.tenant, name="Kai")
    other = character_create(tenant=studio_b.tenant, name="Other")
    artifact = upload_lora(kai, lora_bytes)
    client.force_login(root)
    response = client.post(
        f"/admin/training/loraartifact/{artifact.pk}/change/",
        {"tenant": studio_b.tenant.pk, "character": other.pk, "base_model": "flux", "trigger_token": "ohwx kai"},
    )
    assert response.status_code == 302
    artifact.refresh_from_db()
    assert (artifact.tenant_id, artifact.character_id, artifact.base_model) == (studio_a.tenant.pk, kai.pk, "sdxl")
    assert artifact.trigger_token == "ohwx kai"


# --- 2. related choices stay in the row's tenant and in tenants the user may edit ---------------


def test_staff_of_two_tenants_cannot_attach_a_lora_to_the_other_tenants_character(
    client, staff_of_both, studio_a, studio_b, models, lora_bytes
):
    kai = character_create(tenant=studio_a.tenant, name="Kai")
    villain = character_create(tenant=studio_b.tenant, name="Villain")
    artifact = upload_lora(kai, lora_bytes)
    client.force_login(staff_of_both)

    page = client.get(f"/admin/training/loraartifact/{artifact.pk}/change/").content.decode()
    assert "Villain" not in page
    client.post(f"/admin/training/loraartifact/{artifact.pk}/change/", {"character": villain.pk, "trigger_token": ""})
    assert LoraArtifact.objects.unscoped().get(pk=artifact.pk).character_id == kai.pk


def test_new_row_choices_leave_out_tenants_where_the_user_only_views(staff_of_both, studio_a, studio_b):
    character_create(tenant=studio_a.tenant, name="Kai")
    character_create(tenant=studio_b.tenant, name="Villain")
    request = RequestFactory().get("/admin/training/loraartifact/add/")
    request.user = staff_of_both
    with all_tenants():
        form = site._registry[LoraArtifact].get_form(request, None)()
        names = {c.name for c in form.fields["character"].queryset}
        tenants = set(form.fields["tenant"].queryset.values_list("slug", flat=True))
    assert names == {"Kai"}
    assert tenants == {"studio-a"}


def test_a_row_pointing_at_another_tenants_row_does_not_validate(studio_a, studio_b, models, lora_bytes):
    kai = character_create(tenant=studio_a.tenant, name="Kai")
    villain = character_create(tenant=studio_b.tenant, name="Villain")
    artifact = upload_lora(kai, lora_bytes)
    artifact.character = villain
    with pytest.raises(ValidationError, match="another studio"):
        artifact.clean()


# --- 5. deletes in admin take their files ------------------------------------------------------


def finished_job_with_output(tenant, character) -> tuple[GenerationJob, str]:
    job = GenerationJob.objects.unscoped().create(
        tenant=tenant, character=character, method="pulid_flux", embedder="dlib", prompt="x", width=64,
        height=64, steps=2, seed=1, status=JobStatus.SUCCEEDED,
    )  # fmt: skip
    name = default_storage.save(f"tenants/{tenant.pk}/generations/{job.pk}/0.png", ContentFile(b"png"))
    GeneratedImage.objects.unscoped().create(tenant=tenant, job=job, index=0, file=name, seed=1, width=64, height=64)
    return job, name


def test_deleting_a_generation_in_admin_removes_its_outputs(client, root, studio_a, media_root, committed):
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    job, name = finished_job_with_output(studio_a.tenant, character)
    client.force_login(root)
    with committed():
        response = client.post(f"/admin/generation/generationjob/{job.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not GenerationJob.objects.unscoped().filter(pk=job.pk).exists()
    assert not default_storage.exists(name)


def test_a_running_generation_cannot_be_deleted_in_admin(client, root, studio_a, media_root):
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    job, name = finished_job_with_output(studio_a.tenant, character)
    GenerationJob.objects.unscoped().filter(pk=job.pk).update(status=JobStatus.RUNNING)
    client.force_login(root)
    response = client.post(f"/admin/generation/generationjob/{job.pk}/delete/", {"post": "yes"})
    assert response.status_code == 403
    assert default_storage.exists(name)


def test_deleting_loras_in_admin_removes_their_files(client, root, studio_a, models, lora_bytes, committed):
    kai = character_create(tenant=studio_a.tenant, name="Kai")
    ren = character_create(tenant=studio_a.tenant, name="Ren")
    first, other = upload_lora(kai, lora_bytes), upload_lora(ren, lora_bytes)
    style = lora_services.style_lora_upload(
        tenant=studio_a.tenant, upload=SimpleUploadedFile("s.safetensors", lora_bytes), name="ink", base_model="sdxl"
    )
    client.force_login(root)

    with committed():
        client.post(f"/admin/training/loraartifact/{first.pk}/delete/", {"post": "yes"})
        client.post(f"/admin/training/stylelora/{style.pk}/delete/", {"post": "yes"})

    assert not LoraArtifact.objects.unscoped().filter(pk=first.pk).exists()
    assert not StyleLora.objects.unscoped().exists()
    assert not default_storage.exists(first.file.name) and not default_storage.exists(style.file.name)
    assert default_storage.exists(other.file.name)  # Ren's version is untouched


def test_a_file_still_named_by_a_row_is_kept(studio_a, models, lora_bytes, committed):
    from alkemy.files import delete_files_on_commit

    kai = character_create(tenant=studio_a.tenant, name="Kai")
    artifact = upload_lora(kai, lora_bytes)
    with committed():
        delete_files_on_commit([artifact.file.name])
    assert default_storage.exists(artifact.file.name)


def test_deleting_a_tenant_in_admin_removes_its_media_folder(client, root, studio_a, studio_b, media_root, committed):
    gone = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=gone, upload=photos.upload(photos.astronaut()))
    finished_job_with_output(studio_a.tenant, gone)
    kept = character_create(tenant=studio_b.tenant, name="Hanks")
    reference_add(character=kept, upload=photos.upload(photos.tom_hanks()))
    client.force_login(root)

    with committed():
        response = client.post(f"/admin/tenancy/tenant/{studio_a.tenant.pk}/delete/", {"post": "yes"})

    assert response.status_code == 302
    assert not Tenant.objects.filter(pk=studio_a.tenant.pk).exists()
    assert not (media_root / "tenants" / str(studio_a.tenant.pk)).exists()
    assert not FaceEmbedding.objects.unscoped().filter(tenant_id=studio_a.tenant.pk).exists()
    remaining = stored_files(media_root)
    assert remaining and all(f"tenants/{studio_b.tenant.pk}/" in str(p) for p in remaining)


# --- 15. API keys: revocation is final, the role never changes -----------------------------


def test_revoked_api_key_cannot_be_unrevoked_or_promoted_in_admin(client, root, studio_a):
    from alkemy.tenancy.services import api_key_create

    key, _ = api_key_create(tenant=studio_a.tenant, name="intern", role=Role.VIEWER)
    client.force_login(root)
    client.post("/admin/tenancy/apikey/", {"action": "revoke", "_selected_action": [key.pk]})
    key.refresh_from_db()
    assert key.revoked_at is not None

    client.post(
        f"/admin/tenancy/apikey/{key.pk}/change/",
        {"tenant": studio_a.tenant.pk, "name": "intern", "role": "owner", "revoked_at_0": "", "revoked_at_1": ""},
    )
    key.refresh_from_db()
    assert key.revoked_at is not None and key.role == Role.VIEWER
    assert ApiKey.objects.unscoped().get(pk=key.pk).role == Role.VIEWER


# --- also: one-time secrets are not put in a cookie ---------------------------------------


def test_new_api_key_message_is_stored_server_side(client, root, studio_a):
    client.force_login(root)
    response = client.post(
        "/admin/tenancy/apikey/add/", {"tenant": studio_a.tenant.pk, "name": "render farm", "role": "member"}
    )
    assert response.status_code == 302
    assert "messages" not in response.cookies
    follow = client.get(response["Location"])
    assert any("copy it now" in str(m) for m in follow.context["messages"])


def test_admin_character_list_of_viewer_tenant_is_read_only(client, staff_of_both, studio_b):
    character = character_create(tenant=studio_b.tenant, name="Villain")
    client.force_login(staff_of_both)
    client.post(
        f"/admin/characters/character/{character.pk}/change/",
        {"name": "Hacked", "slug": character.slug, **CHARACTER_FORM},
    )
    assert Character.objects.unscoped().get(pk=character.pk).name == "Villain"


def test_style_lora_can_be_deleted_through_the_api_by_its_tenant_only(
    api_a, api_b, studio_a, models, lora_bytes, committed
):
    style = lora_services.style_lora_upload(
        tenant=studio_a.tenant, upload=SimpleUploadedFile("s.safetensors", lora_bytes), name="ink", base_model="sdxl"
    )
    assert api_b.delete(f"/api/v1/style-loras/{style.pk}").status_code == 404
    assert api_a.get(f"/api/v1/style-loras/{style.pk}").json()["name"] == "ink"
    with committed():
        assert api_a.delete(f"/api/v1/style-loras/{style.pk}").status_code == 204
    assert not StyleLora.objects.unscoped().exists()
    assert not default_storage.exists(style.file.name)


# --- 14 in admin: webhook URLs and delivery logs are for owners and admins -------------------


def test_members_and_viewers_see_no_webhook_urls_in_admin(client, staff_of_both, studio_a, studio_b):
    from alkemy.webhooks.models import WebhookDelivery

    endpoint = WebhookEndpoint.objects.unscoped().create(
        tenant=studio_a.tenant, url="https://hooks.slack.example/T000/B000/secret", events=[], secret="whsec_x"
    )
    delivery = WebhookDelivery.objects.unscoped().create(
        tenant=studio_a.tenant, endpoint=endpoint, event="generation.succeeded", payload={}
    )
    client.force_login(staff_of_both)  # member of A, viewer of B
    assert "secret" not in client.get("/admin/webhooks/webhookendpoint/").content.decode()
    for page in (
        f"/admin/webhooks/webhookendpoint/{endpoint.pk}/change/",
        f"/admin/webhooks/webhookdelivery/{delivery.pk}/change/",
        "/admin/webhooks/webhookdelivery/",
    ):
        response = client.get(page)
        assert response.status_code in (302, 403)
        assert "hooks.slack.example" not in response.content.decode()

    membership_set(tenant=studio_a.tenant, user=staff_of_both, role=Role.ADMIN)
    assert client.get(f"/admin/webhooks/webhookendpoint/{endpoint.pk}/change/").status_code == 200
    client.post(f"/admin/webhooks/webhookendpoint/{endpoint.pk}/delete/", {"post": "yes"})
    assert not WebhookEndpoint.objects.unscoped().filter(pk=endpoint.pk).exists()
    assert not WebhookDelivery.objects.unscoped().exists()


def test_deleting_a_character_removes_its_trainings_checkpoint_and_validation_render(studio_a, media_root, committed):
    from characters.services import character_delete
    from training.models import TrainingJob

    character = character_create(tenant=studio_a.tenant, name="Kai")
    job = TrainingJob.objects.unscoped().create(
        tenant=studio_a.tenant, character=character, base_model="sdxl", steps=10, rank=4, alpha=4.0,
        learning_rate=1e-4, resolution=1024, trigger_token="ohwx_kai", seed=1, status=JobStatus.FAILED,
    )  # fmt: skip
    folder = f"tenants/{studio_a.tenant.pk}/trainings/{job.pk}"
    checkpoint = default_storage.save(f"{folder}/checkpoint-000005.pt", ContentFile(b"state"))
    render = default_storage.save(f"{folder}/validation-seed1.png", ContentFile(b"png"))
    TrainingJob.objects.unscoped().filter(pk=job.pk).update(checkpoint_file=checkpoint, validation_image=render)

    with committed():
        character_delete(character=character)

    assert not default_storage.exists(checkpoint) and not default_storage.exists(render)
