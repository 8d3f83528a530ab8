"""A shot list through real workers: 2 characters × 2 methods × 3 shots = 12 jobs, the consistency report
recomputed here from the stored outputs, the contact sheet's grid, the CSV against the JSON, re-rolls.

Tiny random networks draw no faces, so once the jobs have run the test stores real photos in place of
their outputs (the same person in different variants, and one other person per character as an outlier):
the report reads the stored images, and its numbers are checked against a computation from those files.
"""

import csv
import io
from itertools import combinations

import numpy as np
import pytest
from PIL import Image

from alkemy.jobs import JobStatus
from characters.faces import embedder_infos, get_embedder
from characters.models import CharacterIdentity
from characters.services import character_create, reference_add
from generation.models import GeneratedImage, GenerationJob
from shotlists import contact_sheet
from shotlists.models import ShotJob
from tests import photos
from tests.qcluster import Cluster, wait_for
from usage.selectors import job_cost

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

METHODS = ["pulid_flux", "instantid_sdxl"]


@pytest.fixture
def worker_env(settings, tiny_models_dir, media_root):
    settings.ALKEMY_MODELS_DIR = tiny_models_dir
    return settings


@pytest.fixture
def cast(studio_a, worker_env):
    eileen = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=eileen, upload=photos.upload(photos.astronaut()))
    tom = character_create(tenant=studio_a.tenant, name="Tom")
    reference_add(character=tom, upload=photos.upload(photos.tom_hanks()))
    return eileen, tom


@pytest.fixture
def gpu_cluster(worker_env):
    cluster = Cluster("gpu").start()
    yield cluster
    cluster.stop()


