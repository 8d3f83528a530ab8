"""Input validation found in review: hostile JSON, malformed LoRA headers, odd photos, concurrent
LoRA selection, slugs and admin thumbnail sizes. Every refusal is a 4xx in our error format, never a 500."""

from __future__ import annotations

import io
import json
import struct
import threading

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image
from rest_framework.test import APIClient

from alkemy.errors import AlkemyError
from characters.models import Character, ReferenceImage
from characters.services import character_create, character_update, reference_add
from generation.jobs import generation_submit
from generation.lora import inspect_lora
from generation.model_registry import component_path
from generation.models import GenerationJob
from generation.references import reference_faces
from generation.tiny.lora import write_peft_lora
from tests import photos
from tests.conftest import stored_files
from training.models import LoraArtifact, StyleLora

DEEP = 3000


@pytest.fixture
def eileen(db, studio_a, media_root):
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=character, upload=photos.upload(photos.astronaut()))
    return character


def raw_json(api, path: str, text: str, method: str = "post"):
    """Send `text` as the request body verbatim (the test client's encoder cannot write what attackers can)."""
    return getattr(api, method)(path, data=text.encode(), content_type="application/json")


def generation_body(character, params_json: str) -> str:
    return f'{{"character": {character.pk}, "prompt": "x", "width": 64, "height": 64, "params": {params_json}}}'


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.content[:500]
    error = response.json()["error"]
    assert set(error) == {"code", "message", "details"}
    if code:
        assert error["code"] == code, error
    return error


# -- 7: generation params and hostile JSON ----------------------------------------------------------------


@pytest.mark.parametrize(
    "params_json",
    [
        '{"note": "\\ud800"}',  # a lone surrogate: no UTF-8 text, no PostgreSQL string
        '{"id_weight": 1e400}',  # parses to inf: jsonb has no infinity
        '{"id_weight": -1e400}',
        '{"id_weight": NaN}',
        "[" * DEEP + "]" * DEEP,
        '{"x": ' + "[" * DEEP + "]" * DEEP + "}",
        '{"x": ' + '{"a": ' * DEEP + "1" + "}" * DEEP + "}",
    ],
    ids=["surrogate", "inf", "-inf", "nan", "deep-array", "deep-in-object", "deep-objects"],
)
def test_hostile_generation_params_are_400_and_store_nothing(api_a, eileen, params_json):
    response = raw_json(api_a, "/api/v1/generations", generation_body(eileen, params_json))
    assert_error(response, 400)
    assert not GenerationJob.objects.unscoped().exists()


@pytest.mark.parametrize(
    ("path", "method"),
    [("/api/v1/characters", "post"), ("/api/v1/webhooks", "post"), ("/api/v1/tenant", "put")],
)
def test_deeply_nested_json_is_400_malformed_request_on_any_json_endpoint(api_a, path, method):
    for text in ("[" * 100_000 + "]" * 100_000, '{"name": ' + "[" * DEEP + "]" * DEEP + "}"):
        assert_error(raw_json(api_a, path, text, method), 400, "malformed_request")


def test_views_that_declare_their_own_parsers_refuse_deep_json_too(api_a, studio_a):
    kai = character_create(tenant=studio_a.tenant, name="Kai")
    body = '{"base_model": ' + "[" * DEEP + "]" * DEEP + "}"
    assert_error(raw_json(api_a, f"/api/v1/characters/{kai.pk}/loras", body), 400, "malformed_request")


def test_character_patch_is_400_for_deep_json_and_lone_surrogates(api_a, studio_a):
    character = character_create(tenant=studio_a.tenant, name="Kai")
    path = f"/api/v1/characters/{character.pk}"
    assert_error(raw_json(api_a, path, '{"name": ' + "[" * DEEP + "]" * DEEP + "}", "patch"), 400, "malformed_request")
    assert_error(raw_json(api_a, path, '{"name": "Kai \\udfff"}', "patch"), 400, "malformed_request")
    assert_error(raw_json(api_a, path, '{"name": "Kai", "x": 1e400}', "patch"), 400, "malformed_request")
    character.refresh_from_db()
    assert character.name == "Kai"
    # paired surrogate escapes are one ordinary character and stay welcome
    response = raw_json(api_a, path, '{"name": "Kai \\ud83d\\ude00"}', "patch")
    assert response.status_code == 200 and response.json()["name"] == "Kai \U0001f600"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"x": "\ud800"}, "surrogate"),
        ({"x": float("nan")}, "finite"),
        ({"x": [1.0, float("inf")]}, "finite"),
        ({"x": {"y": -float("inf")}}, "finite"),
        ({"\udc80": 1}, "surrogate"),
        ({"x": json.loads("[" * 20 + "]" * 20)}, "nested"),
        ({"x": "a" * 70_000}, "KiB"),
        ({"x": 10**400}, "large"),
    ],
)
def test_generation_submit_refuses_params_jsonb_cannot_hold(studio_a, eileen, params, message):
    with pytest.raises(AlkemyError, match=message) as caught:
        generation_submit(tenant=studio_a.tenant, character=eileen, prompt="x", width=64, height=64, params=params)
    assert (caught.value.status_code, caught.value.details["field"]) == (400, "params")


