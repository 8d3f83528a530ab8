"""S3-compatible object storage (django-storages) against a real S3-speaking server: moto in server mode.

A reference uploaded through the API, a generation with the tiny models and its download through the API
all go through the bucket; nothing lands under MEDIA_ROOT.
"""

import sys
import urllib.request

import boto3
import pytest

from generation.tasks import run_generation_job
from tests import photos
from tests.servers import free_port, running

pytestmark = pytest.mark.django_db

BUCKET = "alkemy-media"


@pytest.fixture
def s3_endpoint():
    pytest.importorskip("moto.server", reason="moto[server] is in requirements/dev.txt")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with running(argv, ready=lambda: urllib.request.urlopen(url + "/moto-api/", timeout=2).close(), timeout=60):
        yield url


@pytest.fixture
def s3_storage(s3_endpoint, settings, monkeypatch, media_root):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    settings.AWS_STORAGE_BUCKET_NAME = BUCKET
    settings.AWS_S3_ENDPOINT_URL = s3_endpoint
    settings.AWS_S3_REGION_NAME = "us-east-1"
    settings.STORAGES = {**settings.STORAGES, "default": {"BACKEND": "storages.backends.s3.S3Storage"}}
    return client


def test_reference_generation_and_download_through_s3(studio_a, api_a, s3_storage, media_root, settings,
                                                      tiny_models_dir):  # fmt: skip
    from django.core.files.storage import default_storage

    assert type(default_storage._setup() or default_storage._wrapped).__name__ == "S3Storage"
    settings.ALKEMY_MODELS_DIR = tiny_models_dir
    character = api_a.post("/api/v1/characters", {"name": "Eileen"}, format="json").json()
    upload = api_a.post(
        f"/api/v1/characters/{character['id']}/references",
        {"image": photos.upload(photos.astronaut())},
        format="multipart",
    )
    assert upload.status_code == 201, upload.content
    keys = {o["Key"] for o in s3_storage.list_objects_v2(Bucket=BUCKET).get("Contents", [])}
    assert any(k.startswith(f"tenants/{studio_a.tenant.pk}/") for k in keys), keys

    reference = api_a.get(f"/api/v1/characters/{character['id']}/references/{upload.json()['id']}/image")
    assert reference.status_code == 200
    original = photos.upload(photos.astronaut()).read()
    assert b"".join(reference.streaming_content) == original

    submitted = api_a.post(
        "/api/v1/generations",
        {"character": character["id"], "prompt": "a portrait", "width": 64, "height": 64, "steps": 2,
         "method": "instantid_sdxl"},
        format="json",
    )  # fmt: skip
    assert submitted.status_code == 202, submitted.content
    assert run_generation_job(submitted.json()["id"]) == "succeeded"
    body = api_a.get(f"/api/v1/generations/{submitted.json()['id']}").json()
    output = body["outputs"][0]
    download = api_a.get(output["url"])
    assert download.status_code == 200 and download["Content-Type"] == "image/png"
    content = b"".join(download.streaming_content) if download.streaming else download.content
    assert content.startswith(b"\x89PNG")

    keys = {o["Key"] for o in s3_storage.list_objects_v2(Bucket=BUCKET).get("Contents", [])}
    assert len(keys) >= 2  # the reference and the output
    assert not [p for p in media_root.rglob("*") if p.is_file()]  # nothing on the local disk
