"""Bulk import (issue #13): a folder or a zip of real sample photos, one folder per character, through the
same service as single uploads; bad files are reported, not fatal; re-running is idempotent."""

import io
import stat
import zipfile
from io import StringIO

import numpy as np
import pytest
from django.core.management import call_command
from PIL import Image

from characters.import_jobs import run_import_job
from characters.models import Character, CharacterImport, ReferenceImage
from characters.services import character_create, reference_add
from tests import photos
from tests.conftest import make_tenant

pytestmark = pytest.mark.django_db


def jpeg(pixels, quality=90) -> bytes:
    return photos.encode(pixels, "JPEG", quality=quality)


@pytest.fixture(scope="module")
def layout() -> dict[str, bytes]:
    """path → bytes: three good characters, a possible duplicate of one, and every kind of bad file."""
    astronaut, crops = photos.astronaut(), photos.group_crops()
    eileen = photos.encode(astronaut)
    return {
        "Eileen Collins/1.png": eileen,
        "Eileen Collins/2.jpg": jpeg(np.ascontiguousarray(astronaut[:, ::-1])),
        "Tom Hanks/tom.png": photos.encode(photos.tom_hanks()),
        "Group Person/a.png": photos.encode(crops[0]),
        "Eileen Again/again.jpg": jpeg(astronaut, quality=75),  # another file of the same face
        "Eileen Twin/1.png": eileen,  # the very same file in another folder
        "Broken/bad.jpg": b"\xff\xd8\xff\xe0 this is not really a jpeg",
        "Nobody/corner.jpg": jpeg(np.asarray(Image.fromarray(photos.insightface_image("t1.jpg")).crop((0, 0, 60, 60)))),
        "Tom Hanks/old/nested.png": photos.encode(photos.tom_hanks()),
        "stray.png": eileen,
        ".DS_Store": b"\0\0\0\1Bud1",
        "__MACOSX/Tom Hanks/._tom.png": b"\0\5\26\7",
    }


def write_tree(root, files: dict[str, bytes]):
    for path, data in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root


