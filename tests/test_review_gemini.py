"""Security review, Gemini: the model allow-list, encryption-key rotation, and a required SECRET_KEY."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from alkemy.jobs import JobStatus
from alkemy.tenancy.models import Tenant
from alkemy.tenancy.services import membership_set, tenant_gemini_key, tenant_set_gemini_key
from characters.services import character_create, reference_add
from generation.models import GenerationJob
from generation.tasks import run_generation_job
from tests import photos
from tests.test_gemini import (
    MODEL,
    gemini,  # noqa: F401  (a fixture)
    image_reply,
)

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parent.parent
TENANT_KEY = "AIzaSyTENANT-0123456789abcdefghijklmn"


@pytest.fixture
def eileen(studio_a, media_root):
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=character, upload=photos.upload(photos.astronaut()))
    return character


def submit(api, character, **overrides):
    body = {"character": character.pk, "method": "gemini", "prompt": "on a ship", "width": 512, "height": 512,
            "seed": 4, **overrides}  # fmt: skip
    return api.post("/api/v1/generations", body, format="json")


# --- item 3: params.model is allow-listed ------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gemini-2.5-pro", "tunedModels/someone-elses-model", "models/gemini-2.5-pro", ""])
def test_a_model_outside_the_allow_list_is_refused_at_submit(api_a, eileen, model):
    response = submit(api_a, eileen, params={"model": model})

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "model_not_allowed"
    assert error["details"]["field"] == "params.model"
    assert error["details"]["allowed"] == ["gemini-2.5-flash-image"]
    assert not GenerationJob.objects.unscoped().exists()


def test_a_model_that_is_not_a_string_is_refused(api_a, eileen):
    response = submit(api_a, eileen, params={"model": ["gemini-2.5-flash-image"]})

    assert response.status_code == 422
    assert response.json()["error"]["details"]["field"] == "params.model"


def test_the_operator_allows_more_models_and_the_default_model_is_always_allowed(api_a, eileen, settings):
    settings.ALKEMY_GEMINI_ALLOWED_MODELS = ["gemini-3-pro-image-preview"]
    settings.ALKEMY_GEMINI_MODEL = "gemini-2.5-flash-image"

    assert submit(api_a, eileen, params={"model": "gemini-3-pro-image-preview"}).status_code == 202
    assert submit(api_a, eileen, params={"model": "gemini-2.5-flash-image"}).status_code == 202
    assert submit(api_a, eileen).status_code == 202  # no params.model: the default
    assert submit(api_a, eileen, params={"model": "gemini-2.5-pro"}).status_code == 422


def test_other_methods_do_not_look_at_params_model(api_a, eileen):
    body = {"character": eileen.pk, "prompt": "x", "width": 64, "height": 64, "steps": 2, "params": {"model": "any"}}
    assert api_a.post("/api/v1/generations", body, format="json").status_code == 202


def test_a_queued_job_whose_model_is_no_longer_allowed_fails_without_calling_gemini(gemini, api_a, eileen, settings):  # noqa: F811
    settings.ALKEMY_GEMINI_ALLOWED_MODELS = [MODEL, "gemini-3-pro-image-preview"]
    job_id = submit(api_a, eileen, params={"model": "gemini-3-pro-image-preview"}).json()["id"]
    settings.ALKEMY_GEMINI_ALLOWED_MODELS = [MODEL]  # the operator narrowed the list meanwhile
    gemini.reply(image_reply())

    assert run_generation_job(job_id) == JobStatus.FAILED
    job = GenerationJob.objects.unscoped().get(pk=job_id)
    assert job.error_code == "model_not_allowed"
    assert gemini.requests == []


def test_the_model_used_is_recorded_in_the_jobs_usage(gemini, api_a, eileen):  # noqa: F811
    gemini.reply(image_reply())
    job_id = submit(api_a, eileen, num_images=2).json()["id"]

    assert run_generation_job(job_id) == JobStatus.SUCCEEDED
    usage = GenerationJob.objects.unscoped().get(pk=job_id).usage
    assert usage["model"] == MODEL
    assert usage["images"] == 2 and usage["requests"] == 2  # the meters still add up
    assert api_a.get(f"/api/v1/generations/{job_id}").json()["usage"]["model"] == MODEL


# --- item 6: rotating the encryption key -------------------------------------------------------------------


@pytest.fixture
def rotated(settings, studio_a):
    """Studio A's key stored under encryption key "old"; the deployment now only knows "new"."""
    settings.ALKEMY_ENCRYPTION_KEYS = ["old"]
    tenant_set_gemini_key(tenant=studio_a.tenant, api_key=TENANT_KEY)
    settings.ALKEMY_ENCRYPTION_KEYS = ["new"]
    return studio_a


def test_an_unreadable_key_is_shown_as_such_by_the_api_and_can_be_entered_again(rotated, api_a):
    response = api_a.get("/api/v1/tenant")
    assert response.status_code == 200
    body = response.json()
    assert body["gemini_api_key_status"] == "unreadable"
    assert body["gemini_api_key"] is None

    again = api_a.put("/api/v1/tenant", {"api_key": TENANT_KEY}, format="json")
    assert again.status_code == 200
    assert again.json()["gemini_api_key_status"] == "set"
    assert again.json()["gemini_api_key"] == "AIza…klmn"
    assert tenant_gemini_key(Tenant.objects.get(pk=rotated.tenant.pk)) == TENANT_KEY