def variants(pixels: np.ndarray) -> list[np.ndarray]:
    """The same person three ways: as is, mirrored, enlarged 1.5×."""
    image = Image.fromarray(pixels)
    bigger = image.resize((image.width * 3 // 2, image.height * 3 // 2), Image.LANCZOS)
    return [pixels, pixels[:, ::-1].copy(), np.asarray(bigger)]


def jobs_of(shot_list_id):
    return GenerationJob.objects.unscoped().filter(shot_job__shot_list_id=shot_list_id)


def all_finished(shot_list_id, count):
    jobs = jobs_of(shot_list_id)
    return jobs.count() == count and all(job.is_terminal for job in jobs)


def store_faces(shot_list_id, eileen, tom) -> set[int]:
    """Replace each output with a photo of its character, but one of the other person per character.
    Returns the outputs that should be outliers."""
    faces = {eileen.pk: variants(photos.astronaut()), tom.pk: variants(photos.tom_hanks())}
    swaps = {(eileen.pk, "pulid_flux", 2): photos.tom_hanks(), (tom.pk, "instantid_sdxl", 1): photos.astronaut()}
    outliers = set()
    for link in ShotJob.objects.unscoped().filter(shot_list_id=shot_list_id).select_related("shot"):
        key = (link.character_id, link.method, link.shot.index)
        pixels = swaps.get(key, faces[link.character_id][link.shot.index])
        for output in GeneratedImage.objects.unscoped().filter(job_id=link.job_id):
            Image.fromarray(pixels).save(output.file.path, "PNG")
            if key in swaps:
                outliers.add(output.pk)
    return outliers


def expected_row(character, method, shot_list_id, embedder_name) -> dict:
    """The report's numbers for one character × method, computed from the stored files."""
    embedder = get_embedder(embedder_name)
    identity = CharacterIdentity.objects.unscoped().get(character=character, embedder=embedder_name).embedding
    identity = np.asarray(identity)
    identity = identity / np.linalg.norm(identity)
    found = []  # (shot, output id, unit vector, similarity)
    seconds, costs = [], []
    for link in ShotJob.objects.unscoped().filter(shot_list_id=shot_list_id, character=character, method=method):
        outputs = list(GeneratedImage.objects.unscoped().filter(job_id=link.job_id))
        for output in outputs:
            (face,) = embedder.analyze(np.asarray(Image.open(output.file.path).convert("RGB")))
            vector = face.embedding / np.linalg.norm(face.embedding)
            found.append((link.shot.index, output.pk, vector, float(vector @ identity)))
        seconds.append(link.job.device_seconds / len(outputs))
        costs.append(float(job_cost(job_kind="generation", job_id=link.job_id, tenant_id=link.tenant_id)["total"]))
    similarities = [s for *_, s in found]
    pairs = [float(a[2] @ b[2]) for a, b in combinations(found, 2) if a[0] != b[0]]
    threshold = embedder.info.match_threshold
    return {
        "identity": {"mean": np.mean(similarities), "min": min(similarities), "p10": np.percentile(similarities, 10)},
        "consistency": {"mean": np.mean(pairs), "min": min(pairs), "pairs": len(pairs)},
        "same_person_share": sum(s >= threshold for s in similarities) / len(similarities),
        "outliers": sorted((shot, pk) for shot, pk, _, s in found if s < threshold),
        "seconds_per_image": {"p50": np.percentile(seconds, 50), "p90": np.percentile(seconds, 90)},
        "cost_per_image": sum(costs) / len(found),
    }


def close(a, b, tolerance=2e-4):
    return a is not None and abs(float(a) - float(b)) <= tolerance


def test_shot_list_through_real_workers_report_contact_sheet_and_reroll(api_a, cast, gpu_cluster):
    eileen, tom = cast
    body = {
        "name": "Rain sequence", "characters": [eileen.pk, tom.pk], "methods": METHODS,
        "shots": [{"prompt": p, "width": 64, "height": 64, "steps": 2}
                  for p in ("walking in the rain", "close-up under a streetlight", "running across a bridge")],
    }  # fmt: skip
    response = api_a.post("/api/v1/shotlists", body, format="json")
    assert response.status_code == 202, response.json()
    shot_list = response.json()["id"]
    assert jobs_of(shot_list).count() == 12
    wait_for(lambda: all_finished(shot_list, 12), timeout=300, what="the 12 jobs to finish")
    listed = api_a.get(f"/api/v1/shotlists/{shot_list}").json()
    assert listed["progress"]["status"] == "succeeded", "".join(gpu_cluster.log[-40:])
    assert listed["progress"]["progress"] == 1.0 and len(listed["jobs"]) == 12

    outliers = store_faces(shot_list, eileen, tom)
    report = api_a.get(f"/api/v1/shotlists/{shot_list}/report").json()
    embedder = jobs_of(shot_list).first().embedder  # the character identity's space the jobs were validated in
    assert report["embedder"] == embedder
    assert report["same_person_threshold"] == embedder_infos()[embedder].match_threshold
    assert [(r["character"]["id"], r["method"]) for r in report["rows"]] == [
        (c.pk, m) for c in (eileen, tom) for m in METHODS
    ]
    for row in report["rows"]:
        character = eileen if row["character"]["id"] == eileen.pk else tom
        want = expected_row(character, row["method"], shot_list, embedder)
        assert row["outputs"] == row["faces"] == 3 and row["errors"] == []
        for name in ("mean", "min", "p10"):
            assert close(row["identity"][name], want["identity"][name]), (row["identity"], want["identity"])
        assert close(row["consistency"]["mean"], want["consistency"]["mean"])
        assert close(row["consistency"]["min"], want["consistency"]["min"])
        assert row["consistency"]["pairs"] == want["consistency"]["pairs"] == 3
        assert close(row["same_person_share"], want["same_person_share"])
        assert sorted((o["shot"], o["output"]) for o in row["outliers"]) == want["outliers"]
        assert close(row["seconds_per_image"]["p50"], want["seconds_per_image"]["p50"], 1e-3)
        assert close(row["seconds_per_image"]["p90"], want["seconds_per_image"]["p90"], 1e-3)
        assert close(row["cost_per_image"], want["cost_per_image"], 1e-6)
    assert {o["output"] for row in report["rows"] for o in row["outliers"]} == outliers

    # the CSV says what the JSON says
    table = list(csv.DictReader(io.StringIO(api_a.get(f"/api/v1/shotlists/{shot_list}/report?format=csv")
                                            .content.decode())))  # fmt: skip
    assert len(table) == 4
    for line, row in zip(table, report["rows"], strict=True):
        assert (int(line["character_id"]), line["method"]) == (row["character"]["id"], row["method"])
        assert float(line["identity_mean"]) == row["identity"]["mean"]
        assert float(line["identity_p10"]) == row["identity"]["p10"]
        assert float(line["consistency_min"]) == row["consistency"]["min"]
        assert float(line["same_person_share"]) == row["same_person_share"]
        assert int(line["outliers"]) == len(row["outliers"])
        assert line["outlier_shots"] == ";".join(str(o["shot"]) for o in row["outliers"])
        assert float(line["seconds_per_image_p90"]) == row["seconds_per_image"]["p90"]
        assert line["cost_per_image"] == row["cost_per_image"]

    # the contact sheet: 4 rows (character × method) by 3 shots of one thumbnail each
    sheet = api_a.get(f"/api/v1/shotlists/{shot_list}/contact-sheet.png")
    assert sheet.status_code == 200 and sheet["Content-Type"] == "image/png"
    image = Image.open(io.BytesIO(sheet.content))
    assert image.format == "PNG"
    cs = contact_sheet
    assert image.size == (cs.LABEL_W + 3 * (cs.THUMB + cs.PAD) + cs.PAD,
                          cs.HEADER_H + 4 * (cs.THUMB + cs.SCORE_H + cs.PAD) + cs.PAD)  # fmt: skip

    # re-roll every outlier: the same shots on new seeds, added to the report
    before = {o.pk: o.seed for o in GeneratedImage.objects.unscoped().filter(pk__in=outliers)}
    rerolled = api_a.post(f"/api/v1/shotlists/{shot_list}/reroll", {}, format="json")
    assert rerolled.status_code == 202, rerolled.json()
    new = ShotJob.objects.unscoped().filter(shot_list_id=shot_list, reroll_of__isnull=False).select_related("job")
    assert {link.reroll_of_id for link in new} == outliers and new.count() == 2
    for link in new:
        assert link.job.seed != before[link.reroll_of_id] and link.job.num_images == 1
        assert link.shot_id == link.reroll_of.job.shot_job.shot_id and link.method == link.reroll_of.job.method
    wait_for(lambda: all_finished(shot_list, 14), timeout=300, what="the re-rolls to finish")
    after = api_a.get(f"/api/v1/shotlists/{shot_list}/report").json()
    grown = {(r["character"]["id"], r["method"]): r["outputs"] for r in after["rows"]}
    assert grown == {(eileen.pk, "pulid_flux"): 4, (eileen.pk, "instantid_sdxl"): 3,
                     (tom.pk, "pulid_flux"): 3, (tom.pk, "instantid_sdxl"): 4}  # fmt: skip
    cell = next(r for r in after["rows"] if r["character"]["id"] == eileen.pk and r["method"] == "pulid_flux")
    assert [job["reroll_of"] is not None for job in cell["shots"][2]["jobs"]] == [False, True]
    assert after["status"] == JobStatus.SUCCEEDED and after["jobs_total"] == 14
    wide = Image.open(io.BytesIO(api_a.get(f"/api/v1/shotlists/{shot_list}/contact-sheet.png").content))
    assert wide.size[0] == cs.LABEL_W + 3 * 2 * (cs.THUMB + cs.PAD) + cs.PAD  # two outputs in a cell now