def test_ordinary_nested_params_are_accepted(studio_a, eileen):
    params = {"pose_keypoints": [[10.0, 20.0], [30.0, 20.0], [20.0, 30.0], [12.0, 40.0], [28.0, 40.0]], "id_weight": 1}
    job, created = generation_submit(
        tenant=studio_a.tenant, character=eileen, prompt="x", width=64, height=64, params=params
    )
    assert created and job.params == params


@pytest.fixture
def admin_generate(client, staff_of_a, eileen):
    client.force_login(staff_of_a)
    url = f"/admin/characters/character/{eileen.pk}/generate/"
    return lambda params: client.post(
        url, {"method": "pulid_flux", "prompt": "x", "width": 64, "height": 64, "num_images": 1, "params": params}
    )


@pytest.mark.parametrize(
    "params",
    [
        '{"x": NaN}',
        '{"x": Infinity}',
        '{"x": 1e400}',
        '{"x": "\\ud800"}',
        "[" * DEEP + "]" * DEEP,
        '{"x": 1' + "0" * 5000 + "}",
    ],
    ids=["nan", "infinity", "inf", "surrogate", "deep", "huge-int"],
)
def test_admin_render_form_shows_bad_params_instead_of_500(admin_generate, params):
    response = admin_generate(params)
    assert response.status_code == 200
    page = response.content.decode()
    assert "errorlist" in page or "(invalid_parameter)" in page
    assert not GenerationJob.objects.unscoped().exists()


# -- 8: malformed safetensors headers ---------------------------------------------------------------------


@pytest.fixture
def lora_models(settings, tiny_models_dir, media_root):
    settings.ALKEMY_MODELS_DIR = tiny_models_dir
    return tiny_models_dir


def safetensors(header: str | dict, data: bytes = b"") -> bytes:
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw + data


def entry(shape, dtype: str = "F32", offsets=(0, 0)) -> str:
    return f'{{"dtype": "{dtype}", "shape": {shape}, "data_offsets": [{offsets[0]}, {offsets[1]}]}}'


KOHYA = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
MALFORMED_HEADERS = {
    "deep-shape": safetensors('{"unet.a.lora_A.weight": ' + entry("[" * 100_000 + "]" * 100_000) + "}"),
    "deep-header": safetensors("[" * 100_000 + "]" * 100_000),
    "5000-digit-dim": safetensors('{"unet.a.lora_A.weight": ' + entry("[1" + "0" * 5000 + "]") + "}"),
    "5000-digit-offset": safetensors('{"unet.a.lora_A.weight": ' + entry("[1]", offsets=(0, "9" * 5000)) + "}"),
    "zero-times-1e20": safetensors({"unet.a.lora_A.weight": json.loads(entry(f"[0, {10**20}]"))}),
    "stride-overflow": safetensors({"unet.a.lora_A.weight": json.loads(entry(f"[0, {2**40}, {2**40}, {2**40}]"))}),
    "many-dims": safetensors({"unet.a.lora_A.weight": json.loads(entry(str([0] + [2**20] * 60)))}),
    "bool-shape": safetensors({"unet.a.lora_A.weight": json.loads(entry("[true, true]", offsets=(0, 4)))}, b"\0" * 4),
    "bool-offsets": safetensors('{"unet.a.lora_A.weight": ' + entry("[]", offsets=("false", "false")) + "}"),
    "float-dim": safetensors('{"unet.a.lora_A.weight": ' + entry("[1.0]", offsets=(0, 4)) + "}", b"\0" * 4),
    "kohya-alpha-absurd": safetensors(
        {
            f"{KOHYA}.lora_down.weight": json.loads(entry("[4, 32]", offsets=(0, 512))),
            f"{KOHYA}.lora_up.weight": json.loads(entry("[32, 4]", offsets=(512, 1024))),
            f"{KOHYA}.alpha": json.loads(entry(f"[0, {2**62}, {2**62}]", offsets=(1024, 1024))),
        },
        b"\0" * 1024,
    ),
    "kohya-alpha-many": safetensors(
        {
            f"{KOHYA}.lora_down.weight": json.loads(entry("[4, 32]", offsets=(0, 512))),
            f"{KOHYA}.lora_up.weight": json.loads(entry("[32, 4]", offsets=(512, 1024))),
            f"{KOHYA}.alpha": json.loads(entry("[64, 64]", offsets=(1024, 1024 + 4 * 4096))),
        },
        b"\0" * (1024 + 4 * 4096),
    ),
    "surrogate-name": safetensors('{"unet.a\\ud800.lora_A.weight": ' + entry("[0]") + "}"),
    "metadata-not-text": safetensors({"__metadata__": {"a": [1]}, "unet.a.lora_A.weight": json.loads(entry("[0]"))}),
    "metadata-deep": safetensors('{"__metadata__": {"a": ' + "[" * DEEP + "]" * DEEP + "}}"),
}


