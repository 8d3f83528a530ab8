"""Studio staff do their job in admin: references with face boxes, thumbnails, find by photo."""

import io

import pytest
from PIL import Image

from characters.models import CharacterIdentity, ReferenceImage
from characters.services import character_create, reference_add
from tests import photos
from tests.conftest import stored_files

pytestmark = pytest.mark.django_db


@pytest.fixture
def astronaut_character(studio_a, media_root):
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=character, upload=photos.upload(photos.astronaut()))
    return character


def test_staff_adds_reference_photos_in_the_character_form(client, staff_of_a, studio_a, media_root):
    client.force_login(staff_of_a)
    response = client.post(
        "/admin/characters/character/add/",
        {
            "tenant": studio_a.tenant.pk,
            "name": "Tom",
            "slug": "tom",
            "tags": "lead",
            "description": "",
            "new_references": [photos.upload(photos.tom_hanks()), photos.upload(b"not an image", name="bad.jpg")],
            "references-TOTAL_FORMS": "0",
            "references-INITIAL_FORMS": "0",
        },
        follow=True,
    )
    assert response.status_code == 200
    messages = [str(m) for m in response.context["messages"]]
    assert any("reference added" in m for m in messages), messages
    assert any("bad.jpg: not added" in m and "invalid_image" in m for m in messages), messages
    reference = ReferenceImage.objects.unscoped().get(character__slug="tom")
    assert CharacterIdentity.objects.unscoped().filter(character=reference.character).exists()
    assert len(stored_files(media_root)) == 1


def test_change_page_shows_references_with_face_box_thumbnails(client, staff_of_a, astronaut_character):
    client.force_login(staff_of_a)
    page = client.get(f"/admin/characters/character/{astronaut_character.pk}/change/").content.decode()
    reference = ReferenceImage.objects.unscoped().get(character=astronaut_character)
    assert f"/admin/characters/character/references/{reference.pk}/thumbnail.jpg" in page
    assert "sharpness" in page

    thumbnail = client.get(f"/admin/characters/character/references/{reference.pk}/thumbnail.jpg?size=128")
    assert thumbnail["Content-Type"] == "image/jpeg"
    image = Image.open(io.BytesIO(thumbnail.content))
    assert max(image.size) == 128
    assert (
        image.getpixel((int(reference.face_box[0] / 4), int((reference.face_box[1] + reference.face_box[3]) / 8)))[1]
        > 150
    )  # the green box edge on the left side of the face


def test_changelist_shows_face_and_reference_count(client, staff_of_a, astronaut_character):
    client.force_login(staff_of_a)
    page = client.get("/admin/characters/character/").content.decode()
    assert "thumbnail.jpg?size=96&amp;face=1" in page
    assert "Find character by photo" in page


def test_other_tenants_thumbnail_is_404(client, studio_b, astronaut_character, media_root):
    from django.contrib.auth import get_user_model

    from alkemy.tenancy.services import membership_set

    outsider = get_user_model().objects.create_user("bob", password="pw-bob-12345", is_staff=True)
    membership_set(tenant=studio_b.tenant, user=outsider)
    client.force_login(outsider)
    reference = ReferenceImage.objects.unscoped().get(character=astronaut_character)
    assert client.get(f"/admin/characters/character/references/{reference.pk}/thumbnail.jpg").status_code == 404


def test_deleting_a_reference_inline_recomputes_identity(
    client, staff_of_a, astronaut_character, media_root, django_capture_on_commit_callbacks
):
    client.force_login(staff_of_a)
    reference = ReferenceImage.objects.unscoped().get(character=astronaut_character)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            f"/admin/characters/character/{astronaut_character.pk}/change/",
            {
                "tenant": astronaut_character.tenant_id,
                "name": "Eileen",
                "slug": astronaut_character.slug,
                "tags": "",
                "description": "",
                "references-TOTAL_FORMS": "1",
                "references-INITIAL_FORMS": "1",
                "references-0-id": reference.pk,
                "references-0-character": astronaut_character.pk,
                "references-0-DELETE": "on",
            },
        )
    assert response.status_code == 302
    assert not ReferenceImage.objects.unscoped().filter(pk=reference.pk).exists()
    assert not CharacterIdentity.objects.unscoped().filter(character=astronaut_character).exists()
    assert stored_files(media_root) == []


def test_find_character_by_photo(client, staff_of_a, studio_a, astronaut_character):
    other = character_create(tenant=studio_a.tenant, name="Tom")
    reference_add(character=other, upload=photos.upload(photos.tom_hanks()))
    client.force_login(staff_of_a)
    assert client.get("/admin/characters/character/find-by-photo/").status_code == 200
    response = client.post(
        "/admin/characters/character/find-by-photo/",
        {"tenant": studio_a.tenant.pk, "limit": 5, "image": photos.upload(photos.astronaut()[:, ::-1].copy())},
    )
    assert response.status_code == 200
    results = response.context["result"].results
    assert [r.character.name for r in results] == ["Eileen", "Tom"]
    assert results[0].is_match and not results[1].is_match
    assert "thumbnail.jpg?face=1" in response.content.decode()


def test_staff_submit_a_generation_from_the_character_page(client, staff_of_a, astronaut_character, settings):
    from generation.models import GenerationJob

    client.force_login(staff_of_a)
    page = client.get(f"/admin/characters/character/{astronaut_character.pk}/change/").content.decode()
    assert f"/admin/characters/character/{astronaut_character.pk}/generate/" in page
    url = f"/admin/characters/character/{astronaut_character.pk}/generate/"
    assert client.get(url).status_code == 200
    bad = client.post(url, {"method": "pulid_flux", "prompt": "x", "width": 100, "height": 64, "num_images": 1,
                            "params": "{}"})  # fmt: skip
    assert bad.status_code == 200 and "multiple of 16" in bad.content.decode()
    response = client.post(url, {"method": "pulid_flux", "prompt": "in a forest", "width": 64, "height": 64,
                                 "steps": 2, "num_images": 1, "params": '{"id_weight": 0.8}'})  # fmt: skip
    job = GenerationJob.objects.unscoped().get()
    assert response.status_code == 302 and response["Location"].endswith(
        f"/admin/generation/generationjob/{job.pk}/change/"
    )
    assert job.requested_by == staff_of_a and job.params == {"id_weight": 0.8}
    assert client.get(response["Location"]).status_code == 200


def test_tenant_owner_sets_the_gemini_key_in_admin(client, studio_a):
    from django.contrib.auth import get_user_model

    from alkemy.tenancy.models import Tenant
    from alkemy.tenancy.services import membership_set, tenant_gemini_key

    owner = get_user_model().objects.create_user("olga", password="pw-olga-12345", is_staff=True)
    membership_set(tenant=studio_a.tenant, user=owner, role="owner")
    client.force_login(owner)
    key = "AIzaSyADMIN-0123456789abcdefghijklmnop"
    response = client.post(f"/admin/tenancy/tenant/{studio_a.tenant.pk}/change/",
                           {"name": "Studio A", "gemini_api_key": key})  # fmt: skip
    assert response.status_code == 302
    assert tenant_gemini_key(Tenant.objects.get(pk=studio_a.tenant.pk)) == key
    page = client.get(f"/admin/tenancy/tenant/{studio_a.tenant.pk}/change/").content.decode()
    assert key not in page and "AIza…mnop" in page