def test_the_api_says_which_key_is_in_use(api_a, studio_a):
    assert api_a.get("/api/v1/tenant").json()["gemini_api_key_status"] == "unset"
    tenant_set_gemini_key(tenant=studio_a.tenant, api_key=TENANT_KEY)
    assert api_a.get("/api/v1/tenant").json()["gemini_api_key_status"] == "set"


def test_the_admin_tenant_page_shows_an_unreadable_key_and_takes_a_new_one(rotated, client):
    from django.contrib.auth import get_user_model

    owner = get_user_model().objects.create_user("olga", password="pw-olga-12345", is_staff=True)
    membership_set(tenant=rotated.tenant, user=owner, role="owner")
    client.force_login(owner)
    url = f"/admin/tenancy/tenant/{rotated.tenant.pk}/change/"

    page = client.get(url)
    assert page.status_code == 200
    assert "unreadable" in page.content.decode()

    assert client.post(url, {"name": "Studio A", "gemini_api_key": TENANT_KEY}).status_code == 302
    assert tenant_gemini_key(Tenant.objects.get(pk=rotated.tenant.pk)) == TENANT_KEY
    assert "AIza…klmn" in client.get(url).content.decode()


def test_a_job_with_an_unreadable_key_fails_auth_and_never_falls_back_to_the_global_key(
    rotated,
    gemini,  # noqa: F811
    api_a,
    eileen,
):
    gemini.reply(image_reply())
    job_id = submit(api_a, eileen).json()["id"]

    assert run_generation_job(job_id) == JobStatus.FAILED
    job = GenerationJob.objects.unscoped().get(pk=job_id)
    assert job.error_code == "provider_auth_failed"
    assert "enter" in job.error_message and "again" in job.error_message
    assert gemini.requests == []  # the operator's key was not spent instead


def test_keys_stored_under_an_older_encryption_key_stay_readable_while_it_is_listed(settings, studio_a):
    settings.ALKEMY_ENCRYPTION_KEYS = ["old"]
    tenant_set_gemini_key(tenant=studio_a.tenant, api_key=TENANT_KEY)
    settings.ALKEMY_ENCRYPTION_KEYS = ["new", "old"]  # newest first

    assert tenant_gemini_key(Tenant.objects.get(pk=studio_a.tenant.pk)) == TENANT_KEY


def test_keys_stored_with_the_secret_key_derivation_stay_readable(settings, studio_a):
    """Before ALKEMY_ENCRYPTION_KEYS existed the key came from SECRET_KEY; listing it keeps those readable."""
    settings.ALKEMY_ENCRYPTION_KEYS = []
    tenant_set_gemini_key(tenant=studio_a.tenant, api_key=TENANT_KEY)
    settings.ALKEMY_ENCRYPTION_KEYS = ["new", settings.SECRET_KEY]

    assert tenant_gemini_key(Tenant.objects.get(pk=studio_a.tenant.pk)) == TENANT_KEY


def test_reencrypt_command_moves_every_readable_key_to_the_newest_and_reports_the_rest(settings, studio_a, studio_b):
    from io import StringIO

    settings.ALKEMY_ENCRYPTION_KEYS = ["old"]
    tenant_set_gemini_key(tenant=studio_a.tenant, api_key=TENANT_KEY)
    settings.ALKEMY_ENCRYPTION_KEYS = ["lost"]
    tenant_set_gemini_key(tenant=studio_b.tenant, api_key=TENANT_KEY.replace("TENANT", "OTHERS"))
    settings.ALKEMY_ENCRYPTION_KEYS = ["new", "old"]
    out = StringIO()

    with pytest.raises(CommandError, match="studio-b"):
        call_command("reencrypt_secrets", stdout=out)

    assert "1 re-encrypted" in out.getvalue()
    settings.ALKEMY_ENCRYPTION_KEYS = ["new"]  # "old" can now be dropped
    assert tenant_gemini_key(Tenant.objects.get(pk=studio_a.tenant.pk)) == TENANT_KEY
    assert Tenant.objects.get(pk=studio_b.tenant.pk).gemini_api_key_encrypted  # left for its owner to re-enter

    settings.ALKEMY_ENCRYPTION_KEYS = ["new", "old"]
    tenant_set_gemini_key(tenant=studio_b.tenant, api_key="")
    call_command("reencrypt_secrets", stdout=out)  # nothing unreadable left: success


# --- a required SECRET_KEY ---------------------------------------------------------------------------------


def settings_import(**env):
    """Import the real settings in a fresh interpreter with only `env` set (plus what Python needs)."""
    clean = {name: value for name, value in os.environ.items() if name in ("PATH", "HOME", "LANG")}
    clean.update(DJANGO_SETTINGS_MODULE="alkemy.settings", ALKEMY_DATA_DIR="/nonexistent", **env)
    code = "from django.conf import settings; print(settings.SECRET_KEY)"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean, capture_output=True, text=True)


def test_without_secret_key_the_settings_refuse_to_load_even_when_not_required_explicitly():
    result = settings_import(ALKEMY_REQUIRE_SECRET_KEY="0")
    assert result.returncode != 0
    assert "SECRET_KEY" in result.stderr


def test_debug_mode_runs_without_secret_key_and_a_set_key_is_used():
    assert settings_import(DEBUG="1").returncode == 0
    result = settings_import(SECRET_KEY="a-real-secret-from-the-environment")
    assert result.returncode == 0 and result.stdout.strip() == "a-real-secret-from-the-environment"


def test_the_test_suite_runs_with_its_own_test_only_secret(settings):
    assert os.environ["SECRET_KEY"] == settings.SECRET_KEY  # exported, so qcluster subprocesses share it
