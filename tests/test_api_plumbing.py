"""Health, OpenAPI schema, the error format and pagination."""

import json
import re
from pathlib import Path

import pytest
import yaml
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.staticfiles import finders
from openapi_spec_validator import validate
from rest_framework.test import APIClient

from alkemy.tenancy.models import Role
from alkemy.tenancy.services import api_key_create
from characters.services import character_create, reference_add
from tests import photos

pytestmark = pytest.mark.django_db


def assert_error(response, status: int, code: str | None = None) -> dict:
    """`response` is `status` with the error envelope (and `code`, when given); returns the error."""
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"code", "message", "details"}
    if code:
        assert error["code"] == code
    return error


def test_health_reports_postgres_and_pgvector_at_least_0_8(settings):
    settings.ALKEMY_OPERATOR_TOKEN = "operator-token"  # the details are for operators only
    response = APIClient(HTTP_AUTHORIZATION="Bearer operator-token").get("/api/v1/health")
    assert response.status_code == 200
    database = response.json()["database"]
    assert database["ok"] is True
    assert int(database["postgresql"].split(".")[0]) >= 16
    major, minor = (int(part) for part in database["pgvector"].split(".")[:2])
    assert (major, minor) >= (0, 8)
    assert response.json()["queue"]["broker"] == "orm"


def test_schema_is_valid_openapi_3():
    response = APIClient().get("/api/v1/schema")
    assert response.status_code == 200
    spec = yaml.safe_load(response.content)
    assert spec["openapi"].startswith("3.")
    validate(spec)
    for path in (
        "/api/v1/characters",
        "/api/v1/characters/{id}",
        "/api/v1/characters/{character_pk}/references",
        "/api/v1/search/faces",
        "/api/v1/generations",
        "/api/v1/generations/{id}/cancel",
        "/api/v1/webhooks",
        "/api/v1/characters/{character_pk}/loras",
        "/api/v1/tenant",
    ):
        assert path in spec["paths"], path
    assert spec["components"]["securitySchemes"]["ApiKeyAuth"] == {
        "type": "apiKey",
        "in": "header",
        "name": "Authorization",
        "description": spec["components"]["securitySchemes"]["ApiKeyAuth"]["description"],
    }
    assert spec["paths"]["/api/v1/generations/{id}"]["get"]["parameters"][0]["schema"]["type"] == "integer"


def test_swagger_ui_is_served():
    response = APIClient().get("/api/v1/docs")
    assert response.status_code == 200
    assert b"swagger" in response.content.lower()


