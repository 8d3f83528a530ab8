"""Shot lists over the API: fan-out into generation jobs, validation before anything is queued, tenancy,
idempotency, cancel. (Real workers, the report's numbers and re-rolls: tests/test_shotlists_workers.py.)"""

from decimal import Decimal

import pytest

from alkemy.jobs import JobStatus
from characters.services import character_create, reference_add
from generation.models import GenerationJob
from generation.tasks import run_generation_job
from shotlists import services
from shotlists.models import Shot, ShotJob, ShotList
from shotlists.tasks import measure_finished_outputs
from tests import photos
from usage.services import budget_set

pytestmark = pytest.mark.django_db


@pytest.fixture
def eileen(studio_a, settings, tiny_models_dir, media_root):
    settings.ALKEMY_MODELS_DIR = tiny_models_dir
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=character, upload=photos.upload(photos.astronaut()))
    return character


@pytest.fixture
def tom(studio_a, eileen):
    character = character_create(tenant=studio_a.tenant, name="Tom")
    reference_add(character=character, upload=photos.upload(photos.astronaut()[:, ::-1].copy()))
    return character


def shots(count=3, **overrides):
    return [{"prompt": f"shot {i}: walking in the rain", "width": 64, "height": 64, "steps": 2, **overrides}
            for i in range(count)]  # fmt: skip


def body(characters, **overrides):
    return {"name": "Rain sequence", "characters": [c.pk for c in characters],
            "methods": ["pulid_flux", "instantid_sdxl"], "shots": shots(), **overrides}  # fmt: skip


def nothing_stored():
    return not (ShotList.objects.unscoped().exists() or GenerationJob.objects.unscoped().exists()
                or Shot.objects.unscoped().exists())  # fmt: skip


def refused(response, status, code):
    assert response.status_code == status, response.json()
    assert response.json()["error"]["code"] == code, response.json()
    assert nothing_stored()
    return response.json()["error"]


def test_a_shot_list_fans_out_into_one_job_per_character_method_and_shot(api_a, eileen, tom):
    response = api_a.post("/api/v1/shotlists", body([eileen, tom]), format="json")
    assert response.status_code == 202, response.json()
    answer = response.json()
    assert answer["progress"]["status"] == "queued" and answer["progress"]["jobs_total"] == 12
    jobs = GenerationJob.objects.unscoped().filter(shot_job__shot_list_id=answer["id"])
    combos = {(j.character_id, j.method, j.shot_job.shot.index) for j in jobs}
    assert len(combos) == 12 and jobs.count() == 12
    # every character and method of a shot renders on the same seed; the shots differ
    seeds = {index: {j.seed for j in jobs if j.shot_job.shot.index == index} for index in range(3)}
    assert all(len(s) == 1 for s in seeds.values()) and len({s.pop() for s in seeds.values()}) == 3
    assert {(j.width, j.height, j.steps, j.num_images) for j in jobs} == {(64, 64, 2, 1)}
    assert [j["shot"] for j in answer["jobs"]] == sorted(j["shot"] for j in answer["jobs"])
    listed = api_a.get("/api/v1/shotlists").json()
    assert [s["id"] for s in listed["results"]] == [answer["id"]]


def test_methods_default_to_the_default_method_and_seeds_are_kept(api_a, eileen):
    payload = body([eileen], shots=shots(2, seed=77))
    del payload["methods"]
    answer = api_a.post("/api/v1/shotlists", payload, format="json").json()
    assert answer["methods"] == ["pulid_flux"]
    assert {j["seed"] for j in answer["jobs"]} == {77}


def test_empty_shots_are_refused(api_a, eileen):
    error = refused(api_a.post("/api/v1/shotlists", body([eileen], shots=[]), format="json"), 400, "no_shots")
    assert error["details"]["field"] == "shots"


def test_too_many_shots_are_refused(api_a, eileen, settings):
    settings.ALKEMY_SHOTLIST_MAX_SHOTS = 2
    error = refused(api_a.post("/api/v1/shotlists", body([eileen]), format="json"), 400, "too_many_shots")
    assert error["details"]["limit"] == 2 and error["details"]["count"] == 3