@pytest.mark.parametrize("name", list(MALFORMED_HEADERS))
def test_malformed_safetensors_headers_are_invalid_lora(tiny_models_dir, name):
    with pytest.raises(AlkemyError) as caught:
        inspect_lora(MALFORMED_HEADERS[name], "sdxl", tiny_models_dir)
    assert (caught.value.code, caught.value.status_code, caught.value.field) == ("invalid_lora", 422, "file")


@pytest.mark.parametrize("name", ["deep-shape", "5000-digit-dim", "zero-times-1e20", "stride-overflow", "bool-shape",
                                  "kohya-alpha-absurd", "surrogate-name"])  # fmt: skip
def test_malformed_lora_uploads_are_422_for_characters_and_styles(api_a, studio_a, lora_models, media_root, name):
    kai = character_create(tenant=studio_a.tenant, name="Kai")
    data = MALFORMED_HEADERS[name]
    character = api_a.post(
        f"/api/v1/characters/{kai.pk}/loras",
        {"file": SimpleUploadedFile("kai.safetensors", data), "base_model": "sdxl"},
        format="multipart",
    )
    style = api_a.post(
        "/api/v1/style-loras",
        {"file": SimpleUploadedFile("noir.safetensors", data), "name": "noir", "base_model": "sdxl"},
        format="multipart",
    )
    for response in (character, style):
        assert assert_error(response, 422, "invalid_lora")["details"]["field"] == "file"
    assert not LoraArtifact.objects.unscoped().exists() and not StyleLora.objects.unscoped().exists()
    assert stored_files(media_root) == []


def test_a_real_lora_still_passes_the_stricter_header_checks(tiny_models_dir, tmp_path):
    sdxl = component_path(tiny_models_dir, "sdxl")
    path = write_peft_lora(tmp_path / "a.safetensors", base_dir=sdxl, base_model="sdxl", rank=4, seed=1)
    assert inspect_lora(path.read_bytes(), "sdxl", tiny_models_dir).rank == 4


# -- 9: photos with extreme aspect ratios or broken EXIF --------------------------------------------------


@pytest.mark.parametrize("size", [(2100, 1), (5000, 1), (1, 3000), (20000, 40)])
def test_extreme_aspect_ratio_photos_are_422(api_a, studio_a, media_root, size):
    mara = character_create(tenant=studio_a.tenant, name="Mara")
    pixels = np.full((size[1], size[0], 3), 128, np.uint8)
    for response in (
        api_a.post(f"/api/v1/characters/{mara.pk}/references", {"image": photos.upload(pixels)}, format="multipart"),
        api_a.post("/api/v1/search/faces", {"image": photos.upload(pixels)}, format="multipart"),
    ):
        error = assert_error(response, 422)
        assert error["code"] in {"invalid_image", "face_too_small", "no_face"}, error
    assert not ReferenceImage.objects.unscoped().exists() and stored_files(media_root) == []


def exif_with_ascii_planar_configuration(orientation: int) -> bytes:
    """A little-endian TIFF IFD: Orientation (SHORT) and PlanarConfiguration (0x011C) stored as ASCII.

    Pillow reads it, but rewriting it (as `ImageOps.exif_transpose` does) packs "abc" as a SHORT: struct.error.
    """
    entries = [(0x0112, 3, 1, struct.pack("<HH", orientation, 0)), (0x011C, 2, 4, b"abc\0")]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        ifd += struct.pack("<HHI", tag, kind, count) + value
    return b"Exif\0\0" + b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)


def test_jpeg_with_orientation_and_malformed_exif_tag_is_oriented_and_accepted(api_a, client, staff_of_a, studio_a,
                                                                               media_root):  # fmt: skip
    mara = character_create(tenant=studio_a.tenant, name="Mara")
    rotated = Image.fromarray(photos.astronaut()[:400]).transpose(Image.Transpose.ROTATE_90)  # 400x512 -> 512x400
    buffer = io.BytesIO()
    rotated.save(buffer, "JPEG", exif=exif_with_ascii_planar_configuration(6), quality=95)
    data = buffer.getvalue()

    response = api_a.post(
        f"/api/v1/characters/{mara.pk}/references", {"image": photos.upload(data, "JPEG")}, format="multipart"
    )
    assert response.status_code == 201, response.json()
    assert (response.json()["width"], response.json()["height"]) == (512, 400)
    search = api_a.post("/api/v1/search/faces", {"image": photos.upload(data, "JPEG")}, format="multipart")
    assert search.status_code == 200 and search.json()["results"][0]["character"]["id"] == mara.pk

    client.force_login(staff_of_a)
    thumbnail = client.get(f"/admin/characters/character/references/{response.json()['id']}/thumbnail.jpg?size=128")
    assert thumbnail.status_code == 200
    assert Image.open(io.BytesIO(thumbnail.content)).size == (128, 100)
    # generations read the stored photo the same way
    assert [face.image.shape for face in reference_faces(character=mara)] == [(400, 512, 3)]