def test_validation_error_names_the_field(api_a):
    response = api_a.post("/api/v1/characters", {"description": "no name"}, format="json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert error["details"]["field"] == "name"
    assert "name" in error["details"]["fields"]


def test_malformed_json_is_400(api_a):
    response = api_a.post("/api/v1/characters", "{not json", content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "malformed_request"


def test_unknown_endpoint_is_json_404(api_a):
    response = api_a.get("/api/v1/does-not-exist")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_non_numeric_id_is_404_not_500(api_a):
    assert api_a.get("/api/v1/characters/abc").status_code == 404


def test_duplicate_slug_is_409(api_a):
    assert api_a.post("/api/v1/characters", {"name": "Kai", "slug": "kai"}, format="json").status_code == 201
    response = api_a.post("/api/v1/characters", {"name": "Kai 2", "slug": "kai"}, format="json")
    assert response.status_code == 409
    assert response.json()["error"] == {
        "code": "slug_taken",
        "message": response.json()["error"]["message"],
        "details": {"field": "slug"},
    }


def test_list_is_paginated_filterable_and_searchable(studio_a, api_a):
    for i in range(7):
        character_create(tenant=studio_a.tenant, name=f"Extra {i}", tags=["crowd"] if i % 2 else ["hero"])
    character_create(tenant=studio_a.tenant, name="Nadia", description="a pilot with a scar")
    page = api_a.get("/api/v1/characters?page_size=3").json()
    assert page["count"] == 8 and len(page["results"]) == 3 and page["next"]
    assert api_a.get("/api/v1/characters?tag=crowd").json()["count"] == 3
    assert api_a.get("/api/v1/characters?tag=HERO").json()["count"] == 4
    assert [c["name"] for c in api_a.get("/api/v1/characters?search=pilot").json()["results"]] == ["Nadia"]
    names = [c["name"] for c in api_a.get("/api/v1/characters?ordering=-name&page_size=2").json()["results"]]
    assert names == ["Nadia", "Extra 6"]


def test_paging_through_characters_of_one_name_repeats_and_skips_none(studio_a, api_a):
    """Rows that tie on the ordering are ordered by id as well, so every page is stable."""
    ids = sorted(character_create(tenant=studio_a.tenant, name="Twin", slug=f"twin-{i}").pk for i in range(6))
    for ordering in ("", "&ordering=name", "&ordering=-name"):
        seen = [
            c["id"]
            for p in range(1, 7)
            for c in api_a.get(f"/api/v1/characters?page_size=1&page={p}{ordering}").json()["results"]
        ]
        assert seen == ids, ordering


def test_an_empty_choice_filter_is_refused_not_ignored(api_a):
    """`?method=` is none of the documented methods: 400 naming it, not every generation."""
    response = api_a.get("/api/v1/generations?method=&status=succeeded")
    assert response.status_code == 400 and response.json()["error"]["details"]["field"] == "method"
    assert api_a.get("/api/v1/generations?method=pulid_flux").status_code == 200


def test_create_generates_slug_and_normalises_tags(api_a):
    response = api_a.post(
        "/api/v1/characters", {"name": "Dr. Ada Ng", "tags": [" Lead ", "lead", "SciFi"]}, format="json"
    )
    assert response.status_code == 201
    body = response.json()
    assert body["slug"] == "dr-ada-ng"
    assert body["tags"] == ["lead", "scifi"]
    again = api_a.post("/api/v1/characters", {"name": "Dr. Ada Ng"}, format="json").json()
    assert again["slug"] == "dr-ada-ng-2"


# --- JSON only, whatever the client asks for (review item 12) ------------------------------------


@pytest.mark.parametrize(
    "request_kwargs",
    [{"path": "/api/v1/characters?format=api"}, {"path": "/api/v1/characters", "HTTP_ACCEPT": "text/html"}],
    ids=["format=api", "accept-html"],
)
def test_html_requests_get_the_json_list_not_a_500(studio_a, api_a, request_kwargs):
    character_create(tenant=studio_a.tenant, name="Kai")
    api_a.raise_request_exception = False
    response = api_a.get(**request_kwargs)
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert [c["name"] for c in response.json()["results"]] == ["Kai"]


def test_html_request_for_a_missing_object_gets_the_json_error(api_a):
    response = api_a.get("/api/v1/generations/999999", HTTP_ACCEPT="text/html")
    assert_error(response, 404, "generation_not_found")


def test_schema_is_still_served_as_yaml_or_json():
    assert APIClient().get("/api/v1/schema")["Content-Type"].startswith("application/vnd.oai.openapi")
    assert APIClient().get("/api/v1/schema?format=json")["Content-Type"].startswith("application/vnd.oai.openapi+json")


# --- searching by photo is a read (review item 13) -----------------------------------------------


def test_viewer_key_can_search_faces(studio_a, media_root):
    astronaut = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=astronaut, upload=photos.upload(photos.astronaut()))
    _, viewer_key = api_key_create(tenant=studio_a.tenant, name="viewer", role=Role.VIEWER)

    response = studio_a.client(viewer_key).post(
        "/api/v1/search/faces", {"image": photos.upload(photos.astronaut())}, format="multipart"
    )

    assert response.status_code == 200, response.content[:300]
    assert response.json()["results"][0]["character"]["name"] == "Eileen"


def test_viewer_key_still_cannot_write(studio_a):
    _, viewer_key = api_key_create(tenant=studio_a.tenant, name="viewer", role=Role.VIEWER)
    response = studio_a.client(viewer_key).post("/api/v1/characters", {"name": "X"}, format="json")
    assert_error(response, 403, "read_only_role")


# --- oversized bodies, pinned Swagger UI, health for operators (review item 20) ------------------


def test_oversized_json_body_is_413_in_the_error_format(api_a):
    body = json.dumps({"name": "x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1)})
    response = api_a.post("/api/v1/characters", body, content_type="application/json")
    error = assert_error(response, 413, "request_too_large")
    assert error["details"]["limit_bytes"] == settings.DATA_UPLOAD_MAX_MEMORY_SIZE


def test_oversized_multipart_form_is_413_in_the_error_format(api_a):
    response = api_a.post(
        "/api/v1/search/faces",
        {"image": photos.upload(photos.astronaut()), "limit": "1" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1)},
        format="multipart",
    )
    assert_error(response, 413, "request_too_large")


def test_docs_load_pinned_swagger_ui_from_our_static_files():
    page = APIClient().get("/api/v1/docs").content.decode()
    assert "cdn.jsdelivr.net" not in page and "@latest" not in page
    assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css|png))"', page)
    assert {Path(asset).name for asset in assets} >= {"swagger-ui-bundle.js", "swagger-ui.css"}
    for asset in assets:
        assert asset.startswith(settings.STATIC_URL) or asset.startswith("/" + settings.STATIC_URL), asset
        assert finders.find(asset.split(settings.STATIC_URL, 1)[1]), f"{asset} is not in our static files"


def test_public_health_answers_liveness_only(api_a):
    for client in (APIClient(), api_a):  # anonymous, and a tenant's API key: neither is an operator
        response = client.get("/api/v1/health")
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}


def test_superuser_session_sees_health_details():
    admin = get_user_model().objects.create_superuser("root", "root@example.com", "pw-root-123")
    client = APIClient()
    client.force_login(admin)
    body = client.get("/api/v1/health").json()
    assert body["database"]["ok"] is True and body["queue"]["broker"] == "orm"


def test_operator_token_sees_health_details_and_a_wrong_one_does_not(settings):
    settings.ALKEMY_OPERATOR_TOKEN = "op-token-for-tests"
    operator = APIClient(HTTP_AUTHORIZATION="Bearer op-token-for-tests").get("/api/v1/health").json()
    assert "database" in operator and "queue" in operator
    stranger = APIClient(HTTP_AUTHORIZATION="Bearer op-token-for-test").get("/api/v1/health").json()
    assert stranger == {"status": "ok"}
