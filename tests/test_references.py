"""Reference photos: real validation, real face detection and embedding, identities, duplicates."""

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from characters.models import CharacterIdentity, FaceEmbedding, ReferenceImage
from characters.services import character_create
from tests import photos
from tests.conftest import stored_files

pytestmark = pytest.mark.django_db


@pytest.fixture
def mara(studio_a):
    return character_create(tenant=studio_a.tenant, name="Mara")


def post_reference(client, character, upload):
    return client.post(f"/api/v1/characters/{character.pk}/references", {"image": upload}, format="multipart")


def counts():
    return (
        ReferenceImage.objects.unscoped().count(),
        FaceEmbedding.objects.unscoped().count(),
        CharacterIdentity.objects.unscoped().count(),
    )


def test_reference_upload_detects_embeds_and_stores(api_a, mara, media_root):
    data = photos.encode(photos.astronaut(), "JPEG", quality=92)
    response = post_reference(api_a, mara, photos.upload(data, "JPEG"))
    assert response.status_code == 201, response.json()
    body = response.json()
    x1, y1, x2, y2 = body["face_box"]
    assert 150 < x1 < x2 < 320 and 50 < y1 < y2 < 220  # the astronaut's face, top centre of the photo
    assert len(body["landmarks"]) == 5
    assert body["embedder"] == "dlib"
    assert body["det_score"] > 0.5
    assert body["quality"]["face_px"] >= 80 and body["quality"]["sharpness"] > 100
    assert body["warnings"] == []
    assert body["similar_characters"] == []
    assert (body["width"], body["height"], body["image_format"]) == (512, 512, "JPEG")

    reference = ReferenceImage.objects.unscoped().get(pk=body["id"])
    embedding = FaceEmbedding.objects.unscoped().get(reference=reference)
    assert embedding.dims == 128 and abs(np.linalg.norm(embedding.embedding) - 1) < 1e-4
    identity = CharacterIdentity.objects.unscoped().get(character=mara, embedder="dlib")
    assert identity.reference_count == 1
    assert np.allclose(identity.embedding, embedding.embedding, atol=1e-5)
    assert len(stored_files(media_root)) == 1

    download = api_a.get(body["image_url"])
    assert download.status_code == 200 and download["Content-Type"] == "image/jpeg"
    assert b"".join(download.streaming_content) == data
    listed = api_a.get(f"/api/v1/characters/{mara.pk}/references").json()
    assert [r["id"] for r in listed] == [body["id"]]
    assert api_a.get(f"/api/v1/characters/{mara.pk}").json()["reference_count"] == 1