def test_another_tenants_character_is_404(api_a, api_b, eileen, studio_b):
    theirs = character_create(tenant=studio_b.tenant, name="Theirs")
    refused(api_a.post("/api/v1/shotlists", body([eileen, theirs]), format="json"), 404, "character_not_found")
    refused(api_b.post("/api/v1/shotlists", body([eileen]), format="json"), 404, "character_not_found")


def test_unknown_method_is_refused(api_a, eileen):
    error = refused(api_a.post("/api/v1/shotlists", body([eileen], methods=["pulid_flux", "dalle"]), format="json"),
                    400, "unknown_method")  # fmt: skip
    assert error["details"] == {"field": "methods", "method": "dalle"}


def test_one_bad_shot_refuses_the_whole_list_with_its_index(api_a, eileen, tom):
    bad = shots()
    bad[2]["width"] = 65
    error = refused(api_a.post("/api/v1/shotlists", body([eileen, tom], shots=bad), format="json"),
                    400, "invalid_parameter")  # fmt: skip
    assert error["details"]["shot"] == 2 and error["details"]["field"] == "shots[2].width"
    assert error["details"]["character"] == eileen.pk and error["details"]["method"] == "pulid_flux"


def test_a_method_the_character_cannot_use_refuses_the_list(api_a, eileen):
    error = refused(api_a.post("/api/v1/shotlists", body([eileen], methods=["pulid_flux", "lora"]), format="json"),
                    422, "no_lora")  # fmt: skip
    assert error["details"]["shot"] == 0 and error["details"]["method"] == "lora"


def test_job_limits_apply_to_the_whole_list(api_a, studio_a, eileen, tom):
    budget_set(tenant=studio_a.tenant, max_concurrent_jobs=5)
    response = api_a.post("/api/v1/shotlists", body([eileen, tom]), format="json")
    error = refused(response, 429, "too_many_jobs")
    assert response["Retry-After"] and error["details"]["shot"] == 1  # the 6th job: shot 1
    budget_set(tenant=studio_a.tenant, max_concurrent_jobs=12)
    assert api_a.post("/api/v1/shotlists", body([eileen, tom]), format="json").status_code == 202


def test_idempotency_returns_the_same_list_and_refuses_another_body(api_a, eileen):
    first = api_a.post("/api/v1/shotlists", body([eileen], idempotency="take-1"), format="json")
    again = api_a.post("/api/v1/shotlists", body([eileen], idempotency="take-1"), format="json")
    assert first.status_code == again.status_code == 202 and first.json()["id"] == again.json()["id"]
    assert GenerationJob.objects.unscoped().count() == 6
    other = api_a.post("/api/v1/shotlists", body([eileen], idempotency="take-1", name="Other"), format="json")
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"


def test_another_tenant_gets_404_for_everything_of_a_shot_list(api_a, api_b, eileen):
    shot_list = api_a.post("/api/v1/shotlists", body([eileen]), format="json").json()["id"]
    for path in ("", "/report", "/report?format=csv", "/contact-sheet.png"):
        response = api_b.get(f"/api/v1/shotlists/{shot_list}{path}")
        assert response.status_code == 404 and response.json()["error"]["code"] == "shot_list_not_found"
    for path in ("/cancel", "/reroll"):
        assert api_b.post(f"/api/v1/shotlists/{shot_list}{path}", {}, format="json").status_code == 404
    assert api_b.get("/api/v1/shotlists").json()["results"] == []
    assert GenerationJob.objects.unscoped().filter(status=JobStatus.QUEUED).count() == 6


def test_cancel_stops_what_has_not_finished_and_the_report_shows_it(api_a, eileen):
    answer = api_a.post("/api/v1/shotlists", body([eileen], methods=["pulid_flux"]), format="json").json()
    first = ShotJob.objects.unscoped().get(shot_list_id=answer["id"], shot__index=0).job_id
    assert run_generation_job(first) == JobStatus.SUCCEEDED  # shot 0 rendered in-process

    canceled = api_a.post(f"/api/v1/shotlists/{answer['id']}/cancel").json()
    assert canceled["progress"]["jobs_by_status"] == {**dict.fromkeys(JobStatus.values, 0), "succeeded": 1,
                                                      "canceled": 2}  # fmt: skip
    assert canceled["progress"]["status"] == "partial"

    assert measure_finished_outputs() == 1  # the schedule embeds the new output; the report reads the cache
    assert measure_finished_outputs() == 0
    report = api_a.get(f"/api/v1/shotlists/{answer['id']}/report").json()
    (row,) = report["rows"]
    assert row["outputs"] == 1 and [e["shot"] for e in row["errors"]] == [1, 2]
    assert {e["code"] for e in row["errors"]} == {"canceled"}
    assert [cell["status"] for cell in row["shots"]] == ["succeeded", "canceled", "canceled"]
    # tiny random networks draw no face: the output is an outlier, said so, not a number
    assert row["identity"] == {"mean": None, "min": None, "p10": None}
    assert row["outliers"] == [{"output": row["shots"][0]["jobs"][0]["outputs"][0]["id"], "job": first, "shot": 0,
                                "seed": row["shots"][0]["jobs"][0]["seed"], "identity_similarity": None,
                                "reason": "no_face"}]  # fmt: skip
    sheet = api_a.get(f"/api/v1/shotlists/{answer['id']}/contact-sheet.png")
    assert sheet.status_code == 200 and sheet["Content-Type"] == "image/png"


