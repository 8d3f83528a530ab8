"""Health, OpenAPI schema, the error format and pagination."""

import pytest
import yaml
from openapi_spec_validator import validate
from rest_framework.test import APIClient

from characters.services import character_create

pytestmark = pytest.mark.django_db


def test_health_reports_postgres_and_pgvector_at_least_0_8():
    response = APIClient().get("/api/v1/health")
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