def truncated_jpeg():
    data = photos.encode(photos.astronaut(), "JPEG")
    return data[: len(data) // 2]


def gif_bytes():
    buffer = io.BytesIO()
    Image.fromarray(photos.astronaut()).save(buffer, "GIF")
    return buffer.getvalue()


def no_face_photo():
    gradient = np.tile(np.linspace(0, 255, 400, dtype=np.uint8), (300, 1))
    return photos.encode(np.stack([gradient] * 3, axis=-1))


def tiny_face_photo():
    small = Image.fromarray(photos.astronaut()).resize((220, 220), Image.LANCZOS)
    return photos.encode(np.asarray(small))


@pytest.mark.parametrize(
    ("make_bytes", "status", "code"),
    [
        (lambda: b"this is not an image at all", 422, "invalid_image"),
        (lambda: b"", 422, "invalid_image"),
        (truncated_jpeg, 422, "invalid_image"),
        (gif_bytes, 422, "unsupported_image_format"),
        (no_face_photo, 422, "no_face"),
        (lambda: photos.encode(photos.group_photo()), 422, "multiple_faces"),
        (tiny_face_photo, 422, "face_too_small"),
    ],
    ids=["garbage", "empty", "truncated", "gif", "no-face", "six-faces", "tiny-face"],
)
def test_bad_photo_is_refused_and_leaves_nothing(api_a, mara, media_root, make_bytes, status, code):
    before = counts()
    response = post_reference(api_a, mara, photos.upload(make_bytes(), name="innocent.jpg"))
    assert response.status_code == status, response.json()
    error = response.json()["error"]
    assert error["code"] == code
    assert error["details"]["field"] == "image"
    assert counts() == before
    assert stored_files(media_root) == []


def test_file_over_byte_limit_is_refused(api_a, mara, media_root, settings):
    settings.ALKEMY_MAX_UPLOAD_BYTES = 50_000
    response = post_reference(api_a, mara, photos.upload(photos.astronaut()))  # ~500 kB PNG
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "image_too_large"
    assert counts() == (0, 0, 0) and stored_files(media_root) == []


def test_decompression_bomb_is_refused_before_decoding(api_a, mara, media_root, settings):
    settings.ALKEMY_MAX_IMAGE_PIXELS = 100_000
    bomb = photos.encode(np.zeros((2000, 2000, 3), np.uint8))  # compresses to a few kB
    assert len(bomb) < 50_000
    response = post_reference(api_a, mara, photos.upload(bomb))
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "image_too_large"
    assert response.json()["error"]["details"]["max_pixels"] == 100_000
    assert counts() == (0, 0, 0) and stored_files(media_root) == []


def test_missing_image_field_is_a_validation_error(api_a, mara):
    response = api_a.post(f"/api/v1/characters/{mara.pk}/references", {}, format="multipart")
    assert response.status_code == 400
    assert response.json()["error"]["details"]["field"] == "image"


def test_same_file_twice_is_duplicate_reference(api_a, mara, media_root):
    data = photos.encode(photos.astronaut())
    assert post_reference(api_a, mara, photos.upload(data)).status_code == 201
    before = counts()
    response = post_reference(api_a, mara, photos.upload(data, name="again.png"))
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "duplicate_reference"
    assert counts() == before and len(stored_files(media_root)) == 1


def test_reference_limit(api_a, mara, media_root, settings):
    settings.ALKEMY_MAX_REFERENCES = 2
    astronaut = photos.astronaut()
    assert post_reference(api_a, mara, photos.upload(astronaut)).status_code == 201
    assert post_reference(api_a, mara, photos.upload(astronaut[:, ::-1].copy())).status_code == 201
    response = post_reference(api_a, mara, photos.upload(astronaut, "JPEG"))
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "too_many_references"
    assert len(stored_files(media_root)) == 2


def test_exif_orientation_is_applied(api_a, mara, media_root):
    rotated = Image.fromarray(photos.astronaut()[:400]).transpose(Image.Transpose.ROTATE_90)  # 400 wide -> 512x400
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": undoes the rotation above
    buffer = io.BytesIO()
    rotated.save(buffer, "JPEG", exif=exif, quality=95)
    response = post_reference(api_a, mara, photos.upload(buffer.getvalue(), "JPEG"))
    assert response.status_code == 201, response.json()
    assert (response.json()["width"], response.json()["height"]) == (512, 400)


def test_blurry_photo_is_accepted_with_a_warning(api_a, mara, media_root):
    blurred = Image.fromarray(photos.astronaut()).filter(ImageFilter.GaussianBlur(2.5))
    response = post_reference(api_a, mara, photos.upload(np.asarray(blurred)))
    assert response.status_code == 201, response.json()
    assert "blurry" in response.json()["warnings"]


def test_dominant_face_is_accepted_and_others_reported(api_a, mara, media_root):
    base = Image.fromarray(photos.astronaut()).resize((1000, 1000))  # her face: ~170 px
    base.paste(Image.fromarray(photos.tom_hanks()), (860, 860))  # his: ~87 px, a quarter of the area
    response = post_reference(api_a, mara, photos.upload(np.asarray(base)))
    assert response.status_code == 201, response.json()
    assert len(response.json()["other_faces"]) == 1


def test_identity_follows_added_and_removed_references(api_a, mara, media_root, django_capture_on_commit_callbacks):
    astronaut = photos.astronaut()
    first = post_reference(api_a, mara, photos.upload(astronaut)).json()
    second = post_reference(api_a, mara, photos.upload(np.asarray(Image.fromarray(astronaut).resize((700, 700)))))
    assert second.status_code == 201
    vectors = FaceEmbedding.objects.unscoped().filter(character=mara).values_list("embedding", flat=True)
    mean = np.mean([np.asarray(v) for v in vectors], axis=0)
    identity = CharacterIdentity.objects.unscoped().get(character=mara)
    assert identity.reference_count == 2
    assert np.allclose(identity.embedding, mean / np.linalg.norm(mean), atol=1e-5)

    with django_capture_on_commit_callbacks(execute=True):
        assert api_a.delete(f"/api/v1/characters/{mara.pk}/references/{first['id']}").status_code == 204
    identity.refresh_from_db()
    assert identity.reference_count == 1
    assert len(stored_files(media_root)) == 1

    with django_capture_on_commit_callbacks(execute=True):
        api_a.delete(f"/api/v1/characters/{mara.pk}/references/{second.json()['id']}")
    assert not CharacterIdentity.objects.unscoped().filter(character=mara).exists()
    assert stored_files(media_root) == []


def test_other_tenant_cannot_touch_references(api_a, api_b, mara, media_root):
    reference = post_reference(api_a, mara, photos.upload(photos.astronaut())).json()
    base = f"/api/v1/characters/{mara.pk}/references"
    assert api_b.get(base).status_code == 404
    assert api_b.get(f"{base}/{reference['id']}/image").status_code == 404
    assert api_b.delete(f"{base}/{reference['id']}").status_code == 404
    assert post_reference(api_b, mara, photos.upload(photos.tom_hanks())).status_code == 404
    assert ReferenceImage.objects.unscoped().count() == 1


def test_possible_duplicate_is_reported_not_refused(api_a, studio_a, mara, media_root):
    assert post_reference(api_a, mara, photos.upload(photos.astronaut())).status_code == 201
    copy = character_create(tenant=studio_a.tenant, name="Astronaut again")
    response = post_reference(api_a, copy, photos.upload(photos.astronaut()[:, ::-1].copy()))
    assert response.status_code == 201
    similar = response.json()["similar_characters"]
    assert [s["character"]["id"] for s in similar] == [mara.pk]
    assert similar[0]["similarity"] > 0.94 and similar[0]["is_match"] is True


def test_six_people_of_the_group_photo_are_six_identities(api_a, studio_a, media_root):
    for index, crop in enumerate(photos.group_crops()):
        character = character_create(tenant=studio_a.tenant, name=f"Group {index}")
        response = post_reference(api_a, character, photos.upload(crop))
        assert response.status_code == 201, response.json()
        assert response.json()["similar_characters"] == [], f"person {index} flagged as a duplicate"
    assert CharacterIdentity.objects.unscoped().filter(tenant=studio_a.tenant).count() == 6