def test_report_format_must_be_json_or_csv(api_a, eileen):
    shot_list = api_a.post("/api/v1/shotlists", body([eileen]), format="json").json()["id"]
    response = api_a.get(f"/api/v1/shotlists/{shot_list}/report?format=xml")
    assert response.status_code == 400 and response.json()["error"]["details"]["field"] == "format"


def test_reroll_of_an_output_of_another_list_is_404(api_a, eileen):
    shot_list = api_a.post("/api/v1/shotlists", body([eileen]), format="json").json()["id"]
    response = api_a.post(f"/api/v1/shotlists/{shot_list}/reroll", {"outputs": [123456]}, format="json")
    assert response.status_code == 404 and response.json()["error"]["code"] == "output_not_found"
    nothing = api_a.post(f"/api/v1/shotlists/{shot_list}/reroll", {}, format="json")
    assert nothing.status_code == 400 and nothing.json()["error"]["code"] == "nothing_to_reroll"


def test_staff_create_a_shot_list_from_the_character_page_one_prompt_per_line(client, staff_of_a, eileen, tom):
    client.force_login(staff_of_a)
    page = client.get(f"/admin/characters/character/{eileen.pk}/change/").content.decode()
    url = f"/admin/shotlists/shotlist/new/{eileen.pk}/"
    assert url in page
    response = client.post(url, {
        "name": "Chase", "prompts": "on a rooftop\n\nin a car at night\n", "other_characters": [tom.pk],
        "methods": ["pulid_flux", "instantid_sdxl"], "negative_prompt": "", "width": 64, "height": 64, "steps": 2,
        "images_per_shot": 1,
    })  # fmt: skip
    shot_list = ShotList.objects.unscoped().get(name="Chase")
    assert response.status_code == 302 and response["Location"].endswith(f"/shotlist/{shot_list.pk}/change/")
    prompts = [s.prompt for s in Shot.objects.unscoped().filter(shot_list=shot_list)]
    assert prompts == ["on a rooftop", "in a car at night"]
    assert ShotJob.objects.unscoped().filter(shot_list=shot_list).count() == 8

    listing = client.get("/admin/shotlists/shotlist/").content.decode()
    assert "Chase" in listing and "0% (8 queued)" in listing
    change = client.get(f"/admin/shotlists/shotlist/{shot_list.pk}/change/").content.decode()
    assert f"/admin/shotlists/shotlist/{shot_list.pk}/contact-sheet.png" in change and "Consistency report" in change
    assert client.get(f"/admin/shotlists/shotlist/{shot_list.pk}/contact-sheet.png")["Content-Type"] == "image/png"
    assert client.get(f"/admin/shotlists/shotlist/{shot_list.pk}/report.csv").content.decode().startswith(
        "character_id,"
    )
    response = client.post("/admin/shotlists/shotlist/", {"action": "cancel", "_selected_action": [shot_list.pk]})
    assert response.status_code == 302
    assert set(GenerationJob.objects.unscoped().values_list("status", flat=True)) == {JobStatus.CANCELED}


def test_admin_refuses_a_bad_list_with_the_message_and_queues_nothing(client, staff_of_a, eileen):
    client.force_login(staff_of_a)
    response = client.post(f"/admin/shotlists/shotlist/new/{eileen.pk}/", {
        "name": "Bad", "prompts": "fine\nfine too", "methods": ["pulid_flux"], "width": 65, "height": 64,
        "images_per_shot": 1,
    })  # fmt: skip
    assert response.status_code == 200 and "invalid_parameter" in response.content.decode()
    assert nothing_stored()


