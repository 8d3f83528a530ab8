"""Concurrent requests against one character or one idempotency key, each on its own database connection.

Requests run in threads released together by a barrier (Django gives every thread its own connection), so the
row locks and unique constraints are what keeps the data right, not the order the test happens to send them.
"""

from __future__ import annotations

import io
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection

from characters.models import CharacterIdentity, CharacterImport, FaceEmbedding, ReferenceImage
from characters.services import character_create, reference_add
from generation.models import GenerationJob
from tests import photos
from tests.conftest import stored_files

pytestmark = pytest.mark.django_db(transaction=True)


def together(*calls):
    """Run the calls at the same moment, each in its own thread with its own connection; their results."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        try:
            barrier.wait(timeout=30)
            return call()
        finally:
            connection.close()

    with ThreadPoolExecutor(len(calls)) as pool:
        return [future.result() for future in [pool.submit(run, call) for call in calls]]


@pytest.fixture
def variants():
    """Distinct photos of one face (different bytes, same person)."""
    face = photos.astronaut()
    return [
        photos.encode(face),
        photos.encode(face[:, ::-1].copy()),
        photos.encode(face, "JPEG", quality=90),
        photos.encode(face[:, ::-1].copy(), "JPEG", quality=90),
        photos.encode(face[8:, 8:].copy()),
        photos.encode(face[:, ::-1][8:, 8:].copy()),
    ]


def post_reference(client, character, data):
    def call():
        return client.post(
            f"/api/v1/characters/{character.pk}/references", {"image": photos.upload(data)}, format="multipart"
        )

    return call


def test_two_uploads_at_the_reference_limit_keep_exactly_the_limit(studio_a, media_root, settings, variants):
    settings.ALKEMY_MAX_REFERENCES = 2
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=character, upload=photos.upload(variants[0]))
    responses = together(
        post_reference(studio_a.client(), character, variants[1]),
        post_reference(studio_a.client(), character, variants[2]),
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201, 422], [r.content for r in responses]
    refused = next(r for r in responses if r.status_code == 422)
    assert refused.json()["error"]["code"] == "too_many_references"
    assert ReferenceImage.objects.unscoped().filter(character=character).count() == 2
    assert FaceEmbedding.objects.unscoped().filter(character=character).count() == 2
    assert len(stored_files(media_root)) == 2


def test_concurrent_deletes_and_uploads_leave_the_identity_the_mean_of_what_remains(
    studio_a, media_root, settings, variants
):
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    first = [reference_add(character=character, upload=photos.upload(v)).reference for v in variants[:3]]
    client = studio_a.client()

    def delete(reference):
        return lambda: client.delete(f"/api/v1/characters/{character.pk}/references/{reference.pk}")

    responses = together(
        delete(first[0]),
        delete(first[1]),
        post_reference(studio_a.client(), character, variants[3]),
        post_reference(studio_a.client(), character, variants[4]),
    )
    assert sorted(r.status_code for r in responses) == [201, 201, 204, 204], [r.content for r in responses]

    remaining = list(FaceEmbedding.objects.unscoped().filter(character=character))
    assert {e.reference_id for e in remaining} == set(
        ReferenceImage.objects.unscoped().filter(character=character).values_list("pk", flat=True)
    )
    assert len(remaining) == 3
    mean = np.mean([np.asarray(e.embedding, dtype=np.float64) for e in remaining], axis=0)
    mean /= np.linalg.norm(mean)
    identity = CharacterIdentity.objects.unscoped().get(character=character, embedder=remaining[0].embedder)
    assert np.allclose(np.asarray(identity.embedding, dtype=np.float64), mean, atol=1e-5)
    assert len(stored_files(media_root)) == 3


def test_concurrent_idempotent_submissions_make_one_job(studio_a, media_root):
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=character, upload=photos.upload(photos.astronaut()))
    body = {"character": character.pk, "method": "pulid_flux", "prompt": "on a beach", "width": 512, "height": 512,
            "steps": 4, "seed": 5}  # fmt: skip

    def submit():
        return studio_a.client().post("/api/v1/generations", body, format="json", HTTP_IDEMPOTENCY_KEY="retry-42")

    responses = together(*[submit] * 4)
    assert {r.status_code for r in responses} <= {200, 202}, [r.content for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert GenerationJob.objects.unscoped().count() == 1


def test_concurrent_idempotent_imports_make_one_job(studio_a, media_root):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("Eileen/1.png", photos.encode(photos.astronaut()))
    data = archive.getvalue()

    def submit():
        upload = SimpleUploadedFile("cast.zip", data, content_type="application/zip")
        return studio_a.client().post("/api/v1/characters/import", {"archive": upload}, format="multipart",
                                      HTTP_IDEMPOTENCY_KEY="import-7")  # fmt: skip

    responses = together(*[submit] * 4)
    assert {r.status_code for r in responses} <= {200, 202}, [r.content for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert CharacterImport.objects.unscoped().count() == 1
    assert len(stored_files(media_root)) == 1  # the losers' copies of the archive are gone


def test_concurrent_characters_of_one_name_get_distinct_slugs(studio_a):
    """No slug sent: the service derives one, so a concurrent namesake is not a 409 slug_taken for the client."""

    def create():
        return studio_a.client().post("/api/v1/characters", {"name": "Kai Moreno"}, format="json")

    responses = together(*[create] * 4)
    assert [r.status_code for r in responses] == [201] * 4, [r.content for r in responses]
    assert sorted(r.json()["slug"] for r in responses) == ["kai-moreno", "kai-moreno-2", "kai-moreno-3",
                                                           "kai-moreno-4"]  # fmt: skip