# -- 11: concurrent LoRA version selection ----------------------------------------------------------------


def test_concurrent_selects_serialise_and_leave_exactly_one_selected(transactional_db, studio_a):
    from django.db import connection

    kai = character_create(tenant=studio_a.tenant, name="Kai")
    versions = [
        LoraArtifact.objects.unscoped().create(
            tenant=studio_a.tenant,
            character=kai,
            version=v,
            base_model="sdxl",
            file=f"loras/{v}.safetensors",
            sha256=f"{v:064d}",
            file_size=1,
            lora_format="diffusers",
            source="uploaded",
            is_selected=v == 1,
        )
        for v in range(1, 13)
    ]
    threads_per_version = 3
    barrier = threading.Barrier(len(versions) * threads_per_version)
    statuses: list[int | str] = []

    def select(artifact):
        try:
            api = APIClient(raise_request_exception=False)  # a server error is a 500 here, as for a real client
            api.credentials(HTTP_AUTHORIZATION=f"Api-Key {studio_a.key}")
            barrier.wait()
            statuses.append(api.post(f"/api/v1/characters/{kai.pk}/loras/{artifact.pk}/select").status_code)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            statuses.append(repr(error))
        finally:
            connection.close()

    threads = [
        threading.Thread(target=select, args=(artifact,)) for artifact in versions for _ in range(threads_per_version)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert statuses == [200] * len(threads), statuses
    assert LoraArtifact.objects.unscoped().filter(character=kai, is_selected=True).count() == 1


# -- 16, 17: slugs ----------------------------------------------------------------------------------------


def test_patching_an_empty_slug_derives_one_from_the_name(api_a, studio_a):
    character = character_create(tenant=studio_a.tenant, name="Kai Moreno")
    character_create(tenant=studio_a.tenant, name="Lena", slug="lena")
    response = api_a.patch(f"/api/v1/characters/{character.pk}", {"slug": ""}, format="json")
    assert response.status_code == 200 and response.json()["slug"] == "kai-moreno"
    response = api_a.patch(f"/api/v1/characters/{character.pk}", {"slug": "", "name": "Lena"}, format="json")
    assert response.status_code == 200 and response.json()["slug"] == "lena-2"
    character.refresh_from_db()
    assert character.slug == "lena-2"
    assert character_update(character=character, slug="   ").slug == "lena-2"


def test_non_latin_names_get_distinct_slugs_with_one_query(studio_a, django_assert_max_num_queries):
    slugs = {character_create(tenant=studio_a.tenant, name="山田 太郎").slug for _ in range(150)}
    assert len(slugs) == 150 and all(slug.startswith("character-") for slug in slugs)
    # insert + savepoint + release, and at most one query to find a free slug
    with django_assert_max_num_queries(4):
        character_create(tenant=studio_a.tenant, name="山田 太郎")


def test_latin_name_collisions_are_counted_in_one_query(studio_a, django_assert_max_num_queries):
    first = [character_create(tenant=studio_a.tenant, name="Anna").slug for _ in range(30)]
    assert first == ["anna", *(f"anna-{n}" for n in range(2, 31))]
    character_create(tenant=studio_a.tenant, name="Anna Maria")  # "anna-maria" is not a collision of "anna"
    with django_assert_max_num_queries(4):
        assert character_create(tenant=studio_a.tenant, name="Anna").slug == "anna-31"
    assert Character.objects.unscoped().filter(tenant=studio_a.tenant, slug__startswith="anna").count() == 32


# -- 18: admin thumbnail size ------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "side"), [("abc", 256), ("", 256), ("1e3", 256), ("-5", 32), ("99999", 512)])
def test_admin_thumbnail_size_is_clamped_or_defaulted(client, staff_of_a, eileen, size, side):
    reference = ReferenceImage.objects.unscoped().get(character=eileen)
    client.force_login(staff_of_a)
    response = client.get(f"/admin/characters/character/references/{reference.pk}/thumbnail.jpg?size={size}")
    assert response.status_code == 200 and response["Content-Type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(response.content)).size) == side
