"""Generation API: up-front validation, idempotency, cancel, tenant isolation."""

import pytest

from characters.services import character_create, reference_add
from generation.models import GenerationJob
from tests import photos

pytestmark = pytest.mark.django_db


@pytest.fixture
def eileen(studio_a, media_root):
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=character, upload=photos.upload(photos.astronaut()))
    return character


def body(character, **overrides):
    return {"character": character.pk, "method": "pulid_flux", "prompt": "on a beach at dawn", "width": 512,
            "height": 512, "steps": 4, "seed": 5, **overrides}  # fmt: skip


def test_submit_answers_202_with_a_queued_job(api_a, eileen):
    response = api_a.post("/api/v1/generations", body(eileen), format="json")
    assert response.status_code == 202, response.json()
    job = response.json()
    assert job["status"] == "queued" and job["progress"] == 0 and job["outputs"] == []
    assert job["total_steps"] == 4 and job["embedder"] == "dlib"
    assert api_a.get(f"/api/v1/generations/{job['id']}").json()["id"] == job["id"]
    assert api_a.get(f"/api/v1/generations?character={eileen.pk}&status=queued").json()["count"] == 1


@pytest.mark.parametrize(
    ("overrides", "field", "code"),
    [
        ({"method": "dalle"}, "method", "validation_error"),
        ({"width": 100}, "width", "invalid_parameter"),
        ({"height": 8192}, "height", "invalid_parameter"),
        ({"steps": 0}, "steps", "invalid_parameter"),
        ({"steps": 1000}, "steps", "invalid_parameter"),
        ({"num_images": 50}, "num_images", "invalid_parameter"),
        ({"prompt": "  "}, "prompt", "validation_error"),
        ({"seed": -1}, "seed", "validation_error"),
    ],
)
def test_bad_requests_are_refused_up_front(api_a, eileen, overrides, field, code):
    response = api_a.post("/api/v1/generations", body(eileen, **overrides), format="json")
    assert response.status_code == 400, response.json()
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["details"]["field"] == field
    assert GenerationJob.objects.unscoped().count() == 0


def test_character_without_identity_is_422(api_a, studio_a):
    empty = character_create(tenant=studio_a.tenant, name="No photo")
    response = api_a.post("/api/v1/generations", body(empty), format="json")
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "no_identity"


def test_other_tenants_character_and_job_are_404(api_a, api_b, eileen):
    assert api_b.post("/api/v1/generations", body(eileen), format="json").status_code == 404
    job = api_a.post("/api/v1/generations", body(eileen), format="json").json()
    assert api_b.get(f"/api/v1/generations/{job['id']}").status_code == 404
    assert api_b.post(f"/api/v1/generations/{job['id']}/cancel").status_code == 404
    assert api_b.get("/api/v1/generations").json()["count"] == 0


def test_idempotency_key_returns_the_same_job_and_conflicts_on_a_different_body(api_a, eileen):
    first = api_a.post("/api/v1/generations", body(eileen), format="json", HTTP_IDEMPOTENCY_KEY="retry-1")
    again = api_a.post("/api/v1/generations", body(eileen), format="json", HTTP_IDEMPOTENCY_KEY="retry-1")
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert GenerationJob.objects.unscoped().count() == 1

    different = api_a.post(
        "/api/v1/generations", body(eileen, prompt="in space"), format="json", HTTP_IDEMPOTENCY_KEY="retry-1"
    )
    assert different.status_code == 409
    assert different.json()["error"]["code"] == "idempotency_key_reused"
    assert GenerationJob.objects.unscoped().count() == 1


def test_idempotency_without_seed_does_not_draw_a_new_job(api_a, eileen):
    no_seed = body(eileen)
    del no_seed["seed"]
    first = api_a.post("/api/v1/generations", no_seed, format="json", HTTP_IDEMPOTENCY_KEY="k2").json()
    again = api_a.post("/api/v1/generations", no_seed, format="json", HTTP_IDEMPOTENCY_KEY="k2").json()
    assert first["id"] == again["id"] and first["seed"] == again["seed"]


def test_cancel_a_queued_job(api_a, eileen):
    job = api_a.post("/api/v1/generations", body(eileen), format="json").json()
    response = api_a.post(f"/api/v1/generations/{job['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "canceled"
    assert response.json()["error"]["code"] == "canceled"
    # Canceling again is harmless.
    assert api_a.post(f"/api/v1/generations/{job['id']}/cancel").json()["status"] == "canceled"


def test_viewer_cannot_submit(studio_a, eileen):
    from alkemy.tenancy.services import api_key_create

    _, key = api_key_create(tenant=studio_a.tenant, name="viewer", role="viewer")
    response = studio_a.client(key).post("/api/v1/generations", body(eileen), format="json")
    assert response.status_code == 403