def test_staff_of_another_tenant_cannot_see_or_create(client, staff_of_a, studio_b):
    outsider = character_create(tenant=studio_b.tenant, name="Outsider")
    reference_add(character=outsider, upload=photos.upload(photos.tom_hanks()))
    client.force_login(staff_of_a)
    assert client.get(f"/admin/shotlists/shotlist/new/{outsider.pk}/").status_code == 404
    theirs, _ = services.shotlist_submit(
        tenant=studio_b.tenant, name="Theirs", characters=[outsider], methods=["gemini"],
        shots=[services.ShotSpec(prompt="x", width=64, height=64)],
    )  # fmt: skip
    assert client.get(f"/admin/shotlists/shotlist/{theirs.pk}/contact-sheet.png").status_code == 404
    assert client.get(f"/admin/shotlists/shotlist/{theirs.pk}/change/").status_code in (302, 404)


def test_viewers_read_shot_lists_but_cannot_submit_cancel_or_reroll(api_a, studio_a, eileen):
    from alkemy.tenancy.models import Role
    from alkemy.tenancy.services import api_key_create

    shot_list = api_a.post("/api/v1/shotlists", body([eileen]), format="json").json()["id"]
    _, key = api_key_create(tenant=studio_a.tenant, name="viewer", role=Role.VIEWER)
    viewer = studio_a.client(key)
    assert viewer.get(f"/api/v1/shotlists/{shot_list}/report").status_code == 200
    for path in ("", f"/{shot_list}/cancel", f"/{shot_list}/reroll"):
        response = viewer.post(f"/api/v1/shotlists{path}", body([eileen]), format="json")
        assert response.status_code == 403 and response.json()["error"]["code"] == "read_only_role"
    assert GenerationJob.objects.unscoped().filter(status=JobStatus.QUEUED).count() == 6


def test_contact_sheet_stays_within_its_bounds():
    from alkemy.errors import AlkemyError
    from shotlists.contact_sheet import MAX_SIDE, THUMB, fit_thumb, sheet_size

    assert fit_thumb(rows=4, shots=3, per_cell=1) == THUMB
    thumb = fit_thumb(rows=8, shots=100, per_cell=1)
    assert thumb < THUMB and max(sheet_size(rows=8, shots=100, per_cell=1, thumb=thumb)) <= MAX_SIDE
    with pytest.raises(AlkemyError) as refused_sheet:
        fit_thumb(rows=8, shots=100, per_cell=4)
    assert refused_sheet.value.code == "contact_sheet_too_large"


def test_dry_run_estimates_the_whole_list_and_queues_nothing(api_a, studio_a, eileen, tom):
    answer = api_a.post("/api/v1/shotlists?dry_run=true", body([eileen, tom]), format="json")
    assert answer.status_code == 200, answer.json()
    quote = answer.json()
    assert quote["dry_run"] is True and quote["jobs"] == 12 and quote["allowed"] is True
    per_method = quote["estimate"]["per_method"]
    assert {m: line["jobs"] for m, line in per_method.items()} == {"pulid_flux": 6, "instantid_sdxl": 6}
    assert Decimal(quote["estimate"]["cost"]) == sum(Decimal(line["cost"]) for line in per_method.values()) > 0
    # the same verdict a single generation's dry run gives, summed over the list's jobs
    single = api_a.post("/api/v1/generations?dry_run=true", {"character": eileen.pk, "method": "pulid_flux",
                        "prompt": "x", "width": 64, "height": 64, "steps": 2}, format="json").json()  # fmt: skip
    assert Decimal(per_method["pulid_flux"]["cost_per_image"]) == Decimal(single["estimate"]["cost"])
    assert nothing_stored()

    budget_set(tenant=studio_a.tenant, max_concurrent_jobs=5)
    refused_quote = api_a.post("/api/v1/shotlists?dry_run=true", body([eileen, tom]), format="json").json()
    assert refused_quote["allowed"] is False and refused_quote["refusal"]["code"] == "too_many_jobs"
    bad = api_a.post("/api/v1/shotlists?dry_run=true", body([eileen], shots=[]), format="json")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "no_shots"
    assert nothing_stored()
