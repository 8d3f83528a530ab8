"""Admin: staff see only their tenants' objects; superusers see everything."""

import pytest
from django.contrib.auth import get_user_model

from alkemy.tenancy.models import ApiKey
from characters.models import Character
from characters.services import character_create

pytestmark = pytest.mark.django_db

EMPTY_CHARACTER_FORM = {"tags": "", "description": "", "references-TOTAL_FORMS": "0", "references-INITIAL_FORMS": "0"}


@pytest.fixture
def characters(studio_a, studio_b):
    return (
        character_create(tenant=studio_a.tenant, name="Alpha Hero"),
        character_create(tenant=studio_b.tenant, name="Beta Villain"),
    )


def test_staff_changelist_shows_only_own_tenant(client, staff_of_a, characters):
    client.force_login(staff_of_a)
    page = client.get("/admin/characters/character/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "Alpha Hero" in html
    assert "Beta Villain" not in html

    keys_page = client.get("/admin/tenancy/apikey/").content.decode()
    assert "studio-a key" in keys_page
    assert "studio-b key" not in keys_page


def test_staff_cannot_open_other_tenants_change_page(client, staff_of_a, characters):
    client.force_login(staff_of_a)
    own, other = characters
    assert client.get(f"/admin/characters/character/{own.pk}/change/").status_code == 200
    response = client.get(f"/admin/characters/character/{other.pk}/change/")
    assert response.status_code == 302  # Django admin: "doesn't exist", back to the index
    other_key = ApiKey.objects.unscoped().get(tenant=other.tenant)
    assert client.get(f"/admin/tenancy/apikey/{other_key.pk}/change/").status_code == 302
    assert client.post(f"/admin/characters/character/{other.pk}/delete/", {"post": "yes"}).status_code == 302
    assert Character.objects.unscoped().filter(pk=other.pk).exists()


def test_staff_can_create_character_in_own_tenant_only(client, staff_of_a, characters, studio_a, studio_b):
    client.force_login(staff_of_a)
    response = client.post(
        "/admin/characters/character/add/",
        {"tenant": studio_b.tenant.pk, "name": "Sneaky", "slug": "sneaky", **EMPTY_CHARACTER_FORM},
    )
    assert response.status_code == 200  # form redisplayed with an error
    assert not Character.objects.unscoped().filter(slug="sneaky").exists()
    response = client.post(
        "/admin/characters/character/add/",
        {"tenant": studio_a.tenant.pk, "name": "Fine", "slug": "fine", **EMPTY_CHARACTER_FORM},
    )
    assert response.status_code == 302
    assert Character.objects.unscoped().get(slug="fine").tenant == studio_a.tenant


def test_superuser_sees_every_tenant(client, characters):
    admin = get_user_model().objects.create_superuser("root", "root@example.com", "pw-root-12345")
    client.force_login(admin)
    html = client.get("/admin/characters/character/").content.decode()
    assert "Alpha Hero" in html and "Beta Villain" in html


def test_api_key_created_in_admin_shows_secret_once(client, studio_a):
    admin = get_user_model().objects.create_superuser("root", "root@example.com", "pw-root-12345")
    client.force_login(admin)
    response = client.post(
        "/admin/tenancy/apikey/add/",
        {"tenant": studio_a.tenant.pk, "name": "render farm", "role": "member"},
        follow=True,
    )
    assert response.status_code == 200
    messages = [str(m) for m in response.context["messages"]]
    key_message = next(m for m in messages if "copy it now" in m)
    plaintext = key_message.rsplit(" ", 1)[-1]
    assert plaintext.startswith("ak_")
    from rest_framework.test import APIClient

    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Api-Key {plaintext}")
    assert api.get("/api/v1/characters").status_code == 200


def test_login_page_renders_for_anonymous_visitors(client):
    assert client.get("/admin/login/").status_code == 200
    assert client.get("/admin/").status_code == 302