def zipped(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return buffer.getvalue()


def by_path(report) -> dict[str, dict]:
    return {entry["path"]: entry for entry in report}


def assert_first_import(report: dict[str, dict], tenant):
    assert set(report) == {p for p in report if not p.startswith((".", "__MACOSX"))}  # system files ignored
    names = set(Character.objects.unscoped().filter(tenant=tenant).values_list("name", flat=True))
    assert names == {"Eileen Collins", "Tom Hanks", "Group Person", "Eileen Again"}  # no empty character
    for path in ["Eileen Collins/1.png", "Eileen Collins/2.jpg", "Tom Hanks/tom.png", "Group Person/a.png"]:
        assert report[path]["outcome"] == "enrolled", report[path]
    refused = {path: entry["code"] for path, entry in report.items() if entry["outcome"] == "refused"}
    assert refused == {
        "Eileen Twin/1.png": "duplicate_photo",
        "Broken/bad.jpg": "invalid_image",
        "Nobody/corner.jpg": "no_face",
        "Tom Hanks/old/nested.png": "nested_folder",
        "stray.png": "not_in_a_folder",
    }
    # another file of Eileen's face in another folder is enrolled, and the two characters are reported as
    # possible duplicates (by the photos enrolled after the other character existed: folders go in name order)
    assert report["Eileen Again/again.jpg"]["outcome"] == "enrolled"
    pairs = {
        (entry["character"], s["name"], s["is_match"]) for entry in report.values() for s in entry.get("similar", [])
    }
    assert pairs == {("Eileen Collins", "Eileen Again", True)}
    eileen = Character.objects.unscoped().get(tenant=tenant, name="Eileen Collins")
    assert ReferenceImage.objects.unscoped().filter(character=eileen).count() == 2


def test_command_imports_a_folder_reports_refusals_and_is_idempotent(studio_a, media_root, tmp_path, layout):
    root = write_tree(tmp_path / "cast", layout)
    existing = character_create(tenant=studio_a.tenant, name="tom hanks")  # found by name, not created again
    out = StringIO()
    call_command("import_characters", str(root), tenant="studio-a", workers=2, report=str(tmp_path / "r.json"),
                 stdout=out, stderr=StringIO())  # fmt: skip
    text = out.getvalue()
    assert "10 file(s): 5 enrolled, 0 already enrolled (skipped), 5 refused; 3 character(s) created; 2 photo(s)" in text
    assert "duplicate_photo: 1" in text and "Broken/bad.jpg: invalid_image" in text
    assert "Eileen Collins/2.jpg (Eileen Collins) resembles Eileen Again" in text
    assert ReferenceImage.objects.unscoped().filter(character=existing).count() == 1
    import json

    report = by_path(json.loads((tmp_path / "r.json").read_text())["files"])
    assert report["Tom Hanks/tom.png"]["character_id"] == existing.pk
    existing.name = "Tom Hanks"  # the assertion below lists names as imported
    existing.save()
    assert_first_import(report, studio_a.tenant)
    references = ReferenceImage.objects.unscoped().count()

    # Re-running changes nothing: every enrolled photo is skipped, the same files are refused again.
    out = StringIO()
    call_command("import_characters", str(root), tenant=str(studio_a.tenant.pk), workers=1, no_progress=True,
                 stdout=out)  # fmt: skip
    assert "10 file(s): 0 enrolled, 5 already enrolled (skipped), 5 refused; 0 character(s) created" in out.getvalue()
    assert ReferenceImage.objects.unscoped().count() == references


def test_dry_run_enrols_nothing(studio_a, media_root, tmp_path, layout):
    root = write_tree(tmp_path / "cast", {p: d for p, d in layout.items() if p.startswith(("Tom", "Broken"))})
    tom = character_create(tenant=studio_a.tenant, name="Tom")
    reference_add(character=tom, upload=photos.upload(photos.tom_hanks(), "JPEG"))  # the same face, another file
    out = StringIO()
    call_command("import_characters", str(root), tenant="studio-a", dry_run=True, workers=1, no_progress=True,
                 stdout=out)  # fmt: skip
    assert "3 file(s): 1 would be enrolled, 0 already enrolled (skipped), 2 refused" in out.getvalue()
    assert "Tom Hanks/tom.png (Tom Hanks) resembles Tom" in out.getvalue()
    assert list(Character.objects.unscoped().values_list("name", flat=True)) == ["Tom"]


def test_command_refuses_an_unknown_tenant_or_directory(studio_a, tmp_path):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="No tenant"):
        call_command("import_characters", str(tmp_path), tenant="nope")
    with pytest.raises(CommandError, match="not a directory"):
        call_command("import_characters", str(tmp_path / "missing"), tenant="studio-a")


def test_zip_import_job_enrols_reports_and_reruns_idempotently(
    api_a, studio_a, media_root, layout, django_capture_on_commit_callbacks
):
    data = zipped(layout)
    with django_capture_on_commit_callbacks(execute=False):
        response = api_a.post("/api/v1/characters/import", {"archive": io.BytesIO(data)}, format="multipart")
    assert response.status_code == 202, response.json()
    body = response.json()
    assert body["status"] == "queued" and body["total_files"] == 10 and body["report"] == []
    job = CharacterImport.objects.unscoped().get(pk=body["id"])
    assert (media_root / job.archive.name).read_bytes() == data

    with django_capture_on_commit_callbacks(execute=True):
        assert run_import_job(job.pk) == "succeeded"
    assert run_import_job(job.pk) == "skipped"  # a second delivery does nothing
    body = api_a.get(f"/api/v1/characters/imports/{job.pk}").json()
    assert body["status"] == "succeeded" and body["progress"] == 1.0
    assert (body["enrolled_count"], body["refused_count"], body["characters_created"]) == (5, 5, 4)
    assert body["duplicate_count"] == 2
    assert_first_import(by_path(body["report"]), studio_a.tenant)
    job.refresh_from_db()
    assert not job.archive  # the archive is deleted when the job ends; the report stays
    assert not [p for p in media_root.rglob("*.zip")]
    references = ReferenceImage.objects.unscoped().count()

    # the same archive again: a new job whose photos are all skipped
    with django_capture_on_commit_callbacks(execute=False):
        again = api_a.post("/api/v1/characters/import", {"archive": io.BytesIO(data)}, format="multipart").json()
    with django_capture_on_commit_callbacks(execute=True):
        run_import_job(again["id"])
    body = api_a.get(f"/api/v1/characters/imports/{again['id']}").json()
    assert (body["enrolled_count"], body["skipped_count"], body["characters_created"]) == (0, 5, 0)
    assert ReferenceImage.objects.unscoped().count() == references
    assert [j["id"] for j in api_a.get("/api/v1/characters/imports").json()["results"]] == [again["id"], job.pk]


