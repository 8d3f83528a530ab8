"""`manage.py backup` / `manage.py restore`: a round trip into a second, empty data dir (its own embedded
PostgreSQL) finds every character, embedding, job and file, and search by photo still works there."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from characters.models import FaceEmbedding, ReferenceImage
from characters.services import character_create, reference_add
from generation.jobs import generation_submit
from tests import photos

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent

# Runs in the restored data dir: what it holds, and a search by photo there.
VERIFY = """
import json, os
from characters.models import Character, FaceEmbedding, ReferenceImage
from characters.services import faces_search
from generation.models import GenerationJob
from alkemy.tenancy.models import Tenant
from alkemy.tenancy.services import api_key_authenticate
from django.core.files.storage import default_storage
from tests import photos
out = {}
characters = Character.objects.unscoped().select_related("tenant")
out["characters"] = sorted((c.tenant.slug, c.name, c.slug) for c in characters)
out["embeddings"] = sorted((e.reference_id, e.embedder, [round(float(x), 6) for x in e.embedding[:8]])
                           for e in FaceEmbedding.objects.unscoped())
out["jobs"] = sorted((j.pk, j.status, j.prompt, j.character_id) for j in GenerationJob.objects.unscoped())
out["files"] = sorted(r.file.name for r in ReferenceImage.objects.unscoped())
out["readable"] = all(default_storage.open(r.file.name).read() for r in ReferenceImage.objects.unscoped())
tenant = Tenant.objects.get(slug="studio-a")
found = faces_search(tenant=tenant, upload=photos.upload(photos.astronaut(), "JPEG", quality=90))
out["search"] = [(r.character.name, r.similarity) for r in found.results]
out["key_tenant"] = api_key_authenticate(os.environ["ALKEMY_TEST_API_KEY"]).tenant.slug
print("VERIFY" + json.dumps(out))
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manage(*args: str, data_dir: Path, **extra_env: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in {"ALKEMY_MEDIA_ROOT", "ALKEMY_DATA_DIR"}}
    env.update(extra_env, ALKEMY_DATA_DIR=str(data_dir))
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def empty_data_dir():
    """A fresh data dir outside pytest's private (0700) tmp folder: the embedded server runs as its own user."""
    path = Path(tempfile.mkdtemp(prefix="alk-restore-"))
    path.chmod(0o755)
    yield path / "data"
    shutil.rmtree(path, ignore_errors=True)


def test_backup_round_trip_into_an_empty_data_dir(studio_a, studio_b, media_root, tmp_path, empty_data_dir):
    eileen = character_create(tenant=studio_a.tenant, name="Eileen Collins")
    reference_add(character=eileen, upload=photos.upload(photos.astronaut()))
    tom = character_create(tenant=studio_b.tenant, name="Tom")
    reference_add(character=tom, upload=photos.upload(photos.tom_hanks()))
    job, _ = generation_submit(
        tenant=studio_a.tenant, character=eileen, prompt="on a beach", width=512, height=512, steps=4, seed=5
    )
    stray = media_root / "tenants" / str(studio_a.tenant.pk) / "notes" / "stray.bin"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(os.urandom(1000))  # a file no row names is backed up too

    backup = tmp_path / "backup"
    call_command("backup", str(backup))
    manifest = json.loads((backup / "manifest.json").read_text())
    originals = {p.relative_to(media_root).as_posix(): sha256(p) for p in media_root.rglob("*") if p.is_file()}
    assert {name: info["sha256"] for name, info in manifest["media"]["files"].items()} == originals
    assert manifest["media"]["missing"] == []
    counts = manifest["database"]["row_counts"]
    assert counts["characters_character"] == 2 and counts["generation_generationjob"] == 1
    assert counts["characters_faceembedding"] == FaceEmbedding.objects.unscoped().count() >= 2
    assert manifest["database"]["sha256"] == sha256(backup / "database.dump")

    with pytest.raises(CommandError, match="not empty"):
        call_command("backup", str(backup))

    restored = empty_data_dir
    result = manage("restore", str(backup), data_dir=restored)
    assert result.returncode == 0, result.stderr
    assert "checksums verified" in result.stdout
    restored_media = restored / "media"
    assert {p.relative_to(restored_media).as_posix(): sha256(p) for p in restored_media.rglob("*") if p.is_file()} == (
        originals
    )

    verify = manage("shell", "-c", VERIFY, data_dir=restored, ALKEMY_TEST_API_KEY=studio_a.key)
    assert verify.returncode == 0, verify.stderr
    found = json.loads(verify.stdout.split("VERIFY", 1)[1])
    assert found["characters"] == [["studio-a", "Eileen Collins", eileen.slug], ["studio-b", "Tom", tom.slug]]
    assert found["embeddings"] == sorted(
        [e.reference_id, e.embedder, [round(float(x), 6) for x in e.embedding[:8]]]
        for e in FaceEmbedding.objects.unscoped()
    )
    assert found["jobs"] == [[job.pk, "queued", "on a beach", eileen.pk]]
    assert found["readable"]
    assert found["files"] == sorted(r.file.name for r in ReferenceImage.objects.unscoped())
    assert [name for name, _ in found["search"]] == ["Eileen Collins"] and found["search"][0][1] > 0.9
    assert found["key_tenant"] == "studio-a"  # API keys still authenticate (same SECRET_KEY)


def test_restore_refuses_a_checksum_mismatch_and_a_database_that_is_not_empty(studio_a, media_root, tmp_path):
    eileen = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=eileen, upload=photos.upload(photos.astronaut()))
    backup = tmp_path / "backup"
    call_command("backup", str(backup))

    with pytest.raises(CommandError, match="database .* is not empty"):
        call_command("restore", str(backup))  # the test database has tables

    tampered = tmp_path / "tampered"
    shutil.copytree(backup, tampered)
    [photo] = [p for p in (tampered / "media").rglob("*") if p.is_file() and "references" in p.as_posix()][:1]
    photo.write_bytes(photo.read_bytes()[:-1] + b"\x00")
    with pytest.raises(CommandError, match=r"Checksum mismatch: media/tenants/.*is not the file that was backed up"):
        call_command("restore", str(tampered))

    (backup / "database.dump").write_bytes(b"PGDMP truncated")
    with pytest.raises(CommandError, match="Checksum mismatch: database.dump"):
        call_command("restore", str(backup))