def member(name: str, data: bytes = b"x", mode: int | None = None) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    if mode is not None:
        info.external_attr = mode << 16
    return info, data


def raw_zip(*members) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for info, data in members:
            archive.writestr(info, data)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "archive, code",
    [
        (b"PK\3\4 not a zip at all", "invalid_archive"),
        (photos.encode(np.zeros((40, 40, 3), np.uint8)), "invalid_archive"),
        (raw_zip(member("../escape/x.png")), "unsafe_archive"),
        (raw_zip(member("/etc/x.png")), "unsafe_archive"),
        (raw_zip(member("C:/x/y.png")), "unsafe_archive"),
        (raw_zip(member("A/link.png", b"/etc/passwd", stat.S_IFLNK | 0o777)), "unsafe_archive"),
        (raw_zip(*(member(f"A/{i}.png") for i in range(4))), "archive_too_large"),
        (raw_zip(member("A/big.png", b"\0" * 5000)), "archive_too_large"),  # zip-bomb shape: tiny, unpacks large
        (raw_zip(member(".DS_Store")), "empty_archive"),
    ],
)
def test_bad_archives_are_4xx_with_a_code_and_leave_nothing(api_a, media_root, settings, archive, code):
    settings.ALKEMY_IMPORT_MAX_FILES = 3
    settings.ALKEMY_IMPORT_MAX_UNCOMPRESSED_BYTES = 4000
    response = api_a.post("/api/v1/characters/import", {"archive": io.BytesIO(archive)}, format="multipart")
    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == code
    assert not CharacterImport.objects.unscoped().exists()
    assert not any(p.is_file() for p in media_root.rglob("*"))


def test_archive_over_the_upload_limit_is_413_and_missing_archive_400(api_a, media_root, settings):
    settings.ALKEMY_IMPORT_MAX_ARCHIVE_BYTES = 100
    big = raw_zip(member("A/a.png", b"\1" * 500))
    response = api_a.post("/api/v1/characters/import", {"archive": io.BytesIO(big)}, format="multipart")
    assert response.status_code == 413 and response.json()["error"]["code"] == "archive_too_large"
    assert api_a.post("/api/v1/characters/import", {}, format="multipart").status_code == 400


def test_imports_are_the_tenants_own(api_a, studio_a, media_root, layout, django_capture_on_commit_callbacks):
    files = {"Tom Hanks/tom.png": layout["Tom Hanks/tom.png"]}
    with django_capture_on_commit_callbacks(execute=False):
        job = api_a.post("/api/v1/characters/import", {"archive": io.BytesIO(zipped(files))}, format="multipart")
    other = make_tenant("studio-other").client()
    assert other.get(f"/api/v1/characters/imports/{job.json()['id']}").status_code == 404
    assert other.get("/api/v1/characters/imports").json()["results"] == []
    assert other.post(f"/api/v1/characters/imports/{job.json()['id']}/cancel").status_code == 404
    canceled = api_a.post(f"/api/v1/characters/imports/{job.json()['id']}/cancel").json()
    assert canceled["status"] == "canceled"


def test_a_lost_import_is_requeued_by_the_reaper(api_a, media_root, layout, django_capture_on_commit_callbacks):
    from datetime import timedelta

    from django.utils import timezone
    from django_q.models import Schedule

    from characters.import_jobs import reap_import_jobs

    assert Schedule.objects.filter(func="characters.import_jobs.reap_import_jobs").exists()
    files = {"Tom Hanks/tom.png": layout["Tom Hanks/tom.png"]}
    with django_capture_on_commit_callbacks(execute=False):
        job_id = api_a.post("/api/v1/characters/import", {"archive": io.BytesIO(zipped(files))}, format="multipart")
    job_id = job_id.json()["id"]
    past = timezone.now() - timedelta(minutes=5)
    CharacterImport.objects.unscoped().filter(pk=job_id).update(status="running", worker="gone:1", attempt=1,
                                                                 lease_expires_at=past)  # fmt: skip
    with django_capture_on_commit_callbacks(execute=False):
        assert reap_import_jobs()["requeued"] == 1
    with django_capture_on_commit_callbacks(execute=True):
        assert run_import_job(job_id) == "succeeded"  # the re-queued job runs to the end
    assert CharacterImport.objects.unscoped().get(pk=job_id).enrolled_count == 1
